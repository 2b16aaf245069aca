"""LLaVA-1.5 (``llava``) and LLaVA-NeXT (``llava_next``): the study's families.

LLaVA-1.5 packs one tile: an ``image_size / patch_size`` square grid of CLIP patches, row-major (a CLS feature
first under ``vision_feature_select_strategy="full"``). LLaVA-NeXT packs the base tile (the whole image squashed to
the tower's size) and then the any-resolution crops joined into one grid, unpadded, with an ``image_newline`` feature
closing each row; its layout is read off the model's own ``pack_image_features`` run on features that spell their
coordinates (`next_codes`), so the order agrees with transformers by construction.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mm_lens.families.base import Family, FeatureCode, grid_codes


def _side(model: Any) -> tuple[int, int]:
    vision = model.config.vision_config
    return int(vision.image_size) // int(vision.patch_size), int(vision.patch_size)


def llava_codes(model: Any, outputs: Mapping[str, Any]) -> list[FeatureCode]:
    """LLaVA-1.5: one tile, a square patch grid (after a CLS feature under the ``full`` strategy)."""
    side, patch = _side(model)
    strategy = getattr(model.config, "vision_feature_select_strategy", "default")
    cls = [FeatureCode(0, -1, -1, -1, -1, None)] if strategy == "full" else []
    return cls + grid_codes(0, side, side, patch)


def next_codes(model: Any, outputs: Mapping[str, Any]) -> list[FeatureCode]:
    """LLaVA-NeXT (and OneVision's any-res part): the model's own ``pack_image_features`` on coded features.

    Each feature spells (tile, row, col, grid_row, grid_col); what comes out packed is the sequence order of the
    image tokens, base tile first, row separators (``image_newline``) included.
    """
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    side, patch = _side(model)
    config = model.config
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    image_size = torch.as_tensor(outputs["image_sizes"])[0]
    tile_px = config.vision_config.image_size
    n_tiles = image_size_to_num_patches(image_size.tolist(), config.image_grid_pinpoints, tile_px)
    rows = torch.arange(side).repeat_interleave(side)
    cols = torch.arange(side).repeat(side)
    n_cols = _anyres_grid_width(config, image_size, side)
    per_tile = []
    for tile in range(n_tiles):
        if tile == 0:
            grid_r, grid_c = rows, cols
        else:  # position in the joined crop grid, before unpadding
            tr, tc = divmod(tile - 1, n_cols // side)
            grid_r, grid_c = rows + tr * side, cols + tc * side
        feats = torch.stack([torch.full_like(rows, tile), rows, cols, grid_r, grid_c], dim=-1)
        if strategy == "full":
            feats = torch.cat([torch.tensor([[tile, -1, -1, -1, -1]]), feats])
        per_tile.append(feats)
    features = torch.stack(per_tile).to(torch.float64)
    newline = torch.full((5,), -1.0, dtype=torch.float64)
    packed = _pack(model, features, image_size, strategy, newline)
    # Grid coordinates after unpadding: rebase to the first kept row / column of the any-res part.
    anyres = [c for c in packed[side * side + (strategy == "full"):] if c[0] >= 0]
    r0 = min((c[3] for c in anyres), default=0)
    c0 = min((c[4] for c in anyres), default=0)
    width = max((c[4] for c in anyres), default=-1) - c0 + 1
    out: list[FeatureCode] = []
    for tile, row, col, gr, gc in packed:
        if tile < 0:  # a row separator: it carries the tile / row of the patch before it
            prev = out[-1]
            out.append(FeatureCode(prev.tile, prev.row, -1, prev.grid_row, width, None, True))
            continue
        box = (col * patch, row * patch, (col + 1) * patch, (row + 1) * patch) if row >= 0 and col >= 0 else None
        if tile == 0:
            out.append(FeatureCode(tile, row, col, gr, gc, box))
        else:
            out.append(FeatureCode(tile, row, col, gr - r0, gc - c0, box))
    return out


def _pack(model: Any, features: torch.Tensor, image_size: torch.Tensor, strategy: str,
          newline: torch.Tensor) -> list[list[int]]:
    """The model's ``pack_image_features`` on one image's coded features: rows of (tile, row, col, gr, gc)."""
    packer = model.hf_model.model
    packed, _ = packer.pack_image_features([features], image_size[None], strategy, image_newline=newline)
    return packed[0].round().long().tolist()


def _anyres_grid_width(config: Any, image_size: torch.Tensor, side: int) -> int:
    """Width in patches of the joined any-res crop grid (before unpadding)."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    tile_px = config.vision_config.image_size
    _, n_w = get_anyres_image_grid_shape(image_size.tolist(), config.image_grid_pinpoints, tile_px)
    return n_w * side


LLAVA = Family(
    name="llava",
    title="LLaVA-1.5",
    model_types=("llava",),
    layout=llava_codes,
    model_inputs=("pixel_values",),
    layout_note="`<image>` x (336/14)^2 = 576, one tile, row-major",
)

LLAVA_NEXT = Family(
    name="llava_next",
    title="LLaVA-NeXT",
    model_types=("llava_next",),
    layout=next_codes,
    model_inputs=("pixel_values", "image_sizes"),
    layout_note="`<image>` per feature: base tile, then the unpadded any-res grid with an `image_newline` per row",
)

FAMILIES = (LLAVA, LLAVA_NEXT)

__all__ = ["FAMILIES", "LLAVA", "LLAVA_NEXT", "llava_codes", "next_codes"]
