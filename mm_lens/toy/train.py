"""Train the shipped toy LLaVA on the shapes world, from scratch, on a CPU.

A genuine `LlavaForConditionalGeneration` (CLIP vision tower, projector, Llama language model) with its own
tokenizer, image processor and chat template. The recipe, beyond the answer loss (LLaVA's: answer tokens only):
- dense supervision of the image tokens: linear heads on the projector output predict, per patch, the shape,
  colour and size of the object covering most of the patch, and the patch column;
- supervision of the object words of the question: linear heads on the final residual stream at each shape
  word predict whether that object is in the image and, if so, its colour, size and horizontal position.
The heads are dropped after training; only the LLaVA checkpoint is saved. The learning rate follows a cosine
over the time budget, and the best checkpoint so far (by the worst task's held-out accuracy) is saved at every
evaluation, so stopping the run never loses a finished checkpoint; the run ends early once every held-out
question is answered right. Shapes sit on the 16 px patch grid (see `world`): with free placement, shape
recognition from patch fragments stalled every question type that needs shapes or positions near chance.

Run: `mm-lens train-toy --out assets/toy-llava` or `python -m mm_lens.toy.train` (the shipped model: 3,200
steps, 36 minutes on 2 CPU cores; `assets/toy-llava/training_log.txt`).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mm_lens.toy import world

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %} "
    "{% else %}ASSISTANT: "
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "</s>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
INSTRUCTION = "Answer the question using a single word or phrase."
PATCH = 16
GRID = world.IMAGE_SIZE // PATCH
SHAPE_IDS = {s: i + 1 for i, s in enumerate(world.SHAPES)}
COLOR_IDS = {c: i + 1 for i, c in enumerate(world.COLORS)}
SIZE_IDS = {s: i + 1 for i, s in enumerate(world.SIZES)}
WORD_TO_SHAPE = {**{s: s for s in world.SHAPES}, **{p: s for s, p in world.PLURALS.items()}}


def build_processor(out_dir: Path):
    """Tokenizer (word level), CLIP image processor and chat template, saved and reloaded from `out_dir`."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    words = specials + ["\n", ":", "?", ",", "."] + world.vocabulary()
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n|[A-Za-z]+|[^\sA-Za-z]"), behavior="removed", invert=True)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=["<image>"], model_max_length=512,
    )
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": world.IMAGE_SIZE}, crop_size={"height": world.IMAGE_SIZE, "width": world.IMAGE_SIZE},
        do_center_crop=True, do_resize=True, do_normalize=True, do_convert_rgb=True,
    )
    proc = LlavaProcessor(
        image_processor=image_processor, tokenizer=fast, patch_size=PATCH, vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE, num_additional_image_tokens=1, image_token="<image>",
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    proc.save_pretrained(out_dir)
    return LlavaProcessor.from_pretrained(out_dir)


def build_model(tokenizer, d_model: int = 128, n_layers: int = 8, seed: int = 0):
    """A small LLaVA-1.5-shaped model: CLIP tower (patch 16 on 64 px: a 4 x 4 grid), 2-layer projector,
    Llama text model."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=96, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                              image_size=world.IMAGE_SIZE, patch_size=PATCH, projection_dim=96)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=d_model * 3,
                       num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    cfg = LlavaConfig(vision_config=vision, text_config=text,
                      image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                      projector_hidden_act="gelu", vision_feature_select_strategy="default", vision_feature_layer=-1,
                      image_seq_length=GRID * GRID, tie_word_embeddings=False)
    cfg.pad_token_id = tokenizer.pad_token_id
    return LlavaForConditionalGeneration(cfg)


def prompt_text(processor, question: str) -> str:
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"{question} \n{INSTRUCTION}"}]}]
    return processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor
    answer_pos: torch.Tensor  # index of the last prompt token (predicts the answer)
    answer_ids: torch.Tensor
    eos_ids: torch.Tensor
    patch_targets: torch.Tensor  # [B, 64, 4]: shape, colour, size, column
    noun_index: torch.Tensor  # [N, 2]: (batch row, position)
    noun_targets: torch.Tensor  # [N, 4]: present, colour, size, x quartile
    tasks: list[str]


def _patch_targets(objs) -> np.ndarray:
    """Per patch: shape, colour and size of the object covering most of it (0 = background), and its column."""
    t = np.zeros((GRID, GRID, 4), dtype=np.int64)
    t[:, :, 3] = np.arange(GRID)[None, :]
    for r in range(GRID):
        for c in range(GRID):
            best = 0
            for o in objs:
                dx = min(o.x + o.w, (c + 1) * PATCH) - max(o.x, c * PATCH)
                dy = min(o.y + o.h, (r + 1) * PATCH) - max(o.y, r * PATCH)
                if dx > 0 and dy > 0 and dx * dy > best:
                    best = dx * dy
                    t[r, c, :3] = (SHAPE_IDS[o.shape], COLOR_IDS[o.color], SIZE_IDS[o.size])
    return t.reshape(GRID * GRID, 4)


def make_batch(processor, samples) -> Batch:
    """Tensors for a list of (objects, question); answers are capitalised, as LLaVA answers."""
    tok = processor.tokenizer
    images = [world.jpeg_roundtrip(world.render(objs)) for objs, _ in samples]
    prompts = [prompt_text(processor, q.text) for _, q in samples]
    enc = processor(text=prompts, images=images, return_tensors=None, padding=False)
    ids = enc["input_ids"]
    L = max(len(x) for x in ids) + 2
    B = len(samples)
    input_ids = torch.full((B, L), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    ans_pos, ans_ids, noun_index, noun_t, patch_t = [], [], [], [], []
    for b, ((objs, q), row) in enumerate(zip(samples, ids, strict=False)):
        a = tok.convert_tokens_to_ids(q.answer.capitalize())
        full = list(row) + [a, tok.eos_token_id]
        input_ids[b, : len(full)] = torch.tensor(full)
        mask[b, : len(full)] = 1
        ans_pos.append(len(row) - 1)
        ans_ids.append(a)
        by_shape = {o.shape: o for o in objs}
        for p, t in enumerate(row):
            word = tok.convert_ids_to_tokens(int(t))
            if word in WORD_TO_SHAPE:
                o = by_shape.get(WORD_TO_SHAPE[word])
                noun_index.append((b, p))
                noun_t.append((1, COLOR_IDS[o.color], SIZE_IDS[o.size], min(3, int(o.cx // 16))) if o else (0, 0, 0, 0))
        patch_t.append(_patch_targets(objs))
    return Batch(
        input_ids, mask, torch.as_tensor(np.array(enc["pixel_values"])), torch.tensor(ans_pos), torch.tensor(ans_ids),
        torch.full((B,), tok.eos_token_id), torch.as_tensor(np.stack(patch_t)), torch.tensor(noun_index),
        torch.tensor(noun_t), [q.task for _, q in samples],
    )


class AuxHeads(nn.Module):
    """Training-only probes: per-patch layout from image tokens, per-object facts from question words."""

    def __init__(self, d: int):
        super().__init__()
        n_s, n_c, n_z = len(SHAPE_IDS) + 1, len(COLOR_IDS) + 1, len(SIZE_IDS) + 1
        self.patch = nn.ModuleList([nn.Linear(d, n) for n in (n_s, n_c, n_z, GRID)])
        self.noun = nn.ModuleList([nn.Linear(d, n) for n in (2, n_c, n_z, 4)])


def losses(model, heads: AuxHeads, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values,
                output_hidden_states=True)
    logits = out.logits
    rows = torch.arange(len(batch.tasks))
    ans_loss = F.cross_entropy(logits[rows, batch.answer_pos], batch.answer_ids)
    eos_loss = F.cross_entropy(logits[rows, batch.answer_pos + 1], batch.eos_ids)
    img = out.image_hidden_states.reshape(len(rows), GRID * GRID, -1)
    patch_loss = sum(F.cross_entropy(h(img).flatten(0, 1), batch.patch_targets[..., i].flatten())
                     for i, h in enumerate(heads.patch))
    final = out.hidden_states[-1][batch.noun_index[:, 0], batch.noun_index[:, 1]]
    present = batch.noun_targets[:, 0] == 1
    noun_loss = F.cross_entropy(heads.noun[0](final), batch.noun_targets[:, 0])
    if present.any():
        noun_loss = noun_loss + sum(F.cross_entropy(heads.noun[i](final[present]), batch.noun_targets[present, i])
                                    for i in (1, 2, 3))
    total = ans_loss + 0.5 * eos_loss + 0.5 * patch_loss + 0.5 * noun_loss
    return total, {
        "answer": ans_loss.item(), "eos": eos_loss.item(), "patch": patch_loss.item(), "noun": noun_loss.item()
    }


@torch.no_grad()
def evaluate(model, processor, held_out) -> dict[str, float]:
    """Held-out accuracy per task of the first answer token (argmax at the last prompt position)."""
    model.eval()
    correct: dict[str, list[bool]] = {t: [] for t in world.TASKS}
    for i in range(0, len(held_out), 64):
        b = make_batch(processor, held_out[i: i + 64])
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, pixel_values=b.pixel_values).logits
        pred = logits[torch.arange(len(b.tasks)), b.answer_pos].argmax(-1)
        for t, p, a in zip(b.tasks, pred.tolist(), b.answer_ids.tolist(), strict=False):
            correct[t].append(p == a)
    model.train()
    return {t: float(np.mean(v)) for t, v in correct.items()}


def held_out_set(n_per_task: int, seed: int = 99) -> list:
    rng = random.Random(seed)
    return [world.make_sample(rng, t) for t in world.TASKS for _ in range(n_per_task)]


def train(out_dir: Path, minutes: float, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
          eval_every: int = 200, threads: int | None = None, d_model: int = 128, n_layers: int = 8,
          init_from: Path | None = None, warmup: int = 100) -> dict:
    """Train for `minutes` of wall time; `init_from` continues from a saved checkpoint (fresh optimiser and heads)."""
    if threads:
        torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    processor = build_processor(out_dir)
    model = build_model(processor.tokenizer, d_model=d_model, n_layers=n_layers, seed=seed)
    if init_from is not None:
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(init_from)
        d_model = model.config.text_config.hidden_size
    model.config._attn_implementation = "sdpa"
    heads = AuxHeads(d_model)
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    rng = random.Random(seed)
    held_out = held_out_set(60)
    budget, t0, step, best = minutes * 60, time.time(), 0, -1.0
    log: list[dict] = []
    model.train()
    while True:
        frac = (time.time() - t0) / budget
        if frac >= 1:
            break
        warm = min(1.0, (step + 1) / max(1, warmup))
        for g in opt.param_groups:
            g["lr"] = lr * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        batch = make_batch(processor, [world.make_sample(rng) for _ in range(batch_size)])
        loss, parts = losses(model, heads, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step % 25 == 0:
            print(f"step {step} {time.time() - t0:6.0f}s lr {opt.param_groups[0]['lr']:.2e} "
                  + " ".join(f"{k} {v:.3f}" for k, v in parts.items()), flush=True)
        if step % eval_every == 0:
            acc = evaluate(model, processor, held_out)
            worst = min(acc.values())
            log.append({"step": step, "seconds": round(time.time() - t0), **acc})
            print(f"eval step {step}: " + " ".join(f"{t} {a:.2f}" for t, a in acc.items()), flush=True)
            if worst > best:
                best = worst
                model.save_pretrained(out_dir, safe_serialization=True)
                print(f"  saved (worst task {worst:.2f})", flush=True)
            if worst >= 1.0:  # every held-out question right: no later checkpoint can be saved
                break
    acc = evaluate(model, processor, held_out)
    if min(acc.values()) > best:
        model.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "training_log.json").write_text(json.dumps(log, indent=1))
    return acc


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="assets/toy-llava")
    p.add_argument("--minutes", type=float, default=78)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--init-from", type=Path, default=None, help="continue from this checkpoint's weights")
    p.add_argument("--warmup", type=int, default=100, help="warm-up steps of the learning rate")
    a = p.parse_args(argv)
    acc = train(Path(a.out), a.minutes, a.batch_size, a.lr, a.seed, a.eval_every, a.threads, init_from=a.init_from,
                warmup=a.warmup)
    print("final held-out accuracy: " + " ".join(f"{t} {v:.3f}" for t, v in acc.items()))


if __name__ == "__main__":
    main()
