"""The knockout map of every single image patch: fast vs reference engine, and the gradient map's cost.

Builds the random-weight LLaVA-1.5-shaped checkpoint of `bench_engine` (336 px images, patch 14 -> 576 image
tokens, ~40 text tokens; `--shape` as there), then at one window of layers (the study's window, scaled, centred on
the middle layer) maps ``patch -> Question`` knockout for each of the 576 patches (`mm_lens.maps.patch_groups`
with ``group=1``) with both engines, each engine in its own subprocess. Prints both times (the engine's own work
given the prompt's clean pass, which a map computes once either way), the ratio (goal: at least 50x), the largest
relative difference of the probabilities, and the attention and gradient maps' times relative to one clean
forward pass.

    python benchmarks/bench_maps.py            # every patch with both engines (the reference: 576 forwards)
    python benchmarks/bench_maps.py --quick    # the reference on 24 evenly spaced patches, extrapolated to 576
    python benchmarks/bench_maps.py --tiny     # a seconds-long smoke run (56 px images: 16 patches)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import QUESTION, SHAPES, build_checkpoint  # noqa: E402  (the same random checkpoint)

TARGET = "Question"


def worker(ckpt: str, engine: str, threads: int, sample: int | None) -> None:
    """Map every patch (or `sample` evenly spaced ones) with one engine; print a JSON line of timings and probs."""
    import numpy as np
    import torch
    from PIL import Image

    from mm_lens.demo import demo_window
    from mm_lens.engines import clean_pass, get_engine
    from mm_lens.inputs import prepare
    from mm_lens.knockout import Edge
    from mm_lens.maps import attention_values, gradient_values, patch_groups
    from mm_lens.model import load
    from mm_lens.protocol import vocab_softmax
    from mm_lens.sweep import layer_window

    torch.set_num_threads(threads)
    model = load(ckpt)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
    inp = prepare(model, image, QUESTION, protocol="checkpoint")
    groups = patch_groups(model, inp, 1)
    n_groups = len(groups)
    picked = list(range(n_groups))
    if sample is not None and sample < n_groups:
        picked = [int(i) for i in np.linspace(0, n_groups - 1, sample).round()]
        groups = [groups[i] for i in picked]
    window = layer_window(model.n_layers // 2, demo_window(model.n_layers), model.n_layers)
    edges = [Edge(g.name, TARGET, source_positions=g.positions) for g in groups]
    run = get_engine(engine)
    result = {"seq_len": inp.regions.seq_len, "n_image": len(inp.regions.image_positions),
              "n_question": len(inp.regions.question), "n_groups": n_groups, "picked": picked,
              "window": [window.start, window.stop]}
    ids, kwargs = inp.forward_args()
    with torch.inference_mode():
        model.bridge(ids, **kwargs)  # warm-up
        t0 = time.perf_counter()
        model.bridge(ids, **kwargs)
        result["forward_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        clean = clean_pass(model, inp)
        result["clean_seconds"] = time.perf_counter() - t0
        token = int(vocab_softmax(clean.last_logits, inp.vocab_size(model)).argmax())
        t0 = time.perf_counter()
        probs = run(model, inp, edges, [window], token, clean=clean)[:, 0]
        result["seconds"] = time.perf_counter() - t0
        result["clean_prob"] = float(vocab_softmax(clean.last_logits, inp.vocab_size(model))[token])
    result["probs"] = probs.tolist()
    if engine == "fast":  # the cheap maps, once
        all_groups = patch_groups(model, inp, 1)
        t0 = time.perf_counter()
        attention_values(model, inp, all_groups, TARGET, window)
        result["attention_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        gradient_values(model, inp, all_groups, TARGET, window, token)
        result["gradient_seconds"] = time.perf_counter() - t0
    print("RESULT " + json.dumps(result), flush=True)


def _run_worker(ckpt: Path, engine: str, threads: int, sample: int | None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, __file__, "--worker", engine, "--ckpt", str(ckpt), "--threads", str(threads)]
    cmd += ["--sample", str(sample)] if sample is not None else []
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise SystemExit(f"{engine} worker failed:\n{proc.stderr[-3000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    llava = [name for name, shape in SHAPES.items() if shape[0] == "llava" and name != "tiny"]
    p.add_argument("--shape", choices=llava, default="default",
                   help="language-model shape (default: 8 layers, d_model 512; see bench_engine.py)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true",
                   help="time the reference engine on --quick-groups evenly spaced patches and extrapolate")
    p.add_argument("--quick-groups", type=int, default=24, help="patches the reference maps under --quick")
    p.add_argument("--tiny", action="store_true", help="a small shape, for a smoke test")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--sample", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a.ckpt, a.worker, a.threads, a.sample)
    _, layers, d_model, heads, mlp, vocab = SHAPES["tiny" if a.tiny else a.shape]
    sample = a.quick_groups if a.quick else None
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "bench-llava"
        build_checkpoint(ckpt, layers, d_model, a.tiny, heads=heads, mlp=mlp, vocab_size=vocab)
        fast = _run_worker(ckpt, "fast", a.threads, None)
        ref = _run_worker(ckpt, "reference", a.threads, sample)
    n = fast["n_groups"]
    n_ref = len(ref["picked"])
    extrapolated = n_ref < n
    ref_total = ref["seconds"] / n_ref * n
    fast_probs = [fast["probs"][i] for i in ref["picked"]]
    rel = max(abs(r - f) / abs(r) for r, f in zip(ref["probs"], fast_probs, strict=True) if r)
    w0, w1 = fast["window"]
    print(f"shape: {fast['seq_len']} positions ({fast['n_image']} image, {fast['n_question']} question tokens), "
          f"{layers} layers, d_model {d_model}, {heads} heads, MLP {mlp}, vocabulary {vocab}, {a.threads} threads")
    print(f"knockout map of {n} single patches -> {TARGET}, layers {w0}..{w1 - 1} (one window)")
    note = (f" (EXTRAPOLATED: {ref['seconds']:.2f} s measured on {n_ref} of {n} patches, "
            f"{ref['seconds'] / n_ref:.3f} s per patch)" if extrapolated else "")
    print(f"reference engine: {ref_total:.2f} s{note}")
    print(f"fast engine: {fast['seconds']:.2f} s (all {n} patches)")
    print(f"ratio: {ref_total / fast['seconds']:.1f}x{' (extrapolated reference)' if extrapolated else ''} "
          f"(goal >= 50x)")
    print(f"clean pass (shared, not in either time): {fast['clean_seconds']:.2f} s")
    print(f"max relative probability difference: {rel:.2e} (over {n_ref} patches)")
    base = fast["clean_prob"]
    effect = max(abs(q - base) / base for q in fast["probs"]) * 100 if base else float("nan")
    print(f"largest knockout effect: {effect:.3g}% of the clean probability {base:.3g} "
          "(the scale to read the difference against)")
    fwd = fast["forward_seconds"]
    print(f"one clean forward: {fwd:.3f} s; attention map {fast['attention_seconds']:.3f} s "
          f"({fast['attention_seconds'] / fwd:.1f} forwards); gradient map {fast['gradient_seconds']:.3f} s "
          f"({fast['gradient_seconds'] / fwd:.1f} forwards)")


if __name__ == "__main__":
    main()
