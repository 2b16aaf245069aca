"""mm_lens.compat: each work-around shows the bug it fixes, and that it is fixed.

- TL 4.3 on transformers >= 5.24 never writes the KV cache (transformers passes it as ``cache=``): with the fix the
  clean pass keeps its keys and a cached continuation equals a full forward; without it (where the bug exists) the
  keys are ``None``.
- TL 4.3's boot runs ``pip install torchvision`` when ``AutoProcessor`` fails; mm-lens's boot never does.
"""

from __future__ import annotations

import subprocess

import pytest
import torch
import transformers

from mm_lens import compat
from mm_lens.engines import clean_pass
from mm_lens.inputs import prepare
from mm_lens.sweep import greedy_answer


@pytest.fixture(params=["tiny_llava", "tiny_llava_next"])
def model(request):
    return request.getfixturevalue(request.param)


def _inputs(model, make_image):
    return prepare(model, make_image(40, 28, seed=3), "Is the square red or blue?")


def _cached_vs_full(model, inp, clean, token):
    """Max |logit difference| of one cached step from `clean` against a full forward of prompt + token."""
    ids, kwargs = inp.forward_args(extra=[token])
    with torch.inference_mode():
        cached = model.bridge(ids[:, -1:], past_key_values=clean.cache)[0, -1]
        full = model.bridge(ids, **kwargs)[0, -1]
    return float((cached - full).abs().max())


def test_clean_pass_keeps_the_prompts_keys_and_a_cached_step_equals_a_full_forward(model, make_image):
    inp = _inputs(model, make_image)
    clean = clean_pass(model, inp)
    n_pos = inp.input_ids.shape[1]
    assert len(clean.keys_values) == model.n_layers
    for keys, values in clean.keys_values:
        assert keys is not None and values is not None
        assert keys.shape[2] == values.shape[2] == n_pos
    token = int(clean.last_logits.argmax())
    assert _cached_vs_full(model, inp, clean, token) < 1e-4


def test_bridge_generate_with_the_cache_equals_uncached_greedy_decoding(tiny_llava, make_image):
    """TL's cached ``generate`` against decoding by full forwards (mm-lens's plain greedy decoding).

    (TL 4.3's own uncached multimodal ``generate`` gives other tokens from the second on, on transformers 5.18 and
    5.25 alike; it is not the reference here.)
    """
    inp = _inputs(tiny_llava, make_image)
    ids, kwargs = inp.forward_args()
    plain = greedy_answer(tiny_llava, inp, max_new_tokens=4, cached=False).token_ids
    with torch.inference_mode():
        out = tiny_llava.bridge.generate(ids, max_new_tokens=len(plain), do_sample=False, use_past_kv_cache=True,
                                         verbose=False, return_type="tokens", stop_at_eos=False, **kwargs)
    assert out[0, ids.shape[1]:].tolist() == plain


@pytest.mark.skipif(not compat.transformers_names_cache_kwarg(),
                    reason=f"transformers {transformers.__version__} still passes past_key_values: no bug to show")
def test_without_the_fix_the_cache_stays_empty(tiny_llava, make_image, monkeypatch):
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    assert compat.kv_cache_fix_installed()  # mm-lens's load installed it
    monkeypatch.setattr(AttentionBridge, "_update_kv_cache", AttentionBridge._update_kv_cache.__wrapped__)
    assert not compat.kv_cache_fix_installed()
    clean = clean_pass(tiny_llava, _inputs(tiny_llava, make_image))
    assert all(keys is None for keys, _ in clean.keys_values)  # TL 4.3 on transformers >= 5.24: the bug


def test_the_fix_applies_only_where_transformers_renamed_the_argument():
    assert compat.install_kv_cache_fix() == compat.transformers_names_cache_kwarg()
    assert compat.kv_cache_fix_installed() == compat.transformers_names_cache_kwarg()
    assert compat.install_kv_cache_fix() == compat.kv_cache_fix_installed()  # idempotent


def _record_subprocesses(monkeypatch) -> list:
    calls: list = []

    def record(*args, **kwargs):
        calls.append(args[0] if args else kwargs.get("args"))
        return 0

    for name in ("check_call", "run", "call", "check_output"):
        monkeypatch.setattr(subprocess, name, record)
    return calls


def _failing_auto_processor(monkeypatch):
    def fail(*args, **kwargs):
        raise ImportError("this processor needs torchvision (simulated)")

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", fail)


def test_tl_boot_alone_would_pip_install_torchvision(tiny_llava_path, monkeypatch):
    """The hazard itself: TL's processor loader, unguarded, shells out to pip when AutoProcessor fails."""
    import importlib.util

    from transformer_lens.model_bridge.sources.transformers import helpers

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: TL has nothing to install")
    calls = _record_subprocesses(monkeypatch)
    _failing_auto_processor(monkeypatch)

    class Cfg:
        is_multimodal = True

    helpers.load_modality_processor(object(), Cfg(), str(tiny_llava_path), False, None)
    assert any("torchvision" in " ".join(map(str, call)) for call in calls), calls


def test_mm_lens_boot_never_installs_torchvision(tiny_llava_path, monkeypatch):
    calls = _record_subprocesses(monkeypatch)
    _failing_auto_processor(monkeypatch)
    bridge = compat.boot_bridge(str(tiny_llava_path), dtype=torch.float32)
    assert bridge is not None
    assert calls == []
