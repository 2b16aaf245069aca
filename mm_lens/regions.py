"""Build a model input the way the checkpoint expects it, and map named regions to sequence positions.

Positions are absolute indices into the language model's input sequence, after the processor has
expanded ``<image>`` into one token per image feature. `RegionMap` is the only place that computes them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mm_lens.types import SampleSkip
from mm_lens.errors import MMLensError

if TYPE_CHECKING:
    from PIL.Image import Image

    from mm_lens.model import HookedLlava
    from mm_lens.protocol import Protocol

DEFAULT_INSTRUCTION = "Answer the question using a single word or phrase."
FALLBACK_TEMPLATE = "USER: <image>\n{text} ASSISTANT:"

IMAGE, QUESTION, LAST = "Image", "Question", "Last"
RELATED, OTHER = "Related Image Patches", "Other Image Patches"
TRUE_OPTION, FALSE_OPTION, CENTRAL_OBJECT = "True Option", "False Option", "Central Object"
QUESTION_WITHOUT_OPTIONS = "Question without Options"
# LLaVA-NeXT: the base tile (the whole image squashed), the high-resolution tiles (row separators
# included, as the study counts them), and the related / other patches within the latter.
BASE_IMAGE, HD_IMAGE = "Base Image", "HD Image"
RELATED_HD, OTHER_HD = "Related HD Patches", "Other HD Patches"
# The study's names for the same sets.
ALIASES = {
    "Image Central Object": RELATED,
    "Image Without Central Object": OTHER,
    "Image Original Patch": BASE_IMAGE,
    "Image HD Patch Indice": HD_IMAGE,
    "Image Central Object in HD Patch Indice": RELATED_HD,
    "Image HD Patch Without Central Object Indice": OTHER_HD,
}
REGION_NAMES = (
    IMAGE, QUESTION, LAST, RELATED, OTHER, QUESTION_WITHOUT_OPTIONS, BASE_IMAGE, HD_IMAGE, RELATED_HD, OTHER_HD
)
#: Text spans `prepare` locates when their text is given (``spans={...}``); blocks may name them.
SPAN_NAMES = (TRUE_OPTION, FALSE_OPTION, CENTRAL_OBJECT)
#: Regions that need the objects' boxes.
PATCH_REGIONS = (RELATED, OTHER, RELATED_HD, OTHER_HD)

PatchBox = tuple[int, int, int, int]  # (x0, y0, x1, y1) pixels, x1/y1 exclusive


@dataclass
class RegionMap:
    """Where each named region sits in the input sequence, and which image patch each image token is.

    Image-token coordinates (one entry per image token, in sequence order):

    * ``patch_tile`` indexes the processed image tiles in ``pixel_values``: LLaVA-1.5 has one tile (0);
      LLaVA-NeXT has tile 0 = the whole image resized to the vision tower's size (the "base" features,
      which come first), then tiles 1.. = the any-resolution crops in row-major order of the crop grid
      (``pixel_values[0, tile]``).
    * ``patch_row`` / ``patch_col`` are the vision-tower patch coordinates inside that tile (row-major
      ``image_size // patch_size`` grid). ``patch_box`` is that patch's pixel rectangle inside the
      processed tile, so a box mask sent through the image processor can be read patch by patch.
    * LLaVA-NeXT row-separator tokens (``is_newline``) close one row of the unpadded any-res grid;
      they carry the tile and row of the patch just before them, ``patch_col = -1`` and ``patch_box = None``.
    * ``grid_row`` / ``grid_col`` are coordinates in the grid the model packs: for tile 0 the same as
      row/col; for the any-res part, the row/column in the joined crop grid after HF's ``unpad_image``
      (a newline token has ``grid_col`` = that grid's width).
    * A CLS feature (``vision_feature_select_strategy="full"``) has row = col = -1 and no box.
    """

    seq_len: int
    image_positions: list[int]
    patch_tile: list[int]
    patch_row: list[int]
    patch_col: list[int]
    is_newline: list[bool]
    question: list[int]
    last: int
    spans: dict[str, list[int]] = field(default_factory=dict)
    related: list[int] | None = None
    other: list[int] | None = None
    patch_box: list[PatchBox | None] = field(default_factory=list)
    grid_row: list[int] = field(default_factory=list)
    grid_col: list[int] = field(default_factory=list)
    tile_size: int = 0  # pixels per side of a processed tile

    def names(self) -> list[str]:
        """Every name `positions` accepts."""
        return [*REGION_NAMES, *ALIASES, *self.spans]

    def positions(self, name: str) -> list[int]:
        """Sequence positions of a named region (``"Image"``, ``"Question"``, ``"Last"``, patch sets, spans)."""
        key = name.strip()
        canonical = {n.lower(): n for n in REGION_NAMES}
        canonical.update({alias.lower(): target for alias, target in ALIASES.items()})
        target = canonical.get(key.lower())
        if target == IMAGE:
            return list(self.image_positions)
        if target == QUESTION:
            return list(self.question)
        if target == LAST:
            return [self.last]
        if target in (BASE_IMAGE, HD_IMAGE):
            base = target == BASE_IMAGE
            return [p for p, tile in zip(self.image_positions, self.patch_tile) if (tile == 0) == base]
        if target in PATCH_REGIONS:
            found = self.related if target in (RELATED, RELATED_HD) else self.other
            if found is None:
                raise MMLensError(
                    f"region {name!r} needs the objects' bounding boxes; pass boxes=... to prepare() "
                    "(or a dataset with box columns)"
                )
            if target == RELATED_HD:
                hd = set(self.positions(HD_IMAGE))
                return [p for p in found if p in hd]
            if target == OTHER_HD:
                related = set(self.related or ())
                return [p for p in self.positions(HD_IMAGE) if p not in related]
            return list(found)
        if target == QUESTION_WITHOUT_OPTIONS:
            if TRUE_OPTION not in self.spans or FALSE_OPTION not in self.spans:
                raise MMLensError(
                    f"region {name!r} needs both options; pass spans={{'True Option': ..., 'False Option': ...}}"
                )
            options = set(self.spans[TRUE_OPTION]) | set(self.spans[FALSE_OPTION])
            return [p for p in self.question if p not in options]
        for span_name, span in self.spans.items():
            if span_name.lower() == key.lower():
                return list(span)
        raise MMLensError(f"unknown region {name!r}; valid names: {', '.join(self.names())}")

    def image_token_index(self, position: int) -> int:
        """Index into the per-image-token lists of the image token at sequence ``position``."""
        try:
            return self.image_positions.index(position)
        except ValueError:
            raise MMLensError(f"position {position} is not an image token") from None


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
    protocol: Protocol | None = None  # the resolved protocol that built this input (None: built by hand)

    def vocab_size(self, model: HookedLlava) -> int | None:
        """Vocabulary rows the protocol's softmax runs over (None: all)."""
        return self.protocol.vocab_size(model) if self.protocol is not None else None

    def model_kwargs(self) -> dict[str, Tensor]:
        """Keyword arguments for ``bridge(input_ids, **kw)`` / ``run_with_hooks(input_ids, **kw)``."""
        kwargs = {"attention_mask": self.attention_mask, "pixel_values": self.pixel_values}
        if self.image_sizes is not None:
            kwargs["image_sizes"] = self.image_sizes
        return kwargs

    def forward_args(self) -> tuple[Int[Tensor, "1 pos"], dict[str, Tensor]]:
        """``(input_ids, kwargs)`` for ``bridge(input_ids, **kw)`` / ``run_with_hooks`` / ``run_with_cache``."""
        return self.input_ids, self.model_kwargs()


def build_prompt(model: HookedLlava, text: str) -> str:
    """The full prompt: the processor's chat template with one user turn [image, text], else LLaVA-1.5."""
    template = getattr(model.processor, "chat_template", None) or getattr(model.tokenizer, "chat_template", None)
    if template:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return model.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image_token = getattr(model.processor, "image_token", "<image>")
    return FALLBACK_TEMPLATE.replace("<image>", image_token).format(text=text)


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
    from mm_lens.protocol import resolve_protocol

    proto = resolve_protocol(protocol, model)
    question = question.strip()
    if not question:
        raise SampleSkip("the question is empty; pass the question text", "empty question")
    text = f"{question} \n{instruction}" if instruction else question
    image = image.convert("RGB") if getattr(image, "mode", "RGB") != "RGB" else image
    enc = proto.encode(model, image, question, text, dict(spans or {}))
    regions = _image_layout(model, enc.input_ids, enc.image_sizes)
    regions.question = enc.question
    regions.spans = enc.spans
    device = model.device
    vision_dtype = next(model.hf_model.parameters()).dtype
    image_sizes = enc.image_sizes
    inp = MultimodalInput(
        input_ids=enc.input_ids.to(device),
        attention_mask=torch.ones_like(enc.input_ids).to(device),
        pixel_values=enc.pixel_values.to(device=device, dtype=vision_dtype),
        image_sizes=image_sizes.to(device) if image_sizes is not None else None,
        prompt=enc.prompt,
        question=question,
        regions=regions,
        protocol=proto,
    )
    if boxes is not None:
        assign_boxes(model, inp, image, boxes)
    return inp


def assign_boxes(model: HookedLlava, inp: MultimodalInput, image: Image, boxes: Sequence[Any]) -> None:
    """Fill the related / other patch sets of `inp` for `boxes` (image pixels) by its protocol's rule."""
    inp.regions.related, inp.regions.other = inp.protocol.patch_sets(model, image, inp.regions, boxes)


def encode_with_processor(model: HookedLlava, image: Image, question: str, text: str, spans: dict[str, str]):
    """The checkpoint protocol's encoding: the checkpoint's chat template and processor, positions found
    through the tokenizer's character offsets (spans: whole word first, then any case, then any substring)."""
    from mm_lens.protocol import Encoding

    prompt = build_prompt(model, text)
    image_token = getattr(model.processor, "image_token", "<image>")
    if prompt.count(image_token) != 1:
        raise MMLensError(f"prompt must hold exactly one {image_token!r}, got {prompt.count(image_token)}: {prompt!r}")
    img_at = prompt.index(image_token)
    q_start = prompt.find(question, img_at)
    if q_start < 0:
        raise SampleSkip(
            f"question {question!r} not found in the prompt built by the chat template: {prompt!r}",
            "question not in prompt",
        )
    # The user text (question + instruction) bounds the search for spans.
    text_start = q_start
    text_end = q_start + (len(text) if prompt.startswith(text, q_start) else len(question))

    enc = model.processor(
        images=image,
        text=prompt,
        return_tensors="pt",
        return_offsets_mapping=True,
        return_text_replacement_offsets=True,
    )
    if "offset_mapping" not in enc:
        raise MMLensError(
            f"the tokenizer of {model.name!r} gives no character offsets; load a fast (tokenizers) tokenizer"
        )
    offsets = enc["offset_mapping"][0].tolist()
    shift = _char_shifter(enc.get("text_replacement_offsets"))

    def char_span_positions(start: int, end: int) -> list[int]:
        s, e = shift(start), shift(end)
        return [i for i, (a, b) in enumerate(offsets) if b > a and a < e and b > s]

    question_pos = char_span_positions(q_start, q_start + len(question))
    if not question_pos:
        raise SampleSkip(f"question {question!r} maps to no tokens", "question not in prompt")
    found_spans: dict[str, list[int]] = {}
    for span_name, span_text in spans.items():
        start = _find_word(prompt, str(span_text), text_start, text_end)
        if start < 0:
            raise SampleSkip(
                f"span {span_name!r} = {span_text!r} not found in the user text {prompt[text_start:text_end]!r}",
                f"{span_name} not in question",
            )
        found_spans[span_name] = char_span_positions(start, start + len(str(span_text)))
    return Encoding(
        input_ids=enc["input_ids"],
        pixel_values=enc["pixel_values"],
        image_sizes=enc.get("image_sizes"),
        prompt=prompt,
        question=question_pos,
        spans=found_spans,
    )


def _find_word(text: str, needle: str, start: int, end: int) -> int:
    """First occurrence of ``needle`` in ``text[start:end]``: whole word, then any case, then any substring."""
    if not needle:
        return -1
    pattern = r"(?<!\w)" + re.escape(needle) + r"(?!\w)"
    for flags in (0, re.IGNORECASE):
        match = re.compile(pattern, flags).search(text, start, end)
        if match:
            return match.start()
    return text.find(needle, start, end)


def _char_shifter(replacement_offsets: Any):
    """Map a character index of the prompt to the index in the processor's expanded text."""
    entries = []
    if replacement_offsets:
        entries = sorted(
            (int(r["span"][1]), (r["new_span"][1] - r["new_span"][0]) - (r["span"][1] - r["span"][0]))
            for r in replacement_offsets[0]
        )

    def shift(index: int) -> int:
        return index + sum(delta for end, delta in entries if end <= index)

    return shift


def image_codes(model: HookedLlava, image_size: Tensor | None) -> list[tuple]:
    """One code per image feature the model packs, in sequence order: ``(tile, row, col[, grid_row, grid_col])``;
    tile -1 marks a LLaVA-NeXT row separator. ``image_size``: NeXT's original (height, width)."""
    config = model.config
    vision = config.vision_config
    side = int(vision.image_size) // int(vision.patch_size)
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    if model.model_type == "llava_next":
        return _llava_next_codes(model, image_size, strategy, side)
    codes = [(0, -1, -1)] if strategy == "full" else []
    return codes + [(0, r, c) for r in range(side) for c in range(side)]


def _image_layout(model: HookedLlava, input_ids: Tensor, image_sizes: Tensor | None) -> RegionMap:
    """Image positions and the patch each image token stands for, per model type."""
    config = model.config
    image_token_id = getattr(config, "image_token_id", None)
    if image_token_id is None:
        image_token_id = config.image_token_index
    ids = input_ids[0]
    image_positions = (ids == image_token_id).nonzero().flatten().tolist()
    vision = config.vision_config
    tile_px, patch_px = int(vision.image_size), int(vision.patch_size)
    codes = image_codes(model, image_sizes[0] if image_sizes is not None else None)
    if len(codes) != len(image_positions):
        raise MMLensError(
            f"{len(image_positions)} image tokens in the input but the model packs {len(codes)} image features; "
            "the processor's patch_size / vision_feature_select_strategy disagree with the model config"
        )
    regions = RegionMap(
        seq_len=int(ids.shape[0]),
        image_positions=image_positions,
        patch_tile=[],
        patch_row=[],
        patch_col=[],
        is_newline=[],
        question=[],
        last=int(ids.shape[0]) - 1,
        tile_size=tile_px,
    )
    for tile, row, col, *grid in (c if len(c) == 5 else (*c, c[1], c[2]) for c in codes):
        newline = tile < 0
        regions.is_newline.append(newline)
        if newline:  # carry the tile / row of the patch just before the separator
            tile, row = regions.patch_tile[-1], regions.patch_row[-1]
            col = -1
        regions.patch_tile.append(int(tile))
        regions.patch_row.append(int(row))
        regions.patch_col.append(int(col))
        regions.grid_row.append(int(grid[0]))
        regions.grid_col.append(int(grid[1]))
        has_box = not newline and row >= 0 and col >= 0
        regions.patch_box.append(
            (col * patch_px, row * patch_px, (col + 1) * patch_px, (row + 1) * patch_px) if has_box else None
        )
    return regions


def _llava_next_codes(model: HookedLlava, image_size: Tensor, strategy: str, side: int) -> list[tuple]:
    """Run the model's own ``pack_image_features`` on features that encode (tile, row, col, grid_row, grid_col).

    This guarantees the token order (base tile, unpadded any-res grid, row separators) agrees with HF.
    """
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    config = model.config
    n_tiles = image_size_to_num_patches(image_size.tolist(), config.image_grid_pinpoints, config.vision_config.image_size)
    rows = torch.arange(side).repeat_interleave(side)
    cols = torch.arange(side).repeat(side)
    per_tile = []
    n_cols = _anyres_grid_width(model, image_size, side)
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
    packer = model.hf_model.model
    packed, _ = packer.pack_image_features([features], image_size[None], strategy, image_newline=newline)
    packed = packed[0].round().long().tolist()
    # Grid coordinates after unpadding: rebase to the first kept row / column of the any-res part.
    anyres = [c for c in packed[side * side + (strategy == "full"):] if c[0] >= 0]
    r0 = min((c[3] for c in anyres), default=0)
    c0 = min((c[4] for c in anyres), default=0)
    width = max((c[4] for c in anyres), default=-1) - c0 + 1
    out = []
    for i, (tile, row, col, gr, gc) in enumerate(packed):
        if tile < 0:
            prev = out[-1]
            out.append((-1, -1, -1, prev[3], width))
        elif tile == 0:
            out.append((tile, row, col, gr, gc))
        else:
            out.append((tile, row, col, gr - r0, gc - c0))
    return out


def _anyres_grid_width(model: HookedLlava, image_size: Tensor, side: int) -> int:
    """Width in patches of the joined any-res crop grid (before unpadding)."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    config = model.config
    _, n_w = get_anyres_image_grid_shape(image_size.tolist(), config.image_grid_pinpoints, config.vision_config.image_size)
    return n_w * side


__all__ = [
    "ALIASES",
    "PATCH_REGIONS",
    "SPAN_NAMES",
    "DEFAULT_INSTRUCTION",
    "REGION_NAMES",
    "MultimodalInput",
    "RegionMap",
    "build_prompt",
    "prepare",
]
