"""Reference vs fast knockout engine on a random-weight LLaVA of realistic shape, side by side in one run.

Builds a LLaVA-1.5-shaped checkpoint with random weights (336 px images, patch 14 -> 576 image tokens, a chat
prompt of ~40 text tokens, a 32k vocabulary, `--layers` Llama layers of width `--d-model`), then runs the full
layer sweep of each of the six standard blocks with both engines, each engine in its own subprocess so that
peak memory (max RSS) is measured separately. Prints per block and overall: both times, the ratio, the
largest probability difference, and both peak memories. Block times are the engine's own work given the
prompt's clean pass, which a sweep computes once per sample for the greedy answer whatever the engine; the
last line adds it back to both sides.

    python benchmarks/bench_engine.py                           # realistic shape (8 layers, d_model 512)
    python benchmarks/bench_engine.py --shape llava7b-2layers   # LLaVA-1.5-7B's width (4096, 32 heads,
                                                                #   MLP 11008, 32,064 tokens), 2 layers
    python benchmarks/bench_engine.py --tiny                    # a seconds-long smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mm_lens.knockout import STANDARD_BLOCKS as BLOCKS

QUESTION = "Is the large metal cylinder on the left side of the small rubber sphere red or blue?"
GROUPS = {
    "->Question (3 blocks, one call)": [b for b in BLOCKS if b.endswith("->Question")],
    "->Last (3 blocks, one call)": [b for b in BLOCKS if b.endswith("->Last")],
    "all six (one call)": BLOCKS,
}
#: Language-model shapes: layers, d_model, heads, MLP width, vocabulary (the vision tower is the same in all).
SHAPES = {
    "default": (8, 512, 8, 1408, 32000),
    "llava7b-2layers": (2, 4096, 32, 11008, 32064),  # LLaVA-1.5-7B's Vicuna width, two of its 32 layers
    "tiny": (2, 64, 1, 176, 1000),
}
TEMPLATE = (
    "{% for message in messages %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% else %}{{ item['text'] }}{% endif %}{% endfor %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_checkpoint(out: Path, layers: int, d_model: int, tiny: bool, heads: int | None = None,
                     mlp: int | None = None, vocab_size: int | None = None,
                     vision: tuple[int, int, int, int] | None = None, device: str | None = None,
                     dtype: str | None = None) -> None:
    """Save a random LLaVA (weights, word-level tokenizer, CLIP image processor, chat template) to `out`.

    `vision` is the CLIP tower's (width, MLP width, layers, heads); `device` and `dtype` are where and in what
    precision the random weights are made (a 7B model is made on the GPU in float16 in seconds).
    """
    import torch
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    words = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "\n", ":", "?", ".", "USER", "ASSISTANT"]
    words += sorted(set((QUESTION + " Answer the question using a single word or phrase").replace("?", " ").split()))
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n|[A-Za-z]+|[^\sA-Za-z]"), behavior="removed", invert=True)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", additional_special_tokens=["<image>"])
    side, patch = (56, 14) if tiny else (336, 14)
    image_processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    proc = LlavaProcessor(image_processor=image_processor, tokenizer=fast, patch_size=patch,
                          vision_feature_select_strategy="default", chat_template=TEMPLATE,
                          num_additional_image_tokens=1, image_token="<image>")
    proc.save_pretrained(out)
    width, inner, depth, n_heads = vision or ((64, 128, 2, 4) if tiny else (256, 1024, 6, 4))
    vision_cfg = CLIPVisionConfig(hidden_size=width, intermediate_size=inner, num_hidden_layers=depth,
                                  num_attention_heads=n_heads, image_size=side, patch_size=patch)
    heads = heads or max(1, d_model // 64)
    text = LlamaConfig(vocab_size=vocab_size or (1000 if tiny else 32000), hidden_size=d_model,
                       intermediate_size=mlp or d_model * 11 // 4, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=2048,
                       tie_word_embeddings=False)
    cfg = LlavaConfig(vision_config=vision_cfg, text_config=text, image_token_index=vocab["<image>"],
                      vision_feature_select_strategy="default", vision_feature_layer=-2, tie_word_embeddings=False)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype) if dtype else torch.float32)
    try:
        with torch.device(device or "cpu"):
            model = LlavaForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(out)


def worker(ckpt: str, engine: str, threads: int) -> None:
    """Run the six sweeps with one engine; print a JSON line of timings, probabilities and peak memory."""
    import numpy as np
    import torch
    from PIL import Image

    from mm_lens.data.gqa import Box
    from mm_lens.demo import demo_window
    from mm_lens.engines import clean_pass, get_engine
    from mm_lens.inputs import prepare
    from mm_lens.knockout import parse_edge
    from mm_lens.model import load
    from mm_lens.sweep import layer_window

    torch.set_num_threads(threads)
    model = load(ckpt)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
    inp = prepare(model, image, QUESTION, boxes=[Box(200, 120, 240, 200, "cylinder")])
    k = demo_window(model.n_layers)  # the demo's rule: 9 per 32 layers, scaled
    windows = [layer_window(layer, k, model.n_layers) for layer in range(model.n_layers)]
    run = get_engine(engine)
    token = 5
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {"seq_len": inp.regions.seq_len, "n_image": len(inp.regions.image_positions),
              "n_question": len(inp.regions.question), "blocks": {}}
    with torch.inference_mode():
        t0 = time.perf_counter()
        clean = clean_pass(model, inp)  # a sweep needs it anyway (greedy answer, base probability)
        result["clean_seconds"] = time.perf_counter() - t0
        for block in BLOCKS:
            t0 = time.perf_counter()
            probs = run(model, inp, [parse_edge(block)], windows, token, clean=clean)
            result["blocks"][block] = {"seconds": time.perf_counter() - t0, "probs": probs[0].tolist()}
        for name, blocks in GROUPS.items():  # a group's blocks swept in one call, as a sweep does
            t0 = time.perf_counter()
            run(model, inp, [parse_edge(b) for b in blocks], windows, token, clean=clean)
            result.setdefault("groups", {})[name] = time.perf_counter() - t0
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["rss_after_load_mb"] = base_rss / 1024
    print("RESULT " + json.dumps(result), flush=True)


def _run_worker(ckpt: Path, engine: str, threads: int) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, __file__, "--worker", engine, "--ckpt", str(ckpt), "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise SystemExit(f"{engine} worker failed:\n{proc.stderr[-3000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=[name for name in SHAPES if name != "tiny"], default="default",
                   help="language-model shape (default: 8 layers, d_model 512)")
    p.add_argument("--layers", type=int, default=None, help="override the shape's number of layers")
    p.add_argument("--d-model", type=int, default=None, help="override the shape's width (heads of 64, MLP 11/4)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="a small shape, for a smoke test")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a.ckpt, a.worker, a.threads)
    layers, d_model, heads, mlp, vocab = SHAPES["tiny" if a.tiny else a.shape]
    if a.d_model is not None and a.d_model != d_model:
        d_model, heads, mlp = a.d_model, max(1, a.d_model // 64), a.d_model * 11 // 4
    layers = a.layers or layers
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "bench-llava"
        build_checkpoint(ckpt, layers, d_model, a.tiny, heads=heads, mlp=mlp, vocab_size=vocab)
        ref = _run_worker(ckpt, "reference", a.threads)
        fast = _run_worker(ckpt, "fast", a.threads)
    print(f"shape: {ref['seq_len']} positions ({ref['n_image']} image, {ref['n_question']} question tokens), "
          f"{layers} layers, d_model {d_model}, {heads} heads, MLP {mlp}, vocabulary {vocab}, {a.threads} threads")
    print(f"{'block':34s} {'reference s':>11s} {'fast s':>8s} {'ratio':>7s} {'max |dp|':>9s}")
    worst = 0.0
    for block in BLOCKS:
        r, f = ref["blocks"][block], fast["blocks"][block]
        diff = max(abs(x - y) for x, y in zip(r["probs"], f["probs"], strict=True))
        worst = max(worst, diff)
        print(f"{block:34s} {r['seconds']:11.2f} {f['seconds']:8.2f} {r['seconds'] / f['seconds']:7.1f} {diff:9.1e}")
    for name in GROUPS:
        r, f = ref["groups"][name], fast["groups"][name]
        print(f"{name:34s} {r:11.2f} {f:8.2f} {r / f:7.1f}")
    name = "all six (one call)"
    rc, fc = ref["groups"][name] + ref["clean_seconds"], fast["groups"][name] + fast["clean_seconds"]
    print(f"{'one sample: clean pass + all six':34s} {rc:11.2f} {fc:8.2f} {rc / fc:7.1f}")
    print(f"clean pass (shared by the greedy answer and the fast engine): {ref['clean_seconds']:.2f} s / "
          f"{fast['clean_seconds']:.2f} s")
    print(f"max probability difference: {worst:.2e}")
    print(f"peak memory (max RSS): reference {ref['peak_rss_mb']:.0f} MB, fast {fast['peak_rss_mb']:.0f} MB, "
          f"ratio {fast['peak_rss_mb'] / ref['peak_rss_mb']:.2f} (after load: {ref['rss_after_load_mb']:.0f} / "
          f"{fast['rss_after_load_mb']:.0f} MB)")


if __name__ == "__main__":
    main()
