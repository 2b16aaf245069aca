"""The fast engine gives the reference engine's knockout probabilities: fp32 within 1e-5, half precision within the
reference's own run-to-run agreement, on both of its paths (layer by layer, and through the bridge).

Every equivalence test also runs on CUDA when a GPU is present (``device`` parameter).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mm_lens.engines import _Stack, clean_pass, fast_engine, reference_engine
from mm_lens.inputs import prepare
from mm_lens.knockout import Edge as Block
from mm_lens.knockout import block_hooks
from mm_lens.knockout import parse_edge as parse_block
from mm_lens.model import load
from mm_lens.protocol import vocab_softmax
from mm_lens.sweep import layer_window

BLOCKS = ["Image->Question", "Question->Last", "Image->Last", "Last->Last", "True Option->Last"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
_LOADED: dict = {}


def _on(request, fixture: str, device: str, dtype: str | None = None):
    """The session's tiny model on `device` (CPU float32: the shared fixture; anything else loaded once here)."""
    if device == "cpu" and dtype is None:
        return request.getfixturevalue(fixture)
    key = (fixture, device, dtype)
    if key not in _LOADED:
        _LOADED[key] = load(str(request.getfixturevalue(fixture + "_path")), device=device, dtype=dtype or "float32")
    return _LOADED[key]


@pytest.fixture(params=[(name, device) for device in DEVICES for name in ("tiny_llava", "tiny_llava_next")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def model(request):
    name, device = request.param
    return _on(request, name, device)


def _inputs(model, make_image):
    inp = prepare(model, make_image(40, 28, seed=3), "Is the square red or blue?", spans={"True Option": "red"})
    blocks = [parse_block(b, extra_names=["True Option"]) for b in BLOCKS]
    return inp, blocks


def _windows(model, k):
    return [layer_window(layer, k, model.n_layers) for layer in range(model.n_layers)]


def test_llama_models_take_the_layer_path(tiny_llava, tiny_llava_next):
    assert _Stack.of(tiny_llava) is not None and _Stack.of(tiny_llava_next) is not None


@pytest.mark.parametrize("path", ["layers", "bridge"])
@pytest.mark.parametrize("k", [1, 3])
def test_fast_engine_equals_reference(model, make_image, k, path):
    inp, blocks = _inputs(model, make_image)
    windows = _windows(model, k)
    token = 7
    ref = reference_engine(model, inp, blocks, windows, token)
    fast = fast_engine(model, inp, blocks, windows, token, path=path)
    assert fast.shape == ref.shape == (len(blocks), model.n_layers)
    assert torch.allclose(fast, ref, atol=1e-5, rtol=0), (fast - ref).abs().max()
    # The comparison matters only if the knockouts really move the output.
    ids, kwargs = inp.forward_args()
    with torch.inference_mode():
        clean = model.bridge(ids, **kwargs)[0, -1].float().softmax(-1)[token].cpu()
    assert (ref[0] - clean).abs().max() > 1e-6


@pytest.mark.parametrize("heads", [[1], [0, 3]])
def test_fast_engine_equals_reference_in_some_heads(model, make_image, heads):
    inp, blocks = _inputs(model, make_image)
    windows = _windows(model, 2)
    ref = reference_engine(model, inp, blocks, windows, 7, heads=heads)
    fast = fast_engine(model, inp, blocks, windows, 7, heads=heads)
    assert torch.allclose(fast, ref, atol=1e-5, rtol=0), (fast - ref).abs().max()
    every_head = reference_engine(model, inp, blocks[:1], windows, 7)
    assert (every_head[0] - ref[0]).abs().max() > 1e-7  # knocking out some heads is not knocking out all


def _reference_in_a_batch_of_two(model, inp, blocks, windows, token):
    """The reference engine's numbers with the prompt run twice in one batch: its own run-to-run agreement."""
    ids, kwargs = inp.forward_args()
    kwargs = {k: v.expand(2, *v.shape[1:]) if torch.is_tensor(v) and v.shape[:1] == (1,) else v
              for k, v in kwargs.items()}
    out = torch.empty(len(blocks), len(windows))
    with torch.inference_mode():
        for b, block in enumerate(blocks):
            for w, layers in enumerate(windows):
                hooks = block_hooks(inp.regions, block, layers)
                logits = model.bridge.run_with_hooks(ids.expand(2, -1), fwd_hooks=hooks, **kwargs)
                out[b, w] = vocab_softmax(logits[1, -1], inp.vocab_size(model))[token]
    return out


@pytest.mark.parametrize("path", ["layers", "bridge"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("device", DEVICES)
def test_half_precision_agrees_within_the_references_run_to_run_agreement(request, make_image, dtype, device, path):
    model = _on(request, "tiny_llava", device, dtype)
    inp, blocks = _inputs(model, make_image)
    windows = _windows(model, 2)
    ref = reference_engine(model, inp, blocks, windows, 7)
    again = _reference_in_a_batch_of_two(model, inp, blocks, windows, 7)
    run_to_run = float((again - ref).abs().max())  # 0 on CPUs: the fast engine must give the very same numbers
    fast = fast_engine(model, inp, blocks, windows, 7, path=path)
    assert float((fast - ref).abs().max()) <= run_to_run, (fast - ref).abs().max()
    full = _on(request, "tiny_llava", device)  # half precision really is coarser than fp32 here
    assert float((reference_engine(full, _inputs(full, make_image)[0], blocks, windows, 7) - ref).abs().max()) > 1e-7


def test_grouped_query_attention(study_next_llama3, make_image):
    """Llama-3 shares each key/value head between query heads: the layer path folds them the same way."""
    model = study_next_llama3
    assert model.hf_model.config.text_config.num_key_value_heads < model.hf_model.config.text_config.num_attention_heads
    inp = prepare(model, make_image(40, 28, seed=3), "Is the square red or blue?", protocol="checkpoint")
    blocks = [parse_block(b) for b in ("Image->Question", "Last->Last")]
    windows = _windows(model, 2)[::2]
    ref = reference_engine(model, inp, blocks, windows, 7)
    fast = fast_engine(model, inp, blocks, windows, 7, path="layers")
    assert torch.allclose(fast, ref, atol=1e-5, rtol=0), (fast - ref).abs().max()


def test_fast_engine_batches_of_one_and_mid_sequence_targets(tiny_llava, make_image):
    """A tiny memory budget forces one row per batch; a target set starting mid-question still matches."""
    inp, _ = _inputs(tiny_llava, make_image)
    q = inp.regions.question
    mid = q[len(q) // 2:]
    image = inp.regions.image_positions

    class Regions:  # a custom region: the second half of the question
        @staticmethod
        def positions(name):
            return {"Mid": mid, "Image": image, "Nothing": []}[name]

    inp = dataclasses.replace(inp, regions=Regions())
    windows = _windows(tiny_llava, 2) + [range(0, 4, 2), range(1, 1)]  # a strided window, an empty one
    blocks = [Block("Image", "Mid"), Block("Nothing", "Mid")]
    ref = reference_engine(tiny_llava, inp, blocks, windows, 11)
    for path in ("layers", "bridge"):
        fast = fast_engine(tiny_llava, inp, blocks, windows, 11, memory_budget=1, path=path)
        assert torch.allclose(fast, ref, atol=1e-5, rtol=0), (path, (fast - ref).abs().max())
    assert torch.allclose(ref[1], ref[1, :1].expand(len(windows)))  # an empty source region changes nothing


def test_sweep_shares_the_greedy_answers_clean_pass(model, make_image):
    """The greedy answer's pass is the one the fast engine builds on; results still equal the reference."""
    from mm_lens.sweep import greedy_answer
    from mm_lens.sweep import layer_sweep as sweep

    inp, blocks = _inputs(model, make_image)
    greedy = greedy_answer(model, inp)
    assert greedy.clean is not None and greedy.clean.embeds.shape[1] == inp.input_ids.shape[1]
    assert len(greedy.clean.resid_pre) == model.n_layers
    fast = sweep(model, inp, blocks, window=2, engine="fast", greedy=greedy)
    ref = sweep(model, inp, blocks, window=2, engine="reference", greedy=greedy)
    assert torch.allclose(torch.tensor(fast["knockout_prob"].values), torch.tensor(ref["knockout_prob"].values),
                          atol=1e-5, rtol=0)
    # Decoding went on from the pass's cache; the prompt's keys/values the engine reuses are untouched.
    assert greedy.clean.keys_values[0][0].shape[2] == inp.input_ids.shape[1]


def test_clean_pass_keeps_each_layers_residual_stream(tiny_llava, make_image):
    inp, _ = _inputs(tiny_llava, make_image)
    clean = clean_pass(tiny_llava, inp)
    ids, kwargs = inp.forward_args()
    with torch.inference_mode():
        _, cache = tiny_llava.bridge.run_with_cache(ids, **kwargs)
    for layer in range(tiny_llava.n_layers):
        assert torch.equal(clean.resid_pre[layer], cache[f"blocks.{layer}.hook_resid_pre"])
    assert clean.embeds is clean.resid_pre[0]


def test_unknown_path_is_an_error(tiny_llava, make_image):
    from mm_lens.errors import MMLensError

    inp, blocks = _inputs(tiny_llava, make_image)
    with pytest.raises(MMLensError, match="path"):
        fast_engine(tiny_llava, inp, blocks, _windows(tiny_llava, 1), 7, path="fastest")


def test_layers_below_a_window_are_not_recomputed(tiny_llava, make_image):
    """The knockout hook points fire once per computed layer: a window at the top layer computes that layer alone."""
    inp, blocks = _inputs(tiny_llava, make_image)
    top = tiny_llava.n_layers - 1
    fired: dict[str, int] = {}

    def count(scores, hook):
        fired[hook.name] = fired.get(hook.name, 0) + 1

    points = [tiny_llava.bridge.blocks[layer].attn.hook_attn_scores for layer in range(tiny_llava.n_layers)]
    clean = clean_pass(tiny_llava, inp)
    for point in points:
        point.add_hook(count)
    try:
        fast_engine(tiny_llava, inp, blocks[:1], [range(top, top + 1)], 7, clean=clean, path="layers")
        assert fired == {f"blocks.{top}.attn.hook_attn_scores": 1}
        fired.clear()
        fast_engine(tiny_llava, inp, blocks[:1], [range(0, 1), range(1, 2)], 7, clean=clean, path="layers")
        assert fired == {f"blocks.{layer}.attn.hook_attn_scores": 1 for layer in range(tiny_llava.n_layers)}
    finally:
        for point in points:
            point.remove_hooks("fwd")
    assert not any(point.fwd_hooks for point in points)  # the engine's own hooks are gone too
