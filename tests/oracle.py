"""The test oracle for every family's knockout: a plain transformers model (eager attention, no TransformerLens)
whose attention mask is edited at the blocked (target, source) pairs in each layer of the window.

A knockout through mm-lens must give the probabilities this gives, within float tolerance: that proves the hook
cuts exactly the attention it names, on a model where nothing of mm-lens or TL runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import Any

import torch


def plain_model(path: str) -> Any:
    """The checkpoint as a plain transformers model with eager attention, float32, eval mode."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)
    return model.eval()


def decoder_attentions(model: Any) -> list[Any]:
    """The language model's self-attention modules, one per decoder layer."""
    lm = getattr(model.model, "language_model", None) or getattr(model.model, "text_model", None) or model.model
    return [layer.self_attn for layer in lm.layers]


@contextlib.contextmanager
def edited_masks(model: Any, pairs: Iterable[tuple[Sequence[int], Sequence[int]]], layers: Iterable[int],
                 heads: Sequence[int] | None = None):
    """Within the context, layers `layers` of `model` see an attention mask with every (target, source) pair of
    `pairs` set to the dtype's minimum (for `heads` only, when given)."""
    pairs = [(list(t), list(s)) for t, s in pairs]
    handles = []

    def pre_hook(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        q_len = hidden.shape[1]
        mask = kwargs.get("attention_mask")
        dtype = hidden.dtype
        lowest = torch.finfo(dtype).min
        if mask is None or mask.dtype == torch.bool:
            k_len = q_len if mask is None else mask.shape[-1]
            allowed = torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len)[None, None] if mask is None \
                else mask
            mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, lowest)
        mask = mask.clone()
        n_heads = module.config.num_attention_heads
        if mask.shape[1] == 1:
            mask = mask.expand(mask.shape[0], n_heads, *mask.shape[2:]).clone()
        k_len = mask.shape[-1]
        offset = k_len - q_len
        head_index = list(range(n_heads)) if heads is None else list(heads)
        for targets, sources in pairs:
            for t in targets:
                if 0 <= t - offset < q_len:
                    for h in head_index:
                        mask[:, h, t - offset, sources] = lowest
        kwargs["attention_mask"] = mask
        return args, kwargs

    attentions = decoder_attentions(model)
    for layer in layers:
        handles.append(attentions[layer].register_forward_pre_hook(pre_hook, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def knockout_probability(model: Any, inp: Any, pairs, layers, token: int, heads=None,
                         vocab_size: int | None = None) -> float:
    """Probability of `token` at the last position of `inp` (a `MultimodalInput`) with the edited masks."""
    input_ids, kwargs = inp.forward_args()
    kwargs = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in kwargs.items()}
    with torch.inference_mode(), edited_masks(model, pairs, layers, heads):
        logits = model(input_ids=input_ids, **kwargs).logits[0, -1]
    logits = logits[:vocab_size] if vocab_size else logits
    return float(logits.float().softmax(-1)[token])
