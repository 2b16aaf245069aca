"""The fast knockout engine: the reference engine's numbers from a fraction of its work.

A knockout only changes the attention rows of its target positions, so under causal attention every position
before the first target computes exactly what it computes in the clean pass. The engine therefore
- runs the clean pass once per sample (vision tower included; shared with the greedy answer) and keeps the
  language model's input embeddings and its KV cache;
- for each block, re-runs only the suffix from the block's first target position, on top of the clean
  prefix cache (`past_key_values`), feeding embeddings so the image is never encoded again;
- evaluates the layer windows of a block as one batch, one batch row per window, with a hook per layer that
  masks only the rows whose window covers that layer;
- lets blocks with the same first target share one preallocated copy of the prefix cache per batch size;
- computes logits for the last position only.
Batches are sized so the prefix-cache copies stay within a memory budget (by default half the model's size).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from mm_lens.knockout import Block, block_positions, check_rows, hook_name
from mm_lens.lens import forward_args
from mm_lens.protocol import vocab_softmax

if TYPE_CHECKING:
    from mm_lens.model import HookedLlava
    from mm_lens.regions import MultimodalInput

EMBED_HOOK = "blocks.0.hook_resid_pre"


@dataclass
class CleanPass:
    """The unablated pass over a prompt: what knockout runs reuse, and the cache greedy decoding continues from."""

    embeds: Float[Tensor, "1 pos d_model"]  # the language model's input (text embeddings + image features)
    keys_values: list[tuple[Tensor, Tensor]]  # per layer: keys, values ``[1, kv_head, pos, d_head]``
    last_logits: Float[Tensor, "vocab"]
    cache: DynamicCache  # HF cache object (greedy decoding extends it; `keys_values` keeps the prompt's)


def clean_pass(model: HookedLlava, inp: MultimodalInput) -> CleanPass:
    """One forward pass without hooks of ours, keeping embeddings and the KV cache (logits of the last position only)."""
    input_ids, kwargs = forward_args(inp)
    store: dict[str, Tensor] = {}

    def grab(resid: Tensor, hook) -> Tensor:
        store["embeds"] = resid
        return resid

    with torch.inference_mode():
        logits, cache = model.bridge.run_with_hooks(
            input_ids, fwd_hooks=[(EMBED_HOOK, grab)], return_type="logits_and_cache", logits_to_keep=1, **kwargs
        )
    kv = [(layer.keys, layer.values) for layer in cache.layers]
    return CleanPass(store["embeds"], kv, logits[0, -1], cache)


def batched_mask_hook(mask: Bool[Tensor, "q_pos k_pos"], rows: Bool[Tensor, "batch"]):
    """Hook on ``hook_attn_scores`` blocking `mask` in the batch rows selected by `rows` (the windows at this layer)."""
    full = mask[None, None] & rows[:, None, None, None]

    def hook(scores: Float[Tensor, "batch head q_pos k_pos"], hook=None) -> Tensor:
        return scores.masked_fill(full.to(scores.device), float("-inf"))

    return hook


def _suffix_mask(targets: Sequence[int], sources: Sequence[int], start: int, seq_len: int) -> Tensor:
    """Blocked (query row, key column) pairs for the suffix that starts at absolute position `start`."""
    mask = torch.zeros(seq_len - start, seq_len, dtype=torch.bool)
    t = torch.tensor(sorted({int(p) for p in targets}), dtype=torch.long) - start
    s = torch.tensor(sorted({int(p) for p in sources}), dtype=torch.long)
    if len(t) and len(s):
        mask[t[:, None], s[None, :]] = True
    return mask


def _prefix(clean: CleanPass, length: int) -> list[tuple[Tensor, Tensor]]:
    return [(k[:, :, :length], v[:, :, :length]) for k, v in clean.keys_values]


def _batch_size(model: HookedLlava, prefix: list[tuple[Tensor, Tensor]], n: int, budget: int | None) -> int:
    if budget is None:
        budget = max(sum(p.numel() * p.element_size() for p in model.hf_model.parameters()) // 2, 64 << 20)
    per_row = sum(k.numel() * k.element_size() * 2 for k, _ in prefix) or 1
    return max(1, min(n, budget // per_row))


class _PrefixLayer(DynamicLayer):
    """A cache layer over a preallocated buffer holding the clean prefix for every batch row.

    Each run writes only its suffix's keys and values after the prefix, so runs that share a prefix (blocks
    with the same first target) share one copy of it instead of concatenating a new one per run.
    """

    def __init__(self, keys: Tensor, values: Tensor, batch: int, suffix_len: int):
        super().__init__()
        self.prefix_len = keys.shape[2]
        shape = (batch, keys.shape[1], self.prefix_len + suffix_len, keys.shape[3])
        self.buf_k, self.buf_v = keys.new_empty(shape), values.new_empty(shape)
        self.buf_k[:, :, : self.prefix_len] = keys
        self.buf_v[:, :, : self.prefix_len] = values
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self.rewind()

    def rewind(self) -> None:
        """Forget the last run's suffix."""
        self.keys = self.buf_k[:, :, : self.prefix_len]
        self.values = self.buf_v[:, :, : self.prefix_len]

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        end = self.keys.shape[2] + key_states.shape[2]
        self.buf_k[:, :, self.keys.shape[2]: end] = key_states
        self.buf_v[:, :, self.keys.shape[2]: end] = value_states
        self.keys, self.values = self.buf_k[:, :, :end], self.buf_v[:, :, :end]
        return self.keys, self.values


def _prefix_cache(prefix: list[tuple[Tensor, Tensor]], batch: int, suffix_len: int) -> DynamicCache:
    cache = DynamicCache()
    cache.layers = [_PrefixLayer(k, v, batch, suffix_len) for k, v in prefix]
    return cache


def fast_engine(
    model: HookedLlava,
    inp: MultimodalInput,
    blocks: Sequence[Block],
    windows: Sequence[range],
    token: int,
    progress: bool = False,
    clean: CleanPass | None = None,
    memory_budget: int | None = None,
) -> Float[Tensor, "block layer"]:
    """Knockout probabilities of `token` at the last position, ``[block, window]``; equals the reference engine.

    `clean` is the prompt's clean pass when the caller already has it (the sweep shares the greedy answer's).
    """
    out = torch.empty(len(blocks), len(windows))
    n_vocab = inp.vocab_size(model)
    with torch.inference_mode():
        clean = clean or clean_pass(model, inp)
        embeds = clean.embeds
        seq_len = embeds.shape[1]
        jobs = []
        for b, block in enumerate(blocks):
            targets, sources = block_positions(inp.regions, block)
            check_rows([(targets, sources)], [str(block)])
            # An empty region blocks nothing: the clean probability, as the reference would give.
            start = min(int(t) for t in targets) if len(targets) and len(sources) else seq_len - 1
            jobs.append((start, b, targets, sources))
        caches: dict[tuple[int, int], DynamicCache] = {}
        for start, b, targets, sources in tqdm(sorted(jobs), desc="knockout", leave=False, disable=not progress):
            if caches and next(iter(caches))[0] != start:
                caches.clear()  # blocks come sorted by start: the previous prefix is done with
            mask = _suffix_mask(targets, sources, start, seq_len)
            prefix = _prefix(clean, start)
            step = _batch_size(model, prefix, len(windows), memory_budget)
            for lo in range(0, len(windows), step):
                chunk = windows[lo: lo + step]
                n = len(chunk)
                hooks = []
                for layer in sorted({layer for w in chunk for layer in w}):
                    rows = torch.tensor([layer in w for w in chunk])
                    hooks.append((hook_name(layer), batched_mask_hook(mask, rows)))
                past = None
                if start > 0:
                    past = caches.get((start, n))
                    if past is None:
                        past = caches[(start, n)] = _prefix_cache(prefix, n, seq_len - start)
                    for layer in past.layers:
                        layer.rewind()
                suffix = embeds[:, start:].expand(n, -1, -1)
                logits = model.bridge.run_with_hooks(suffix, fwd_hooks=hooks, past_key_values=past, logits_to_keep=1)
                out[b, lo: lo + n] = vocab_softmax(logits[:, -1], n_vocab)[:, token].cpu()
    return out
