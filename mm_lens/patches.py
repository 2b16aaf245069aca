"""Related / other image patches: which image tokens see the objects' boxes, found through the model's
own image preprocessing so the mapping is exact for LLaVA-1.5 (resize + centre crop or pad) and
LLaVA-NeXT (base image + any-resolution tiles, padding, row separators) alike.

How: the processor is run (normalisation and rescaling off, nearest-neighbour resampling) on two images
of the original size whose pixels spell their own x (resp. y) coordinate in the red/green channels, with
blue = 255 marking real pixels. Each processed pixel then tells which original column and row it was
sampled from, and blue < 255 marks padding. Resize, crop, pad and tiling are separable, so one original
interval per processed row and per processed column describes the whole geometry: the samples are fitted
exactly by a resize plus an integer crop/pad shift, giving each processed pixel its true footprint
``[j * a + b, (j + 1) * a + b)`` in the original image (for an unknown resampling chain, strips between
neighbouring samples, good to half an original pixel). A processed pixel lies in a box when its
footprint overlaps the box with positive area. No threshold on resampled mask values is involved, and a
box thinner than the resize stride is still seen.

An image token is *related* when any processed pixel of its patch lies in a box, *padding* when none of
its pixels comes from the original image, and *other* otherwise; LLaVA-NeXT row separators are neither.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from jaxtyping import Bool, Float

from mm_lens.errors import MMLensError
from mm_lens.types import Box, SampleSkip

if TYPE_CHECKING:
    from PIL.Image import Image

MAX_SIDE = 65535  # coordinates are spelled in two 8-bit channels
CROPPED_KIND = "box outside the centre crop"


@dataclass(frozen=True)
class Axis:
    """For one axis of one processed tile: the original-image interval [lo, hi) each processed pixel
    stands for (NaN for padding pixels)."""

    lo: Float[np.ndarray, " n"]
    hi: Float[np.ndarray, " n"]

    @property
    def valid(self) -> Bool[np.ndarray, " n"]:
        return ~np.isnan(self.lo)

    def inside(self, start: float, stop: float) -> Bool[np.ndarray, " n"]:
        """Processed pixels whose interval overlaps [start, stop) with positive length."""
        with np.errstate(invalid="ignore"):
            return self.valid & (self.lo < stop) & (self.hi > start)


@dataclass(frozen=True)
class TileGeometry:
    """Where each processed pixel of one tile (pixel_values order: LLaVA-NeXT's base image first) comes
    from in the original image."""

    rows: Axis  # processed rows -> original y intervals
    cols: Axis  # processed columns -> original x intervals

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.rows.lo), len(self.cols.lo)


def image_geometry(image_processor, width: int, height: int, to_tiles=None) -> list[TileGeometry]:
    """The geometry of every tile the processor makes from a ``width`` x ``height`` image.

    ``to_tiles(outputs)``: the processor's outputs as tiles ``[tile, 3, h, w]`` (the family's ``pixel_tiles``;
    default: ``pixel_values`` reshaped)."""
    if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
        raise MMLensError(f"image size {width}x{height} is out of range; images must be 1..{MAX_SIDE} px a side")
    xs = _source_coordinates(image_processor, width, height, axis="x", to_tiles=to_tiles)
    ys = _source_coordinates(image_processor, width, height, axis="y", to_tiles=to_tiles)
    if xs.shape != ys.shape:
        raise MMLensError("the image processor gave different tile layouts for two images of the same size")
    tiles = []
    for t in range(xs.shape[0]):
        valid = (xs[t] >= 0) & (ys[t] >= 0)
        row_valid, col_valid = valid.any(axis=1), valid.any(axis=0)
        if not np.array_equal(valid, row_valid[:, None] & col_valid[None, :]):
            raise MMLensError(_NOT_SEPARABLE)
        col_src = _constant_along(xs[t], valid, axis=0)
        row_src = _constant_along(ys[t], valid, axis=1)
        tiles.append(TileGeometry(rows=_axis(row_src, height), cols=_axis(col_src, width)))
    return tiles


_NOT_SEPARABLE = (
    "the image processor's geometry is not a separable resize/crop/pad/tiling, so boxes cannot be mapped to "
    "patches; use a LLaVA-1.5 or LLaVA-NeXT image processor"
)


def _source_coordinates(image_processor, width: int, height: int, axis: str, to_tiles=None) -> np.ndarray:
    """Run a coordinate-spelling image through the processor; returns [tile, h, w] source coords, -1 = padding."""
    from PIL import Image
    from transformers.image_utils import PILImageResampling

    n = width if axis == "x" else height
    coord = np.arange(n, dtype=np.int64)
    plane = np.stack([coord >> 8, coord & 255, np.full(n, 255)], axis=-1).astype(np.uint8)  # [n, 3]
    pixels = np.broadcast_to(plane[None, :, :], (height, width, 3)) if axis == "x" else (
        np.broadcast_to(plane[:, None, :], (height, width, 3))
    )
    image = Image.fromarray(np.ascontiguousarray(pixels), mode="RGB")
    try:
        out = image_processor(
            images=image,
            do_normalize=False,
            do_rescale=False,
            resample=PILImageResampling.NEAREST,
            return_tensors="pt",
        )
    except Exception as err:  # noqa: BLE001 - any processor failure is reported as a user-facing error
        raise MMLensError(
            f"the image processor {type(image_processor).__name__} rejected the box-mapping pass ({err}); "
            "related patches need a processor that accepts do_normalize/do_rescale/resample"
        ) from err
    if to_tiles is not None:
        pv = to_tiles(out)
    else:
        pv = out["pixel_values"]
        pv = torch.as_tensor(pv) if not isinstance(pv, torch.Tensor) else pv
        pv = pv.reshape(-1, *pv.shape[-3:])  # [tile, 3, h, w] for LLaVA [1,3,h,w] and NeXT [1,tiles,3,h,w]
    v = pv.to(torch.float64).round().to(torch.int64).numpy()
    if v.min() < 0 or v.max() > 255:
        raise MMLensError(
            f"the image processor {type(image_processor).__name__} still rescaled or normalised pixels with "
            "do_rescale=False, do_normalize=False; related patches cannot be mapped with it"
        )
    if not (v[:, 2] == 255).any():
        raise MMLensError(
            f"the image processor {type(image_processor).__name__} kept no recognisable pixel of the box-mapping "
            "image (it ignores do_rescale/do_normalize/resample); related patches cannot be mapped with it"
        )
    src = v[:, 0] * 256 + v[:, 1]
    return np.where(v[:, 2] == 255, src, -1)


def _constant_along(src: np.ndarray, valid: np.ndarray, axis: int) -> np.ndarray:
    """The per-row (axis=1) or per-column (axis=0) source coordinate; checks it is constant where valid."""
    filled = np.where(valid, src, np.iinfo(np.int64).max)
    low = filled.min(axis=axis)
    high = np.where(valid, src, -1).max(axis=axis)
    has = valid.any(axis=axis)
    if np.any(has & (low != high)):
        raise MMLensError(_NOT_SEPARABLE)
    return np.where(has, low, -1)


def _axis(src: np.ndarray, length: int) -> Axis:
    """The original interval [lo, hi) each processed pixel of one axis stands for (``length`` = original
    size of that axis, ``src`` = sampled original pixel per processed pixel, -1 for padding).

    Exact when the samples fit ``src[j] == floor((j + c) * a + b)`` (c = 0.5 or 0, the nearest-neighbour
    sampling conventions of PIL and torch) for a resize-then-crop/pad (a = length / R, b = -p * a, R and
    p integers: LLaVA-1.5's centre crop, LLaVA-NeXT's tiles) or a pad-then-resize (a = M / n, b = -q,
    M and q integers: LLaVA's pad-to-square); then pixel j covers ``[j * a + b, (j + 1) * a + b)``.
    Otherwise the strips run between midpoints of neighbouring samples, which still partition the
    visible image to within half an original pixel.
    """
    lo = np.full(len(src), np.nan)
    hi = np.full(len(src), np.nan)
    idx = np.flatnonzero(src >= 0)
    if len(idx) == 0:
        return Axis(lo, hi)
    samples = src[idx].astype(np.float64)
    fit = _fit_resize(idx.astype(np.float64), samples, length, len(src))
    if fit is not None:
        a, b = fit
        lo[idx] = idx * a + b
        hi[idx] = (idx + 1) * a + b
        return Axis(lo, hi)
    centre = samples + 0.5
    stride = (centre[-1] - centre[0]) / (idx[-1] - idx[0]) if len(idx) > 1 else 1.0
    stride = max(stride, 1e-9)
    mids = (centre[1:] + centre[:-1]) / 2
    lo[idx] = np.concatenate([[centre[0] - stride / 2], mids])
    hi[idx] = np.concatenate([mids, [centre[-1] + stride / 2]])
    return Axis(lo, hi)


def _fit_resize(j: np.ndarray, samples: np.ndarray, length: int, n: int) -> tuple[float, float] | None:
    """(a, b) of an exact resize + integer shift reproducing ``samples`` (see `_axis`), or None."""
    if len(j) < 2:
        return None
    dj, ds = j[-1] - j[0], samples[-1] - samples[0]
    a_lo, a_hi = max(ds - 1, 0) / dj, (ds + 1) / dj  # floor() blurs each sample by < 1 pixel

    def b_range(a: float, c: float) -> tuple[float, float]:
        pos = (j + c) * a
        return float(np.max(samples - pos)), float(np.min(samples + 1 - pos))  # b in [lo, hi)

    def exact(a: float, b: float, c: float) -> bool:
        pos = (j + c) * a + b
        return bool(np.all((np.floor(pos + 1e-6) == samples) | (np.floor(pos - 1e-6) == samples)))

    a_mid = ds / dj if ds > 0 else length / n
    # resize to R pixels, then an integer shift p (crop / pad / tile offset) in processed pixels
    rs = range(max(1, int(np.floor(length / a_hi))), int(np.ceil(length / a_lo)) + 1 if a_lo > 0 else 1)
    if len(rs) <= 4096:
        for r in sorted(rs, key=lambda r: abs(length / r - a_mid)):
            a = length / r
            for c in (0.5, 0.0):
                b_lo, b_hi = b_range(a, c)
                for p in range(int(np.floor(-b_hi / a)), int(np.ceil(-b_lo / a)) + 1):
                    if exact(a, -p * a, c):
                        return a, -p * a
    # an integer shift q in original pixels (pad to a canvas of M pixels), then resize M -> n
    ms = range(max(1, int(np.floor(a_lo * n))), int(np.ceil(a_hi * n)) + 1)
    if len(ms) <= 4096:
        for m in sorted(ms, key=lambda m: abs(m / n - a_mid)):
            a = m / n
            for c in (0.5, 0.0):
                b_lo, b_hi = b_range(a, c)
                for q in range(int(np.floor(-b_hi)), int(np.ceil(-b_lo)) + 1):
                    if exact(a, -q, c):
                        return a, -float(q)
    return None


# ----------------------------------------------------------------------------------------------- tokens


@dataclass(frozen=True)
class PatchSets:
    """Image tokens (absolute sequence positions) split by the boxes."""

    related: list[int]
    other: list[int]
    padding: list[int] = field(default_factory=list)  # no pixel of the original image: in neither set
    lost_boxes: tuple[Box, ...] = ()  # boxes no image token sees (cut away by a centre crop)
    footprints: dict[int, tuple[float, float, float, float]] = field(default_factory=dict)
    # position -> (x0, y0, x1, y1) of the original image the token's patch covers (for figures)
    tiles: dict[int, int] = field(default_factory=dict)  # position -> tile (0 = base / only image)


@dataclass(frozen=True)
class TokenPatch:
    """One image token's patch: its sequence position, tile, and pixel rectangle in the processed tile
    (rows r0:r1, columns c0:c1). LLaVA-NeXT row separators are not patches and are left out."""

    position: int
    tile: int
    r0: int
    r1: int
    c0: int
    c1: int

    @classmethod
    def of(cls, token) -> TokenPatch:
        """The patch of a `mm_lens.regions.ImageToken` that has a box."""
        x0, y0, x1, y1 = token.box
        return cls(token.position, token.tile, y0, y1, x0, x1)


def split_patches(
    geometry: Sequence[TileGeometry],
    tokens: Sequence[TokenPatch],
    boxes: Sequence[Box],
) -> PatchSets:
    """Related / other / padding tokens for ``boxes`` (original-image pixels, already clipped).

    Raises `SampleSkip` (kind ``CROPPED_KIND``) when no image token covers any box (all cut away by the
    crop), so a sample never silently gets an empty related set; boxes lost while others survive are
    listed in ``lost_boxes``.
    """
    if not boxes:
        raise SampleSkip("no object box given, so related patches are undefined", "no box")
    if not tokens:
        raise MMLensError("the region map has no image patches to split")
    pos = np.array([t.position for t in tokens])
    tile = np.array([t.tile for t in tokens])
    r0, r1, c0, c1 = (np.array([getattr(t, k) for t in tokens]) for k in ("r0", "r1", "c0", "c1"))
    bad = (tile < 0) | (tile >= len(geometry))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise MMLensError(
            f"image token at position {pos[i]} belongs to tile {tile[i]}, but the image processor made "
            f"{len(geometry)} tile(s); the region map and the processor disagree"
        )
    valid = np.zeros(len(tokens), bool)
    hits = np.zeros((len(tokens), len(boxes)), bool)
    footprint = np.full((len(tokens), 4), np.nan)
    for t, g in enumerate(geometry):
        sel = np.flatnonzero(tile == t)
        if len(sel) == 0:
            continue
        rows, cols = (r0[sel], r1[sel]), (c0[sel], c1[sel])
        valid[sel] = _any_in(g.rows.valid, *rows) & _any_in(g.cols.valid, *cols)
        for k, b in enumerate(boxes):
            hits[sel, k] = _any_in(g.rows.inside(b.y, b.y1), *rows) & _any_in(g.cols.inside(b.x, b.x1), *cols)
        # strips grow along each axis, so a patch spans from its first valid strip to its last
        footprint[sel] = np.stack(
            [_first(g.cols, c0[sel]), _first(g.rows, r0[sel]), _last(g.cols, c1[sel]), _last(g.rows, r1[sel])], axis=1
        )
    hits &= valid[:, None]
    seen = hits.any(axis=0)
    if not seen.any():
        where = ", ".join(_box_text(b) for b in boxes)
        raise SampleSkip(
            f"box {where} lies outside the centre crop: the image processor cuts it away, so no image token "
            "covers it",
            CROPPED_KIND,
        )
    is_related = hits.any(axis=1)
    return PatchSets(
        related=pos[is_related].tolist(),
        other=pos[valid & ~is_related].tolist(),
        padding=pos[~valid].tolist(),
        lost_boxes=tuple(b for b, s in zip(boxes, seen, strict=True) if not s),
        footprints={int(p): tuple(map(float, f)) for p, f, v in zip(pos, footprint, valid, strict=True) if v},
        tiles={int(p): int(t) for p, t in zip(pos, tile, strict=True)},
    )


def _any_in(mask: np.ndarray, start: np.ndarray, stop: np.ndarray) -> np.ndarray:
    """For each [start, stop) slice: does ``mask`` hold a True in it?"""
    counts = np.concatenate([[0], np.cumsum(mask)])
    stop = np.clip(stop, 0, len(mask))
    start = np.clip(start, 0, len(mask))
    return counts[stop] > counts[start]


def _first(axis: Axis, start: np.ndarray) -> np.ndarray:
    """``lo`` of the first valid pixel at or after ``start`` (NaN if none)."""
    lo = np.append(axis.lo, np.nan)
    idx = np.flatnonzero(axis.valid)
    at = np.searchsorted(idx, start)
    return np.where(at < len(idx), lo[np.append(idx, len(axis.lo))[at]], np.nan)


def _last(axis: Axis, stop: np.ndarray) -> np.ndarray:
    """``hi`` of the last valid pixel before ``stop`` (NaN if none)."""
    idx = np.flatnonzero(axis.valid)
    at = np.searchsorted(idx, stop) - 1
    return np.where(at >= 0, axis.hi[idx[np.maximum(at, 0)]] if len(idx) else np.nan, np.nan)


def _box_text(box: Box) -> str:
    name = f"{box.name} " if box.name else ""
    return f"{name}(x={box.x:g}, y={box.y:g}, w={box.w:g}, h={box.h:g})"


# ------------------------------------------------------------------------------------------ region maps

_GEOMETRY_CACHE: dict[int, dict[tuple[int, int], list[TileGeometry]]] = {}
_CACHE_SIZES = 256  # image sizes remembered per processor (GQA images come in a few dozen sizes)


def cached_geometry(image_processor, width: int, height: int, to_tiles=None) -> list[TileGeometry]:
    """`image_geometry`, remembered per processor object and image size (a processor's settings are
    assumed fixed once loaded, and so is its family's ``to_tiles``)."""
    key = id(image_processor)
    per_proc = _GEOMETRY_CACHE.get(key)
    if per_proc is None:
        per_proc = {}
        try:
            weakref.finalize(image_processor, _GEOMETRY_CACHE.pop, key, None)
        except TypeError:  # not weak-referenceable: compute every time rather than risk a stale id
            return image_geometry(image_processor, width, height, to_tiles)
        _GEOMETRY_CACHE[key] = per_proc
    geometry = per_proc.get((width, height))
    if geometry is None:
        geometry = image_geometry(image_processor, width, height, to_tiles)
        if len(per_proc) >= _CACHE_SIZES:
            per_proc.pop(next(iter(per_proc)))
        per_proc[(width, height)] = geometry
    return geometry


def as_boxes(boxes: Sequence[Box | Sequence[float]], width: int, height: int) -> list[Box]:
    """Boxes as `Box`, clipped to the ``width`` x ``height`` image; accepts (x, y, w, h) tuples.

    A box with no area inside the image is an input error: the caller should have skipped the row.
    """
    out = []
    for raw in boxes:
        box = _as_box(raw)
        if not (box.w > 0 and box.h > 0):
            raise MMLensError(f"box {_box_text(box)} has no area; pass boxes as (x, y, w, h) with w, h > 0")
        clipped = box.clip(width, height)
        if clipped is None:
            raise SampleSkip(
                f"box {_box_text(box)} lies outside the {width}x{height} image", "malformed box"
            )
        out.append(clipped)
    return out


def _as_box(raw: Box | Sequence[float]) -> Box:
    """A `Box` as it is, or one from ``(x, y, w, h)`` numbers in image pixels."""
    if isinstance(raw, Box):
        return raw
    try:
        x, y, w, h = (float(v) for v in raw)
    except (TypeError, ValueError):
        raise MMLensError(f"box {raw!r} is not (x, y, w, h) numbers in image pixels") from None
    return Box(x, y, w, h)


def region_tokens(regions) -> list[TokenPatch]:
    """The image tokens of a `RegionMap` that are patches (row separators and CLS features left out)."""
    out = [TokenPatch.of(token) for token in regions.image_tokens if token.box is not None]
    if not out:
        raise MMLensError(
            "the region map has no patch rectangles (ImageToken.box); build it with mm_lens.prepare"
        )
    return out


def patch_sets(model, image_size: tuple[int, int], regions, boxes: Sequence[Box | Sequence[float]]) -> PatchSets:
    """Related / other / padding image tokens of ``regions`` for ``boxes`` on an image of ``image_size``
    (width, height) prepared by ``model`` (a `HookedLlava`, a processor, or an image processor)."""
    width, height = (int(v) for v in image_size)
    family = getattr(model, "family", None)
    geometry = cached_geometry(_image_processor(model), width, height, getattr(family, "pixel_tiles", None))
    return split_patches(geometry, region_tokens(regions), as_boxes(boxes, width, height))


def related_and_other(model, image, regions, boxes) -> tuple[list[int], list[int]]:
    """The exact rule's related and other position lists (the checkpoint pipeline's, `mm_lens.encoders`)."""
    found = patch_sets(model, image.size, regions, boxes)
    return found.related, found.other


def _image_processor(model):
    """The image processor of a `HookedLlava`, a multimodal processor, or an image processor itself."""
    processor = getattr(model, "processor", model)
    image_processor = getattr(processor, "image_processor", processor)
    if not callable(image_processor):
        raise MMLensError(f"{type(model).__name__} has no image processor to map boxes to patches")
    return image_processor


# ------------------------------------------------------------------------------------------ the study's rule


def red_mask_patches(
    image_processor, image, regions, boxes: Sequence[Box | Sequence[float]]
) -> tuple[list[int], list[int]]:
    """The study's related / other image tokens: boxes drawn red on a green mask of the image's size, the mask
    sent through `image_processor` without rescaling or normalising, a patch related when one of its pixels
    is exactly (255, 0, 0).

    Other = every image token but the related ones and LLaVA-NeXT's row separators (padding patches
    included). Boxes are ``Box`` (x, y, w, h) or ``(x, y, w, h)`` in image pixels, drawn as the study draws
    ``(int(x), int(y), int(x) + int(w), int(y) + int(h))``.
    """
    drawn = []
    for raw in boxes:
        box = _as_box(raw)
        x, y, w, h = int(box.x), int(box.y), int(box.w), int(box.h)
        drawn.append((x, y, x + w, y + h))
    if not drawn:
        raise SampleSkip("no object box given, so related patches are undefined", "no box")
    mask = red_mask(image.size, drawn)
    tiles = image_processor(images=mask, do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"]
    tiles = np.asarray(tiles).reshape(-1, *np.asarray(tiles).shape[-3:])  # [tile, 3, H, W]
    red = pure_red(tiles)
    related, other = [], []
    for token in region_tokens(regions):
        if red[token.tile, token.r0:token.r1, token.c0:token.c1].any():
            related.append(token.position)
        else:
            other.append(token.position)
    return related, other


def red_mask(image_size: tuple[int, int], boxes: Sequence[tuple[int, int, int, int]]) -> Image:
    """The study's ``create_mask_with_bbox``: a green image with the boxes ``(x0, y0, x1, y1)`` filled red.

    PIL's rectangle includes both corners, as in the study.
    """
    from PIL import Image as PILImage
    from PIL import ImageDraw

    mask = PILImage.new("RGB", image_size, (0, 255, 0))
    draw = ImageDraw.Draw(mask)
    for box in boxes:
        draw.rectangle(box, fill=(255, 0, 0))
    return mask


def pure_red(tiles: np.ndarray) -> np.ndarray:
    """Boolean ``[..., H, W]`` of the pixels that are exactly (255, 0, 0) in channel-first ``[..., 3, H, W]``."""
    return (tiles[..., 0, :, :] == 255) & (tiles[..., 1, :, :] == 0) & (tiles[..., 2, :, :] == 0)
