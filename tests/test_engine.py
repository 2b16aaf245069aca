"""The fast engine gives the reference engine's knockout probabilities (fp32, within 1e-5)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mm_lens.engines import fast_engine, reference_engine
from mm_lens.knockout import Edge as Block
from mm_lens.knockout import parse_edge as parse_block
from mm_lens.regions import prepare
from mm_lens.sweep import layer_window

BLOCKS = ["Image->Question", "Question->Last", "Image->Last", "Last->Last", "True Option->Last"]


@pytest.fixture(params=["tiny_llava", "tiny_llava_next"])
def model(request):
    return request.getfixturevalue(request.param)


def _inputs(model, make_image):
    inp = prepare(model, make_image(40, 28, seed=3), "Is the square red or blue?", spans={"True Option": "red"})
    blocks = [parse_block(b, extra_names=["True Option"]) for b in BLOCKS]
    return inp, blocks


@pytest.mark.parametrize("k", [1, 3])
def test_fast_engine_equals_reference(model, make_image, k):
    inp, blocks = _inputs(model, make_image)
    windows = [layer_window(layer, k, model.n_layers) for layer in range(model.n_layers)]
    token = 7
    ref = reference_engine(model, inp, blocks, windows, token)
    fast = fast_engine(model, inp, blocks, windows, token)
    assert fast.shape == ref.shape == (len(blocks), model.n_layers)
    assert torch.allclose(fast, ref, atol=1e-5, rtol=0), (fast - ref).abs().max()
    # The comparison matters only if the knockouts really move the output.
    ids, kwargs = inp.forward_args()
    with torch.inference_mode():
        clean = model.bridge(ids, **kwargs)[0, -1].softmax(-1)[token]
    assert (ref[0] - clean).abs().max() > 1e-6


def test_fast_engine_batches_of_one_and_mid_sequence_targets(tiny_llava, make_image):
    """A tiny memory budget forces one window per batch; a target set starting mid-question still matches."""
    inp, _ = _inputs(tiny_llava, make_image)
    q = inp.regions.question
    mid = q[len(q) // 2:]
    image = inp.regions.image_positions

    class Regions:  # a custom region: the second half of the question
        @staticmethod
        def positions(name):
            return {"Mid": mid, "Image": image}[name]

    inp = dataclasses.replace(inp, regions=Regions())
    windows = [layer_window(layer, 2, tiny_llava.n_layers) for layer in range(tiny_llava.n_layers)]
    blocks = [Block("Image", "Mid")]
    ref = reference_engine(tiny_llava, inp, blocks, windows, 11)
    fast = fast_engine(tiny_llava, inp, blocks, windows, 11, memory_budget=1)
    assert torch.allclose(fast, ref, atol=1e-5, rtol=0)


def test_sweep_shares_the_greedy_answers_clean_pass(model, make_image):
    """The greedy answer's pass is the one the fast engine builds on; results still equal the reference."""
    from mm_lens.sweep import greedy_answer
    from mm_lens.sweep import layer_sweep as sweep

    inp, blocks = _inputs(model, make_image)
    greedy = greedy_answer(model, inp)
    assert greedy.clean is not None and greedy.clean.embeds.shape[1] == inp.input_ids.shape[1]
    fast = sweep(model, inp, blocks, window=2, engine="fast", greedy=greedy)
    ref = sweep(model, inp, blocks, window=2, engine="reference", greedy=greedy)
    assert torch.allclose(torch.tensor(fast["knockout_prob"].values), torch.tensor(ref["knockout_prob"].values),
                          atol=1e-5, rtol=0)
    # Decoding went on from the pass's cache; the prompt's keys/values the engine reuses are untouched.
    assert greedy.clean.keys_values[0][0].shape[2] == inp.input_ids.shape[1]
