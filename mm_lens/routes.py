"""Knockout routes into attention that TransformerLens does not compute itself.

Some TL 4.3 adapters (Qwen2.5-VL, Qwen3-VL, GLM-4V) keep Hugging Face's native attention: their
``blocks.{l}.attn.hook_attn_scores`` fires after HF has used the weights, with post-softmax weights, and an edit is
discarded. `install_attention_route` instead registers an attention function through transformers'
``AttentionInterface`` (and the eager mask function under the same name in ``AttentionMaskInterface``, without which
mask creation returns no mask) and sets it on the language model's config only. The function computes eager
attention and fires the bridge's own hook points ``blocks.{l}.attn.hook_attn_scores`` (pre-softmax,
``batch head q k``) and ``hook_pattern`` inside the computation, so a knockout edit reaches the softmax; it returns
no weights, so TL's post-hoc path never runs.
"""

from __future__ import annotations

from typing import Any

from mm_lens import hook_points
from mm_lens.errors import MMLensError

ROUTE_NAME = "mm_lens_knockout"
_HOOKS = "_mm_lens_hooks"  # attribute on each HF attention module: (scores HookPoint, pattern HookPoint)


def hooked_eager_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                           scaling: float | None = None, dropout: float = 0.0, **kwargs: Any) -> tuple[Any, None]:
    """Eager attention (GQA repeat, float32 softmax, no dropout) firing the bridge's score and pattern hooks."""
    import torch

    hooks = getattr(module, _HOOKS, None)
    n_rep = query.shape[1] // key.shape[1]
    if n_rep > 1:
        key = key.repeat_interleave(n_rep, dim=1)
        value = value.repeat_interleave(n_rep, dim=1)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    if hooks is not None:
        scores = hooks[0](scores)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if hooks is not None:
        weights = hooks[1](weights)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, eager_mask

    AttentionInterface.register(ROUTE_NAME, hooked_eager_attention)
    if ROUTE_NAME not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(ROUTE_NAME, eager_mask)


def language_model(hf_model: Any) -> Any:
    """The decoder stack of a vision-language HF model (``model.language_model``)."""
    inner = getattr(hf_model, "model", hf_model)
    lm = getattr(inner, "language_model", None)
    if lm is None or not hasattr(lm, "layers"):
        raise MMLensError(f"{type(hf_model).__name__} has no language_model with decoder layers for the knockout route")
    return lm


def install_attention_route(model: Any) -> None:
    """Route the language model's attention through `hooked_eager_attention` with the bridge's hook points."""
    _register()
    bridge = model.bridge
    lm = language_model(model.hf_model)
    points = dict(getattr(bridge, "hook_dict", {}))
    for layer, decoder in enumerate(lm.layers):
        attn = decoder.self_attn
        scores = points.get(hook_points.attn_scores(layer))
        pattern = points.get(hook_points.attn_pattern(layer))
        if scores is None or pattern is None:
            raise MMLensError(f"the bridge has no {hook_points.attn_scores(layer)} / hook_pattern for the route")
        for module in (attn, getattr(attn, "original_component", None)):  # TL wraps HF's module in its bridge
            if module is not None:
                object.__setattr__(module, _HOOKS, (scores, pattern))
    lm.config._attn_implementation = ROUTE_NAME
    for decoder in lm.layers:
        decoder.self_attn.config._attn_implementation = ROUTE_NAME


__all__ = ["ROUTE_NAME", "hooked_eager_attention", "install_attention_route", "language_model"]
