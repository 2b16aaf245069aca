"""Idefics3 (``idefics3``) and SmolVLM (``smolvlm``): split tiles, then the global tile, each pixel-shuffled.

The image processor resizes the image (longest edge ``size["longest_edge"]``) and cuts it into
``max_image_size`` tiles, row-major, then appends the whole image squashed to one tile (the global tile, last).
The prompt spells each split tile as ``<fake_token_around_image><row_i_col_j>`` + ``<image>`` x ``image_seq_len``
with ``\\n`` closing each tile row, then ``\\n<fake_token_around_image><global-img>`` + ``<image>`` x
``image_seq_len`` + ``<fake_token_around_image>``. Inside a tile the connector's pixel shuffle folds each
``scale_factor`` x ``scale_factor`` block of vision patches into one feature; the order is read off the model's own
``pixel_shuffle`` run on patch features that spell their (row, col) (`tile_codes`), so it agrees with transformers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from mm_lens.errors import MMLensError
from mm_lens.families.base import Family, FeatureCode, last_tile, processor_without_video


def _connector(model: Any) -> Any:
    hf = getattr(model, "hf_model", model)
    return hf.model.connector


def tile_codes(model: Any) -> list[tuple[int, int, tuple[int, int, int, int]]]:
    """(row, col, box) of each feature of one tile, in sequence order, from the connector's own pixel shuffle."""
    vision = model.config.vision_config
    side = int(vision.image_size) // int(vision.patch_size)
    patch = int(vision.patch_size)
    scale = int(model.config.scale_factor)
    rows = torch.arange(side).repeat_interleave(side)
    cols = torch.arange(side).repeat(side)
    coded = torch.stack([rows, cols], dim=-1).to(torch.float64)[None]  # [1, seq, 2]: each patch spells (r, c)
    connector = _connector(model)
    shuffled = connector.pixel_shuffle(coded, scale)[0].round().long()  # [seq / s^2, 2 * s^2]
    side_out = side // scale
    out = []
    for i, feature in enumerate(shuffled.reshape(shuffled.shape[0], -1, 2).tolist()):
        rs = [rc[0] for rc in feature]
        cs = [rc[1] for rc in feature]
        box = (min(cs) * patch, min(rs) * patch, (max(cs) + 1) * patch, (max(rs) + 1) * patch)
        out.append((i // side_out, i % side_out, box))
    return out


def idefics3_codes(model: Any, outputs: Mapping[str, Any]) -> list[FeatureCode]:
    """Every real tile (padding tiles, all-False ``pixel_attention_mask``, dropped as the model drops them), each
    tile's pixel-shuffled features in the connector's order; the global tile is the last."""
    pv = torch.as_tensor(outputs["pixel_values"])
    n_tiles = pv.reshape(-1, *pv.shape[-3:]).shape[0]
    mask = outputs.get("pixel_attention_mask")
    if mask is not None:
        mask = torch.as_tensor(mask).reshape(n_tiles, -1)
        real = [t for t in range(n_tiles) if bool(mask[t].any())]
    else:
        real = list(range(n_tiles))
    per_tile = tile_codes(model)
    codes = []
    for tile in real:
        codes += [FeatureCode(tile, r, c, r, c, box) for r, c, box in per_tile]
    return codes


def pixel_tiles(outputs: Mapping[str, Any]) -> torch.Tensor:
    """``pixel_values`` [1, tiles, 3, h, w] as [tiles, 3, h, w] (padding tiles kept: tile indices match)."""
    pv = torch.as_tensor(outputs["pixel_values"])
    return pv.reshape(-1, *pv.shape[-3:])


def idefics3_processor(path: str) -> Any:
    """Idefics3's processor from its PIL image processor (no torchvision)."""
    from transformers import Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    return processor_without_video(path, Idefics3Processor, Idefics3ImageProcessorPil)


def smolvlm_processor(path: str) -> Any:
    """SmolVLM's processor from its PIL image processor, its video processor a stub (no torchvision).

    Its ``__init__`` refuses to run without ``num2words``, which only its video prompt uses (frame counts spelt
    out); where that package is missing, a stand-in that refuses video is put in its place."""
    from transformers import SmolVLMProcessor
    from transformers.models.smolvlm import processing_smolvlm
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    if not processing_smolvlm.num2words:
        processing_smolvlm.num2words = _no_num2words

    class ImageOnlySmolVLMProcessor(SmolVLMProcessor):
        """SmolVLM's processor that takes the video stand-in (its type check needs the torchvision video class)."""

        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument_name == "video_processor":
                return type(argument)
            return super().check_argument_for_proper_class(argument_name, argument)

    return processor_without_video(path, ImageOnlySmolVLMProcessor, SmolVLMImageProcessorPil)


def _no_num2words(*args: Any, **kwargs: Any) -> str:
    raise MMLensError("mm-lens analyses images only; video input is not supported")


_MARKERS = ("<fake_token_around_image>", "<global-img>") + tuple(
    f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))
_NOTE = ("per split tile `<fake_token_around_image><row_i_col_j>` + `<image>` x image_seq_len (`\\n` per tile row), "
         "then `<fake_token_around_image><global-img>` + `<image>` x image_seq_len for the global tile; "
         "pixel-shuffled scale_factor^2 patch blocks, row-major")

IDEFICS3 = Family(
    name="idefics3",
    title="Idefics3",
    model_types=("idefics3",),
    layout=idefics3_codes,
    processor=idefics3_processor,
    model_inputs=("pixel_values", "pixel_attention_mask"),
    marker_tokens=_MARKERS,
    base_tile=last_tile,
    pixel_tiles=pixel_tiles,
    layout_note=_NOTE,
)

# SmolVLM is Idefics3's layout with its own processor, booted on TL's Idefics3 adapter.
SMOLVLM = replace(
    IDEFICS3,
    name="smolvlm",
    title="SmolVLM",
    model_types=("smolvlm",),
    processor=smolvlm_processor,
    tl_like={"SmolVLMForConditionalGeneration": "Idefics3ForConditionalGeneration"},
)

FAMILIES = (IDEFICS3, SMOLVLM)

__all__ = ["FAMILIES", "IDEFICS3", "SMOLVLM", "idefics3_codes", "tile_codes"]
