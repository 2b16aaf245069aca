"""Gemma 3 (``gemma3``, ``Gemma3ForConditionalGeneration``): a SigLIP tower whose patches are average-pooled.

The chat template puts ``<start_of_image>`` where the image goes; the processor expands it into
``\\n\\n<start_of_image>`` + ``<image_soft_token>`` x ``mm_tokens_per_image`` + ``<end_of_image>\\n\\n``. The
processed square (896 px on the real checkpoints) is cut into ``image_size / patch_size`` patches a side, and the
multi-modal projector average-pools them ``kernel_size`` x ``kernel_size`` into ``tokens_per_side`` ^ 2 features,
row-major: each feature sees one ``image_size / tokens_per_side`` px cell. The layout is read off the projector's
own ``avg_pool`` run on maps that spell each patch's row and column (`gemma3_codes`). With ``token_type_ids`` the
image block attends to itself both ways, so ``token_type_ids`` is a model input and ``image_full_forward`` says so.
Pan-and-scan crops (off by default) are further tiles, each a block of its own, the original image first.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mm_lens.families.base import Family, FeatureCode, processor_without_video


def gemma3_processor(path: str) -> Any:
    """``Gemma3Processor`` from the PIL image processor and the tokenizer (never a torchvision backend)."""
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor

    return processor_without_video(path, Gemma3Processor, Gemma3ImageProcessorPil)


def _projector(model: Any) -> Any:
    hf = model.hf_model
    inner = getattr(hf, "model", hf)
    return getattr(inner, "multi_modal_projector", None) or getattr(hf, "multi_modal_projector", None)


def _n_tiles(outputs: Mapping[str, Any]) -> int:
    pv = outputs.get("pixel_values")
    if pv is None:
        return 1
    pv = torch.as_tensor(pv) if not isinstance(pv, torch.Tensor) else pv
    return int(pv.reshape(-1, *pv.shape[-3:]).shape[0])


def gemma3_codes(model: Any, outputs: Mapping[str, Any]) -> list[FeatureCode]:
    """One code per pooled feature of every tile: the projector's ``avg_pool`` on one-hot patch-row and
    patch-column maps says which patch rows and columns each feature averages, hence its pixel cell."""
    vision = model.config.vision_config
    patch = int(vision.patch_size)
    projector = _projector(model)
    side = int(getattr(projector, "patches_per_image", int(vision.image_size) // patch))
    pool = getattr(projector, "avg_pool", None)
    if pool is None:  # no projector to run: its own arithmetic (kernel = patches / tokens per side)
        k = side // int(int(model.config.mm_tokens_per_image) ** 0.5)
        pool = torch.nn.AvgPool2d(kernel_size=k, stride=k)
    index = torch.arange(side, dtype=torch.float64)
    rows = (index[:, None, None] == index[None, :, None]).expand(side, side, side)  # channel r: patch row == r
    cols = (index[:, None, None] == index[None, None, :]).expand(side, side, side)  # channel c: patch col == c
    maps = torch.cat([rows, cols]).to(torch.float64)[None]  # [1, 2 * side, side, side]
    pooled = pool(maps)[0]  # [2 * side, out, out]
    out_side = pooled.shape[-1]
    seen_rows, seen_cols = pooled[:side] > 0, pooled[side:] > 0
    codes = []
    for r in range(out_side):
        for c in range(out_side):
            pr = torch.nonzero(seen_rows[:, r, c]).flatten()
            pc = torch.nonzero(seen_cols[:, r, c]).flatten()
            box = (int(pc.min()) * patch, int(pr.min()) * patch, (int(pc.max()) + 1) * patch,
                   (int(pr.max()) + 1) * patch)
            codes.append((r, c, box))
    return [FeatureCode(tile, r, c, r, c, box) for tile in range(_n_tiles(outputs)) for r, c, box in codes]


GEMMA3 = Family(
    name="gemma3",
    title="Gemma 3",
    model_types=("gemma3",),
    layout=gemma3_codes,
    processor=gemma3_processor,
    model_inputs=("pixel_values", "token_type_ids"),
    marker_tokens=("<start_of_image>", "<end_of_image>"),
    image_full_forward="its image features attend to each other both ways (token_type_ids)",
    layout_note="`<start_of_image>` + `<image_soft_token>` x mm_tokens_per_image (patches avg-pooled to a "
                "sqrt(n) x sqrt(n) grid, row-major, bidirectional) + `<end_of_image>`",
)

FAMILIES = (GEMMA3,)

__all__ = ["FAMILIES", "GEMMA3", "gemma3_codes", "gemma3_processor"]
