"""`mm-lens attention` is a run like `flow`: killed with SIGKILL, the same command resumes to the same table;
and a CSV with only the four required columns runs `flow`, `lens` and `attention`."""

from __future__ import annotations

import csv
import json

import pandas as pd

from mm_lens.cli import main
from test_runs import kill_after_two_samples, write_samples

SLOW_ATTENTION = """
import sys, time
import mm_lens.attention as attention
real = attention.attention_mass
def slow(*args, **kwargs):
    out = real(*args, **kwargs)
    time.sleep(0.4)  # keep the run going long enough to be killed part-way
    return out
attention.attention_mass = slow
from mm_lens.cli import main
sys.exit(main(sys.argv[1:]))
"""


def attention_argv(model, csv_path, images, out, *extra) -> list[str]:
    return ["attention", "--model", str(model), "--dataset", str(csv_path), "--images", str(images),
            "--out", str(out), *extra]


def test_attention_survives_sigkill_and_resumes(tiny_llava_path, make_image, tmp_path, capsys):
    csv_path, images = write_samples(tmp_path / "data", make_image, 8)
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    results = killed / "attention.results.jsonl"
    done = kill_after_two_samples(SLOW_ATTENTION, attention_argv(tiny_llava_path, csv_path, images, killed), results)
    assert 2 <= done < 8 and not (killed / "attention.csv").exists()

    assert main(attention_argv(tiny_llava_path, csv_path, images, killed)) == 0
    assert f"({done} finished by an earlier run, resumed)" in capsys.readouterr().err
    assert main(attention_argv(tiny_llava_path, csv_path, images, clean)) == 0
    resumed = pd.read_csv(killed / "attention.csv", dtype={"question_id": str})
    uninterrupted = pd.read_csv(clean / "attention.csv", dtype={"question_id": str})
    assert list(resumed.columns) == ["question_id", "layer", "target", "source", "mass"]
    assert resumed["question_id"].nunique() == 8
    pd.testing.assert_frame_equal(resumed, uninterrupted, check_exact=False, rtol=1e-6)
    indices = [json.loads(line)["index"] for line in results.read_text().splitlines()]
    assert sorted(indices) == list(range(8))
    config = json.loads((killed / "attention.config.json").read_text())
    assert config["targets"] == ["Question", "Last"] and config["sources"] == ["Image", "Question"]
    assert (killed / "attention.html").is_file()


def test_csv_with_only_the_four_required_columns_runs_every_analysis(tiny_llava_path, make_image, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    path = tmp_path / "four.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["question_id", "img_id", "question", "answer"])
        for i in range(3):
            make_image(40 + 8 * i, 32, seed=7 + i).save(images / f"im{i}.jpg")
            writer.writerow([f"q{i}", f"im{i}", "What color is the ball?", "red"])
    common = [
        "--model", str(tiny_llava_path), "--dataset", str(path), "--images", str(images), "--out", str(tmp_path / "out")
    ]
    assert main(["flow", *common, "--block", "Image->Question", "--window", "2", "--all-samples"]) == 0
    assert main(["lens", *common]) == 0
    assert main(["attention", *common]) == 0
    for name in ("flow", "lens", "attention"):
        table = pd.read_csv(tmp_path / "out" / f"{name}.csv", dtype={"question_id": str})
        assert set(table["question_id"]) == {"q0", "q1", "q2"}, name
