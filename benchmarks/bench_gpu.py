"""Both knockout engines on a random-weight LLaVA-1.5-7B on a GPU: samples per second, peak memory, the study's time.

Builds LLaVA-1.5-7B's full shape with random weights in float16 directly on the device (CLIP ViT-L/14-336: 24
layers of width 1024, 336 px, 576 image tokens; the projector; Vicuna-7B: 32 layers, d_model 4096, 32 heads, MLP
11008, 32,064 tokens), saves it with a word-level tokenizer and a CLIP image processor, and loads it back with
`mm_lens.model.load` as any checkpoint. Then, per sample, the study's work: the greedy answer (its clean pass and
`--answer-tokens` decoding steps) and the layer sweep of the six standard blocks with window 7, with each engine
(the reference on `--reference-samples`, the fast engine on `--samples`). Prints samples per second, peak GPU memory,
the largest probability difference between the engines, the fast engine's time split, and the projected time of
the whole study: 6 task sets, 5,525 questions, six blocks.

    python benchmarks/bench_gpu.py                                  # CUDA, LLaVA-1.5-7B's shape, float16
    python benchmarks/bench_gpu.py --shape tiny --device cpu --dtype float32 --samples 2   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import QUESTION, build_checkpoint  # noqa: E402

STUDY_QUESTIONS = 5525  # the six GQA task sets of the study
#: name: (LM layers, d_model, heads, MLP width, vocabulary, (vision width, vision MLP, vision layers, vision heads))
SHAPES = {
    "llava-1.5-7b": (32, 4096, 32, 11008, 32064, (1024, 4096, 24, 16)),
    "tiny": (2, 64, 4, 176, 1000, (64, 128, 2, 4)),
}


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def _reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--shape", choices=list(SHAPES), default="llava-1.5-7b")
    p.add_argument("--samples", type=int, default=12, help="samples the fast engine sweeps (after one warm-up)")
    p.add_argument("--reference-samples", type=int, default=1, help="samples the reference engine sweeps")
    p.add_argument("--window", type=int, default=7, help="the study's window for 32 layers")
    p.add_argument("--answer-tokens", type=int, default=3, help="greedy decoding steps per answer")
    a = p.parse_args()

    import numpy as np
    import torch
    from PIL import Image

    from mm_lens.data.gqa import Box
    from mm_lens.engines import clean_pass, fast_engine
    from mm_lens.inputs import prepare
    from mm_lens.knockout import STANDARD_BLOCKS, parse_edge
    from mm_lens.model import load
    from mm_lens.sweep import greedy_answer, layer_sweep, layer_window

    layers, d_model, heads, mlp, vocab, vision = SHAPES[a.shape]
    tiny = a.shape == "tiny"
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "llava"
        t0 = time.perf_counter()
        build_checkpoint(ckpt, layers, d_model, tiny, heads=heads, mlp=mlp, vocab_size=vocab, vision=vision,
                         device=a.device, dtype=a.dtype)
        if a.device.startswith("cuda"):
            torch.cuda.empty_cache()
        model = load(str(ckpt), device=a.device, dtype=a.dtype)
        build_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    n = max(a.samples, a.reference_samples) + 1
    inputs = [prepare(model, Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)), QUESTION,
                      boxes=[Box(200, 120, 240, 200, "cylinder")]) for _ in range(n)]
    k = min(a.window, layers)
    blocks = list(STANDARD_BLOCKS)
    gpu = torch.cuda.get_device_name() if a.device.startswith("cuda") else a.device
    print(f"device: {gpu}; model: {a.shape} ({layers} layers, d_model {d_model}, {heads} heads, MLP {mlp}, "
          f"vocabulary {vocab}; CLIP {vision[2]}x{vision[0]}), {a.dtype}, built and loaded in {build_s:.0f} s; "
          f"{inputs[0].regions.seq_len} positions, window {k}", flush=True)

    def sample(engine: str, inp) -> tuple[float, float, object]:
        _sync(a.device)
        t0 = time.perf_counter()
        greedy = greedy_answer(model, inp, max_new_tokens=a.answer_tokens)
        _sync(a.device)
        t1 = time.perf_counter()
        table = layer_sweep(model, inp, blocks, window=k, engine=engine, greedy=greedy)
        _sync(a.device)
        return t1 - t0, time.perf_counter() - t1, table

    result: dict = {"device": gpu, "shape": a.shape, "dtype": a.dtype, "seq_len": inputs[0].regions.seq_len}
    sample("fast", inputs[0])  # warm-up: kernels, workspaces
    tables: dict = {}
    for engine, count in (("fast", a.samples), ("reference", a.reference_samples)):
        _reset_peak(a.device)
        answer_s = sweep_s = 0.0
        for inp in inputs[1: count + 1]:
            ans, sw, table = sample(engine, inp)
            answer_s, sweep_s = answer_s + ans, sweep_s + sw
            tables.setdefault(engine, []).append(table["knockout_prob"].to_numpy())
        per_sample = (answer_s + sweep_s) / count
        result[engine] = {"samples": count, "answer_s": answer_s / count, "sweep_s": sweep_s / count,
                          "samples_per_s": 1 / per_sample, "peak_gib": _peak(a.device),
                          "study_hours": STUDY_QUESTIONS * per_sample / 3600}
        print(f"{engine:9s}: {count} samples, {1 / per_sample:7.3f} samples/s (answer {answer_s / count:.3f} s + "
              f"sweep {sweep_s / count:.3f} s per sample), peak memory "
              f"{'n/a' if _peak(a.device) is None else f'{_peak(a.device):.1f} GiB'}, whole study "
              f"{result[engine]['study_hours']:.2f} h", flush=True)
    m = len(tables["reference"])
    diff = float(max(np.abs(f - r).max() for f, r in zip(tables["fast"][:m], tables["reference"], strict=True)))
    result["max_prob_diff"] = diff
    result["speedup"] = result["fast"]["samples_per_s"] / result["reference"]["samples_per_s"]

    # The fast engine's time split on one sample: clean pass, the three ->Question blocks, the three ->Last blocks.
    inp = inputs[1]
    windows = [layer_window(layer, k, layers) for layer in range(layers)]
    split = {}
    with torch.inference_mode():
        for _ in range(2):  # the second round is the one kept
            _sync(a.device)
            t0 = time.perf_counter()
            clean = clean_pass(model, inp)
            _sync(a.device)
            split["clean pass"] = time.perf_counter() - t0
            for name, group in (("->Question", blocks[:3]), ("->Last", blocks[3:])):
                t0 = time.perf_counter()
                fast_engine(model, inp, [parse_edge(b) for b in group], windows, 5, clean=clean)
                _sync(a.device)
                split[name] = time.perf_counter() - t0
    result["fast_split_s"] = split
    print(f"fast engine / reference: {result['speedup']:.1f}x samples per second; "
          f"max probability difference {diff:.2e} ({m} sample{'s' * (m > 1)})")
    print("fast engine, one sample: " + ", ".join(f"{name} {s * 1e3:.0f} ms" for name, s in split.items()))
    print(f"projected whole study ({STUDY_QUESTIONS} questions x six blocks, every sample swept): "
          f"fast {result['fast']['study_hours']:.2f} h, reference {result['reference']['study_hours']:.2f} h")
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
