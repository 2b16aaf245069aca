"""The attention-interface route (`mm_lens.routes`): without it, TL's Qwen2.5-VL and GLM-4V adapters (and mm-lens's
Qwen2-VL subclass of the first, `compat.qwen2_vl_adapter`) fire the score hook after HF's native attention
(post-softmax weights, edits discarded) and mm-lens refuses the model at load; with it, the score hook is
pre-softmax and an edit reaches the pattern."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from test_family_glm4v import build as build_glm4v
from test_family_qwen_vl import build as build_qwen


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl", "glm4v"])
def native_path(request, tmp_path_factory):
    """A tiny checkpoint of each native-attention adapter family (Qwen3-VL's adapter is Qwen2.5-VL's kind)."""
    out = tmp_path_factory.mktemp("routes")
    return build_glm4v(out) if request.param == "glm4v" else build_qwen(request.param, out)


def _load_without_route(path, monkeypatch, check=True):
    import mm_lens.model as mm
    from mm_lens.families import family_of
    from mm_lens.families.base import TL_SCORES

    monkeypatch.setattr(mm, "family_of", lambda t, n="": dataclasses.replace(family_of(t, n), route=TL_SCORES))
    if not check:
        monkeypatch.setattr(mm, "check_live", lambda model: 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mm.load(str(path))


def test_without_route_tl_score_hook_is_post_softmax_and_edits_are_discarded(native_path, monkeypatch):
    """Noticed the day TL computes these adapters' attention itself (then the route may go)."""
    model = _load_without_route(native_path, monkeypatch, check=False)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    seen = {}

    def scores(x, hook):
        seen["scores"] = x.detach().clone()
        return torch.zeros_like(x)  # an edit TL discards

    def pattern(x, hook):
        seen["pattern"] = x.detach().clone()
        return x

    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clean = model.bridge(ids)
        edited = model.bridge.run_with_hooks(ids, fwd_hooks=[("blocks.0.attn.hook_attn_scores", scores),
                                                             ("blocks.0.attn.hook_pattern", pattern)])
    s = seen["scores"][0]
    assert torch.allclose(s.sum(-1), torch.ones_like(s.sum(-1)), atol=1e-5)  # rows of weights, not scores
    assert torch.allclose(clean, edited)


def test_without_route_check_live_refuses(native_path, monkeypatch):
    from mm_lens.errors import MMLensError

    with pytest.raises(MMLensError, match="knockout is not live"):
        _load_without_route(native_path, monkeypatch)


def test_with_route_score_hook_is_pre_softmax(native_path):
    from mm_lens.model import load

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load(str(native_path))
    seen = {}

    def grab(x, hook):
        seen[hook.name] = x.detach().clone()
        return x

    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.inference_mode():
        model.bridge.run_with_hooks(ids, fwd_hooks=[("blocks.1.attn.hook_attn_scores", grab),
                                                    ("blocks.1.attn.hook_pattern", grab)])
    scores, pattern = seen["blocks.1.attn.hook_attn_scores"], seen["blocks.1.attn.hook_pattern"]
    assert scores.shape == pattern.shape == (1, 4, 6, 6)
    assert torch.allclose(scores.float().softmax(-1), pattern, atol=1e-6)
    assert model.self_checks["knockout_live"] > 0
