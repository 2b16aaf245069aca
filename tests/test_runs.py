"""Resumable runs (mm_lens.runs): per-sample records, partial-line repair, config checks, SIGKILL + resume."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from mm_lens.cli import main
from mm_lens.data.gqa import Sample, SampleSkip
from mm_lens.errors import MMLensError
from mm_lens.runs import MAX_CONSECUTIVE_ERRORS, RunDir, execute, run_config

COLUMNS = ["question_id", "img_id", "question", "answer", "true option", "false option", "image_w", "image_h"]
QUESTIONS = [
    ("What color is the ball ?", "red", "", ""),
    ("Is the cube red or blue ?", "blue", "blue", "red"),
    ("Is there a dog ?", "no", "", ""),
    ("What shape is the object ?", "circle", "", ""),
]


def write_samples(folder: Path, make_image, n: int) -> tuple[Path, Path]:
    """A GQA-style CSV of `n` rows (ids q0..) with generated images <img_id>.jpg of a few sizes."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    path = folder / "tasks.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for i in range(n):
            question, answer, true, false = QUESTIONS[i % len(QUESTIONS)]
            w, h = 32 + 8 * (i % 3), 32
            make_image(w, h, seed=100 + i).save(images / f"img{i}.jpg")
            writer.writerow([f"q{i}", f"img{i}", question, answer, true, false, w, h])
    return path, images


def flow_argv(model, csv_path, images, out, *extra) -> list[str]:
    argv = ["flow", "--model", str(model), "--dataset", str(csv_path), "--images", str(images), "--out", str(out)]
    return argv + ["--block", "Image->Question", "--block", "Question->Last", "--window", "2", "--all-samples", *extra]


def read_flow(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "flow.csv", dtype={"question_id": str})


# ------------------------------------------------------------------------------------ run directory (no model)


def fake_samples(n: int) -> list[Sample]:
    return [Sample(f"q{i}", f"img{i}", "What ?", "red", None, None, 32, 32, (), "t") for i in range(n)]


def fake_table(sample: Sample) -> pd.DataFrame:
    i = int(sample.question_id[1:])
    return pd.DataFrame(
        [[sample.question_id, layer, "answer_lower", (i + 1) / (layer + 7)] for layer in range(3)],
        columns=["question_id", "layer", "form", "prob"],
    )


def lens_config(tmp_path: Path, n: int, **options) -> dict:
    csv_path = tmp_path / "data.csv"
    if not csv_path.exists():
        csv_path.write_text("question_id,img_id,question,answer,image_w,image_h\nq0,i0,What ?,red,32,32\n")
    return run_config("lens", csv_path, n, model="m", **options)


def test_records_resume_without_duplicates(tmp_path):
    samples = fake_samples(6)
    calls = []

    def process(sample):
        calls.append(sample.question_id)
        if sample.question_id == "q2":
            raise SampleSkip("image gone", "image not found")
        return fake_table(sample)

    config = lens_config(tmp_path, 6)
    with RunDir(tmp_path / "run", "lens").open(config) as run:
        assert execute(run, samples, range(3), process, progress=False) == 3
    with RunDir(tmp_path / "run", "lens").open(config) as run:  # resume: q0..q2 are not run again
        assert set(run.done()) == {0, 1, 2}
        assert execute(run, samples, range(6), process, progress=False) == 3
        written = run.finish(outputs=True)
    assert calls == ["q0", "q1", "q2", "q3", "q4", "q5"]
    lines = (tmp_path / "run" / "lens.results.jsonl").read_text().splitlines()
    assert [json.loads(line)["index"] for line in lines] == [0, 1, 3, 4, 5]
    table = pd.read_csv(tmp_path / "run" / "lens.csv", dtype={"question_id": str})
    expected = pd.concat([fake_table(s) for s in samples if s.question_id != "q2"], ignore_index=True)
    pd.testing.assert_frame_equal(table, expected)
    skips = pd.read_csv(tmp_path / "run" / "lens.skips.csv")
    assert skips.to_dict("records") == [{"question_id": "q2", "kind": "image not found", "reason": "image gone"}]
    assert {p.name for p in written} == {"lens.csv", "lens.html", "lens.skips.csv"}
    assert json.loads((tmp_path / "run" / "lens.config.json").read_text()) == config


def test_partial_trailing_line_is_dropped_and_cut(tmp_path):
    samples = fake_samples(3)
    config = lens_config(tmp_path, 3)
    with RunDir(tmp_path, "lens").open(config) as run:
        execute(run, samples, range(2), fake_table, progress=False)
    results = tmp_path / "lens.results.jsonl"
    good = results.read_bytes()
    results.write_bytes(good + b'{"index": 2, "question_id": "q2", "rows": [["q2", 0, "ans')  # died mid-write
    with RunDir(tmp_path, "lens").open(config) as run:
        assert results.read_bytes() == good  # cut back to the last complete record
        assert run.done() == {0, 1}
        execute(run, samples, range(3), fake_table, progress=False)
        assert len(run.table()) == 9
    assert [json.loads(x)["index"] for x in results.read_text().splitlines()] == [0, 1, 2]


def test_damaged_middle_line_is_a_clear_error(tmp_path):
    config = lens_config(tmp_path, 3)
    with RunDir(tmp_path, "lens").open(config) as run:
        execute(run, fake_samples(3), range(3), fake_table, progress=False)
    results = tmp_path / "lens.results.jsonl"
    lines = results.read_text().splitlines(keepends=True)
    results.write_text(lines[0] + "garbage\n" + lines[2])
    with pytest.raises(MMLensError, match=r"lens.results.jsonl is damaged at line 2"):
        RunDir(tmp_path, "lens").open(config)


def test_different_config_is_refused_naming_the_keys(tmp_path):
    config = lens_config(tmp_path, 3, dtype="float32", limit=None)
    with RunDir(tmp_path, "lens").open(config) as run:
        execute(run, fake_samples(3), range(1), fake_table, progress=False)
    other = dict(config, dtype="bfloat16", limit=2)
    with pytest.raises(MMLensError) as err:
        RunDir(tmp_path, "lens").open(other)
    message = str(err.value)
    assert "dtype: 'float32' -> 'bfloat16'" in message and "limit: None -> 2" in message
    assert "new --out" in message


def test_second_writer_is_refused_while_the_first_runs(tmp_path):
    config = lens_config(tmp_path, 3)
    with RunDir(tmp_path, "lens").open(config):
        with pytest.raises(MMLensError, match="another mm-lens lens process is writing"):
            RunDir(tmp_path, "lens").open(config)
    RunDir(tmp_path, "lens").open(config).close()  # released


def test_unexpected_errors_are_recorded_retried_and_stop_a_broken_run(tmp_path):
    samples = fake_samples(12)
    config = lens_config(tmp_path, 12)

    def flaky(sample):
        if sample.question_id == "q1":
            raise RuntimeError("CUDA out of memory")
        return fake_table(sample)

    with RunDir(tmp_path, "lens").open(config) as run:
        execute(run, samples, range(3), flaky, progress=False)
        assert run.skip_list()[0].kind == "error (RuntimeError)"
        assert "CUDA out of memory" in run.skip_list()[0].reason
    assert "RuntimeError: CUDA out of memory" in (tmp_path / "lens.errors.log").read_text()
    with RunDir(tmp_path, "lens").open(config) as run:  # the error is retried; this time it works
        assert run.done() == {0, 2}
        execute(run, samples, range(3), fake_table, progress=False)
        assert run.skip_list() == [] and sorted(run.results) == [0, 1, 2]

    def broken(sample):
        raise ValueError("bad kernel")

    with RunDir(tmp_path, "lens").open(config) as run:
        with pytest.raises(MMLensError, match=f"stopped after {MAX_CONSECUTIVE_ERRORS} samples in a row failed"):
            execute(run, samples, range(12), broken, progress=False)
        assert len(run.final_skips()) == MAX_CONSECUTIVE_ERRORS  # recorded, and retried next time


def test_retry_skips_reruns_skipped_samples(tmp_path):
    samples = fake_samples(2)
    config = lens_config(tmp_path, 2)

    def missing(sample):
        raise SampleSkip("image gone", "image not found")

    with RunDir(tmp_path, "lens").open(config) as run:
        execute(run, samples, range(2), missing, progress=False)
    with RunDir(tmp_path, "lens").open(config) as run:
        assert execute(run, samples, range(2), fake_table, progress=False) == 0  # skips are final ...
        assert execute(run, samples, range(2), fake_table, retry_skips=True, progress=False) == 2  # ... unless retried
        assert run.skip_list() == [] and len(run.table()) == 6


# ------------------------------------------------------------------------------------ end to end on the tiny LLaVA


SLOW_MAIN = """
import sys, time
import mm_lens.sweep
sweep = sys.modules["mm_lens.sweep"]
real = sweep.flow_sample
def slow(*args, **kwargs):
    out = real(*args, **kwargs)
    time.sleep(0.4)  # keep the run going long enough to be killed part-way
    return out
sweep.flow_sample = slow
from mm_lens.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def ten_samples(tmp_path_factory, make_image):
    return write_samples(tmp_path_factory.mktemp("runs-data"), make_image, 10)


def kill_after_two_samples(main_code: str, argv: list[str], results: Path) -> int:
    """Run ``python -c main_code argv`` and SIGKILL it once `results` holds two samples; the samples written."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen([sys.executable, "-c", main_code, *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if results.exists() and results.read_bytes().count(b"\n") >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    return results.read_bytes().count(b"\n")


def test_sigkill_then_resume_equals_an_uninterrupted_run(tiny_llava_path, ten_samples, tmp_path, capsys):
    csv_path, images = ten_samples
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    results = killed / "flow.results.jsonl"
    done = kill_after_two_samples(SLOW_MAIN, flow_argv(tiny_llava_path, csv_path, images, killed), results)
    assert 2 <= done < 10 and not (killed / "flow.csv").exists()
    with open(results, "ab") as f:  # as if the kill had landed in the middle of writing a record
        f.write(b'{"index": 9, "question_id": "q9", "rows": [["q9", "Image->Question", 0, 0.1')

    different = flow_argv(tiny_llava_path, csv_path, images, killed)
    different[different.index("--window") + 1] = "3"
    assert main(different) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "window: 2 -> 3" in err and "new --out" in err

    assert main(flow_argv(tiny_llava_path, csv_path, images, killed)) == 0
    assert f"({done} finished by an earlier run, resumed)" in capsys.readouterr().err
    assert main(flow_argv(tiny_llava_path, csv_path, images, clean)) == 0

    resumed, uninterrupted = read_flow(killed), read_flow(clean)
    assert len(uninterrupted) == 10 * 2 * 4  # samples x blocks x layers
    assert not resumed.duplicated(["question_id", "block", "layer"]).any()
    pd.testing.assert_frame_equal(resumed, uninterrupted, check_exact=False, rtol=1e-6)
    indices = [json.loads(line)["index"] for line in results.read_text().splitlines()]
    assert sorted(indices) == list(range(10))  # every sample once, the partial record gone


def test_finished_run_resumes_without_loading_the_model(tiny_llava_path, ten_samples, tmp_path, monkeypatch, capsys):
    csv_path, images = ten_samples
    argv = flow_argv(tiny_llava_path, csv_path, images, tmp_path, "--limit", "2")
    assert main(argv) == 0
    first = (tmp_path / "flow.csv").read_bytes()
    capsys.readouterr()

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded although every sample was done")

    monkeypatch.setattr("mm_lens.runs.load", no_load)  # the name runs.py loads the model by
    assert main(argv) == 0
    assert (tmp_path / "flow.csv").read_bytes() == first
    assert "(2 finished by an earlier run, resumed)" in capsys.readouterr().err


def test_flow_and_lens_share_an_output_folder(tiny_llava_path, ten_samples, tmp_path):
    csv_path, images = ten_samples
    common = ["--dataset", str(csv_path), "--images", str(images), "--out", str(tmp_path), "--limit", "2"]
    assert main(["lens", "--model", str(tiny_llava_path), *common]) == 0
    assert main(flow_argv(tiny_llava_path, csv_path, images, tmp_path, "--limit", "2")) == 0
    assert {"flow.csv", "lens.csv", "flow.config.json", "lens.config.json"} <= {p.name for p in tmp_path.iterdir()}
    assert set(pd.read_csv(tmp_path / "lens.csv", dtype={"question_id": str}).question_id) == {"q0", "q1"}


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    def interrupted(**kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("mm_lens.runs.lens_run", interrupted)
    argv = ["lens", "--model", "m", "--dataset", "ChooseAttr", "--images", ".", "--out", "o"]
    assert main(argv) == 130
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["mm-lens: interrupted; finished samples are saved, re-run the same command to resume"]


def test_run_options_are_one_record_and_an_unknown_one_is_named():
    from mm_lens.runs import RUN_OPTIONS, RunOptions, flow_run, lens_run

    assert RUN_OPTIONS == ("limit", "dtype", "device", "device_map", "shard", "retry_skips", "progress", "protocol")
    base = RunOptions(limit=3, protocol="study")
    assert RunOptions.build(base, {"limit": 5}) == RunOptions(limit=5, protocol="study")
    with pytest.raises(TypeError, match=r"flow_run\(\) got unexpected keyword argument\(s\) 'limt'.*blocks.*limit"):
        flow_run("o", "m", "ChooseAttr", ".", limt=3)
    with pytest.raises(TypeError, match="lens_run.*'blocks'"):
        lens_run("o", "m", "ChooseAttr", ".", blocks=["Image->Last"])
    with pytest.raises(TypeError, match="options= takes a RunOptions"):
        lens_run("o", "m", "ChooseAttr", ".", options={"limit": 3})
