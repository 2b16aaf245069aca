"""The Qwen-VL group: Qwen2-VL (``qwen2_vl``), Qwen2.5-VL (``qwen2_5_vl``), Qwen3-VL (``qwen3_vl``).

The image is smart-resized to multiples of ``patch_size * merge_size`` (28; 32 for Qwen3-VL), cut into
``patch_size`` patches, and each ``merge_size`` x ``merge_size`` cell of patches becomes one language-model token:
``<|vision_start|>`` ``<|image_pad|>`` x (h / 28) (w / 28) ``<|vision_end|>``, one tile, row-major over the merged
cells. The counts come from the processor's own ``image_grid_thw``; ``pixel_values`` are flattened patches (merge
cells grouped, the frame repeated ``temporal_patch_size`` times), which `qwen_pixel_tiles` folds back into the
resized image. Positions use 3-D mRoPE. TL's adapters keep HF's native attention, so the knockout goes through the
attention-interface route (`mm_lens.routes`).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from mm_lens.compat import qwen2_vl_adapter
from mm_lens.errors import MMLensError
from mm_lens.families.base import Family, FeatureCode, KnockoutRoute, grid_codes, processor_without_video
from mm_lens.routes import install_attention_route


def _vision(model: Any) -> Any:
    return model.config.vision_config


def qwen_codes(model: Any, outputs: Mapping[str, Any]) -> list[FeatureCode]:
    """One tile; one code per merged cell of the processor's ``image_grid_thw``, row-major."""
    vision = _vision(model)
    merge, patch = int(vision.spatial_merge_size), int(vision.patch_size)
    t, gh, gw = (int(v) for v in torch.as_tensor(outputs["image_grid_thw"])[0])
    return grid_codes(0, gh // merge, gw // merge, patch * merge)


def qwen_pixel_tiles(outputs: Mapping[str, Any], patch: int | None = None, merge: int = 2,
                     temporal: int = 2) -> torch.Tensor:
    """``[1, 3, H, W]``: the processor's flattened patches folded back into the resized image (first frame)."""
    pv = torch.as_tensor(outputs["pixel_values"])
    _, gh, gw = (int(v) for v in torch.as_tensor(outputs["image_grid_thw"])[0])
    if patch is None:  # patch_dim = 3 * temporal * patch^2
        patch = round((pv.shape[-1] / (3 * temporal)) ** 0.5)
    x = pv[: gh * gw].reshape(gh // merge, gw // merge, merge, merge, 3, temporal, patch, patch)[:, :, :, :, :, 0]
    # (gh/m, gw/m, mh, mw, C, ph, pw) -> (C, gh/m, mh, ph, gw/m, mw, pw)
    x = x.permute(4, 0, 2, 5, 1, 3, 6).reshape(3, gh * patch, gw * patch)
    return x[None]


def _processor(processor_cls: str) -> Any:
    def build(path: str) -> Any:
        import transformers
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        return processor_without_video(path, getattr(transformers, processor_cls),
                                       Qwen2VLImageProcessorPil)

    return build


ATTENTION_INTERFACE = KnockoutRoute(
    "attention-interface",
    "an eager attention function registered through transformers' AttentionInterface on the language model fires "
    "hook_attn_scores (pre-softmax) and hook_pattern inside the computation",
    install=install_attention_route,
)

_COMMON: dict[str, Any] = dict(
    layout=qwen_codes,
    model_inputs=("pixel_values", "image_grid_thw", "mm_token_type_ids"),
    marker_tokens=("<|vision_start|>", "<|vision_end|>"),
    pixel_tiles=qwen_pixel_tiles,
    unused_libraries=("torchvision",),
    route=ATTENTION_INTERFACE,
)

QWEN2_5_VL = Family(
    name="qwen2_5_vl", title="Qwen2.5-VL", model_types=("qwen2_5_vl",), processor=_processor("Qwen2_5_VLProcessor"),
    layout_note="`<|vision_start|>` `<|image_pad|>` x (h/28)(w/28) `<|vision_end|>`, smart-resized, row-major",
    **_COMMON,
)

QWEN2_VL = Family(
    name="qwen2_vl", title="Qwen2-VL", model_types=("qwen2_vl",), processor=_processor("Qwen2VLProcessor"),
    # TL 4.3 ships no Qwen2-VL adapter; its Qwen2.5-VL adapter with the vision MLP as fc1 / fc2 serves it.
    tl_like={"Qwen2VLForConditionalGeneration": qwen2_vl_adapter},
    layout_note="`<|vision_start|>` `<|image_pad|>` x (h/28)(w/28) `<|vision_end|>`, smart-resized, row-major",
    **_COMMON,
)

QWEN3_VL = Family(
    name="qwen3_vl", title="Qwen3-VL", model_types=("qwen3_vl",), processor=_processor("Qwen3VLProcessor"),
    layout_note="`<|vision_start|>` `<|image_pad|>` x (h/32)(w/32) `<|vision_end|>`, smart-resized, row-major",
    image_full_forward="DeepStack adds visual features to early layers' image positions inside HF's forward, which "
                       "a suffix run over a cached prefix cannot replay",
    **_COMMON,
)

@contextlib.contextmanager
def without_deepstack(model: Any) -> Iterator[None]:
    """Within this context Qwen3-VL's language model runs without DeepStack: an ablation of the visual features
    HF's forward adds to the residual stream at the image positions of its first layers.

    That addition is not attention, so a knockout does not cut it: ``Image->Question`` cuts the question's attention
    to the image, but the image positions still receive the DeepStack features (and later layers read them there).
    Inside this context they receive none; the image's input embeddings (the merger's output) stay. Every forward
    through the model goes without them (the bridge, both engines, `mm_lens.sweep`, the flow analysis).
    `model`: a loaded model (`mm_lens.model.load`) or the HF ``Qwen3VLForConditionalGeneration`` itself; a model
    without DeepStack is refused. A forward pre-hook on the language model passes ``deepstack_visual_embeds=None``
    and is removed on exit.

    >>> with without_deepstack(model):
    ...     probs = fast_engine(model, inp, edges, windows, token)
    """
    hf = getattr(model, "hf_model", model)
    language_model = getattr(getattr(hf, "model", None), "language_model", None)
    if language_model is None or "deepstack_visual_embeds" not in inspect.signature(language_model.forward).parameters:
        raise MMLensError(f"{type(hf).__name__} has no DeepStack (its language model takes no deepstack_visual_embeds)")

    def drop(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if kwargs.get("deepstack_visual_embeds") is None:
            return None
        return args, {**kwargs, "deepstack_visual_embeds": None}

    handle = language_model.register_forward_pre_hook(drop, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


FAMILIES = (QWEN2_VL, QWEN2_5_VL, QWEN3_VL)

__all__ = ["ATTENTION_INTERFACE", "FAMILIES", "QWEN2_5_VL", "QWEN2_VL", "QWEN3_VL", "qwen_codes", "qwen_pixel_tiles",
           "without_deepstack"]
