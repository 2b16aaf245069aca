"""Activation patching with images on the tiny random LLaVA models, checked against plain transformers."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from mm_lens.data.gqa import Sample, SampleSkip
from mm_lens.errors import MMLensError
from mm_lens.inputs import prepare
from mm_lens.patching import (
    LAYOUT_MISMATCH,
    PATCHING_COLUMNS,
    counterfactual_pairs,
    layout_difference,
    patching_sample,
    patching_sweep,
    swap_options,
)

QUESTION = "Is the ball red or blue ?"


def _sample(qid, img_id, answer, question=QUESTION, true="red", false="blue", task="ChooseAttr"):
    return Sample(
        question_id=qid,
        img_id=img_id,
        question=question,
        answer=answer,
        true_option=true,
        false_option=false,
        image_w=None,
        image_h=None,
        boxes=(),
        task=task,
    )


@pytest.fixture(scope="module")
def llava_pair(tiny_llava, make_image):
    clean = prepare(tiny_llava, make_image(seed=1), QUESTION)
    corrupt = prepare(tiny_llava, make_image(seed=2), QUESTION)
    return clean, corrupt


def test_patching_nothing_gives_the_corrupted_run(tiny_llava, llava_pair):
    clean, corrupt = llava_pair
    table = patching_sweep(tiny_llava, clean, corrupt, [])
    assert list(table.columns) == ["layer", "prob", "clean_prob", "corrupt_prob", "restoration"]
    assert table.layer.tolist() == list(range(tiny_llava.n_layers))
    assert table.clean_prob.iloc[0] != pytest.approx(table.corrupt_prob.iloc[0], rel=1e-3)  # a real corruption
    torch.testing.assert_close(
        torch.tensor(table.prob.to_numpy()), torch.tensor(table.corrupt_prob.to_numpy()), rtol=1e-5, atol=1e-7
    )
    assert table.restoration.abs().max() < 1e-4


@pytest.mark.parametrize("site,layer", [("resid_pre", 0), ("resid_pre", 2), ("resid_mid", 1), ("resid_post", 3)])
def test_patching_every_position_of_the_stream_gives_the_clean_run(tiny_llava, llava_pair, site, layer):
    clean, corrupt = llava_pair
    everything = list(range(clean.regions.seq_len))
    table = patching_sweep(tiny_llava, clean, corrupt, everything, site=site, layers=[layer])
    assert len(table) == 1
    assert table.prob.iloc[0] == pytest.approx(table.clean_prob.iloc[0], rel=1e-5)
    assert table.restoration.iloc[0] == pytest.approx(1.0, abs=1e-4)


def test_tracked_token_is_the_clean_greedy_answer(tiny_llava, llava_pair):
    clean, corrupt = llava_pair
    with torch.inference_mode():
        probs = tiny_llava.bridge(clean.input_ids, **clean.model_kwargs())[0, -1].float().softmax(-1)
    table = patching_sweep(tiny_llava, clean, corrupt, "Image", layers=[1])
    assert table.attrs["token"] == int(probs.argmax())
    assert table.clean_prob.iloc[0] == pytest.approx(float(probs.max()), rel=1e-5)
    other = int(probs.argsort()[-2])
    table2 = patching_sweep(tiny_llava, clean, corrupt, "Image", layers=[1], token=other)
    assert table2.clean_prob.iloc[0] == pytest.approx(float(probs[other]), rel=1e-5)
    by_text = patching_sweep(tiny_llava, clean, corrupt, "Image", layers=[1], token="red")
    assert by_text.attrs["token"] == tiny_llava.tokenizer.convert_tokens_to_ids("red")


@pytest.mark.parametrize("which", ["tiny_llava", "tiny_llava_next"])
def test_matches_a_forward_pre_hook_on_plain_transformers(which, request, make_image):
    """The same patch as a torch forward pre-hook on the HF decoder layer of a separately loaded HF model."""
    import transformers as tf

    model = request.getfixturevalue(which)
    path = request.getfixturevalue(f"{which}_path")
    clean = prepare(model, make_image(48, 32, seed=3), QUESTION)
    corrupt = prepare(model, make_image(48, 32, seed=4), QUESTION)
    positions = clean.regions.positions("Image")
    table = patching_sweep(model, clean, corrupt, "Image", batch_size=3)

    hf = tf.AutoModelForImageTextToText.from_pretrained(path).eval()
    layers = hf.model.language_model.layers
    with torch.inference_mode():
        clean_out = hf(input_ids=clean.input_ids, output_hidden_states=True, **clean.model_kwargs())
        hidden = clean_out.hidden_states  # hidden[l] enters decoder layer l
        token = int(clean_out.logits[0, -1].argmax())
        corrupt_prob = float(hf(input_ids=corrupt.input_ids, **corrupt.model_kwargs()).logits[0, -1].softmax(-1)[token])
        expected = []
        for layer in range(model.n_layers):

            def pre_hook(module, args, kwargs, layer=layer):
                key = "hidden_states" if "hidden_states" in kwargs else None
                states = (kwargs[key] if key else args[0]).clone()
                states[0, positions] = hidden[layer][0, positions]
                if key:
                    return args, {**kwargs, key: states}
                return (states, *args[1:]), kwargs

            handle = layers[layer].register_forward_pre_hook(pre_hook, with_kwargs=True)
            try:
                logits = hf(input_ids=corrupt.input_ids, **corrupt.model_kwargs()).logits
            finally:
                handle.remove()
            expected.append(float(logits[0, -1].softmax(-1)[token]))
    assert table.attrs["token"] == token
    assert table.clean_prob.iloc[0] == pytest.approx(float(clean_out.logits[0, -1].softmax(-1)[token]), rel=1e-5)
    assert table.corrupt_prob.iloc[0] == pytest.approx(corrupt_prob, rel=1e-5)
    for got, want in zip(table.prob, expected, strict=True):
        assert got == pytest.approx(want, rel=1e-5)
    assert max(abs(p - corrupt_prob) for p in expected) > 1e-4  # the patch mattered


def test_batched_and_single_runs_agree(tiny_llava, llava_pair):
    clean, corrupt = llava_pair
    one = patching_sweep(tiny_llava, clean, corrupt, "Question", site="attn_out", batch_size=1)
    many = patching_sweep(tiny_llava, clean, corrupt, "Question", site="attn_out", batch_size=4)
    pd.testing.assert_frame_equal(one, many, rtol=1e-5, atol=1e-6)


def test_per_position_rows(tiny_llava, llava_pair):
    clean, corrupt = llava_pair
    positions = clean.regions.positions("Image")[:3]
    table = patching_sweep(tiny_llava, clean, corrupt, positions, site="mlp_out", layers=[0, 2], per_position=True)
    assert list(table.columns) == ["layer", "position", "prob", "clean_prob", "corrupt_prob", "restoration"]
    assert len(table) == 2 * 3
    assert table[["layer", "position"]].values.tolist() == [[layer, p] for layer in (0, 2) for p in positions]
    single = patching_sweep(tiny_llava, clean, corrupt, [positions[1]], site="mlp_out", layers=[2])
    row = table[(table.layer == 2) & (table.position == positions[1])].iloc[0]
    assert row.prob == pytest.approx(single.prob.iloc[0], rel=1e-5)


def test_restoration_is_nan_when_clean_equals_corrupt(tiny_llava, llava_pair):
    clean, _ = llava_pair
    table = patching_sweep(tiny_llava, clean, clean, "Image", layers=[0, 1])
    assert table.restoration.isna().all()
    assert table.prob.tolist() == pytest.approx(table.clean_prob.tolist(), rel=1e-5)


def test_layouts_that_differ_are_refused(tiny_llava, tiny_llava_next, make_image):
    clean = prepare(tiny_llava, make_image(seed=1), QUESTION)
    longer = prepare(tiny_llava, make_image(seed=1), "Is the small ball red or blue ?")
    with pytest.raises(MMLensError, match="differ in layout") as err:
        patching_sweep(tiny_llava, clean, longer, "Image")
    message = str(err.value)
    assert "\n" not in message and "sequence length" in message and "same length" in message
    # LLaVA-NeXT: another image size gives another tile grid
    wide = prepare(tiny_llava_next, make_image(64, 32, seed=1), QUESTION)
    tall = prepare(tiny_llava_next, make_image(32, 64, seed=1), QUESTION)
    assert layout_difference(wide, tall) is not None
    with pytest.raises(MMLensError, match="differ in layout"):
        patching_sweep(tiny_llava_next, wide, tall, "Image")
    with pytest.raises(MMLensError, match="site"):
        patching_sweep(tiny_llava, clean, clean, "Image", site="resid_middle")
    with pytest.raises(MMLensError, match="outside"):
        patching_sweep(tiny_llava, clean, clean, "Image", layers=[99])
    with pytest.raises(MMLensError, match="unknown region"):
        patching_sweep(tiny_llava, clean, clean, "Sky")


def test_swap_options():
    assert swap_options("Is the ball red or blue ?", "red", "blue") == "Is the ball blue or red ?"
    assert swap_options("Red or blue: which is the ball ?", "red", "blue") == "Blue or red: which is the ball ?"
    assert swap_options("Is the bluebird blue or red ?", "blue", "red") == "Is the bluebird red or blue ?"
    with pytest.raises(SampleSkip, match="not a word"):
        swap_options("Is the ball red ?", "red", "blue")
    with pytest.raises(SampleSkip):
        swap_options("Is the ball red ?", "red", "")


def test_image_pairs_prefer_the_same_question():
    samples = [
        _sample("q1", "i1", "red"),
        _sample("q2", "i2", "red"),  # same answer: no counterfactual for q1
        _sample("q3", "i3", "blue", question="Is the box red or blue ?"),
        _sample("q4", "i4", "blue"),  # same question, other answer: preferred for q1
        _sample("q5", "i5", "yes", question="Is there a ball ?", true=None, false=None, task="LogicalObj"),
    ]
    pairs = counterfactual_pairs(samples, mode="image")
    by_id = {p.sample.question_id: p for p in pairs}
    assert by_id["q1"].corrupt_img_id == "i4" and by_id["q1"].corrupt_question == QUESTION
    assert by_id["q1"].partner_id == "q4" and by_id["q1"].mode == "image"
    assert by_id["q3"].corrupt_img_id == "i1"  # same options, first in order
    assert by_id["q3"].corrupt_question == "Is the box red or blue ?"  # the clean question on the other image
    assert [s.question_id for s in pairs.skips] == ["q5"]
    assert pairs.skips[0].kind == "no counterfactual"
    with pytest.raises(MMLensError, match="pair mode"):
        counterfactual_pairs(samples, mode="question")


def test_options_pairs_keep_the_layout(tiny_llava, make_image):
    samples = [
        _sample("q1", "i1", "red"),
        _sample("q2", "i2", "red", question="Is the ball red or dark blue ?", false="dark blue"),
        _sample("q3", "i3", "red", question="Is the ball red ?", false="blue"),
    ]
    pairs = counterfactual_pairs(samples, mode="options", tokenizer=tiny_llava.tokenizer)
    assert [p.sample.question_id for p in pairs] == ["q1"]
    assert pairs.pairs[0].corrupt_question == "Is the ball blue or red ?"
    assert pairs.pairs[0].corrupt_img_id == "i1"
    assert {s.question_id: s.kind for s in pairs.skips} == {"q2": LAYOUT_MISMATCH, "q3": "options not in question"}

    image = make_image(seed=5)
    clean = prepare(tiny_llava, image, samples[0].question)
    corrupt = prepare(tiny_llava, image, pairs.pairs[0].corrupt_question)
    assert layout_difference(clean, corrupt) is None
    assert not torch.equal(clean.input_ids, corrupt.input_ids)

    table = patching_sample(tiny_llava, pairs.pairs[0], lambda s: image, "True Option", site="resid_post")
    assert list(table.columns) == PATCHING_COLUMNS
    assert len(table) == tiny_llava.n_layers
    assert set(table.question_id) == {"q1"} and set(table.region) == {"True Option"}
    assert set(table.site) == {"resid_post"}
    assert table.corrupt_prob.iloc[0] == pytest.approx(
        float(_last_softmax(tiny_llava, corrupt)[table.attrs["token"]]), rel=1e-5
    )

    # without a tokenizer the pair is built, and patching_sample skips it for its layout
    unchecked = counterfactual_pairs(samples[1:2], mode="options")
    with pytest.raises(SampleSkip) as skip:
        patching_sample(tiny_llava, unchecked.pairs[0], lambda s: image, "Image")
    assert skip.value.kind == LAYOUT_MISMATCH and skip.value.question_id == "q2"


def test_patching_sample_with_another_image(tiny_llava, make_image):
    images = {"i1": make_image(seed=1), "i2": make_image(seed=2)}
    samples = [_sample("q1", "i1", "red"), _sample("q2", "i2", "blue")]
    pair = counterfactual_pairs(samples, mode="image").pairs[0]
    table = patching_sample(tiny_llava, pair, lambda s: images[s.img_id], "Image", layers=[0, 1], per_position=False)
    direct = patching_sweep(
        tiny_llava,
        prepare(tiny_llava, images["i1"], QUESTION),
        prepare(tiny_llava, images["i2"], QUESTION),
        "Image",
        layers=[0, 1],
    )
    assert table.prob.tolist() == pytest.approx(direct.prob.tolist(), rel=1e-5)
    per_pos = patching_sample(tiny_llava, pair, lambda s: images[s.img_id], "Last", layers=[3], per_position=True)
    assert list(per_pos.columns) == [*PATCHING_COLUMNS[:4], "position", *PATCHING_COLUMNS[4:]]
    assert not math.isnan(per_pos.restoration.iloc[0])


def _last_softmax(model, inp):
    with torch.inference_mode():
        return model.bridge(inp.input_ids, **inp.model_kwargs())[0, -1].float().softmax(-1)
