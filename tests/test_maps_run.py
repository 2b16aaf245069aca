"""`mm-lens maps` is a run like `flow`: one map per method per sample, box groups from a CSV's box columns, a run
killed part-way resumes to the same table, and a correct-only protocol (the study's) skips wrong answers."""

from __future__ import annotations

import csv
import json
from dataclasses import replace

import pandas as pd
import pytest

from mm_lens.analyses import MAPS
from mm_lens.cli import main
from mm_lens.inputs import prepare
from mm_lens.maps import MAP_COLUMNS, METHODS, map_agreement
from mm_lens.protocol import CHECKPOINT
from mm_lens.runs import maps_sample
from mm_lens.sweep import greedy_answer
from mm_lens.types import WRONG_ANSWER, Sample, SampleSkip
from test_runs import kill_after_two_samples, write_samples

SLOW_MAPS = """
import sys, time
import mm_lens.runs as runs
real = runs.patch_map
def slow(*args, **kwargs):
    out = real(*args, **kwargs)
    time.sleep(0.4)  # keep the run going long enough to be killed part-way
    return out
runs.patch_map = slow
from mm_lens.cli import main
sys.exit(main(sys.argv[1:]))
"""


def maps_argv(model, csv_path, images, out, *extra) -> list[str]:
    return ["maps", "--model", str(model), "--dataset", str(csv_path), "--images", str(images), "--out", str(out),
            "--layers", "0:2", *extra]


def read_maps(out) -> pd.DataFrame:
    return pd.read_csv(out / "maps.csv", dtype={"question_id": str, "group": str})


def test_cli_writes_one_map_per_method_per_sample(tiny_llava_path, make_image, tmp_path):
    csv_path, images = write_samples(tmp_path / "data", make_image, 3)
    out = tmp_path / "out"
    assert main(maps_argv(tiny_llava_path, csv_path, images, out, "--group", "2")) == 0
    table = read_maps(out)
    assert list(table.columns) == list(MAPS.columns) == ["question_id", *MAP_COLUMNS]
    assert set(table["question_id"]) == {"q0", "q1", "q2"}
    per_map = table.groupby(["question_id", "method"])
    assert per_map.ngroups == 3 * len(METHODS)
    assert (per_map["group"].nunique() == per_map.size()).all()  # each group once per map
    assert (table["n_patches"] <= 4).all() and (table["window_start"] == 0).all() and (table["window_stop"] == 2).all()
    config = json.loads((out / "maps.config.json").read_text())
    assert config["methods"] == list(METHODS) and config["group"] == 2 and config["layers"] == [[0, 2]]
    assert (out / "maps.html").is_file()
    agreement = map_agreement(table)
    assert set(agreement["question_id"]) == {"q0", "q1", "q2"} and set(agreement["method"]) == {"attention", "gradient"}
    written = pd.read_csv(out / "maps_agreement.csv", dtype={"question_id": str})  # the run writes it beside maps.csv
    assert len(written) == len(agreement) and set(written["question_id"]) == {"q0", "q1", "q2"}


def test_box_groups_from_the_csv_box_columns(tiny_llava_path, make_image, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    path = tmp_path / "boxes.csv"
    boxes = [(4, 4, 12, 10), (16, 8, 20, 20), ("-", "-", "-", "-")]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["question_id", "img_id", "question", "answer", "image_w", "image_h", "central object name",
                         "central object x", "central object y", "central object w", "central object h"])
        for i, box in enumerate(boxes):
            make_image(40, 32, seed=20 + i).save(images / f"im{i}.jpg")
            writer.writerow([f"q{i}", f"im{i}", "What color is the ball ?", "red", 40, 32, "ball", *box])
    out = tmp_path / "out"
    assert main(maps_argv(tiny_llava_path, path, images, out, "--group", "box", "--method", "knockout,attention")) == 0
    table = read_maps(out)
    assert set(table["question_id"]) == {"q0", "q1"}
    assert len(table) == 2 * 2  # one box per row, two methods
    assert set(table["group"]) == {"ball"} and (table["n_patches"] >= 1).all()
    skips = pd.read_csv(out / "maps.skips.csv", dtype=str)
    assert skips.to_dict("records")[0]["question_id"] == "q2" and skips["kind"].tolist() == ["no box"]
    with pytest.raises(SystemExit):  # argparse names the methods
        main(maps_argv(tiny_llava_path, path, images, tmp_path / "bad", "--method", "knockout,saliency"))
    assert "choose comma-separated methods from knockout, attention, gradient" in capsys.readouterr().err


def test_maps_survives_sigkill_and_resumes(tiny_llava_path, make_image, tmp_path, capsys):
    csv_path, images = write_samples(tmp_path / "data", make_image, 6)
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    results = killed / "maps.results.jsonl"
    argv = ["--group", "2", "--method", "knockout,gradient"]
    done = kill_after_two_samples(SLOW_MAPS, maps_argv(tiny_llava_path, csv_path, images, killed, *argv), results)
    assert 2 <= done < 6 and not (killed / "maps.csv").exists()
    assert main(maps_argv(tiny_llava_path, csv_path, images, killed, *argv)) == 0
    assert f"({done} finished by an earlier run, resumed)" in capsys.readouterr().err
    assert main(maps_argv(tiny_llava_path, csv_path, images, clean, *argv)) == 0
    resumed, uninterrupted = read_maps(killed), read_maps(clean)
    assert resumed["question_id"].nunique() == 6
    pd.testing.assert_frame_equal(resumed, uninterrupted, check_exact=False, rtol=1e-6)


def test_a_correct_only_protocol_skips_wrong_answers(tiny_llava, make_image):
    """The study protocol keeps correct answers only (``lens_correct_only``); the tiny model is no study family,
    so the checkpoint protocol with that flag set stands in for it."""
    protocol = replace(CHECKPOINT, lens_correct_only=True)
    image = make_image(40, 32, seed=3)
    question = "What color is the ball ?"
    answer = greedy_answer(tiny_llava, prepare(tiny_llava, image, question, protocol=protocol)).text
    right = Sample("right", "im", question, answer, None, None, 40, 32, (), "t")
    wrong = Sample("wrong", "im", question, answer + " not", None, None, 40, 32, (), "t")
    args = ("Question", ["knockout", "attention"], 2, range(0, 2))
    table = maps_sample(tiny_llava, right, lambda s: image, *args, protocol=protocol)
    assert set(table["question_id"]) == {"right"} and set(table["method"]) == {"knockout", "attention"}
    with pytest.raises(SampleSkip) as skip:
        maps_sample(tiny_llava, wrong, lambda s: image, *args, protocol=protocol)
    assert skip.value.kind == WRONG_ANSWER and skip.value.question_id == "wrong"
    kept = maps_sample(tiny_llava, wrong, lambda s: image, *args, all_samples=True, protocol=protocol)
    assert kept.drop(columns="question_id").equals(table.drop(columns="question_id"))
