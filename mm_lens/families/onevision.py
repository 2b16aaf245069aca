"""LLaVA-OneVision (``llava_onevision``): SigLIP tiles packed as LLaVA-NeXT, one ``<image>`` id per feature.

The sequence holds the base tile (the whole image squashed to the tower's size, row-major, no separator after it)
and then the any-resolution crops joined into one grid, unpadded, with an ``image_newline`` feature closing each
row. When the unpadded grid exceeds ``anyres_max_N`` tiles' worth of features (``vision_aspect_ratio``), the model
bilinearly shrinks it; each shrunk feature then mixes several patches, and mm-lens gives it the tile / row / col /
box of its nearest source patch (its grid_row / grid_col are its place in the shrunk grid). The layout is read off
the model's own ``pack_image_features`` run on features that spell their coordinates (`onevision_codes`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mm_lens.families.base import Family, FeatureCode, processor_without_video


def onevision_processor(path: str) -> Any:
    """``LlavaOnevisionProcessor`` from its PIL image processor, without the (torchvision) video processor."""
    from transformers import LlavaOnevisionProcessor

    try:
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil as image_cls,
        )
    except ImportError:  # older transformers: the slow processor is the PIL one
        from transformers import LlavaOnevisionImageProcessor as image_cls
    return processor_without_video(path, LlavaOnevisionProcessor, image_cls)


def onevision_codes(model: Any, outputs: Mapping[str, Any]) -> list[FeatureCode]:
    """The model's own ``pack_image_features`` on coded features of one image.

    Each any-res feature spells its (row, col) in the joined crop grid before unpadding; base-tile features spell
    (-2 - row, col) so they cannot be mistaken for crop ones; separators come out as -1. Bilinear shrinking keeps
    the spelling linear, so rounding names the nearest source patch.
    """
    from transformers.models.llava_onevision.modeling_llava_onevision import (
        get_anyres_image_grid_shape,
        image_size_to_num_patches,
    )

    config = model.config
    vision = config.vision_config
    tile_px, patch = int(vision.image_size), int(vision.patch_size)
    side = tile_px // patch
    image_size = torch.as_tensor(outputs["image_sizes"]).reshape(-1, 2)[0]
    n_tiles = image_size_to_num_patches(image_size.tolist(), config.image_grid_pinpoints, tile_px)
    _, n_w = get_anyres_image_grid_shape(image_size.tolist(), config.image_grid_pinpoints, tile_px)
    rows = torch.arange(side).repeat_interleave(side)
    cols = torch.arange(side).repeat(side)
    per_tile = [torch.stack([-2.0 - rows, cols.double()], dim=-1)]
    for tile in range(1, n_tiles):
        tr, tc = divmod(tile - 1, n_w)
        per_tile.append(torch.stack([rows + tr * side, cols + tc * side], dim=-1).double())
    features = torch.stack(per_tile).to(torch.float64)
    if getattr(config, "vision_feature_select_strategy", "full") == "default":
        raise NotImplementedError("OneVision with a CLS-dropping strategy")  # SigLIP towers have no CLS
    newline = torch.full((2,), -1.0, dtype=torch.float64)
    aspect = getattr(config, "vision_aspect_ratio", "anyres_max_9") or "anyres_max_9"
    packed, _ = model.hf_model.model.pack_image_features([features], image_size[None], image_newline=newline,
                                                         vision_aspect_ratio=aspect)
    out: list[FeatureCode] = []
    grid_row, grid_col = 0, 0
    for a, b in packed[0].tolist():
        if a <= -1.5:  # base tile
            row, col = int(round(-2.0 - a)), int(round(b))
            out.append(FeatureCode(0, row, col, row, col, _box(row, col, patch)))
        elif a < -0.5:  # an image_newline: it carries the tile / row of the feature before it
            prev = out[-1] if out else FeatureCode(0, -1, -1, -1, -1, None)
            out.append(FeatureCode(prev.tile, prev.row, -1, prev.grid_row, grid_col, None, True))
            grid_row, grid_col = grid_row + (prev.tile > 0), 0
        else:  # an any-res feature (its nearest source patch when the grid was shrunk)
            gr, gc = int(round(a)), int(round(b))
            tile = 1 + (gr // side) * n_w + gc // side
            row, col = gr % side, gc % side
            out.append(FeatureCode(tile, row, col, grid_row, grid_col, _box(row, col, patch)))
            grid_col += 1
    return out


def _box(row: int, col: int, patch: int) -> tuple[int, int, int, int]:
    return (col * patch, row * patch, (col + 1) * patch, (row + 1) * patch)


ONEVISION = Family(
    name="onevision",
    title="LLaVA-OneVision",
    model_types=("llava_onevision",),
    layout=onevision_codes,
    processor=onevision_processor,
    model_inputs=("pixel_values", "image_sizes", "batch_num_images"),
    layout_note="`<image>` per feature: base tile, then the unpadded any-res grid with an `image_newline` per row "
                "(bilinearly shrunk above anyres_max_9 tiles)",
)

FAMILIES = (ONEVISION,)

__all__ = ["FAMILIES", "ONEVISION", "onevision_codes", "onevision_processor"]
