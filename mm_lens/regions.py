"""Build a model input the way the checkpoint expects it, and say where each named region of it sits.

A *region* is a named set of positions in the language model's input sequence. Every analysis addresses
the input through region names: a knockout block ``"Image->Last"`` cuts the attention from the ``Last``
position to the ``Image`` positions, an attention table sums a region's share, patching swaps a region's
activations. The names (`REGION_NAMES`; the study's names for the same sets in `ALIASES`):

* ``Image``: every image token; ``Question``: the tokens of the question text (not the instruction);
  ``Last``: the final position, where the answer's first token is predicted.
* ``Base Image`` / ``HD Image`` (LLaVA-NeXT): the image tokens of tile 0, the whole image squashed to the
  vision tower's size, and those of the high-resolution tiles (row separators included).
* ``Related Image Patches`` / ``Other Image Patches``: the image tokens whose patch does / does not show an
  object's box (and their ``HD`` restrictions); they need the boxes, see `assign_boxes`.
* Spans: named pieces of the user text located on request (``"True Option"``, ``"Central Object"``, ...);
  ``Question without Options`` is the question less both option spans.

A position is an absolute index into the sequence the language model reads, *after* the processor has
expanded the one ``<image>`` placeholder into one token per image feature. `prepare` computes them in steps:

1. The protocol (`mm_lens.protocol`) encodes (image, question): token ids, pixels, and the positions of the
   question and of the spans (the checkpoint protocol's is `encode_with_processor`).
2. `image_tokens` pairs the positions that hold the image token id, in order, with `image_codes`: the tile,
   row and column of each feature the model packs. For LLaVA-NeXT the codes come from the model's own
   ``pack_image_features`` run on features that spell their coordinates, so the order (base tile, any-res
   grid after unpadding, row separators) agrees with transformers by construction. Each pair is an
   `ImageToken`.
3. `region_map` puts the image tokens and the text positions together into a complete `RegionMap`; every
   region name is derived from them when asked (`RegionMap.positions`). `RegionMap` is the only place that
   turns names into positions.
4. With boxes, `assign_boxes` fills the related / other patch sets by the protocol's patch rule
   (`mm_lens.patches`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mm_lens.errors import MMLensError
from mm_lens.types import SampleSkip

if TYPE_CHECKING:
    from PIL.Image import Image

    from mm_lens.model import HookedLlava
    from mm_lens.protocol import Encoding, Protocol

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
# Any spelling of a region name or alias (case-insensitive) -> its canonical name.
_CANONICAL = {name.lower(): name for name in REGION_NAMES} | {a.lower(): t for a, t in ALIASES.items()}

PatchBox = tuple[int, int, int, int]  # (x0, y0, x1, y1) pixels, x1/y1 exclusive


# ------------------------------------------------------------------------------------------ records


@dataclass(frozen=True)
class ImageToken:
    """One image token of the input: its sequence position and the vision patch it stands for.

    * ``tile`` indexes the processed image tiles in ``pixel_values``: LLaVA-1.5 has one tile (0);
      LLaVA-NeXT has tile 0 = the whole image resized to the vision tower's size (the "base" features,
      which come first), then tiles 1.. = the any-resolution crops in row-major order of the crop grid
      (``pixel_values[0, tile]``).
    * ``row`` / ``col`` are the vision-tower patch coordinates inside that tile (row-major
      ``image_size // patch_size`` grid). ``box`` is that patch's pixel rectangle ``(x0, y0, x1, y1)`` inside
      the processed tile, so a box mask sent through the image processor can be read patch by patch.
    * ``grid_row`` / ``grid_col`` are coordinates in the grid the model packs: for tile 0 the same as
      row / col; for the any-res part, the row / column in the joined crop grid after HF's ``unpad_image``.
    * A LLaVA-NeXT row separator (``is_newline``) closes one row of the unpadded any-res grid; it carries
      the tile and row of the patch just before it, ``col = -1``, ``grid_col`` = the grid's width and no box.
    * A CLS feature (``vision_feature_select_strategy="full"``) has row = col = -1 and no box.
    """

    position: int
    tile: int
    row: int
    col: int
    grid_row: int
    grid_col: int
    box: PatchBox | None = None
    is_newline: bool = False


def _column(field_name: str) -> cached_property:
    """A `RegionMap` attribute: ``field_name`` of every image token, as a list in sequence order."""

    def column(self: RegionMap) -> list:
        return [getattr(token, field_name) for token in self.image_tokens]

    column.__doc__ = f"``ImageToken.{field_name}`` of every image token, in sequence order."
    return cached_property(column)


@dataclass
class RegionMap:
    """Where each named region sits in the input sequence: the image tokens (`ImageToken`, in sequence
    order) and the text positions; `positions` derives every region from them.

    ``related`` / ``other`` are None until the objects' boxes are assigned (`assign_boxes`).
    """

    seq_len: int
    image_tokens: tuple[ImageToken, ...]
    question: list[int]
    last: int
    spans: dict[str, list[int]] = field(default_factory=dict)
    related: list[int] | None = None
    other: list[int] | None = None
    tile_size: int = 0  # pixels per side of a processed tile

    def __post_init__(self) -> None:
        self.image_tokens = tuple(self.image_tokens)

    # One list per `ImageToken` field, an entry per image token in sequence order, for code that indexes
    # image tokens by number (``regions.patch_row[i]``). Read them; each is computed once per map.
    image_positions = _column("position")
    patch_tile = _column("tile")
    patch_row = _column("row")
    patch_col = _column("col")
    grid_row = _column("grid_row")
    grid_col = _column("grid_col")
    patch_box = _column("box")
    is_newline = _column("is_newline")

    def names(self) -> list[str]:
        """Every name `positions` accepts."""
        return [*REGION_NAMES, *ALIASES, *self.spans]

    def positions(self, name: str) -> list[int]:
        """Sequence positions of a named region (``"Image"``, ``"Question"``, ``"Last"``, patch sets, spans)."""
        key = name.strip()
        target = _CANONICAL.get(key.lower())
        if target == IMAGE:
            return list(self.image_positions)
        if target == QUESTION:
            return list(self.question)
        if target == LAST:
            return [self.last]
        if target in (BASE_IMAGE, HD_IMAGE):
            base = target == BASE_IMAGE
            return [t.position for t in self.image_tokens if (t.tile == 0) == base]
        if target in PATCH_REGIONS:
            return self._patch_region(name, target)
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

    def _patch_region(self, name: str, target: str) -> list[int]:
        """Related / other image tokens, over the whole image or within the HD tiles."""
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

    def image_token_index(self, position: int) -> int:
        """Index into `image_tokens` (and the per-token lists) of the image token at sequence ``position``."""
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

    def forward_args(self, extra: list[int] | None = None) -> tuple[Int[Tensor, "1 pos"], dict[str, Tensor]]:
        """``(input_ids, kwargs)`` for ``bridge(input_ids, **kw)`` / ``run_with_hooks`` / ``run_with_cache``.

        `extra`: token ids appended to the prompt (an answer so far), the attention mask extended to cover them.
        """
        kwargs = self.model_kwargs()
        if not extra:
            return self.input_ids, kwargs
        tail = torch.tensor([list(extra)], dtype=self.input_ids.dtype, device=self.input_ids.device)
        kwargs["attention_mask"] = torch.cat([self.attention_mask, torch.ones_like(tail)], dim=1)
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
    from mm_lens.protocol import resolve_protocol

    proto = resolve_protocol(protocol, model)
    question = question.strip()
    if not question:
        raise SampleSkip("the question is empty; pass the question text", "empty question")
    image = image.convert("RGB") if getattr(image, "mode", "RGB") != "RGB" else image
    encoding = proto.encode(model, image, question, user_text(question, instruction), dict(spans or {}))
    inp = _model_input(model, encoding, question, region_map(model, encoding), proto)
    if boxes is not None:
        assign_boxes(model, inp, image, boxes)
    return inp


def user_text(question: str, instruction: str | None) -> str:
    """What the user turn says: the question, then (when given) the instruction on its own line."""
    return f"{question} \n{instruction}" if instruction else question


def region_map(model: HookedLlava, encoding: Encoding) -> RegionMap:
    """The complete region map of an encoded input: its image tokens and the protocol's text positions."""
    seq_len = int(encoding.input_ids.shape[1])
    return RegionMap(
        seq_len=seq_len,
        image_tokens=image_tokens(model, encoding.input_ids, encoding.image_sizes),
        question=list(encoding.question),
        last=seq_len - 1,
        spans=dict(encoding.spans),
        tile_size=int(model.config.vision_config.image_size),
    )


def _model_input(
    model: HookedLlava, encoding: Encoding, question: str, regions: RegionMap, proto: Protocol
) -> MultimodalInput:
    """The encoding's tensors on the model's device (pixels in the vision tower's dtype), with its regions."""
    device = model.device
    vision_dtype = next(model.hf_model.parameters()).dtype
    image_sizes = encoding.image_sizes
    return MultimodalInput(
        input_ids=encoding.input_ids.to(device),
        attention_mask=torch.ones_like(encoding.input_ids).to(device),
        pixel_values=encoding.pixel_values.to(device=device, dtype=vision_dtype),
        image_sizes=image_sizes.to(device) if image_sizes is not None else None,
        prompt=encoding.prompt,
        question=question,
        regions=regions,
        protocol=proto,
    )


def assign_boxes(model: HookedLlava, inp: MultimodalInput, image: Image, boxes: Sequence[Any]) -> None:
    """Fill the related / other patch sets of `inp` for `boxes` (image pixels) by its protocol's rule."""
    inp.regions.related, inp.regions.other = inp.protocol.patch_sets(model, image, inp.regions, boxes)


# ------------------------------------------------------------------------------------------ text positions


def build_prompt(model: HookedLlava, text: str) -> str:
    """The full prompt: the processor's chat template with one user turn [image, text], else LLaVA-1.5."""
    template = getattr(model.processor, "chat_template", None) or getattr(model.tokenizer, "chat_template", None)
    if template:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return model.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image_token = getattr(model.processor, "image_token", "<image>")
    return FALLBACK_TEMPLATE.replace("<image>", image_token).format(text=text)


def encode_with_processor(model: HookedLlava, image: Image, question: str, text: str, spans: dict[str, str]):
    """The checkpoint protocol's encoding: the checkpoint's chat template and processor, positions found
    through the tokenizer's character offsets (spans: whole word first, then any case, then any substring)."""
    from mm_lens.protocol import Encoding

    prompt = build_prompt(model, text)
    q_start = _question_start(model, prompt, question)
    # The user text (question + instruction) bounds the search for spans.
    text_end = q_start + (len(text) if prompt.startswith(text, q_start) else len(question))
    enc = model.processor(
        images=image,
        text=prompt,
        return_tensors="pt",
        return_offsets_mapping=True,
        return_text_replacement_offsets=True,
    )
    tokens_of = _token_locator(model, enc)
    question_pos = tokens_of(q_start, q_start + len(question))
    if not question_pos:
        raise SampleSkip(f"question {question!r} maps to no tokens", "question not in prompt")
    found_spans: dict[str, list[int]] = {}
    for span_name, span_text in spans.items():
        span_text = str(span_text)
        start = _find_word(prompt, span_text, q_start, text_end)
        if start < 0:
            raise SampleSkip(
                f"span {span_name!r} = {span_text!r} not found in the user text {prompt[q_start:text_end]!r}",
                f"{span_name} not in question",
            )
        found_spans[span_name] = tokens_of(start, start + len(span_text))
    return Encoding(
        input_ids=enc["input_ids"],
        pixel_values=enc["pixel_values"],
        image_sizes=enc.get("image_sizes"),
        prompt=prompt,
        question=question_pos,
        spans=found_spans,
    )


def _question_start(model: HookedLlava, prompt: str, question: str) -> int:
    """Character index of the question in the prompt, after its one image placeholder."""
    image_token = getattr(model.processor, "image_token", "<image>")
    if prompt.count(image_token) != 1:
        raise MMLensError(f"prompt must hold exactly one {image_token!r}, got {prompt.count(image_token)}: {prompt!r}")
    start = prompt.find(question, prompt.index(image_token))
    if start < 0:
        raise SampleSkip(
            f"question {question!r} not found in the prompt built by the chat template: {prompt!r}",
            "question not in prompt",
        )
    return start


def _token_locator(model: HookedLlava, enc: Any):
    """``tokens_of(start, end)``: the token positions that overlap prompt characters [start, end)."""
    if "offset_mapping" not in enc:
        raise MMLensError(
            f"the tokenizer of {model.name!r} gives no character offsets; load a fast (tokenizers) tokenizer"
        )
    offsets = enc["offset_mapping"][0].tolist()
    shift = _char_shifter(enc.get("text_replacement_offsets"))

    def tokens_of(start: int, end: int) -> list[int]:
        s, e = shift(start), shift(end)
        return [i for i, (a, b) in enumerate(offsets) if b > a and a < e and b > s]

    return tokens_of


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


# ------------------------------------------------------------------------------------------ image tokens


def image_tokens(model: HookedLlava, input_ids: Tensor, image_sizes: Tensor | None) -> tuple[ImageToken, ...]:
    """Every image token of ``input_ids``, in sequence order: the n-th image position stands for the n-th
    feature the model packs (`image_codes`). ``image_sizes``: NeXT's original (height, width), else None."""
    ids = input_ids[0]
    positions = (ids == image_token_id(model.config)).nonzero().flatten().tolist()
    codes = image_codes(model, image_sizes[0] if image_sizes is not None else None)
    if len(codes) != len(positions):
        raise MMLensError(
            f"{len(positions)} image tokens in the input but the model packs {len(codes)} image features; "
            "the processor's patch_size / vision_feature_select_strategy disagree with the model config"
        )
    patch_px = int(model.config.vision_config.patch_size)
    tokens: list[ImageToken] = []
    for position, code in zip(positions, codes, strict=True):
        tokens.append(_image_token(position, code, patch_px, tokens[-1] if tokens else None))
    return tuple(tokens)


def _image_token(position: int, code: tuple, patch_px: int, previous: ImageToken | None) -> ImageToken:
    """The `ImageToken` of one code of `image_codes` (``previous``: the token before it in the sequence)."""
    tile, row, col, grid_row, grid_col = (int(v) for v in (code if len(code) == 5 else (*code, code[1], code[2])))
    if tile < 0:  # a row separator: it carries the tile / row of the patch just before it
        return ImageToken(position, previous.tile, previous.row, -1, grid_row, grid_col, None, True)
    has_box = row >= 0 and col >= 0  # not a CLS feature
    box = (col * patch_px, row * patch_px, (col + 1) * patch_px, (row + 1) * patch_px) if has_box else None
    return ImageToken(position, tile, row, col, grid_row, grid_col, box)


def image_token_id(config: Any) -> int:
    """The id of the image token in the model's vocabulary."""
    token = getattr(config, "image_token_id", None)
    return int(token if token is not None else config.image_token_index)


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


def _llava_next_codes(model: HookedLlava, image_size: Tensor, strategy: str, side: int) -> list[tuple]:
    """Run the model's own ``pack_image_features`` on features that encode (tile, row, col, grid_row, grid_col).

    This guarantees the token order (base tile, unpadded any-res grid, row separators) agrees with HF.
    """
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    config = model.config
    tile_px = config.vision_config.image_size
    n_tiles = image_size_to_num_patches(image_size.tolist(), config.image_grid_pinpoints, tile_px)
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
    for tile, row, col, gr, gc in packed:
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
    tile_px = config.vision_config.image_size
    _, n_w = get_anyres_image_grid_shape(image_size.tolist(), config.image_grid_pinpoints, tile_px)
    return n_w * side


__all__ = [
    "ALIASES",
    "PATCH_REGIONS",
    "SPAN_NAMES",
    "DEFAULT_INSTRUCTION",
    "REGION_NAMES",
    "ImageToken",
    "MultimodalInput",
    "RegionMap",
    "build_prompt",
    "prepare",
    "region_map",
]
