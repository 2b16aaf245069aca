"""Mistral 3 / Pixtral (``mistral3``): one tile, aspect ratio kept, a merged feature grid with row breaks.

The image is resized to fit ``longest_edge``, each side a multiple of ``patch_size * spatial_merge_size`` pixels,
and never tiled. Pixtral's tower sees ``patch_size`` px patches; the model's patch merger folds each
``spatial_merge_size`` x ``spatial_merge_size`` block of patches into one feature (28 px cells in the real model),
row-major over the merged grid. The prompt spells the grid: one ``[IMG]`` per merged cell, ``[IMG_BREAK]`` after
each row, the last one ``[IMG_END]`` (the markers). The grid is read off the processor's ``image_sizes`` (the
resized ``(h, w)``), and each feature's pixel cell off the model's own ``Mistral3PatchMerger`` run on patches that
spell their coordinates (`mistral3_codes`), so the order agrees with transformers by construction.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import torch

from mm_lens.families.base import Family, FeatureCode, processor_without_video


def mistral3_codes(model: Any, outputs: Mapping[str, Any]) -> list[FeatureCode]:
    """One code per ``[IMG]`` token: the model's patch merger on patch features spelling (row, col).

    The merger's own ``forward`` runs with its learned ``merging_layer`` replaced by the identity, so each merged
    feature lists the (row, col) of the patches it folds; its box is their union in the resized image's pixels.
    """
    from transformers.models.mistral3.modeling_mistral3 import Mistral3PatchMerger

    config = model.config
    patch = int(config.vision_config.patch_size)
    merge = int(config.spatial_merge_size)
    height, width = (int(v) for v in torch.as_tensor(outputs["image_sizes"]).reshape(-1, 2)[0].tolist())
    rows, cols = height // patch, width // patch
    r = torch.arange(rows).repeat_interleave(cols)
    c = torch.arange(cols).repeat(rows)
    features = torch.stack([r, c], dim=-1).to(torch.float64)  # [rows * cols, 2], the tower's row-major order
    merger = SimpleNamespace(patch_size=patch, spatial_merge_size=merge, merging_layer=lambda x: x)
    with torch.no_grad():
        merged = Mistral3PatchMerger.forward(merger, features, torch.tensor([[height, width]]))
    merged = merged.round().long().view(merged.shape[0], 2, merge * merge)  # [feature, (row, col), kernel]
    grid_cols = cols // merge
    out: list[FeatureCode] = []
    for i, cell in enumerate(merged.tolist()):
        prow, pcol = cell
        r0, r1, c0, c1 = min(prow), max(prow) + 1, min(pcol), max(pcol) + 1
        row, col = divmod(i, grid_cols)
        assert (r0 // merge, c0 // merge) == (row, col), "patch merger order is not row-major over the merged grid"
        out.append(FeatureCode(0, row, col, row, col, (c0 * patch, r0 * patch, c1 * patch, r1 * patch)))
    return out


def mistral3_processor(path: str) -> Any:
    """``PixtralProcessor`` with the PIL image processor (no torchvision).

    The processor resizes to multiples of ``patch_size * spatial_merge_size`` by overriding the image processor's
    ``patch_size`` per call; the image processor is given that size as its own, so a direct call (the box
    mapping of `mm_lens.patches`) resizes exactly as the processor does.
    """
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    processor = processor_without_video(path, pixtral_processor_class(), PixtralImageProcessorPil)
    step = int(processor.patch_size) * int(processor.spatial_merge_size)
    processor.image_processor.patch_size = {"height": step, "width": step}
    return processor


def pixtral_processor_class() -> type:
    """transformers' ``PixtralProcessor`` class, imported without torchvision.

    Its module imports one helper, ``get_resize_output_image_size``, from the torchvision image processor's module;
    where torchvision is missing, that import is served for the moment of the import by the PIL image processor's
    module, which defines the same function (``transformers`` itself only hands out a placeholder class then).
    """
    import importlib
    import sys

    name = "transformers.models.pixtral.processing_pixtral"
    helper = "transformers.models.pixtral.image_processing_pixtral"
    try:
        return importlib.import_module(name).PixtralProcessor
    except ImportError:
        sys.modules.pop(name, None)
    pil = importlib.import_module("transformers.models.pixtral.image_processing_pil_pixtral")
    saved = sys.modules.get(helper)
    sys.modules[helper] = pil
    try:
        return importlib.import_module(name).PixtralProcessor
    finally:
        if saved is None:
            sys.modules.pop(helper, None)
        else:
            sys.modules[helper] = saved


def _pixel_tiles(outputs: Mapping[str, Any]) -> torch.Tensor:
    """The one tile ``[1, 3, h, w]``, cut to the resized size (``image_sizes``) from any batch padding."""
    pv = outputs["pixel_values"]
    pv = torch.as_tensor(pv) if not isinstance(pv, torch.Tensor) else pv
    pv = pv.reshape(-1, *pv.shape[-3:])[:1]
    sizes = outputs.get("image_sizes")
    if sizes is not None:
        h, w = (int(v) for v in torch.as_tensor(sizes).reshape(-1, 2)[0].tolist())
        pv = pv[..., :h, :w]
    return pv


MISTRAL3 = Family(
    name="mistral3",
    title="Mistral 3 / Pixtral",
    model_types=("mistral3",),
    layout=mistral3_codes,
    processor=mistral3_processor,
    model_inputs=("pixel_values", "image_sizes"),
    marker_tokens=("[IMG_BREAK]", "[IMG_END]"),
    pixel_tiles=_pixel_tiles,
    layout_note="`[IMG]` per merged 2x2 patch cell, row-major, `[IMG_BREAK]` after each row, `[IMG_END]` last; "
                "one tile, aspect ratio kept",
)

FAMILIES = (MISTRAL3,)

__all__ = ["FAMILIES", "MISTRAL3", "mistral3_codes", "mistral3_processor", "pixtral_processor_class"]
