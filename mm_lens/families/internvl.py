"""InternVL 3 (``internvl``, the HF-native ``InternVLForConditionalGeneration``): aspect-ratio tiles plus a thumbnail.

The image processor (GOT-OCR2's, ``crop_to_patches``) picks a grid of ``image_size`` square tiles whose aspect ratio
best fits the image (between ``min_patches`` and ``max_patches`` tiles), row-major, and adds the whole image squashed
to one tile (the thumbnail) last when there is more than one tile. Each tile's ``patch_size`` patches are folded by
the model's ``pixel_shuffle`` (``downsample_ratio`` 0.5): one feature per 2x2 block of patches. The prompt is
``<img>`` + ``<IMG_CONTEXT>`` x (features per tile x tiles) + ``</img>``; ``<img>`` / ``</img>`` are the markers.
Each feature's patches are read off the model's own ``pixel_shuffle`` run on patches that spell their (row, col)
(`internvl_codes`), so the order agrees with transformers by construction; the thumbnail is the Base Image.

TransformerLens 4.3 ships no InternVL adapter. The module layout is LLaVA's (``model.vision_tower``,
``model.multi_modal_projector``, ``model.language_model``, ``lm_head``), but the LLaVA adapter wraps the tower in a
CLIP bridge (``pre_layrnorm``, which InternViT lacks); the Mistral 3 adapter is the LLaVA adapter with the vision
tower delegated opaquely, so it serves InternVL (`Family.tl_like`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mm_lens.families.base import Family, FeatureCode, last_tile, processor_without_video


def _hf(model: Any) -> Any:
    """The transformers ``InternVLModel`` (the one with ``pixel_shuffle``) inside a loaded model."""
    hf = getattr(model, "hf_model", model)
    return hf.model if hasattr(hf, "model") and hasattr(hf.model, "pixel_shuffle") else hf


def tile_codes(model: Any) -> list[tuple[int, int, tuple[int, int, int, int]]]:
    """One tile's features in the model's order: (row, col) in the feature grid and the pixel box each sees.

    The model's ``pixel_shuffle`` runs on a ``[1, side, side, 2]`` patch grid whose channels are (row, col); each
    output feature's channels then list the (row, col) of the patches it folds (pairs stay contiguous).
    """
    config = model.config
    vision = config.vision_config
    size = vision.image_size
    patch = vision.patch_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    side = int(size) // int(patch)
    rows = torch.arange(side).repeat_interleave(side)
    cols = torch.arange(side).repeat(side)
    coded = torch.stack([rows, cols], dim=-1).to(torch.float64).reshape(1, side, side, 2)
    with torch.no_grad():
        shuffled = _hf(model).pixel_shuffle(coded, scale_factor=float(config.downsample_ratio))
    grid_h, grid_w = shuffled.shape[1], shuffled.shape[2]
    folded = shuffled.reshape(grid_h * grid_w, -1, 2).round().long().tolist()
    out = []
    for cell in folded:
        prow = [r for r, _ in cell]
        pcol = [c for _, c in cell]
        box = (min(pcol) * patch, min(prow) * patch, (max(pcol) + 1) * patch, (max(prow) + 1) * patch)
        out.append((min(prow) * grid_h // side, min(pcol) * grid_w // side, box))
    return out


def internvl_codes(model: Any, outputs: Mapping[str, Any]) -> list[FeatureCode]:
    """Every tile's features, tile by tile (crops row-major, the thumbnail last), each in `tile_codes` order."""
    pv = outputs.get("pixel_values")
    n_tiles = 1 if pv is None else int(torch.as_tensor(pv).reshape(-1, *torch.as_tensor(pv).shape[-3:]).shape[0])
    one = tile_codes(model)
    return [FeatureCode(t, r, c, r, c, box) for t in range(n_tiles) for r, c, box in one]


def internvl_processor(path: str) -> Any:
    """``InternVLProcessor`` with GOT-OCR2's PIL image processor and no video processor (no torchvision)."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    from transformers.models.internvl.processing_internvl import InternVLProcessor

    return processor_without_video(path, InternVLProcessor, GotOcr2ImageProcessorPil)


INTERNVL = Family(
    name="internvl",
    title="InternVL 3",
    model_types=("internvl",),
    layout=internvl_codes,
    processor=internvl_processor,
    model_inputs=("pixel_values",),
    marker_tokens=("<img>", "</img>"),
    base_tile=last_tile,
    tl_like={"InternVLForConditionalGeneration": "Mistral3ForConditionalGeneration"},
    layout_note="`<img>` `<IMG_CONTEXT>` x (features per tile x tiles) `</img>`; aspect-ratio tiles row-major, "
                "thumbnail last; each feature a 2x2 patch block (pixel shuffle)",
)

FAMILIES = (INTERNVL,)

__all__ = ["FAMILIES", "INTERNVL", "internvl_codes", "internvl_processor", "tile_codes"]
