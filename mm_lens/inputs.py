"""One model input: `prepare` turns (image, question) into a `MultimodalInput`, the tensors plus the region map.

`prepare` runs in steps, each in the module that owns it:

1. `mm_lens.model.resolve_protocol` resolves the protocol (``"auto"``: the study's for its model families);
2. the protocol's input pipeline (`mm_lens.encoders`) encodes (image, question): token ids, pixels, and the
   positions of the question and of the spans;
3. `mm_lens.regions.image_tokens` says where each image feature sits (tile, row, column), and `region_map` puts
   image tokens and text positions together into a complete `RegionMap` (`mm_lens.regions`);
4. with boxes, `assign_boxes` fills the related / other patch sets by the pipeline's patch rule
   (`mm_lens.patches`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mm_lens.encoders import DEFAULT_INSTRUCTION, Encoding, encode, patch_sets, user_text
from mm_lens.families import family_of
from mm_lens.model import resolve_protocol
from mm_lens.protocol import Protocol
from mm_lens.regions import RegionMap, image_tokens, marker_positions
from mm_lens.types import SampleSkip

if TYPE_CHECKING:
    from PIL.Image import Image

    from mm_lens.model import HookedLlava

#: Processor outputs with one entry per token: extended with text entries (0) when an answer is appended.
_PER_TOKEN = ("token_type_ids", "mm_token_type_ids")


@dataclass
class MultimodalInput:
    """Model-ready tensors for one (image, question) plus the prompt and its region map."""

    input_ids: Int[Tensor, "1 pos"]
    attention_mask: Int[Tensor, "1 pos"]
    pixel_values: Float[Tensor, "..."]  # llava: (1, 3, H, W); llava_next: (1, tiles, 3, H, W)
    image_sizes: Int[Tensor, "1 2"] | None  # llava_next: original (height, width); llava: None
    prompt: str
    question: str
    regions: RegionMap
    protocol: Protocol  # the resolved protocol that built this input
    image_size: tuple[int, int] | None = None  # the original image's (width, height), for pixel boxes of patches
    #: Every other processor output the model takes (``token_type_ids``, ``pixel_attention_mask``, ...).
    extra: dict[str, Tensor] = field(default_factory=dict)

    def vocab_size(self, model: HookedLlava) -> int | None:
        """Vocabulary rows the protocol's softmax runs over (None: all)."""
        return self.protocol.vocab_size(model)

    def model_kwargs(self) -> dict[str, Tensor]:
        """Keyword arguments for ``bridge(input_ids, **kw)`` / ``run_with_hooks(input_ids, **kw)``."""
        kwargs = {"attention_mask": self.attention_mask, "pixel_values": self.pixel_values}
        if self.image_sizes is not None:
            kwargs["image_sizes"] = self.image_sizes
        kwargs.update(self.extra)
        return kwargs

    def forward_args(self, extra: list[int] | None = None) -> tuple[Int[Tensor, "1 pos"], dict[str, Tensor]]:
        """``(input_ids, kwargs)`` for ``bridge(input_ids, **kw)`` / ``run_with_hooks`` / ``run_with_cache``.

        `extra`: token ids appended to the prompt (an answer so far), the attention mask extended to cover them.
        """
        kwargs = self.model_kwargs()
        if not extra:
            return self.input_ids, kwargs
        tail = torch.tensor([list(extra)], dtype=self.input_ids.dtype, device=self.input_ids.device)
        kwargs["attention_mask"] = torch.cat([self.attention_mask, torch.ones_like(tail)], dim=1)
        for key in _PER_TOKEN:  # per-token inputs cover the appended text too (text type 0)
            if key in kwargs and kwargs[key].shape[-1] == self.input_ids.shape[1]:
                kwargs[key] = torch.cat([kwargs[key], torch.zeros_like(tail, dtype=kwargs[key].dtype)], dim=-1)
        return torch.cat([self.input_ids, tail], dim=1), kwargs


# ------------------------------------------------------------------------------------------ prepare


def prepare(
    model: HookedLlava,
    image: Image,
    question: str,
    instruction: str | None = DEFAULT_INSTRUCTION,
    spans: dict[str, str] | None = None,
    boxes: Sequence[Any] | None = None,
    protocol: str | Protocol | None = "auto",
) -> MultimodalInput:
    """Tokenise (image, question) as `protocol` says and locate every region of interest.

    ``protocol``: ``"study"`` (the study's prompt, tokens, pixels and patch rule), ``"checkpoint"`` (the
    checkpoint's chat template and processor) or ``"auto"`` (the study's for its model families). The user
    text is ``question + " \\n" + instruction``; ``spans`` names substrings of it (e.g. ``{"True Option":
    "red"}``); ``boxes`` (image pixels) fill the related / other patch sets.
    """
    proto = resolve_protocol(protocol, model)
    question = question.strip()
    if not question:
        raise SampleSkip("the question is empty; pass the question text", "empty question")
    image = image.convert("RGB") if getattr(image, "mode", "RGB") != "RGB" else image
    encoding = encode(proto, model, image, question, user_text(question, instruction), dict(spans or {}))
    inp = _model_input(model, encoding, question, region_map(model, encoding), proto)
    inp.image_size = tuple(int(v) for v in image.size)
    if boxes is not None:
        assign_boxes(model, inp, image, boxes)
    return inp


def region_map(model: HookedLlava, encoding: Encoding) -> RegionMap:
    """The complete region map of an encoded input: its image tokens and the protocol's text positions."""
    seq_len = int(encoding.input_ids.shape[1])
    family = family_of(model.model_type)
    tokens = image_tokens(model, encoding.input_ids, encoding.outputs())
    positions = [t.position for t in tokens]
    spans = [(min(positions), max(positions) + 1)] if family.image_full_forward and positions else []
    tile = getattr(model.config.vision_config, "image_size", 0)
    return RegionMap(
        seq_len=seq_len,
        image_tokens=tokens,
        question=list(encoding.question),
        last=seq_len - 1,
        spans=dict(encoding.spans),
        tile_size=int(tile[0] if isinstance(tile, (list, tuple)) else tile or 0),
        markers=marker_positions(model, encoding.input_ids, positions),
        base_tile=family.base_tile(tokens),
        full_forward_spans=spans,
    )


def _model_input(
    model: HookedLlava, encoding: Encoding, question: str, regions: RegionMap, proto: Protocol
) -> MultimodalInput:
    """The encoding's tensors on the model's device (pixels in the vision tower's dtype), with its regions."""
    device = model.device
    vision_dtype = next(model.hf_model.parameters()).dtype
    image_sizes = encoding.image_sizes
    extra = {
        key: value.to(device=device, dtype=vision_dtype if value.is_floating_point() else value.dtype)
        for key, value in encoding.extra.items()
    }
    return MultimodalInput(
        input_ids=encoding.input_ids.to(device),
        attention_mask=torch.ones_like(encoding.input_ids).to(device),
        pixel_values=encoding.pixel_values.to(device=device, dtype=vision_dtype),
        image_sizes=image_sizes.to(device) if image_sizes is not None else None,
        prompt=encoding.prompt,
        question=question,
        regions=regions,
        protocol=proto,
        extra=extra,
    )


def assign_boxes(model: HookedLlava, inp: MultimodalInput, image: Image, boxes: Sequence[Any]) -> None:
    """Fill the related / other patch sets of `inp` for `boxes` (image pixels) by its protocol's rule."""
    inp.regions.related, inp.regions.other = patch_sets(inp.protocol, model, image, inp.regions, boxes)


__all__ = ["DEFAULT_INSTRUCTION", "MultimodalInput", "assign_boxes", "prepare", "region_map"]
