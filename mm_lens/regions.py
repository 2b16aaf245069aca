"""Regions: named sets of positions in the language model's input, and where each image token sits.

A *region* is a named set of positions in the language model's input sequence. Every analysis addresses
the input through region names: a knockout block ``"Image->Last"`` cuts the attention from the ``Last``
position to the ``Image`` positions, an attention table sums a region's share, patching swaps a region's
activations. The names (`REGION_NAMES`; the study's names for the same sets in `ALIASES`):

* ``Image``: every image token; ``Question``: the tokens of the question text (not the instruction);
  ``Last``: the final position, where the answer's first token is predicted.
* ``Base Image`` / ``HD Image`` (tiled families): the image tokens of the tile that shows the whole image
  (LLaVA-NeXT / OneVision's base tile 0, Idefics3's global tile, InternVL's thumbnail) and those of the other tiles
  (row separators included, as the study counts them). A one-tile family's image is all ``Base Image``.
* ``Image Markers``: the tokens that mark the image without being features (Gemma 3's ``<start_of_image>``,
  Idefics3's tile tags, Pixtral's ``[IMG_BREAK]``, Qwen's ``<|vision_start|>``); ``Image`` never includes them.
* ``Related Image Patches`` / ``Other Image Patches``: the image tokens whose patch does / does not show an
  object's box (and their ``HD`` restrictions); they need the boxes (`mm_lens.inputs.assign_boxes`).
* Spans: named pieces of the user text located on request (``"True Option"``, ``"Central Object"``, ...);
  ``Question without Options`` is the question less both option spans.

A position is an absolute index into the sequence the language model reads, *after* the processor has
expanded the one ``<image>`` placeholder into one token per image feature. `image_tokens` pairs the positions
that hold the image token id, in order, with `image_codes`: the tile, row and column of each feature the model
packs, by the model's family (`mm_lens.families`: each family's layout is read off the model's own packing code
run on coded inputs, e.g. LLaVA-NeXT's ``pack_image_features`` on features that spell their coordinates, so the order
agrees with transformers by construction). Each pair is an `ImageToken`; a `RegionMap` holds them and the text
positions, and is the only place that turns names into positions (`RegionMap.positions`).
`mm_lens.inputs.prepare` builds it for an (image, question).

What a knockout of a region cuts is attention, and only attention. On Qwen3-VL the ``Image`` positions also
receive visual features outside attention: DeepStack adds the vision tower's intermediate features to the
residual stream at those positions in the first language layers, inside HF's forward. ``Image->Question`` cuts the
question's attention to the image positions in the window; it does not stop the image positions from holding the
DeepStack features, nor later layers from reading them there outside the window. The ablation that removes them
as well is `mm_lens.families.qwen_vl.without_deepstack`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from torch import Tensor

from mm_lens.errors import MMLensError
from mm_lens.families import FeatureCode, family_of

if TYPE_CHECKING:
    from mm_lens.model import HookedLlava

IMAGE, QUESTION, LAST = "Image", "Question", "Last"
RELATED, OTHER = "Related Image Patches", "Other Image Patches"
TRUE_OPTION, FALSE_OPTION, CENTRAL_OBJECT = "True Option", "False Option", "Central Object"
QUESTION_WITHOUT_OPTIONS = "Question without Options"
# The tokens that mark the image without being image features: begin / end markers, tile tags, row breaks.
IMAGE_MARKERS = "Image Markers"
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
    IMAGE, QUESTION, LAST, RELATED, OTHER, QUESTION_WITHOUT_OPTIONS, BASE_IMAGE, HD_IMAGE, RELATED_HD, OTHER_HD,
    IMAGE_MARKERS,
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
    markers: list[int] = field(default_factory=list)  # the Image Markers region
    base_tile: int = 0  # the tile that shows the whole image (Base Image); the others are HD Image
    #: Spans [start, stop) where a knockout target leaves no clean prefix (Gemma 3's bidirectional image block,
    #: Qwen3-VL's DeepStack image positions): `mm_lens.engines.fast_engine` runs such blocks as full forwards.
    full_forward_spans: list[tuple[int, int]] = field(default_factory=list)

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
            return [t.position for t in self.image_tokens if (t.tile == self.base_tile) == base]
        if target == IMAGE_MARKERS:
            return list(self.markers)
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


# ------------------------------------------------------------------------------------------ image tokens


def image_tokens(model: HookedLlava, input_ids: Tensor, outputs: Mapping[str, Any] | None = None
                 ) -> tuple[ImageToken, ...]:
    """Every image token of ``input_ids``, in sequence order: the n-th image position stands for the n-th
    feature of the family's layout (`image_codes`). ``outputs``: the processor's tensors (NeXT's
    ``image_sizes``, Qwen's ``image_grid_thw``, ...)."""
    ids = input_ids[0]
    positions = (ids == model.image_token_id).nonzero().flatten().tolist()
    codes = image_codes(model, outputs or {})
    if len(codes) != len(positions):
        raise MMLensError(
            f"{len(positions)} image tokens in the input but the model packs {len(codes)} image features; "
            "the processor's settings (patch size, tiles, feature strategy) disagree with the model config"
        )
    return tuple(
        ImageToken(position, code.tile, code.row, code.col, code.grid_row, code.grid_col, code.box, code.is_newline)
        for position, code in zip(positions, codes, strict=True)
    )


def image_codes(model: HookedLlava, outputs: Mapping[str, Any]) -> list[FeatureCode]:
    """One `FeatureCode` per image feature the model packs, in sequence order, by the model's family layout
    (`mm_lens.families`); ``outputs``: the processor's tensors for the image."""
    return family_of(model.model_type).layout(model, outputs)


def marker_positions(model: HookedLlava, input_ids: Tensor, image_positions: Sequence[int]) -> list[int]:
    """The ``Image Markers`` region: positions of the family's marker tokens (image begin / end, tile tags, row
    breaks) and every other non-feature position between the first and the last image feature."""
    ids = input_ids[0].tolist()
    family = family_of(model.model_type)
    marker_ids: set[int] = set()
    vocab = model.tokenizer.get_vocab() if hasattr(model.tokenizer, "get_vocab") else {}
    for token in family.marker_tokens:
        if token in vocab:
            marker_ids.add(int(vocab[token]))
    features = set(image_positions)
    out = {p for p, i in enumerate(ids) if i in marker_ids}
    if image_positions:
        out |= {p for p in range(min(image_positions), max(image_positions) + 1) if p not in features}
    return sorted(out - features)


__all__ = [
    "ALIASES",
    "PATCH_REGIONS",
    "REGION_NAMES",
    "SPAN_NAMES",
    "ImageToken",
    "RegionMap",
    "image_codes",
    "image_tokens",
    "marker_positions",
]
