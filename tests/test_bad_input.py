"""Bad input, tried on purpose: each gives one readable error line (exit 2) or a recorded, counted skip."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from mm_lens.cli import main
from mm_lens.data.gqa import SampleSkip, load_task, open_image

BOX_COLUMNS = ["central object x", "central object y", "central object w", "central object h"]
COLUMNS = ["question_id", "img_id", "question", "answer", "true option", "false option", "image_w", "image_h"]


def write_csv(path: Path, rows: list[list], columns=COLUMNS + BOX_COLUMNS, encoding="utf-8") -> Path:
    with open(path, "w", newline="", encoding=encoding) as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)
    return path


def last_error(capsys, only_line: bool = False) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    if only_line:
        assert len(lines) == 1, lines
    assert lines[-1].startswith("mm-lens: error: "), lines
    return lines[-1]


def flow(model, csv_path, images, out, *extra) -> list[str]:
    return ["flow", "--model", str(model), "--dataset", str(csv_path), "--images", str(images), "--out", str(out),
            "--window", "2", "--all-samples", *extra]


# ------------------------------------------------------------------------------------ per-sample: recorded skips


@pytest.fixture(scope="module")
def bad_bag(tmp_path_factory, make_image):
    """One good row and one row per kind of per-sample problem, with images to match."""
    folder = tmp_path_factory.mktemp("bad-bag")
    images = folder / "images"
    images.mkdir()
    make_image(40, 32, seed=1).save(images / "ok.jpg")
    make_image(1, 1, seed=2).save(images / "tiny.png")
    (images / "corrupt.jpg").write_bytes(b"this is not a jpeg at all" * 20)
    make_image(64, 64, seed=3).save(images / "full.jpg")
    data = (images / "full.jpg").read_bytes()
    (images / "trunc.jpg").write_bytes(data[: len(data) // 2])
    Image.new("1", (10000, 10000)).save(images / "huge.png")  # 100 MP, a few KB on disk
    Image.new("1", (1, 10000)).save(images / "strip.png")
    q = "What color is the ball ?"
    rows = [
        ["q_ok", "ok", q, "red", "", "", 40, 32, 4, 4, 16, 16],
        ["q_missing", "missing", q, "red", "", "", 40, 32, 4, 4, 16, 16],
        ["q_corrupt", "corrupt", q, "red", "", "", 40, 32, 4, 4, 16, 16],
        ["q_trunc", "trunc", q, "red", "", "", 64, 64, 4, 4, 16, 16],
        ["q_tiny", "tiny", q, "red", "", "", 1, 1, 0, 0, 1, 1],
        ["q_huge", "huge", q, "red", "", "", 10000, 10000, 4, 4, 16, 16],
        ["q_strip", "strip", q, "red", "", "", 1, 10000, 0, 0, 1, 16],
        ["q_zero", "ok", q, "red", "", "", 40, 32, 4, 4, 0, 16],
        ["q_neg", "ok", q, "red", "", "", 40, 32, 4, 4, -5, 16],
        ["q_empty", "ok", "   ", "red", "", "", 40, 32, 4, 4, 16, 16],
        ["q_option", "ok", "Is the ball red or blue ?", "red", "red", "blue", 40, 32, 4, 4, 16, 16],
        ["q_unicode", "ok", "What colour is the café ball ? 🙂", "red", "", "", 40, 32, 4, 4, 16, 16],
    ]
    return write_csv(folder / "bag.csv", rows), images


EXPECTED_SKIPS = {
    "q_missing": "image not found",
    "q_corrupt": "image unreadable",
    "q_trunc": "image unreadable",
    "q_huge": "image too large",
    "q_strip": "image aspect ratio too extreme",
    "q_zero": "malformed box",
    "q_neg": "malformed box",
    "q_empty": "empty question",
}


def test_every_bad_row_is_skipped_with_its_reason_and_counted(tiny_llava_path, bad_bag, tmp_path, capsys):
    csv_path, images = bad_bag
    blocks = ["--block", "Related Image Patches->Question", "--block", "Image->Last"]
    assert main(flow(tiny_llava_path, csv_path, images, tmp_path, *blocks)) == 0
    err = capsys.readouterr().err
    table = pd.read_csv(tmp_path / "flow.csv", dtype={"question_id": str})
    assert set(table.question_id) == {"q_ok", "q_tiny", "q_option", "q_unicode"}  # a 1x1 px image is processed
    skips = pd.read_csv(tmp_path / "flow.skips.csv", dtype=str)
    assert dict(zip(skips.question_id, skips.kind, strict=False)) == EXPECTED_SKIPS
    assert "4 of 12 sample(s) analysed" in err and "8 sample(s) skipped" in err
    counts = {line.split(None, 1)[1]: int(line.split()[0]) for line in err.splitlines() if line[:1] == " "}
    assert counts["image unreadable"] == 2 and counts["malformed box"] == 2 and counts["image too large"] == 1
    reasons = dict(zip(skips.question_id, skips.reason, strict=False))
    assert "above PIL's decompression-bomb limit" in reasons["q_huge"] and "10000x10000" in reasons["q_huge"]
    assert "non-positive size" in reasons["q_neg"]
    assert "Traceback" not in err


def test_lens_needs_no_boxes_so_box_problems_do_not_skip(tiny_llava_path, bad_bag, tmp_path):
    csv_path, images = bad_bag
    argv = ["lens", "--model", str(tiny_llava_path), "--dataset", str(csv_path), "--images", str(images)]
    assert main(argv + ["--out", str(tmp_path)]) == 0
    kept = set(pd.read_csv(tmp_path / "lens.csv", dtype={"question_id": str}).question_id)
    assert kept == {"q_ok", "q_tiny", "q_zero", "q_neg", "q_option", "q_unicode"}


def test_huge_image_is_refused_from_its_header(tmp_path, monkeypatch):
    Image.new("1", (10000, 10000)).save(tmp_path / "big.png")
    sample = load_task(write_csv(tmp_path / "t.csv", [["q", "big", "Q ?", "a", "", "", 10, 10, 1, 1, 2, 2]]))[0]
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self) or None)
    with pytest.raises(SampleSkip) as err:
        open_image(tmp_path, sample)
    assert err.value.kind == "image too large" and not decoded  # refused before any decoding
    monkeypatch.undo()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # beyond twice the limit PIL itself refuses to open
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    with pytest.raises(SampleSkip) as err:
        open_image(tmp_path, sample)
    assert err.value.kind == "image too large"


def test_option_missing_from_row_or_question_is_a_recorded_skip(tiny_llava_path, good_csv, tmp_path):
    images = good_csv[1]
    rows = [
        ["q_absent", "ok", "Is the ball red or blue ?", "red", "green", "blue", 40, 32, 4, 4, 16, 16],
        ["q_none", "ok", "What color is the ball ?", "red", "", "", 40, 32, 4, 4, 16, 16],
        ["q_fine", "ok", "Is the ball red or blue ?", "red", "red", "blue", 40, 32, 4, 4, 16, 16],
    ]
    csv_path = write_csv(tmp_path / "options.csv", rows)
    assert main(flow(tiny_llava_path, csv_path, images, tmp_path / "o", "--block", "True Option->Last")) == 0
    skips = pd.read_csv(tmp_path / "o" / "flow.skips.csv", dtype=str)
    assert dict(zip(skips.question_id, skips.kind, strict=False)) == {
        "q_absent": "True Option not in question",
        "q_none": "no True Option",
    }
    assert "'green' not found" in skips.reason[0]
    assert set(pd.read_csv(tmp_path / "o" / "flow.csv").question_id) == {"q_fine"}


def test_question_the_chat_template_rewrites_is_a_recorded_skip(tiny_llava_path, bad_bag, tmp_path, capsys):
    model = tmp_path / "lower-template"
    shutil.copytree(tiny_llava_path, model)
    template = (model / "chat_template.jinja").read_text()
    assert "content['text']" in template
    (model / "chat_template.jinja").write_text(template.replace("content['text']", "(content['text'] | lower)"))
    csv_path, images = bad_bag
    assert main(flow(model, csv_path, images, tmp_path / "o", "--limit", "1", "--block", "Image->Last")) == 0
    skips = pd.read_csv(tmp_path / "o" / "flow.skips.csv", dtype=str)
    assert skips.kind.tolist() == ["question not in prompt"]
    assert "not found in the prompt" in skips.reason[0]


# ------------------------------------------------------------------------------------ run-stopping: one line, exit 2


@pytest.fixture(scope="module")
def good_csv(tmp_path_factory, make_image):
    folder = tmp_path_factory.mktemp("good")
    (folder / "images").mkdir()
    make_image(40, 32, seed=5).save(folder / "images" / "ok.jpg")
    rows = [["q1", "ok", "What color is the ball ?", "red", "", "", 40, 32, 4, 4, 16, 16]]
    return write_csv(folder / "good.csv", rows), folder / "images"


@pytest.mark.parametrize(
    "content, message",
    [
        ("question_id,img_id,question,image_w,image_h\nq1,ok,Q ?,40,32\n", "missing required column 'answer'"),
        ("", "is empty (no header row)"),
        (",".join(COLUMNS) + "\n", "has a header but no rows"),
        (
            ",".join(COLUMNS + BOX_COLUMNS[:2]) + "\nq1,ok,Q ?,red,,,40,32,1,1\n",
            "missing required column 'central object w'",
        ),
    ],
    ids=["missing-column", "empty", "header-only", "partial-box-columns"],
)
def test_broken_csv(tmp_path, good_csv, capsys, content, message):
    path = tmp_path / "broken.csv"
    path.write_text(content)
    assert main(flow("no-model-needed", path, good_csv[1], tmp_path / "o")) == 2
    line = last_error(capsys, only_line=True)
    assert message in line and str(path) in line
    assert not (tmp_path / "o" / "flow.config.json").exists()


def test_non_utf8_csv_names_file_line_and_encoding(tmp_path, good_csv, capsys):
    rows = [["q1", "ok", "Is the ball red ?", "red", "", "", 40, 32, 4, 4, 16, 16],
            ["q2", "ok", "Où est la balle ?", "red", "", "", 40, 32, 4, 4, 16, 16]]
    path = write_csv(tmp_path / "latin1.csv", rows, encoding="latin-1")
    assert main(flow("no-model-needed", path, good_csv[1], tmp_path / "o")) == 2
    line = last_error(capsys, only_line=True)
    assert str(path) in line and "not valid UTF-8" in line and "byte 0xf9 on line 3" in line


@pytest.mark.parametrize(
    "block, message",
    [
        ("Image->", "has no target region"),
        ("->Last", "has no source region"),
        ("Foo->Last", "unknown source region 'Foo'"),
        ("Image-Question", "is not of the form 'Source->Target'"),
        ("Image->Question->Last", "is not of the form 'Source->Target'"),
    ],
)
def test_malformed_block_fails_before_the_model_loads(tmp_path, good_csv, capsys, block, message):
    csv_path, images = good_csv
    assert main(flow("no-such-model", csv_path, images, tmp_path, f"--block={block}")) == 2
    line = last_error(capsys, only_line=True)
    assert message in line and "valid region names" in line


@pytest.mark.parametrize("window", ["0", "-1", "5", "100"])
def test_bad_window_is_refused_and_leaves_no_config_behind(tiny_llava_path, good_csv, tmp_path, capsys, window):
    csv_path, images = good_csv
    argv = flow(tiny_llava_path, csv_path, images, tmp_path, "--block", "Image->Last")
    argv[argv.index("--window") + 1] = window
    assert main(argv) == 2
    assert f"window {window}" in last_error(capsys)
    assert main(flow(tiny_llava_path, csv_path, images, tmp_path, "--block", "Image->Last")) == 0  # fixed: runs


def _fake_checkpoint(folder: Path, model_type: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    return folder


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "nowhere", "does not exist"),
        (lambda d: (d / "file.bin").write_bytes(b"x") and d / "file.bin", "is not a directory"),
        (lambda d: (d / "empty").mkdir() or d / "empty", "is not a Hugging Face checkpoint"),
        (lambda d: _fake_checkpoint(d / "llama", "llama"), "model type 'llama'"),
        (lambda d: _fake_checkpoint(d / "llama4", "llama4"), "model type 'llama4'"),
        (lambda d: _fake_checkpoint(d / "none", None), "model type None"),
    ],
    ids=["missing", "file", "no-config", "llama", "llama4", "no-type"],
)
def test_model_that_is_not_a_llava(tmp_path, good_csv, capsys, make, message):
    csv_path, images = good_csv
    model = make(tmp_path)
    assert main(flow(model, csv_path, images, tmp_path / "o", "--block", "Image->Last")) == 2
    line = last_error(capsys, only_line=True)
    assert message in line
    if "model type" in line:
        assert "supported types: llava, llava_next" in line


def test_broken_weights_are_one_line(tiny_llava_path, good_csv, tmp_path, capsys):
    model = tmp_path / "broken"
    shutil.copytree(tiny_llava_path, model)
    (model / "model.safetensors").write_bytes(b"\0" * 64)
    csv_path, images = good_csv
    assert main(flow(model, csv_path, images, tmp_path / "o", "--block", "Image->Last")) == 2
    assert "cannot load model" in last_error(capsys)


@pytest.mark.parametrize(
    "flag, message",
    [
        (["--shard", "2/2"], "shard index must be 0..1"),
        (["--shard", "1/0"], "number of shards must be at least 1"),
        (["--shard", "half"], "is not of the form i/n"),
        (["--limit", "0"], "--limit 0 must be at least 1"),
        (["--engine", "warp"], "unknown sweep engine 'warp'"),
        (["--device-map", "{bad"], "--device-map '{bad' is not valid JSON"),
        (["--dtype", "int3"], "dtype 'int3' is not understood"),
    ],
)
def test_bad_run_options(good_csv, tmp_path, capsys, flag, message):
    csv_path, images = good_csv
    assert main(flow("no-such-model", csv_path, images, tmp_path, *flag)) == 2
    assert message in last_error(capsys, only_line=True)


def test_images_folder_missing(good_csv, tmp_path, capsys):
    assert main(flow("no-such-model", good_csv[0], tmp_path / "nope", tmp_path / "o")) == 2
    assert "is not a folder" in last_error(capsys, only_line=True)
