"""Scale: --shard i/n (two processes at once) and merge, RANK/WORLD_SIZE from a launcher, --device-map."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from mm_lens.cli import main
from mm_lens.errors import MMLensError
from mm_lens.runs import Shard, merge_runs, parse_shard, shard_from_env
from test_runs import flow_argv, read_flow, write_samples


def test_parse_shard():
    assert parse_shard("0/2") == Shard(0, 2) and parse_shard(" 3 / 4 ") == Shard(3, 4)
    assert list(Shard(1, 3).indices(8)) == [1, 4, 7] and Shard(1, 3).dirname == "shard-1-of-3"
    for text, message in [("2/2", "must be 0..1"), ("0/0", "at least 1"), ("1", "form i/n"), ("-1/2", "form i/n")]:
        with pytest.raises(MMLensError, match=message):
            parse_shard(text)


def test_shards_partition_the_samples():
    n = 11
    parts = [set(Shard(i, 4).indices(n)) for i in range(4)]
    assert set().union(*parts) == set(range(n)) and sum(map(len, parts)) == n


def test_shard_from_launcher_env():
    assert shard_from_env({}) is None
    assert shard_from_env({"WORLD_SIZE": "1", "RANK": "0"}) is None
    assert shard_from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == Shard(3, 4)
    with pytest.raises(MMLensError, match="shard index must be 0..1"):
        shard_from_env({"WORLD_SIZE": "2", "RANK": "2"})
    with pytest.raises(MMLensError, match="not integers"):
        shard_from_env({"WORLD_SIZE": "two", "RANK": "0"})


@pytest.fixture(scope="module")
def six_samples(tmp_path_factory, make_image):
    return write_samples(tmp_path_factory.mktemp("shard-data"), make_image, 6)


@pytest.fixture(scope="module")
def sharded(tiny_llava_path, six_samples, tmp_path_factory):
    """Shards 0/2 and 1/2 run by two concurrent processes into one --out; and a single-process run."""
    csv_path, images = six_samples
    root = tmp_path_factory.mktemp("sharded")
    out, single = root / "out", root / "single"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("WORLD_SIZE", None)
    procs = [
        subprocess.Popen(
            [
                sys.executable, "-m", "mm_lens.cli",
                *flow_argv(tiny_llava_path, csv_path, images, out, "--shard", f"{i}/2"),
            ],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    results = [p.communicate(timeout=600) for p in procs]
    for proc, (_, err) in zip(procs, results, strict=False):
        assert proc.returncode == 0, err
    assert main(flow_argv(tiny_llava_path, csv_path, images, single)) == 0
    return out, single, [err for _, err in results]


def test_two_concurrent_shards_merge_into_the_single_process_table(sharded):
    out, single, errs = sharded
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["shard-0-of-2", "shard-1-of-2"]
    assert not (out / "shard-0-of-2" / "flow.csv").exists()  # a shard writes no table of its own
    assert any("all shards finished; merged into" in err for err in errs)  # the last one to finish merged
    merged, reference = read_flow(out), read_flow(single)
    assert len(reference) == 6 * 2 * 4
    pd.testing.assert_frame_equal(merged, reference, check_exact=False, rtol=1e-6)
    config = json.loads((out / "flow.config.json").read_text())
    assert config == json.loads((single / "flow.config.json").read_text())  # shard: null, all else equal
    assert (out / "flow.html").exists() and (out / "flow.skips.csv").exists()


def test_merge_command_gives_the_same_table(sharded, tmp_path, capsys):
    out, single, _ = sharded
    assert main(["merge", str(tmp_path / "a"), str(out)]) == 0  # a folder holding shard-i-of-n/
    assert main(["merge", str(tmp_path / "b"), str(out / "shard-1-of-2"), str(out / "shard-0-of-2")]) == 0
    assert "flow: 6 of 6 sample(s) analysed" in capsys.readouterr().err
    for merged in ("a", "b"):
        pd.testing.assert_frame_equal(read_flow(tmp_path / merged), read_flow(single), check_exact=False, rtol=1e-6)


def test_merged_folder_resumes_as_a_finished_run(sharded, tiny_llava_path, six_samples, tmp_path, capsys):
    out, _, _ = sharded
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    csv_path, images = six_samples
    assert main(flow_argv(tiny_llava_path, csv_path, images, copy)) == 0  # unsharded, same options: all done
    assert "(6 finished by an earlier run, resumed)" in capsys.readouterr().err


def _copy_shards(out: Path, dest: Path) -> tuple[Path, Path]:
    shutil.copytree(out / "shard-0-of-2", dest / "s0")
    shutil.copytree(out / "shard-1-of-2", dest / "s1")
    return dest / "s0", dest / "s1"


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "flow.config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_merge_refuses_missing_overlapping_mismatched_and_unfinished_shards(sharded, tmp_path):
    out, single, _ = sharded
    s0, s1 = _copy_shards(out, tmp_path)
    dest = tmp_path / "merged"
    with pytest.raises(MMLensError, match=r"missing shard\(s\) 1/2"):
        merge_runs(dest, [s0])
    twin = tmp_path / "twin"
    shutil.copytree(s0, twin)
    with pytest.raises(MMLensError, match="overlapping shards: .* are both shard 0/2"):
        merge_runs(dest, [s0, twin, s1])
    _edit_config(twin, window=3)
    with pytest.raises(MMLensError, match=r"different configurations \(window: 2 -> 3\)"):
        merge_runs(dest, [s1, twin])
    results = s1 / "flow.results.jsonl"
    results.write_text("".join(results.read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(MMLensError, match="shard 1/2 in .* is unfinished \\(2 of 3 samples\\)"):
        merge_runs(dest, [s0, s1])
    with pytest.raises(MMLensError, match="is not a shard run"):
        merge_runs(dest, [single])
    with pytest.raises(MMLensError, match="holds no flow shard run"):
        merge_runs(dest, [tmp_path / "twin" / ".."], commands=["flow"])
    assert not dest.exists() or not any(dest.iterdir())


def test_merge_accepts_shards_whose_images_sit_elsewhere(sharded, tmp_path):
    out, single, _ = sharded
    s0, s1 = _copy_shards(out, tmp_path)
    _edit_config(s1, images="/mnt/other-machine/images", dataset="/mnt/other-machine/tasks.csv")
    merge_runs(tmp_path / "m", [s0, s1])
    pd.testing.assert_frame_equal(read_flow(tmp_path / "m"), read_flow(single), check_exact=False, rtol=1e-6)
    _edit_config(s1, dataset_sha256="0" * 64)  # but not another CSV
    with pytest.raises(MMLensError, match="dataset_sha256"):
        merge_runs(tmp_path / "m2", [s0, s1])


def test_merge_refuses_shards_of_different_splits(sharded, tmp_path):
    out, _, _ = sharded
    s0, s1 = _copy_shards(out, tmp_path)
    _edit_config(s1, shard="1/3")
    with pytest.raises(MMLensError, match="split the samples differently"):
        merge_runs(tmp_path / "m", [s0, s1])


def test_merge_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["merge", str(tmp_path / "m"), str(tmp_path / "nope")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mm-lens: error:") and "does not exist" in lines[0]


def test_launcher_rank_and_world_size_pick_the_shard(tiny_llava_path, six_samples, tmp_path, monkeypatch, capsys):
    """What `accelerate launch` / `torchrun` set: each rank runs its shard; the last to finish merges."""
    csv_path, images = six_samples
    lens = ["lens", "--model", str(tiny_llava_path), "--dataset", str(csv_path), "--images", str(images)]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "1")
    assert main(lens + ["--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "lens shard 1/2: 3 of 3 sample(s) analysed" in err and "merged" not in err
    assert not (tmp_path / "out" / "lens.csv").exists()
    monkeypatch.setenv("RANK", "0")
    assert main(lens + ["--out", str(tmp_path / "out")]) == 0
    assert "all shards finished; merged into" in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE")
    assert main(lens + ["--out", str(tmp_path / "single")]) == 0
    merged = pd.read_csv(tmp_path / "out" / "lens.csv", dtype={"question_id": str})
    single = pd.read_csv(tmp_path / "single" / "lens.csv", dtype={"question_id": str})
    pd.testing.assert_frame_equal(merged, single, check_exact=False, rtol=1e-6)
    assert main(lens + ["--out", str(tmp_path / "explicit"), "--shard", "0/2"]) == 0  # --shard wins over env
    assert (tmp_path / "explicit" / "shard-0-of-2" / "lens.config.json").exists()


def test_device_map_reaches_load(tiny_llava_path, six_samples, tmp_path, monkeypatch):
    import mm_lens.runs

    seen = []
    real = mm_lens.runs.load

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(mm_lens.runs, "load", spy)  # the name runs.py loads the model by
    csv_path, images = six_samples
    argv = ["lens", "--model", str(tiny_llava_path), "--dataset", str(csv_path), "--images", str(images)]
    assert main(argv + ["--out", str(tmp_path), "--limit", "1", "--device-map", "cpu"]) == 0
    assert seen[0]["device_map"] == "cpu" and seen[0]["device"] is None
    assert len(pd.read_csv(tmp_path / "lens.csv")) > 0


def test_device_and_device_map_are_exclusive(tiny_llava_path, six_samples, tmp_path, capsys):
    csv_path, images = six_samples
    argv = ["lens", "--model", str(tiny_llava_path), "--dataset", str(csv_path), "--images", str(images)]
    assert main(argv + ["--out", str(tmp_path), "--device", "cpu", "--device-map", "auto"]) == 2
    assert "either device or device_map" in capsys.readouterr().err
