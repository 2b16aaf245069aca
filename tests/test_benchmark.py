"""The engine benchmark runs end to end on a tiny shape (the real numbers come from running it by hand)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_engine.py"


@pytest.mark.parametrize("shape", ["default", "gemma3", "qwen2_5_vl"])
def test_benchmark_smoke_run(shape):
    """Each family's shape, tiny: every block and group is timed, the engines agree, the fast path is the one
    expected (layer by layer: Llama, Gemma 3, Qwen2)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--shape", shape, "--tiny", "--threads", "1"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    for block in ("Image->Question", "Related Image Patches->Question", "Other Image Patches->Question",
                  "Question->Last", "Image->Last", "Last->Last", "->Question (3 blocks, one call)",
                  "->Last (3 blocks, one call)", "all six (one call)"):
        assert re.search(rf"^{re.escape(block)}\s+[\d.]+\s+[\d.]+\s+[\d.]+", out, re.M), out
    diff = float(re.search(r"max probability difference: (\S+)", out).group(1))
    assert diff < 1e-5
    assert re.search(r"peak memory \(max RSS\): reference \d+ MB, fast \d+ MB, ratio [\d.]+", out)
    assert "the fast engine's path: layers" in out


def test_gpu_benchmark_smoke_run_on_a_cpu():
    """The GPU benchmark's script on a tiny shape on the CPU: every step runs, the engines agree."""
    import json

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    script = SCRIPT.parent / "bench_gpu.py"
    proc = subprocess.run([sys.executable, str(script), "--shape", "tiny", "--device", "cpu", "--dtype", "float32",
                           "--samples", "1", "--answer-tokens", "1"], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["max_prob_diff"] < 1e-5
    assert result["fast"]["samples_per_s"] > 0 and result["reference"]["study_hours"] > 0
    assert set(result["fast_split_s"]) == {"clean pass", "->Question", "->Last"}
    assert "projected whole study (5525 questions" in proc.stdout


def test_maps_benchmark_smoke_run():
    """The patch-map benchmark on a tiny shape: both engines run, the ratio and their agreement are printed."""
    proc = subprocess.run([sys.executable, str(SCRIPT.parent / "bench_maps.py"), "--tiny", "--threads", "1"],
                          capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"^ratio: [\d.]+x", proc.stdout, re.M), proc.stdout
    assert float(re.search(r"max relative probability difference: (\S+)", proc.stdout).group(1)) < 1e-5
