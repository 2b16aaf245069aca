"""The six shipped GQA task sets load as typed records; bad rows become recorded skips, not crashes."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import pytest
from PIL import Image

from mm_lens.data import gqa
from mm_lens.data.gqa import TASKS, Box, SampleSkip, check_sample, load_task, open_image
from mm_lens.errors import MMLensError

ROW_COUNTS = {
    "ChooseAttr": 1000,
    "ChooseCat": 1000,
    "ChooseRel": 964,
    "CompareAttr": 570,
    "LogicalObj": 991,
    "QueryAttr": 1000,
}
SHARED = Path(__file__).resolve().parents[2] / "shared" / "gqa-tasks"  # ../shared beside the checkout


def _raw_rows(task: str) -> list[dict[str, str]]:
    path = gqa.task_path(task)
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("task", TASKS)
def test_every_row_of_every_task_loads(task):
    samples = load_task(task)
    raw = _raw_rows(task)
    assert len(samples) == ROW_COUNTS[task] == len(raw)
    for s, r in zip(samples, raw, strict=False):
        assert s.task == task
        assert s.question_id == r["question_id"]  # kept as text: leading zeros survive
        assert s.img_id == r["img_id"] and s.question == r["question"] and s.answer == r["answer"]
        assert (s.image_w, s.image_h) == (int(r["image_w"]), int(r["image_h"]))
        if s.box_problem is None:
            assert s.boxes, "a row without a problem has at least one box"
            for b in s.boxes:
                assert 0 <= b.x and 0 <= b.y and b.w > 0 and b.h > 0
                assert b.x1 <= s.image_w and b.y1 <= s.image_h
    assert any(s.question_id.startswith("0") for s in samples)


@pytest.mark.parametrize("task", ["ChooseAttr", "ChooseCat", "ChooseRel"])
def test_choose_tasks_carry_both_options(task):
    for s in load_task(task):
        assert s.true_option and s.false_option and s.true_option == s.answer
        assert s.options == (s.true_option, s.false_option)


def test_single_and_two_object_boxes():
    first = load_task("ChooseAttr")[0]  # central object jar at (253, 291) 60x105 in a 375x500 image
    assert first.boxes == (Box(253, 291, 60, 105, "jar"),)
    rel = load_task("ChooseRel")[0]
    assert [b.name for b in rel.boxes] == ["surfboard", "surfer"]
    assert rel.boxes[1] == Box(290, 77, 74, 110, "surfer")
    logical = load_task("LogicalObj")
    one = [s for s in logical if len(s.boxes) == 1]
    two = [s for s in logical if len(s.boxes) == 2]
    assert len(one) == 910 and len(two) == 81  # '-' marks a missing second object
    assert one[0].boxes == (Box(32, 312, 214, 147, "grass"),)
    assert all(s.true_option is None for s in logical)


def test_box_partly_outside_is_clipped_and_fully_outside_is_a_problem():
    samples = load_task("ChooseCat")
    raw = {r["question_id"]: r for r in _raw_rows("ChooseCat")}
    over = [
        s for s in samples
        if int(raw[s.question_id]["central object x"]) + int(raw[s.question_id]["central object w"]) > s.image_w
    ]
    assert over
    for s in over:
        assert s.boxes[0].x1 == s.image_w
    outside = [s for s in load_task("QueryAttr") if s.box_problem]
    assert [s.question_id for s in outside] == ["1594913"]  # x=503 in a 500 px wide image
    with pytest.raises(SampleSkip, match="lies outside the 500x375 image") as err:
        check_sample(outside[0])
    assert err.value.kind == "malformed box" and err.value.question_id == "1594913"


def test_shipped_files_are_byte_for_byte_the_collection():
    if not SHARED.is_dir():
        pytest.skip("shared copy of the task sets not present")
    for task in TASKS:
        shipped = gqa.task_path(task).read_bytes()
        assert hashlib.sha256(shipped).digest() == hashlib.sha256((SHARED / f"{task}.csv").read_bytes()).digest()


def test_task_name_is_case_insensitive_and_path_works(tmp_path):
    assert len(load_task("chooseattr")) == 1000
    path = tmp_path / "mine.csv"
    path.write_bytes(gqa.task_path("CompareAttr").read_bytes())
    samples = load_task(str(path))
    assert len(samples) == 570 and samples[0].task == "mine"


def test_unknown_dataset_names_the_choices():
    with pytest.raises(MMLensError, match="neither a task name .*ChooseAttr"):
        load_task("ChooseColour")


def _write(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


HEADER = ["question_id", "img_id", "question", "answer", "image_w", "image_h",
          "central object name", "central object x", "central object y", "central object w", "central object h"]


@pytest.mark.parametrize("column", ["answer", "image_h", "central object w"])
def test_missing_column_names_column_and_file(tmp_path, column):
    header = [c for c in HEADER if c != column]
    row = ["007", "1", "Is it red?", "yes", "10", "10", "ball", "1", "1", "2", "2"]
    row = [v for c, v in zip(HEADER, row, strict=False) if c != column]
    path = _write(tmp_path / "broken.csv", header, [row])
    with pytest.raises(MMLensError, match=f"broken.csv is missing required column '{column}'"):
        load_task(path)


def test_empty_csv_is_an_error(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(MMLensError, match="empty.csv is empty"):
        load_task(tmp_path / "empty.csv")
    header_only = _write(tmp_path / "header.csv", HEADER, [])
    with pytest.raises(MMLensError, match="header.csv has a header but no rows"):
        load_task(header_only)


def test_malformed_boxes_are_recorded_not_raised(tmp_path):
    rows = [
        ["1", "10", "q?", "a", "40", "30", "ball", "abc", "1", "2", "2"],
        ["2", "10", "q?", "a", "40", "30", "ball", "1", "1", "0", "5"],
        ["3", "10", "q?", "a", "40", "30", "ball", "1", "1", "-4", "5"],
        ["4", "10", "q?", "a", "40", "30", "ball", "30", "20", "50", "50"],  # partly outside: clipped
        ["5", "10", "q?", "a", "x", "30", "ball", "1", "1", "2", "2"],
        ["6", "10", "q?", "a", "40", "30", "ball", "-", "-", "-", "-"],
        ["7", "10", "q?", "a", "40", "30", "ball", "1.5", "2.5", "3", "4"],
    ]
    samples = load_task(_write(tmp_path / "mixed.csv", HEADER, rows))
    assert len(samples) == 7
    problems = {s.question_id: s.box_problem for s in samples}
    assert "non-numeric x 'abc'" in problems["1"]
    assert "non-positive size" in problems["2"] and "non-positive size" in problems["3"]
    assert problems["4"] is None and samples[3].boxes == (Box(30, 20, 10, 10, "ball"),)
    assert "image size" in problems["5"]
    assert problems["6"].startswith("no box")
    assert problems["7"] is None and samples[6].boxes == (Box(1.5, 2.5, 3, 4, "ball"),)
    skips = []
    for s in samples:
        try:
            check_sample(s)
        except SampleSkip as err:
            skips.append(err.record())
    assert [s.question_id for s in skips] == ["1", "2", "3", "5", "6"]
    summary = gqa.summarise_skips(skips)
    assert "5 sample(s) skipped" in summary and "malformed box" in summary and "no box" in summary
    check_sample(samples[0], need_boxes=False)  # whole-image blocks do not need boxes


def test_open_image_missing_unreadable_truncated(tmp_path):
    sample = load_task("ChooseAttr")[0]
    with pytest.raises(SampleSkip, match=r"image .*2390560\.jpg not found") as err:
        open_image(tmp_path, sample)
    assert err.value.kind == "image not found"

    (tmp_path / "2390560.jpg").write_bytes(b"not an image at all")
    with pytest.raises(SampleSkip, match="not a readable image file") as err:
        open_image(tmp_path, sample)
    assert err.value.kind == "image unreadable"

    full = tmp_path / "full.jpg"
    Image.new("RGB", (sample.image_w, sample.image_h), (200, 30, 30)).save(full, quality=90)
    (tmp_path / "2390560.jpg").write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(SampleSkip, match="unreadable or truncated"):
        open_image(tmp_path, sample)

    (tmp_path / "2390560.jpg").write_bytes(full.read_bytes())
    img = open_image(tmp_path, sample)
    assert img.size == (375, 500) and img.mode == "RGB"


def test_png_images_are_found_and_boxes_scale_to_a_resized_copy(tmp_path):
    sample = load_task("ChooseAttr")[0]
    Image.new("L", (75, 100)).save(tmp_path / f"{sample.img_id}.png")
    img = open_image(tmp_path, sample)
    assert img.mode == "RGB" and img.size == (75, 100)
    (box,) = gqa.boxes_for(sample, *img.size)
    assert (box.x, box.y, box.w, box.h) == pytest.approx((50.6, 58.2, 12, 21))
    assert gqa.boxes_for(sample, 375, 500) == sample.boxes
