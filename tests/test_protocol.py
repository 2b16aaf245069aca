"""The protocol object: resolution per checkpoint, its defaults, and how it reaches prepare, sweep, lens and runs.

Token-for-token agreement with the study's pipeline lives in ``test_study_protocol.py``; this file tests the
choices themselves on the tiny checkpoints (the study's real tokenizers, and the word-level test tokenizer).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from mm_lens.cli import main
from mm_lens.errors import MMLensError
from mm_lens.inputs import prepare
from mm_lens.lens import answer_forms, answer_lens, layer_probs
from mm_lens.model import protocol_for_checkpoint, resolve_protocol
from mm_lens.protocol import CHECKPOINT, LLAVA_LLAMA_3, STUDY, VICUNA_V1
from mm_lens.sweep import greedy_answer
from mm_lens.sweep import layer_sweep as sweep

QUESTION = "Is the car red or blue?"
SPANS = {"True Option": "red", "False Option": "blue", "Central Object": "car"}


def test_auto_resolves_study_for_the_study_families_and_checkpoint_otherwise(
    study_llava15, study_next_vicuna, study_next_llama3, tiny_llava, tiny_llava_next
):
    assert resolve_protocol("auto", study_llava15).conversation is VICUNA_V1
    assert resolve_protocol("auto", study_next_vicuna).conversation is VICUNA_V1
    assert resolve_protocol("auto", study_next_llama3).conversation is LLAVA_LLAMA_3
    for model in (study_llava15, study_next_llama3):
        assert resolve_protocol(None, model).name == "study"
        assert resolve_protocol("checkpoint", model) is CHECKPOINT
    for model in (tiny_llava, tiny_llava_next):  # a word-level vocabulary and a 32 px tower: not the study's
        assert resolve_protocol("auto", model) is CHECKPOINT
        with pytest.raises(MMLensError, match="not one of the study's model families"):
            resolve_protocol("study", model)
    with pytest.raises(MMLensError, match="protocol 'paper' is not known"):
        resolve_protocol("paper", tiny_llava)


def test_resolution_from_files_matches_the_loaded_model(study_llava15_path, study_next_llama3_path, tiny_llava_path):
    assert protocol_for_checkpoint("auto", str(study_llava15_path)).conversation is VICUNA_V1
    assert protocol_for_checkpoint("auto", str(study_next_llama3_path)).conversation is LLAVA_LLAMA_3
    assert protocol_for_checkpoint("auto", str(tiny_llava_path)) is CHECKPOINT
    with pytest.raises(MMLensError, match="use --protocol checkpoint"):
        protocol_for_checkpoint("study", str(tiny_llava_path))


@pytest.mark.parametrize("n_layers, study, checkpoint", [(32, 7, 9), (40, 9, 9), (4, 1, 2), (8, 2, 4), (2, 1, 1)])
def test_default_windows(n_layers, study, checkpoint):
    assert STUDY.window(n_layers) == study
    assert CHECKPOINT.window(n_layers) == checkpoint


@pytest.mark.parametrize("n_layers", range(1, 49))
def test_no_default_window_covers_the_whole_model(n_layers):
    """A window over every layer makes each curve one smeared value (the toy's 8 layers once got 8)."""
    for protocol in (STUDY, CHECKPOINT):
        k = protocol.window(n_layers)
        assert 1 <= k <= max(1, n_layers // 2)


def test_precision_defaults():
    assert STUDY.dtype("cuda:0") == torch.float16 and STUDY.dtype("cpu") == torch.float32
    assert CHECKPOINT.dtype("cuda") == torch.float32


def test_answer_rules():
    # The study compares the whole decoded answer: no first-line cut, no dropped final period.
    assert STUDY.answer.normalise("  Red.\n") == "red."
    assert STUDY.answer.normalise("\nred") == "red"
    assert STUDY.answer.gold("red.") == "red."
    assert CHECKPOINT.answer.normalise(" Red.\nmore") == "red"
    assert CHECKPOINT.answer.gold("Red.") == "red"


def test_study_prompts():
    assert VICUNA_V1.prompt("Q? \nI.") == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nQ? \nI. ASSISTANT:"
    )
    llama3 = LLAVA_LLAMA_3.prompt("Q? \nI.")
    assert llama3.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful")
    assert llama3.endswith("<|start_header_id|>user<|end_header_id|>\n\n<image>\nQ? \nI.<|eot_id|>"
                           "<|start_header_id|>assistant<|end_header_id|>\n\n \n")


def test_prepare_records_its_protocol_and_the_checkpoint_protocol_is_unchanged(tiny_llava, make_image):
    image = make_image(40, 32, seed=1)
    auto = prepare(tiny_llava, image, "What color is the ball ?")
    explicit = prepare(tiny_llava, image, "What color is the ball ?", protocol="checkpoint")
    assert auto.protocol is CHECKPOINT and explicit.protocol is CHECKPOINT
    assert torch.equal(auto.input_ids, explicit.input_ids)
    assert auto.vocab_size(tiny_llava) is None


def test_study_prepare_on_llava15(study_llava15, make_image):
    inp = prepare(study_llava15, make_image(500, 375, seed=2), QUESTION, spans=SPANS, protocol="study")
    ids = inp.input_ids[0].tolist()
    image_id = study_llava15.config.image_token_id
    first = ids.index(image_id)
    assert ids.count(image_id) == 576 and ids[first: first + 576] == [image_id] * 576
    assert ids[0] == 1 and ids.count(1) == 1  # one BOS: the second chunk's is dropped
    assert ids[first + 576: first + 578] == [29871, 13]  # the "▁" piece, then "\n"
    assert inp.prompt.startswith(VICUNA_V1.system)
    tok = study_llava15.tokenizer
    words = lambda name: tok.decode([ids[p] for p in inp.regions.positions(name)]).strip()  # noqa: E731
    assert words("Question") == QUESTION
    assert words("True Option") == "red" and words("Central Object") == "car"
    assert words("Question without Options") == "Is the car or?"
    assert inp.regions.positions("Last") == [len(ids) - 1]
    assert inp.pixel_values.shape == (1, 3, 336, 336)
    assert inp.vocab_size(study_llava15) == 32000  # the rows below <image>, not the padded 32064


def test_next_regions_split_base_and_hd_tiles(study_next_vicuna, make_image):
    inp = prepare(study_next_vicuna, make_image(500, 375, seed=3), QUESTION, protocol="study",
                  boxes=[(100, 80, 120, 90)])
    regions = inp.regions
    base, hd = regions.positions("Base Image"), regions.positions("HD Image")
    assert len(base) == 576 and sorted(base + hd) == regions.positions("Image")
    assert regions.positions("Image Original Patch") == base  # the study's name
    newlines = {p for p, n in zip(regions.image_positions, regions.is_newline, strict=False) if n}
    assert newlines and newlines <= set(hd)  # the study counts the row separators in the HD part
    related, other = regions.positions("Related Image Patches"), regions.positions("Other Image Patches")
    assert set(related) | set(other) | newlines == set(regions.image_positions)
    assert not newlines & set(other)
    related_hd = regions.positions("Related HD Patches")
    assert related_hd and set(related_hd) == set(related) & set(hd)
    assert set(regions.positions("Other HD Patches")) == set(hd) - set(related_hd)


def test_study_lens_reads_embeddings_to_output_raw_over_the_original_vocab(study_llava15, make_image):
    model = study_llava15
    inp = prepare(model, make_image(500, 375, seed=4), QUESTION, protocol="study")
    probs = layer_probs(model, inp)
    assert probs.shape == (model.n_layers + 1, 32000)
    bridge = model.bridge
    with torch.inference_mode():
        logits, cache = bridge.run_with_cache(inp.input_ids, **inp.model_kwargs())
        embeds = cache["blocks.0.hook_resid_pre"][0, -1]
        raw0 = bridge.unembed(embeds[None, None])[0, 0, :32000].float().softmax(-1)
        top = logits[0, -1, :32000].float().softmax(-1)
    torch.testing.assert_close(probs[0], raw0, rtol=1e-4, atol=0)
    torch.testing.assert_close(probs[-1], top, rtol=1e-4, atol=1e-12)
    normed = layer_probs(model, inp, readout="norm")
    assert normed.shape == probs.shape
    torch.testing.assert_close(normed[-1], probs[-1])  # the top point is the model's output either way
    assert not torch.allclose(normed[1], probs[1])
    table = answer_lens(model, inp, answer_forms("red"))
    assert sorted(table.layer.unique()) == list(range(model.n_layers + 1))
    with pytest.raises(MMLensError, match="readout 'lnf' is not known"):
        layer_probs(model, inp, readout="lnf")


def test_checkpoint_protocol_offers_the_raw_readout(tiny_llava, make_image):
    inp = prepare(tiny_llava, make_image(40, 32, seed=5), "What color is the ball ?")
    norm, raw = layer_probs(tiny_llava, inp), layer_probs(tiny_llava, inp, readout="raw")
    assert norm.shape == raw.shape == (tiny_llava.n_layers, norm.shape[1])
    torch.testing.assert_close(norm[-1], raw[-1])
    assert not torch.allclose(norm[0], raw[0])


def test_study_greedy_answer_and_sweep_use_the_original_vocabulary(study_llava15, make_image):
    model = study_llava15
    inp = prepare(model, make_image(500, 375, seed=6), QUESTION, protocol="study")
    greedy = greedy_answer(model, inp)
    assert greedy.first_token < 32000
    with torch.inference_mode():
        logits = model.bridge(inp.input_ids, **inp.model_kwargs())[0, -1]
    expected = logits[:32000].float().softmax(-1)
    assert greedy.first_token == int(expected.argmax())
    assert greedy.first_prob == pytest.approx(float(expected.max()), rel=1e-5)
    # Up to 128 tokens, no stop at a newline; the text is the decoded tokens stripped and lower-cased.
    assert len(greedy.token_ids) <= 128
    decoded = model.tokenizer.decode(greedy.token_ids, skip_special_tokens=True)
    assert greedy.text == decoded.strip().lower()
    table = sweep(model, inp, ["Question->Last"], greedy=greedy)
    assert len(table) == model.n_layers and (table.base_prob == greedy.first_prob).all()


# ------------------------------------------------------------------------------------------ runs and CLI


def _task_rows(folder: Path, make_image, answers: dict[str, str] | None = None) -> tuple[Path, Path]:
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    columns = ["question_id", "img_id", "question", "answer", "true option", "false option",
               "central object name", "central object x", "central object y", "central object w",
               "central object h", "image_w", "image_h"]
    rows = [
        ["a", "ia", "Is the car red or blue?", "red", "red", "blue", "car", 100, 50, 40, 30, 500, 375],
        ["b", "ib", "Is the cup red or blue?", "blue", "blue", "red", "cup", "-", "-", "-", "-", 500, 375],
    ]
    for i, row in enumerate(rows):
        make_image(500, 375, seed=20 + i).save(images / f"{row[1]}.jpg")
        if answers:
            row[3] = answers[row[0]]
    path = folder / "rows.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)
    return path, images


def test_flow_and_lens_runs_record_the_protocol_and_drop_bad_boxes_from_patch_blocks_only(
    study_llava15_path, tmp_path, make_image, capsys
):
    csv_path, images = _task_rows(tmp_path, make_image)
    out = tmp_path / "run"
    blocks = ["--block", "Related Image Patches->Question", "--block", "Central Object->Last"]
    args = ["--model", str(study_llava15_path), "--dataset", str(csv_path), "--images", str(images),
            "--out", str(out), "--all-samples"]
    assert main(["flow", *args, *blocks]) == 0
    err = capsys.readouterr().err
    assert "protocol study, template vicuna_v1, dtype float32, window 1 of 4 layers" in err
    config = json.loads((out / "flow.config.json").read_text())
    assert config["protocol"] == "study" and config["template"] == "vicuna_v1" and config["window"] == 1
    table = pd.read_csv(out / "flow.csv", dtype={"question_id": str})
    per_sample = table.groupby("question_id").block.unique().to_dict()
    assert set(per_sample["a"]) == {"Related Image Patches->Question", "Central Object->Last"}
    assert list(per_sample["b"]) == ["Central Object->Last"]  # no box: the patch block only is dropped

    assert main(["lens", *args]) == 0
    lens_config = json.loads((out / "lens.config.json").read_text())
    assert lens_config["readout"] == "raw" and lens_config["protocol"] == "study"
    lens = pd.read_csv(out / "lens.csv", dtype={"question_id": str})
    assert sorted(lens.layer.unique()) == list(range(5))


def test_study_lens_keeps_correct_samples_only(study_llava15, study_llava15_path, tmp_path, make_image):
    from mm_lens.data.gqa import load_task, open_image

    csv_path, images = _task_rows(tmp_path / "probe", make_image)
    sample = load_task(csv_path)[0]
    inp = prepare(study_llava15, open_image(images, sample), sample.question)
    right = greedy_answer(study_llava15, inp).text
    csv_path, images = _task_rows(tmp_path, make_image, answers={"a": right, "b": right + " not"})
    out = tmp_path / "lens"
    assert main(["lens", "--model", str(study_llava15_path), "--dataset", str(csv_path), "--images", str(images),
                 "--out", str(out)]) == 0
    assert set(pd.read_csv(out / "lens.csv", dtype={"question_id": str}).question_id) == {"a"}
    skips = pd.read_csv(out / "lens.skips.csv", dtype=str)
    assert dict(zip(skips.question_id, skips.kind, strict=False)) == {"b": "wrong answer"}


def test_study_command_runs_every_task_and_writes_the_report(study_llava15_path, tmp_path, make_image):
    from mm_lens.data.gqa import TASKS, load_task

    images = tmp_path / "images"
    images.mkdir()
    for task in TASKS:
        sample = load_task(task)[0]
        make_image(sample.image_w, sample.image_h, seed=len(task)).save(images / f"{sample.img_id}.jpg")
    out = tmp_path / "study"
    args = ["study", "--model", str(study_llava15_path), "--images", str(images), "--out", str(out),
            "--limit", "1", "--all-samples"]
    assert main(args) == 0
    for task in TASKS:
        flow = pd.read_csv(out / task / "flow.csv")
        assert len(flow) and flow.layer.nunique() == 4
        assert json.loads((out / task / "flow.config.json").read_text())["protocol"] == "study"
        assert (out / task / "lens.csv").is_file()
    assert (out / "report.html").is_file()
    before = (out / "ChooseAttr" / "flow.csv").read_text()
    assert main(args) == 0  # resumes: nothing to do, same table
    assert (out / "ChooseAttr" / "flow.csv").read_text() == before
