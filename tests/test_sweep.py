"""Layer windows, greedy answers and the reference layer sweep on the tiny random LLaVA."""

from __future__ import annotations

import pytest
import torch

from mm_lens.data.gqa import Sample, SampleSkip
from mm_lens.engines import get_engine
from mm_lens.errors import MMLensError
from mm_lens.inputs import prepare
from mm_lens.knockout import block_hooks
from mm_lens.sweep import FLOW_COLUMNS, greedy_answer, layer_window, normalize_answer
from mm_lens.sweep import flow_samples as sweep_samples
from mm_lens.sweep import layer_sweep as sweep

QUESTION = "What color is the ball ?"


# ------------------------------------------------------------------------------------------ windows


@pytest.mark.parametrize(
    "layer, k, n, expected",
    [
        (0, 9, 32, range(0, 5)),  # clipped at the bottom
        (3, 9, 32, range(0, 8)),
        (4, 9, 32, range(0, 9)),  # first full window
        (16, 9, 32, range(12, 21)),
        (31, 9, 32, range(27, 32)),  # clipped at the top
        (5, 4, 32, range(3, 7)),  # even k: k//2 below, k/2 above (layer included)
        (7, 1, 8, range(7, 8)),
        (0, 4, 4, range(0, 2)),
        (3, 4, 4, range(1, 4)),
        (2, 3, 4, range(1, 4)),
    ],
)
def test_layer_window(layer, k, n, expected):
    window = layer_window(layer, k, n)
    assert window == expected
    assert layer in window


@pytest.mark.parametrize("layer, k, n", [(0, 0, 4), (0, -1, 4), (0, 5, 4), (4, 1, 4), (-1, 1, 4)])
def test_layer_window_rejects_bad_arguments(layer, k, n):
    with pytest.raises(MMLensError, match="window|layer"):
        layer_window(layer, k, n)


# ------------------------------------------------------------------------------------------ answers


@pytest.mark.parametrize(
    "raw, expected",
    [(" Red.", "red"), ("Yes", "yes"), ("two dogs.\nAnd more", "two dogs"), ("\nred", ""), ("U.S.", "u.s")],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize("seed", [1, 2])
def test_greedy_answer_matches_hf_generate(tiny_llava, make_image, seed):
    inp = prepare(tiny_llava, make_image(seed=seed), QUESTION)
    greedy = greedy_answer(tiny_llava, inp, max_new_tokens=6)
    with torch.inference_mode():
        out = tiny_llava.hf_model.generate(
            inp.input_ids, **inp.model_kwargs(), max_new_tokens=6, do_sample=False
        )
        probs = tiny_llava.bridge(inp.input_ids, **inp.model_kwargs())[0, -1].softmax(-1)
    hf_tokens = out[0, inp.input_ids.shape[1] :].tolist()
    eos, newline = tiny_llava.tokenizer.eos_token_id, tiny_llava.tokenizer.convert_tokens_to_ids("\n")
    expected = hf_tokens[: hf_tokens.index(eos)] if eos in hf_tokens else hf_tokens
    expected = expected[: expected.index(newline) + 1] if newline in expected else expected  # stop at "\n"
    assert greedy.token_ids == expected
    assert greedy.first_token == hf_tokens[0] == int(probs.argmax())
    assert greedy.first_prob == pytest.approx(float(probs.max()), abs=1e-6)
    assert greedy.text == normalize_answer(tiny_llava.tokenizer.decode(expected, skip_special_tokens=True))


def test_greedy_answer_stops_at_newline(tiny_llava, make_image):
    inp = prepare(tiny_llava, make_image(seed=3), QUESTION)
    newline = tiny_llava.tokenizer.convert_tokens_to_ids("\n")
    red = tiny_llava.tokenizer.convert_tokens_to_ids("Red")
    calls = []

    def force(logits, hook):  # step 0 -> "Red", step 1 -> newline, later steps -> "Red" again
        step = len(calls)
        calls.append(step)
        logits[..., -1, :] = -1e4
        logits[..., -1, newline if step == 1 else red] = 1e4
        return logits

    greedy = greedy_answer(tiny_llava, inp, max_new_tokens=8, fwd_hooks=[("unembed.hook_out", force)])
    assert greedy.token_ids == [red, newline]
    assert greedy.text == "red"
    assert len(calls) == 2  # no forward after the newline


# ------------------------------------------------------------------------------------------ sweep


def test_reference_sweep_matches_manual_knockout(tiny_llava, make_image):
    inp = prepare(tiny_llava, make_image(seed=4), QUESTION)
    blocks = ["Image->Question", "Image->Last", "Last->Last", "Last->Image"]
    table = sweep(tiny_llava, inp, blocks, window=3, engine="reference", question_id="q1")
    n = tiny_llava.n_layers
    assert list(table.columns) == FLOW_COLUMNS
    assert len(table) == len(blocks) * n
    assert set(table["question_id"]) == {"q1"} and list(table["block"].unique()) == blocks
    with torch.inference_mode():
        probs = tiny_llava.bridge(inp.input_ids, **inp.model_kwargs())[0, -1].softmax(-1)
        token = int(probs.argmax())
        assert table["base_prob"].tolist() == pytest.approx([float(probs[token])] * len(table), abs=1e-7)
        for block, layer in [("Image->Last", 0), ("Image->Question", 3), ("Last->Last", 2)]:
            hooks = block_hooks(inp.regions, block, layer_window(layer, 3, n))
            # The last position's logits only, as the reference engine computes them (the same unembedding product,
            # so the same rounding; a full-sequence product rounds the last row differently, ~1e-7 relative).
            logits = tiny_llava.bridge.run_with_hooks(inp.input_ids, fwd_hooks=hooks, logits_to_keep=1,
                                                      **inp.model_kwargs())
            expected = float(logits[0, -1].softmax(-1)[token])
            row = table[(table.block == block) & (table.layer == layer)].iloc[0]
            assert row.knockout_prob == pytest.approx(expected, abs=1e-7)
            assert row.relative_change_pct == pytest.approx((expected - row.base_prob) / row.base_prob * 100)
    image_last = table[table.block == "Image->Last"]
    assert (image_last.relative_change_pct.abs() > 1e-3).all()  # the knockout does something...
    backwards = table[table.block == "Last->Image"]  # ...and blocking a causally invisible edge does nothing
    assert (backwards.knockout_prob == backwards.base_prob).all()


def test_sweep_rejects_bad_window_block_and_engine(tiny_llava, make_image):
    inp = prepare(tiny_llava, make_image(), QUESTION)
    with pytest.raises(MMLensError, match="window 9"):
        sweep(tiny_llava, inp, ["Image->Last"], window=9)
    with pytest.raises(MMLensError, match="Foo"):
        sweep(tiny_llava, inp, ["Foo->Last"], window=1)
    with pytest.raises(MMLensError, match="reference"):
        sweep(tiny_llava, inp, ["Image->Last"], window=1, engine="warp")
    assert get_engine("reference") is not None


def _sample(qid: str, answer: str, img_id: str = "img") -> Sample:
    return Sample(qid, img_id, QUESTION, answer, None, None, 32, 32, (), "test")


def test_sweep_samples_skips_and_counts_wrong_answers(tiny_llava, make_image):
    image = make_image(seed=5)
    right = greedy_answer(tiny_llava, prepare(tiny_llava, image, QUESTION)).text
    samples = [_sample("good", right.upper() + "."), _sample("bad", right + " nope"), _sample("gone", "x", "missing")]

    def load_image(sample):
        if sample.img_id == "missing":
            raise SampleSkip("image missing.jpg not found", "image not found")
        return image

    result = sweep_samples(tiny_llava, samples, load_image, ["Image->Last"], window=2, progress=False)
    assert result.n_samples == 3 and result.n_wrong == 1 and result.n_kept == 1
    assert [(s.question_id, s.kind) for s in result.skips] == [("bad", "wrong answer"), ("gone", "image not found")]
    assert set(result.table.question_id) == {"good"} and len(result.table) == tiny_llava.n_layers

    everything = sweep_samples(
        tiny_llava, samples, load_image, ["Image->Last"], window=2, all_samples=True, progress=False
    )
    assert everything.n_wrong == 0 and set(everything.table.question_id) == {"good", "bad"}
