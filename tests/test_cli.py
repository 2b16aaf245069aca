"""``mm-lens flow`` / ``mm-lens lens`` end to end on the tiny LLaVA and a three-row CSV with generated images."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from mm_lens.cli import main
from mm_lens.data.gqa import load_task, open_image
from mm_lens.inputs import prepare
from mm_lens.sweep import greedy_answer

COLUMNS = ["question_id", "img_id", "question", "answer", "true option", "false option", "image_w", "image_h"]
ROWS = [
    ("q1", "img1", "What color is the ball ?", "red", "", ""),
    ("q2", "img2", "Is the cube red or blue ?", "blue", "blue", "red"),
    ("q3", "img3", "Is there a dog ?", "no", "", ""),
]


def write_dataset(folder: Path, make_image, answers=None) -> tuple[Path, Path]:
    """A GQA-style CSV plus an images folder with <img_id>.jpg; `answers` overrides the gold answers."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    path = folder / "tasks.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for i, (qid, img, question, answer, true, false) in enumerate(ROWS):
            make_image(40 + 8 * i, 32, seed=10 + i).save(images / f"{img}.jpg")
            gold = answers[i] if answers else answer
            writer.writerow([qid, img, question, gold, true, false, 40 + 8 * i, 32])
    return path, images


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, make_image):
    return write_dataset(tmp_path_factory.mktemp("cli-data"), make_image)


def test_flow_writes_table_and_figure(tiny_llava_path, dataset, tmp_path, capsys):
    csv_path, images = dataset
    out = tmp_path / "flow"
    argv = ["flow", "--model", str(tiny_llava_path), "--dataset", str(csv_path), "--images", str(images)]
    argv += ["--block", "Image->Question", "--block", "Last->Last", "--window", "3", "--all-samples", "--out", str(out)]
    assert main(argv) == 0
    table = pd.read_csv(out / "flow.csv", dtype={"question_id": str})
    assert list(table.columns) == ["question_id", "block", "layer", "base_prob", "knockout_prob", "relative_change_pct"]
    assert len(table) == 3 * 2 * 4  # samples x blocks x layers
    assert set(table.question_id) == {"q1", "q2", "q3"}
    assert set(table.block) == {"Image->Question", "Last->Last"}
    assert sorted(table.layer.unique()) == [0, 1, 2, 3]
    assert table.base_prob.between(0, 1).all() and table.knockout_prob.between(0, 1).all()
    html = (out / "flow.html").read_text()
    assert "plotly" in html
    assert all(name.replace(">", "\\u003e") in html for name in ("Image->Question", "Last->Last"))  # JSON-escaped
    assert "3 of 3 sample(s) analysed" in capsys.readouterr().err


def test_flow_skips_and_counts_wrong_answers(tiny_llava, tiny_llava_path, make_image, tmp_path, capsys):
    csv_path, images = write_dataset(tmp_path / "data", make_image)
    first = load_task(csv_path)[0]  # the model's own answer on row 1 becomes its gold answer
    right = greedy_answer(tiny_llava, prepare(tiny_llava, open_image(images, first), first.question)).text
    csv_path, images = write_dataset(tmp_path / "data", make_image, answers=[right, "blue", "no"])
    out = tmp_path / "flow"
    argv = ["flow", "--model", str(tiny_llava_path), "--dataset", str(csv_path), "--images", str(images)]
    assert main(argv + ["--block", "Image->Last", "--window", "2", "--out", str(out)]) == 0
    table = pd.read_csv(out / "flow.csv", dtype={"question_id": str})
    assert set(table.question_id) == {"q1"} and len(table) == 4
    err = capsys.readouterr().err
    assert "1 of 3 sample(s) analysed" in err
    assert "2 sample(s) skipped" in err and "wrong answer" in err


def test_flow_limit_and_missing_image(tiny_llava_path, dataset, tmp_path, capsys):
    csv_path, images = dataset
    partial = tmp_path / "images"
    shutil.copytree(images, partial)
    (partial / "img2.jpg").unlink()
    argv = ["flow", "--model", str(tiny_llava_path), "--dataset", str(csv_path), "--images", str(partial)]
    argv += ["--block", "Image->Last", "--window", "1", "--all-samples", "--limit", "2", "--engine", "reference"]
    argv += ["--out", str(tmp_path / "o")]
    assert main(argv) == 0
    table = pd.read_csv(tmp_path / "o" / "flow.csv", dtype={"question_id": str})
    assert set(table.question_id) == {"q1"}
    err = capsys.readouterr().err
    assert "1 of 2 sample(s) analysed" in err and "image not found" in err


def test_lens_writes_table_and_figure(tiny_llava_path, dataset, tmp_path):
    csv_path, images = dataset
    out = tmp_path / "lens"
    argv = ["lens", "--model", str(tiny_llava_path), "--dataset", str(csv_path), "--images", str(images)]
    assert main(argv + ["--out", str(out)]) == 0
    table = pd.read_csv(out / "lens.csv", dtype={"question_id": str})
    assert list(table.columns) == ["question_id", "layer", "form", "prob"]
    forms = table.groupby("question_id").form.unique().map(set).to_dict()
    assert forms["q1"] == {"answer_lower", "answer_capitalized"}
    assert forms["q2"] == {"answer_lower", "answer_capitalized", "false_option_lower", "false_option_capitalized"}
    assert len(table) == 4 * (2 + 4 + 2)  # layers x forms per row
    assert table.prob.between(0, 1).all()
    assert "answer_capitalized" in (out / "lens.html").read_text()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--block", "Foo->Last"], "unknown source region 'Foo'"),
        (["--block", "Image->"], "no target region"),
        (["--window", "9"], "window 9"),
        (["--engine", "warp"], "unknown sweep engine"),
    ],
)
def test_errors_are_one_line_and_exit_2(tiny_llava_path, dataset, tmp_path, capsys, extra, message):
    csv_path, images = dataset
    argv = ["flow", "--model", str(tiny_llava_path), "--dataset", str(csv_path), "--images", str(images)]
    assert main(argv + extra + ["--out", str(tmp_path / "o")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # earlier lines: model-loading progress
    assert last.startswith("mm-lens: error:") and message in last


def test_missing_images_folder(tiny_llava_path, dataset, tmp_path, capsys):
    csv_path, _ = dataset
    argv = ["lens", "--model", str(tiny_llava_path), "--dataset", str(csv_path), "--images", str(tmp_path / "nope")]
    assert main(argv + ["--out", str(tmp_path / "o")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_console_script_exit_code(dataset, tmp_path):
    csv_path, images = dataset
    exe = Path(sys.executable).with_name("mm-lens")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mm_lens.cli"]
    args = ["flow", "--model", "m", "--dataset", str(csv_path), "--images", str(images), "--out", str(tmp_path)]
    proc = subprocess.run(cmd + args + ["--block", "Foo->Last"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("mm-lens: error:") and len(proc.stderr.strip().splitlines()) == 1


def test_a_run_whose_every_sample_fails_on_an_error_exits_non_zero(tiny_llava_path, dataset, tmp_path, capsys,
                                                                   monkeypatch):
    import mm_lens.sweep as sweep

    def broken(*args, **kwargs):
        raise TypeError("'NoneType' object is not subscriptable")

    monkeypatch.setattr(sweep, "layer_sweep", broken)
    csv_path, images = dataset
    out = tmp_path / "flow"
    argv = ["flow", "--model", str(tiny_llava_path), "--dataset", str(csv_path), "--images", str(images),
            "--block", "Image->Last", "--window", "2", "--all-samples", "--limit", "2", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "0 of 2 sample(s) analysed" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("mm-lens: error: flow: no sample analysed, 2 of 2 failed with errors")
    assert str(out / "flow.errors.log") in last


def test_skips_alone_keep_exit_0(tiny_llava_path, dataset, tmp_path, capsys):
    csv_path, images = dataset
    empty = tmp_path / "no-images"
    empty.mkdir()
    argv = ["flow", "--model", str(tiny_llava_path), "--dataset", str(csv_path), "--images", str(empty),
            "--block", "Image->Last", "--window", "2", "--limit", "2", "--out", str(tmp_path / "o")]
    assert main(argv) == 0
    assert "0 of 2 sample(s) analysed" in capsys.readouterr().err


def test_a_failed_self_check_stops_the_run_in_one_line(tiny_llava_path, dataset, tmp_path, capsys, monkeypatch):
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    original = AttentionBridge._update_kv_cache

    def forgetful(self, k, v, **kwargs):  # the transformers 5.24 + TL 4.3 bug, simulated on any version
        return original(self, k, v, **{n: x for n, x in kwargs.items() if n not in ("past_key_values", "cache")})

    monkeypatch.setattr(AttentionBridge, "_update_kv_cache", forgetful)
    csv_path, images = dataset
    out = tmp_path / "flow"
    argv = ["flow", "--model", str(tiny_llava_path), "--dataset", str(csv_path), "--images", str(images),
            "--block", "Image->Last", "--window", "2", "--all-samples", "--out", str(out)]
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mm-lens: error:")]
    assert len(lines) == 1 and "self-check failed" in lines[0] and "--engine reference" in lines[0]
    assert not (out / "flow.errors.log").exists()  # stopped at once, not recorded sample by sample


LIGHT_CLI = """
import sys, types
package = types.ModuleType("mm_lens")  # mm_lens/__init__.py left out: only the CLI module's own imports
package.__path__ = [sys.argv[1]]
sys.modules["mm_lens"] = package
import mm_lens.cli
print("torch" in sys.modules)
"""


def test_the_cli_module_imports_no_torch():
    """cli.py's own top-level imports (the package's __init__ aside) load no torch: ``mm-lens --help`` stays quick."""
    package = Path(__file__).resolve().parents[1] / "mm_lens"
    proc = subprocess.run([sys.executable, "-c", LIGHT_CLI, str(package)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_import_mm_lens_cli_loads_no_torch():
    """The package's __init__ imports its names lazily (PEP 562), so the CLI's import loads no torch."""
    proc = subprocess.run([sys.executable, "-c", "import mm_lens.cli, sys; print('torch' in sys.modules)"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_help_exits_0_quickly(capsys):
    import time

    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert time.perf_counter() - start < 5
    assert "flow" in capsys.readouterr().out


def test_the_cli_name_lists_are_the_library_s():
    """`mm_lens.names` (torch-free, for the CLI) holds the same names the heavy modules check against."""
    import mm_lens
    from mm_lens import engines, knockout, names, patching, protocol

    assert names.PROTOCOL_NAMES == protocol.PROTOCOL_NAMES
    assert names.READOUTS == protocol.READOUTS
    assert names.SITES == patching.SITES
    assert names.PAIR_MODES == patching.PAIR_MODES
    assert set(names.ENGINE_NAMES) == set(engines.ENGINES) and engines.DEFAULT_ENGINE in names.ENGINE_NAMES
    assert names.STUDY_BLOCKS == knockout.STUDY_BLOCKS
    assert names.VERSION == mm_lens.__version__
    parser_choices = {a.dest: a.choices for p in _subparsers().values() for a in p._actions if a.choices}
    assert parser_choices["protocol"] == names.PROTOCOL_NAMES and parser_choices["readout"] == names.READOUTS
    assert parser_choices["pairs"] == names.PAIR_MODES


def _subparsers():
    from mm_lens.cli import build_parser

    parser = build_parser()
    return next(a for a in parser._actions if a.dest == "command").choices
