"""The TransformerLens hook names mm-lens reads and writes, in one place.

A TransformerBridge exposes the HookedTransformer names: ``blocks.{l}.hook_resid_pre`` (the residual stream
entering block ``l``; at ``l = 0`` the input embeddings, image features included), ``blocks.{l}.attn.
hook_attn_scores`` (pre-softmax scores, ``batch head q_pos k_pos``: where a knockout writes -inf),
``blocks.{l}.attn.hook_pattern`` (post-softmax weights), ``blocks.{l}.hook_{attn,mlp}_out`` and
``blocks.{l}.hook_resid_post``. Build names with these functions rather than typing them out.
"""

from __future__ import annotations

EMBED = "blocks.0.hook_resid_pre"  # the input embeddings as the language model receives them


def attn_scores(layer: int) -> str:
    """Pre-softmax attention scores of block `layer`: the knockout hook point."""
    return f"blocks.{layer}.attn.hook_attn_scores"


def attn_pattern(layer: int) -> str:
    """Post-softmax attention weights of block `layer`."""
    return f"blocks.{layer}.attn.hook_pattern"


def resid_pre(layer: int) -> str:
    """The residual stream entering block `layer`."""
    return f"blocks.{layer}.hook_resid_pre"


def resid_post(layer: int) -> str:
    """The residual stream leaving block `layer`."""
    return f"blocks.{layer}.hook_resid_post"


def site(layer: int, name: str) -> str:
    """``blocks.{layer}.hook_{name}`` for a per-block activation site (``resid_pre``, ``attn_out``, ``mlp_out``...)."""
    return f"blocks.{layer}.hook_{name}"


__all__ = ["EMBED", "attn_pattern", "attn_scores", "resid_post", "resid_pre", "site"]
