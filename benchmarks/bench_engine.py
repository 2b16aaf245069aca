"""Reference vs fast knockout engine on a random-weight LLaVA of realistic shape, side by side in one run.

Builds a LLaVA-1.5-shaped checkpoint with random weights (336 px images, patch 14 -> 576 image tokens, a chat
prompt of ~40 text tokens, a 32k vocabulary, `--layers` Llama layers of width `--d-model`), then runs the full
layer sweep of each of the six standard blocks with both engines, each engine in its own subprocess so that
peak memory (max RSS) is measured separately. Prints per block and overall: both times, the ratio, the
largest probability difference, and both peak memories. Block times are the engine's own work given the
prompt's clean pass, which a sweep computes once per sample for the greedy answer whatever the engine; the
last line adds it back to both sides.

    python benchmarks/bench_engine.py                 # realistic shape (8 layers, d_model 512)
    python benchmarks/bench_engine.py --tiny          # a seconds-long smoke run
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
TEMPLATE = (
    "{% for message in messages %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% else %}{{ item['text'] }}{% endif %}{% endfor %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_checkpoint(out: Path, layers: int, d_model: int, tiny: bool) -> None:
    """Save a random LLaVA (weights, word-level tokenizer, CLIP image processor, chat template) to `out`."""
    import torch
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

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
    vision = CLIPVisionConfig(hidden_size=64 if tiny else 256, intermediate_size=128 if tiny else 1024,
                              num_hidden_layers=2 if tiny else 6, num_attention_heads=4, image_size=side,
                              patch_size=patch)
    text = LlamaConfig(vocab_size=1000 if tiny else 32000, hidden_size=d_model, intermediate_size=d_model * 11 // 4,
                       num_hidden_layers=layers, num_attention_heads=max(1, d_model // 64),
                       num_key_value_heads=max(1, d_model // 64), max_position_embeddings=2048,
                       tie_word_embeddings=False)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=vocab["<image>"],
                      vision_feature_select_strategy="default", vision_feature_layer=-2, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(cfg).save_pretrained(out)


def worker(ckpt: str, engine: str, threads: int) -> None:
    """Run the six sweeps with one engine; print a JSON line of timings, probabilities and peak memory."""
    import numpy as np
    import torch
    from PIL import Image

    from mm_lens.data.gqa import Box
    from mm_lens.demo import window_for
    from mm_lens.engines import clean_pass
    from mm_lens.model import load
    from mm_lens.regions import prepare
    from mm_lens.engines import get_engine
    from mm_lens.sweep import layer_window
    from mm_lens.knockout import parse_edge

    torch.set_num_threads(threads)
    model = load(ckpt)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
    inp = prepare(model, image, QUESTION, boxes=[Box(200, 120, 240, 200, "cylinder")])
    k = window_for(model.n_layers)  # the study's 9 of 32 layers, scaled
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
    proc = subprocess.run([sys.executable, __file__, "--worker", engine, "--ckpt", str(ckpt), "--threads", str(threads)],
                          capture_output=True, text=True, env=env, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise SystemExit(f"{engine} worker failed:\n{proc.stderr[-3000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="a small shape, for a smoke test")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a.ckpt, a.worker, a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "bench-llava"
        build_checkpoint(ckpt, 2 if a.tiny else a.layers, 64 if a.tiny else a.d_model, a.tiny)
        ref = _run_worker(ckpt, "reference", a.threads)
        fast = _run_worker(ckpt, "fast", a.threads)
    print(f"shape: {ref['seq_len']} positions ({ref['n_image']} image, {ref['n_question']} question tokens), "
          f"{2 if a.tiny else a.layers} layers, d_model {64 if a.tiny else a.d_model}, {a.threads} threads")
    print(f"{'block':34s} {'reference s':>11s} {'fast s':>8s} {'ratio':>7s} {'max |dp|':>9s}")
    worst = 0.0
    for block in BLOCKS:
        r, f = ref["blocks"][block], fast["blocks"][block]
        diff = max(abs(x - y) for x, y in zip(r["probs"], f["probs"]))
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
