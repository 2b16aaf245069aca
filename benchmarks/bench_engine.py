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
    python benchmarks/bench_engine.py --shape gemma3            # Gemma 3 4B's text width, 2 layers, 896 px SigLIP
    python benchmarks/bench_engine.py --shape qwen2_5_vl        # Qwen2.5-VL-7B's text width, 2 layers
    python benchmarks/bench_engine.py --tiny                    # a seconds-long smoke run (of --shape's family)

The family shapes build their checkpoint as the family's own classes (a word-level tokenizer with the family's
special tokens, its processor, its chat template) and load it through `mm_lens.model.load`, as a real one is loaded.
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
from typing import Any

from mm_lens.knockout import STANDARD_BLOCKS as BLOCKS

INSTRUCTION = "Answer the question using a single word or phrase"
QUESTION = "Is the large metal cylinder on the left side of the small rubber sphere red or blue?"
GROUPS = {
    "->Question (3 blocks, one call)": [b for b in BLOCKS if b.endswith("->Question")],
    "->Last (3 blocks, one call)": [b for b in BLOCKS if b.endswith("->Last")],
    "all six (one call)": BLOCKS,
}
#: Language-model shapes: family, layers, d_model, heads, MLP width, vocabulary (the vision tower is small in all).
SHAPES = {
    "default": ("llava", 8, 512, 8, 1408, 32000),
    "llava7b-2layers": ("llava", 2, 4096, 32, 11008, 32064),  # LLaVA-1.5-7B's Vicuna width, two of its 32 layers
    "gemma3": ("gemma3", 2, 2560, 8, 10240, 262208),  # Gemma 3 4B's text width (8 heads of 256, 4 KV), 2 of 34 layers
    "qwen2_5_vl": ("qwen2_5_vl", 2, 3584, 28, 18944, 152064),  # Qwen2.5-VL-7B's Qwen2 width (28 heads, 4 KV), 2 of 28
    "tiny": ("llava", 2, 64, 1, 176, 1000),
    "tiny-gemma3": ("gemma3", 2, 64, 2, 128, 1000),
    "tiny-qwen2_5_vl": ("qwen2_5_vl", 2, 64, 4, 128, 1000),
}
TEMPLATE = (
    "{% for message in messages %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% else %}{{ item['text'] }}{% endif %}{% endfor %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _word_tokenizer(out: Path, specials: list[str], words: list[str], bos: str | None, **names: str) -> Any:
    """A word-level fast tokenizer over `specials` + `words` (+ the question's words), saved to `out`, reloaded.

    The bridge needs a tokenizer loaded from disk (an in-memory fast tokenizer breaks it); `names` are the special
    token roles (``eos_token="</s>"``, ...), given to the tokenizer as such.
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    words = words + sorted(set((QUESTION + " " + INSTRUCTION).replace("?", " ").split()))
    vocab = {w: i for i, w in enumerate(dict.fromkeys(["<unk>", *specials, "\n", ":", "?", ".", *words]))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n|[A-Za-z]+|[^\sA-Za-z]"), behavior="removed", invert=True)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    role_tokens = set(names.values()) | ({bos} if bos else set())
    extra = [t for t in specials if t not in role_tokens]
    standard = {key: t for key, t in names.items() if key in ("eos_token", "pad_token")}
    roles = {key: t for key, t in names.items() if key not in standard}  # e.g. Gemma 3's boi_token
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", additional_special_tokens=extra,
                                   **({"bos_token": bos} if bos else {}), **standard,
                                   **({"extra_special_tokens": roles} if roles else {}))
    fast.save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


def _make(model_cls: Any, config: Any, out: Path, device: str | None = None, dtype: str | None = None) -> Any:
    """The random-weight model of `config`, made on `device` in `dtype` (seed 0)."""
    import torch

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype) if dtype else torch.float32)
    try:
        with torch.device(device or "cpu"):
            return model_cls(config).eval()
    finally:
        torch.set_default_dtype(default)


def build_checkpoint(out: Path, layers: int, d_model: int, tiny: bool, heads: int | None = None,
                     mlp: int | None = None, vocab_size: int | None = None,
                     vision: tuple[int, int, int, int] | None = None, device: str | None = None,
                     dtype: str | None = None) -> None:
    """Save a random LLaVA (weights, word-level tokenizer, CLIP image processor, chat template) to `out`.

    `vision` is the CLIP tower's (width, MLP width, layers, heads); `device` and `dtype` are where and in what
    precision the random weights are made (a 7B model is made on the GPU in float16 in seconds).
    """
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    fast = _word_tokenizer(out / "tokenizer", ["<s>", "</s>", "<pad>", "<image>"], ["USER", "ASSISTANT"], "<s>",
                           eos_token="</s>", pad_token="<pad>")
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
    cfg = LlavaConfig(vision_config=vision_cfg, text_config=text,
                      image_token_index=fast.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
                      vision_feature_layer=-2, tie_word_embeddings=False)
    _make(LlavaForConditionalGeneration, cfg, out, device, dtype).save_pretrained(out)


def build_gemma3(out: Path, layers: int, d_model: int, heads: int, mlp: int, vocab_size: int, tiny: bool) -> None:
    """Save a random Gemma 3 (SigLIP at 896 px, patch 14, pooled to 256 image tokens; heads of 256, 2 per KV head)."""
    import torch
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    roles = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tok = _word_tokenizer(out / "tokenizer", ["<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>",
                                              *roles.values()], ["user", "model"], "<bos>", eos_token="<eos>",
                          pad_token="<pad>", **roles)
    side, patch, features = (64, 8, 16) if tiny else (896, 14, 256)
    head_dim = 32 if tiny else 256
    text = Gemma3TextConfig(vocab_size=vocab_size, hidden_size=d_model, intermediate_size=mlp,
                            num_hidden_layers=layers, num_attention_heads=heads,
                            num_key_value_heads=max(1, heads // 2), head_dim=head_dim, query_pre_attn_scalar=head_dim,
                            sliding_window=1024, max_position_embeddings=4096)
    width, inner, depth, n_heads = (32, 64, 1, 2) if tiny else (256, 1024, 6, 4)
    vision = SiglipVisionConfig(image_size=side, patch_size=patch, hidden_size=width, intermediate_size=inner,
                                num_hidden_layers=depth, num_attention_heads=n_heads)
    ids = {key: tok.convert_tokens_to_ids(t) for key, t in roles.items()}
    cfg = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=features,
                       boi_token_index=ids["boi_token"], eoi_token_index=ids["eoi_token"],
                       image_token_index=ids["image_token"])
    model = _make(Gemma3ForConditionalGeneration, cfg, out)
    with torch.no_grad():  # the projection starts at zero: make the image matter
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.05)
    model.save_pretrained(out)
    template = (
        "{% for message in messages %}<start_of_turn>{{ 'model' if message['role'] == 'assistant' else 'user' }}\n"
        "{% for item in message['content'] %}{% if item['type'] == 'image' %}<start_of_image>"
        "{% else %}{{ item['text'] }}{% endif %}{% endfor %}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    )
    Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": side, "width": side}), tokenizer=tok,
                    chat_template=template, image_seq_length=features).save_pretrained(out)


def build_qwen2_5_vl(out: Path, layers: int, d_model: int, heads: int, mlp: int, vocab_size: int,
                     tiny: bool) -> None:
    """Save a random Qwen2.5-VL (a 640 x 480 image is 23 x 17 merged 28 px cells: 391 image tokens; 4 KV heads)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>",
                "<|vision_end|>", "<|video_pad|>"]
    tok = _word_tokenizer(out, specials, ["user", "assistant", "system"], None, eos_token="<|im_end|>",
                          pad_token="<|endoftext|>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    head_dim = d_model // heads
    section = [head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16]  # Qwen's 16/24/24 of 128, scaled
    section[0] += head_dim // 2 - sum(section)
    text = dict(hidden_size=d_model, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=2 if tiny else 4, vocab_size=vocab_size, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": section},
                tie_word_embeddings=False)
    width, inner, depth, n_heads = (32, 64, 2, 2) if tiny else (256, 1024, 4, 4)
    vision = dict(depth=depth, hidden_size=width, intermediate_size=inner, num_heads=n_heads, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_chans=3, out_hidden_size=d_model, window_size=112,
                  fullatt_block_indexes=[depth - 1])
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    _make(Qwen2_5_VLForConditionalGeneration, cfg, out).save_pretrained(out)
    pixels = {"shortest_edge": 28 * 28 * 4, "longest_edge": 28 * 28 * 16} if tiny else {
        "shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}  # the released processor's bounds
    Qwen2VLImageProcessorPil(size=pixels, patch_size=14, merge_size=2, temporal_patch_size=2).save_pretrained(out)
    (out / "chat_template.jinja").write_text(
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% for item in message['content'] %}{% if item['type'] == 'image' %}<|vision_start|><|image_pad|>"
        "<|vision_end|>{% else %}{{ item['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def worker(ckpt: str, engine: str, threads: int) -> None:
    """Run the six sweeps with one engine; print a JSON line of timings, probabilities and peak memory."""
    import numpy as np
    import torch
    from PIL import Image

    from mm_lens.data.gqa import Box
    from mm_lens.demo import demo_window
    from mm_lens.engines import clean_pass, fast_path, get_engine
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
    result = {"fast_path": fast_path(model), "seq_len": inp.regions.seq_len,
              "n_image": len(inp.regions.image_positions),
              "n_question": len(inp.regions.question), "blocks": {}}
    with torch.inference_mode():
        t0 = time.perf_counter()
        clean = clean_pass(model, inp)  # a sweep needs it anyway (greedy answer, base probability)
        result["clean_seconds"] = time.perf_counter() - t0
        unembed = model.bridge.unembed  # one position's logits: a cost every engine call pays once, at any depth
        last = clean.resid_pre[-1][:, -1]
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            unembed(last)
            times.append(time.perf_counter() - t0)
        result["unembed_seconds"] = min(times)
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


BUILDERS = {"gemma3": build_gemma3, "qwen2_5_vl": build_qwen2_5_vl}


def _tiny(shape: str) -> str:
    """The smoke-test shape of `shape`'s family."""
    family = SHAPES[shape][0]
    return "tiny" if family == "llava" else f"tiny-{family}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=[name for name in SHAPES if not name.startswith("tiny")], default="default",
                   help="language-model shape (default: LLaVA-1.5, 8 layers, d_model 512); gemma3 and qwen2_5_vl "
                        "are those families' real widths with 2 layers")
    p.add_argument("--layers", type=int, default=None, help="override the shape's number of layers")
    p.add_argument("--d-model", type=int, default=None, help="override the shape's width (heads of 64, MLP 11/4)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="a small shape of the --shape's family, for a smoke test")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a.ckpt, a.worker, a.threads)
    family, layers, d_model, heads, mlp, vocab = SHAPES[_tiny(a.shape) if a.tiny else a.shape]
    if a.d_model is not None and a.d_model != d_model:
        d_model, heads, mlp = a.d_model, max(1, a.d_model // 64), a.d_model * 11 // 4
    layers = a.layers or layers
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / f"bench-{family}"
        if family == "llava":
            build_checkpoint(ckpt, layers, d_model, a.tiny, heads=heads, mlp=mlp, vocab_size=vocab)
        else:
            BUILDERS[family](ckpt, layers, d_model, heads, mlp, vocab, a.tiny)
        ref = _run_worker(ckpt, "reference", a.threads)
        fast = _run_worker(ckpt, "fast", a.threads)
    print(f"family: {family}; shape: {ref['seq_len']} positions ({ref['n_image']} image, "
          f"{ref['n_question']} question tokens), "
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
    print(f"unembedding of one position (paid once per engine call, at any depth): {fast['unembed_seconds']:.3f} s")
    print(f"the fast engine's path: {fast['fast_path']}")
    print(f"peak memory (max RSS): reference {ref['peak_rss_mb']:.0f} MB, fast {fast['peak_rss_mb']:.0f} MB, "
          f"ratio {fast['peak_rss_mb'] / ref['peak_rss_mb']:.2f} (after load: {ref['rss_after_load_mb']:.0f} / "
          f"{fast['rss_after_load_mb']:.0f} MB)")


if __name__ == "__main__":
    main()
