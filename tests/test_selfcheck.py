"""mm_lens.selfcheck: the cache and the fast engine are checked on a model's first sweep; a broken one stops the run.

The breakages are simulated: TL's attention bridge made to ignore the cache (what transformers 5.24 did to TL 4.3),
and a fast engine whose logits are perturbed.
"""

from __future__ import annotations

import pytest
import torch

from mm_lens import selfcheck
from mm_lens.engines import clean_pass
from mm_lens.errors import MMLensError, SetupError
from mm_lens.inputs import prepare
from mm_lens.model import load
from mm_lens.sweep import greedy_answer, layer_sweep


@pytest.fixture
def fresh(tiny_llava_path):
    """A model loaded for this test alone (the self-checks are kept on the model)."""
    return load(str(tiny_llava_path))


def _inputs(model, make_image):
    return prepare(model, make_image(40, 28, seed=3), "Is the square red or blue?")


@pytest.fixture
def ignore_cache(monkeypatch):
    """TL's attention bridge neither writes nor reads the KV cache: the transformers 5.24 + TL 4.3 bug."""
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    original = AttentionBridge._update_kv_cache

    def forgetful(self, k, v, **kwargs):
        for name in ("past_key_values", "cache", "layer_past"):
            kwargs.pop(name, None)
        return original(self, k, v, **kwargs)

    monkeypatch.setattr(AttentionBridge, "_update_kv_cache", forgetful)


def test_a_healthy_model_passes_both_checks_once(fresh, make_image):
    inp = _inputs(fresh, make_image)
    layer_sweep(fresh, inp, ["Image->Question", "Question->Last"])
    assert set(fresh.self_checks) == {"knockout_live", "cache", "engine"}  # the first proved at load
    assert fresh.self_checks["cache"] <= selfcheck.TOLERANCE["full"]["cache"]
    assert fresh.self_checks["engine"] <= selfcheck.TOLERANCE["full"]["engine"]
    calls = []
    original = selfcheck.check_engine
    try:
        selfcheck.check_engine = lambda *a: calls.append(a) or 0.0
        layer_sweep(fresh, inp, ["Image->Question"])
    finally:
        selfcheck.check_engine = original
    assert calls == []  # once per model


def test_a_cache_that_is_never_written_stops_the_sweep(fresh, make_image, ignore_cache):
    inp = _inputs(fresh, make_image)
    with pytest.raises(SetupError) as err:
        layer_sweep(fresh, inp, ["Image->Question"])
    message = str(err.value)
    assert "no keys" in message and "--engine reference" in message
    assert "transformers " in message and "transformer_lens " in message


def test_a_cache_that_is_written_but_not_read_is_caught(fresh, make_image, monkeypatch):
    inp = _inputs(fresh, make_image)
    clean = clean_pass(fresh, inp)  # keys present
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    original = AttentionBridge._update_kv_cache
    monkeypatch.setattr(AttentionBridge, "_update_kv_cache",
                        lambda self, k, v, **kw: original(self, k, v, **{n: x for n, x in kw.items()
                                                                           if n not in ("past_key_values", "cache")}))
    with pytest.raises(SetupError, match="cached decoding step differs"):
        selfcheck.check_cache(fresh, inp, clean, int(clean.last_logits.argmax()))


def test_greedy_decoding_checks_its_cache(fresh, make_image, ignore_cache):
    with pytest.raises(SetupError, match="KV cache"):
        greedy_answer(fresh, _inputs(fresh, make_image))


def test_the_reference_engine_decodes_without_the_cache_and_gives_the_same_answer(tiny_llava, make_image):
    inp = _inputs(tiny_llava, make_image)
    cached = greedy_answer(tiny_llava, inp, max_new_tokens=5)
    plain = greedy_answer(tiny_llava, inp, max_new_tokens=5, cached=False)
    assert plain.token_ids == cached.token_ids and plain.text == cached.text


def test_the_reference_engine_still_runs_where_the_cache_is_broken(fresh, make_image, ignore_cache):
    inp = _inputs(fresh, make_image)
    greedy = greedy_answer(fresh, inp, max_new_tokens=3, cached=False)
    table = layer_sweep(fresh, inp, ["Image->Question"], window=2, engine="reference", greedy=greedy)
    assert len(table) == fresh.n_layers and "engine" not in fresh.self_checks


def test_a_fast_engine_that_drifts_is_caught(fresh, make_image, monkeypatch):
    import mm_lens.engines as engines

    original = engines._run_stack
    monkeypatch.setattr(engines, "_run_stack", lambda *a: original(*a) * 1.01)
    with pytest.raises(SetupError, match="fast engine differs from the reference engine"):
        layer_sweep(fresh, _inputs(fresh, make_image), ["Image->Question", "Question->Last"])


def test_setup_errors_are_mm_lens_errors():
    assert issubclass(SetupError, MMLensError)


def test_the_checks_cost_one_reference_forward_and_one_step(fresh, make_image):
    """What the self-check adds to a model's first sweep: counted in bridge calls, not timed."""
    inp = _inputs(fresh, make_image)
    calls = []
    bridge_forward = type(fresh.bridge).forward

    def counting(self, *args, **kwargs):
        calls.append(1)
        return bridge_forward(self, *args, **kwargs)

    type(fresh.bridge).forward = counting
    try:
        layer_sweep(fresh, inp, ["Image->Question"], window=2)
        first = len(calls)
        calls.clear()
        layer_sweep(fresh, inp, ["Image->Question"], window=2)
        again = len(calls)
    finally:
        type(fresh.bridge).forward = bridge_forward
    # cache: a cached step + a full forward; engine: one reference forward (the fast engine's row runs layer by layer)
    assert first - again == 3
    assert torch.is_tensor(inp.input_ids)
