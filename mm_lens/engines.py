"""Knockout engines: how a sweep computes the knockout probabilities of every (edge, window).

An engine is any callable ``engine(model, inp, edges, windows, token, progress=False, clean=None)`` returning
``[edge, window]`` probabilities of `token` at the last position (`Engine`). Two ship, and must agree:

``reference_engine`` runs one full forward pass with the knockout hooks per (edge, window): slow and plain,
the ground truth.

``fast_engine`` gives the same numbers from a fraction of the work.

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
from typing import TYPE_CHECKING, Protocol

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from mm_lens import hook_points
from mm_lens.errors import MMLensError
from mm_lens.knockout import Edge, KnockoutHook, block_hooks, edge_positions, hook_name
from mm_lens.protocol import vocab_softmax

if TYPE_CHECKING:
    from mm_lens.model import HookedLlava
    from mm_lens.regions import MultimodalInput

EMBED_HOOK = hook_points.EMBED


@dataclass
class CleanPass:
    """The unablated pass over a prompt: what knockout runs reuse, and the cache greedy decoding continues from."""

    embeds: Float[Tensor, "1 pos d_model"]  # the language model's input (text embeddings + image features)
    keys_values: list[tuple[Tensor, Tensor]]  # per layer: keys, values ``[1, kv_head, pos, d_head]``
    last_logits: Float[Tensor, "vocab"]
    cache: DynamicCache  # HF cache object (greedy decoding extends it; `keys_values` keeps the prompt's)


def clean_pass(model: HookedLlava, inp: MultimodalInput) -> CleanPass:
    """One forward pass without hooks of ours, keeping embeddings and the KV cache (logits of the last position only)."""
    input_ids, kwargs = inp.forward_args()
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
    blocks: Sequence[Edge],
    windows: Sequence[range],
    token: int,
    progress: bool = False,
    clean: CleanPass | None = None,
    memory_budget: int | None = None,
    heads: Sequence[int] | None = None,
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
            targets, sources = edge_positions(inp.regions, block)
            hook = KnockoutHook([(targets, sources)], [str(block)], heads=heads)
            # An empty region blocks nothing: the clean probability, as the reference would give.
            start = min(int(t) for t in targets) if len(targets) and len(sources) else seq_len - 1
            jobs.append((start, b, hook))
        caches: dict[tuple[int, int], DynamicCache] = {}
        jobs.sort(key=lambda job: job[:2])
        for start, b, knockout in tqdm(jobs, desc="knockout", leave=False, disable=not progress):
            if caches and next(iter(caches))[0] != start:
                caches.clear()  # blocks come sorted by start: the previous prefix is done with
            prefix = _prefix(clean, start)
            step = _batch_size(model, prefix, len(windows), memory_budget)
            for lo in range(0, len(windows), step):
                chunk = windows[lo: lo + step]
                n = len(chunk)
                hooks = []
                for layer in sorted({layer for w in chunk for layer in w}):
                    rows = torch.tensor([layer in w for w in chunk])
                    hooks.append((hook_name(layer), knockout.with_rows(rows)))
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


# ---------------------------------------------------------------- the reference engine and the registry

class Engine(Protocol):
    """Knockout probabilities of `token` at the last position, ``[edge, window]``.

    ``clean`` is the prompt's clean pass when the caller has it (an engine may reuse it or ignore it);
    ``heads`` restricts the knockout to those attention heads (None: all).
    """

    def __call__(
        self,
        model: HookedLlava,
        inp: MultimodalInput,
        edges: Sequence[Edge],
        windows: Sequence[range],
        token: int,
        progress: bool = False,
        clean: CleanPass | None = None,
        heads: Sequence[int] | None = None,
    ) -> Float[Tensor, "edge window"]: ...


def reference_engine(
    model: HookedLlava,
    inp: MultimodalInput,
    blocks: Sequence[Edge],
    windows: Sequence[range],
    token: int,
    progress: bool = False,
    clean: CleanPass | None = None,
    heads: Sequence[int] | None = None,
) -> Float[Tensor, "block layer"]:
    """One full forward with the knockout hooks per (block, window): slow and plain, the ground truth.

    `clean` is accepted for the engine signature and not used: every pass starts from the pixels.
    """
    input_ids, kwargs = inp.forward_args()
    n_vocab = inp.vocab_size(model)
    out = torch.empty(len(blocks), len(windows))
    jobs = [(b, w) for b in range(len(blocks)) for w in range(len(windows))]
    with torch.inference_mode():
        for b, w in tqdm(jobs, desc="knockout", unit="fwd", leave=False, disable=not progress):
            hooks = block_hooks(inp.regions, blocks[b], windows[w], heads=heads)
            logits = model.bridge.run_with_hooks(input_ids, fwd_hooks=hooks, **kwargs)
            out[b, w] = vocab_softmax(logits[0, -1], n_vocab)[token]
    return out


fast_engine.reuses_clean = True  # type: ignore[attr-defined]  # layer_sweep hands it its clean pass

#: Engines by name; "fast" is the default.
ENGINES: dict[str, Engine] = {"reference": reference_engine, "fast": fast_engine}


def get_engine(engine: str | Engine) -> Engine:
    """The engine called `engine` (or `engine` itself when it is a callable), else an error listing the names."""
    if callable(engine):
        return engine
    if engine not in ENGINES:
        raise MMLensError(f"unknown sweep engine {engine!r}; available: {', '.join(sorted(ENGINES))} (or a callable)")
    return ENGINES[engine]
