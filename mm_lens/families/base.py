"""What mm-lens must know of a model family, as one record: `Family`.

A family is one or more Hugging Face ``model_type`` values that share a processor, a prompt layout and an image
feature layout. Everything family-specific the core needs is a field of `Family` (how its processor is built without
torchvision, which processor outputs the model takes, where each image feature sits, which tokens mark the image,
which tile is the whole image, how TransformerLens boots it); the core modules (`mm_lens.model`, `mm_lens.regions`,
`mm_lens.inputs`, `mm_lens.engines`) read these fields and never branch on a family's name. One module per family
in this package builds its record; `mm_lens.families` is the registry.

`FeatureCode` is the unit of an image layout: one per image-feature position of ``input_ids``, in sequence order,
saying which processed tile the feature comes from, its coordinates in that tile's feature grid and in the grid the
model packs, and the pixel rectangle of the tile it sees. Layouts are read off the model's own packing code run on
coded inputs, or the processor's own counts, never re-derived by hand (see each family module).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from torch import Tensor

from mm_lens.errors import MMLensError

PixelBox = tuple[int, int, int, int]  # (x0, y0, x1, y1) pixels of a processed tile, x1 / y1 exclusive


class FeatureCode(NamedTuple):
    """Where one image feature sits: its processed tile, its (row, col) in the tile's feature grid, its
    (grid_row, grid_col) in the grid the model packs, and the tile pixels it sees (None: a CLS feature or a
    separator feature such as LLaVA-NeXT's ``image_newline``, which ``is_newline`` marks)."""

    tile: int
    row: int
    col: int
    grid_row: int
    grid_col: int
    box: PixelBox | None
    is_newline: bool = False


def grid_codes(tile: int, rows: int, cols: int, cell_h: int, cell_w: int | None = None, row0: int = 0,
               col0: int = 0) -> list[FeatureCode]:
    """Row-major codes of a ``rows`` x ``cols`` feature grid over one tile, each feature seeing a
    ``cell_h`` x ``cell_w`` pixel cell; (row0, col0) offsets the packed-grid coordinates."""
    cell_w = cell_h if cell_w is None else cell_w
    return [
        FeatureCode(tile, r, c, row0 + r, col0 + c, (c * cell_w, r * cell_h, (c + 1) * cell_w, (r + 1) * cell_h))
        for r in range(rows) for c in range(cols)
    ]


def pixel_tiles(outputs: Mapping[str, Any]) -> Tensor:
    """The processed image as tiles ``[tile, 3, h, w]`` (the default: ``pixel_values`` reshaped)."""
    import torch

    pv = outputs["pixel_values"]
    pv = torch.as_tensor(pv) if not isinstance(pv, Tensor) else pv
    return pv.reshape(-1, *pv.shape[-3:])


def default_base_tile(tokens: Any) -> int:
    """The whole image's tile: tile 0 (LLaVA-1.5's only tile, LLaVA-NeXT / OneVision's base image)."""
    return 0


def last_tile(tokens: Any) -> int:
    """The whole image's tile where it comes last (Idefics3's global tile, InternVL's thumbnail)."""
    return max((t.tile for t in tokens), default=0)


@dataclass(frozen=True)
class KnockoutRoute:
    """How a family's attention reaches ``blocks.{l}.attn.hook_attn_scores`` with pre-softmax scores an edit can
    change. ``install(model)`` runs once at load (None: TL computes attention itself and the hook already works)."""

    name: str
    description: str
    install: Callable[[Any], None] | None = None


#: TransformerLens computes attention itself: the score hook is the pre-softmax scores, and edits take effect.
TL_SCORES = KnockoutRoute("tl-scores", "TransformerLens computes attention; the knockout edits hook_attn_scores")


def auto_processor(path: str) -> Any:
    """``AutoProcessor.from_pretrained(path)`` (families whose processor needs no torchvision)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path)


def processor_without_video(path: str, processor_cls: Any, image_processor_cls: Any, **extra: Any) -> Any:
    """A family's processor built from its PIL image processor and its tokenizer, without the video processor.

    ``AutoProcessor`` of these families loads a torchvision video processor; the image path never uses it.
    """
    import inspect

    from transformers import AutoTokenizer

    image_processor = image_processor_cls.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    params = inspect.signature(processor_cls.__init__).parameters
    kwargs: dict[str, Any] = {"image_processor": image_processor, "tokenizer": tokenizer}
    if "video_processor" in params:
        kwargs["video_processor"] = _NoVideo()
        processor_cls = _accepting_stand_in_video(processor_cls)
    template = getattr(tokenizer, "chat_template", None)
    try:
        import json
        from pathlib import Path

        saved = Path(path) / "chat_template.jinja"
        if saved.is_file():
            template = saved.read_text()
        elif (Path(path) / "chat_template.json").is_file():
            template = json.loads((Path(path) / "chat_template.json").read_text())["chat_template"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if template is not None and "chat_template" in params:
        kwargs["chat_template"] = template
    config = _processor_config(path)
    for key, value in config.items():
        if key in params and key not in kwargs and key != "processor_class":
            kwargs[key] = value
    kwargs.update(extra)
    try:
        return processor_cls(**kwargs)
    except Exception as exc:  # noqa: BLE001 - reported with the family's processor named
        raise MMLensError(f"cannot build {processor_cls.__name__} without its video processor for {path!r}: "
                          f"{type(exc).__name__}: {exc}") from exc


def _processor_config(path: str) -> dict[str, Any]:
    """The saved ``processor_config.json`` settings (image_seq_len, patch_size, ...), if any."""
    import json
    from pathlib import Path

    file = Path(path) / "processor_config.json"
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if not isinstance(v, dict) or k in ("size",)}


def _accepting_stand_in_video(base: Any) -> Any:
    """`base` taking `_NoVideo` as its video processor: the processors' class check on that argument loads
    transformers' video-processor mapping, which needs torchvision."""

    def check(self: Any, name: str, arg: Any) -> Any:
        if name == "video_processor" and isinstance(arg, _NoVideo):
            return type(arg)
        return base.check_argument_for_proper_class(self, name, arg)

    return type(base.__name__, (base,), {"check_argument_for_proper_class": check})


class _NoVideo:
    """Stands in for a video processor: the processors' image path never calls it, and video input is refused."""

    # SmolVLM's chat template and processor read these video settings even for an image.
    num_frames = None
    fps = None
    model_input_names: list[str] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise MMLensError("mm-lens analyses images only; video input is not supported")


@dataclass(frozen=True)
class Family:
    """One model family: its ``model_type`` values and everything family-specific mm-lens's core reads.

    * ``layout(model, outputs)``: one `FeatureCode` per image-feature position of ``input_ids`` in sequence order;
      ``outputs`` are the processor's (or the study pipeline's) tensors.
    * ``model_inputs``: the processor outputs the model's forward takes besides ``input_ids`` and
      ``attention_mask`` (``token_type_ids`` for Gemma 3, without which its image block is a different model).
    * ``marker_tokens``: tokens that mark the image in the prompt (begin / end markers, separators, tile tags):
      the ``Image Markers`` region, together with every non-feature position between the first and last feature.
    * ``base_tile(tokens)``: the tile that shows the whole image (``Base Image``; the rest is ``HD Image``).
    * ``image_full_forward``: why positions before a target inside the image are not clean, when they are not
      (Gemma 3's image features attend to each other both ways; Qwen3-VL's DeepStack adds visual features at the
      image positions of early layers inside HF's forward): the fast engine runs such blocks as full forwards.
    * ``tl_like`` / ``unused_libraries``: what serves this architecture when TL ships no adapter for it (a TL
      architecture whose adapter fits as is, an adapter class, or a function returning one:
      `mm_lens.compat.register_tl_adapter`), and the libraries its adapter declares but the language-model path
      never uses (`mm_lens.compat.without_required_libraries`).
    * ``route``: how the knockout reaches the attention scores (`KnockoutRoute`).
    """

    name: str
    title: str
    model_types: tuple[str, ...]
    layout: Callable[[Any, Mapping[str, Any]], list[FeatureCode]]
    processor: Callable[[str], Any] = auto_processor
    model_inputs: tuple[str, ...] = ("pixel_values",)
    marker_tokens: tuple[str, ...] = ()
    base_tile: Callable[[Any], int] = default_base_tile
    pixel_tiles: Callable[[Mapping[str, Any]], Tensor] = pixel_tiles
    image_full_forward: str = ""
    #: architecture -> the TL architecture whose adapter serves it, or an adapter class, or a function returning one
    tl_like: Mapping[str, str | type | Callable[[], type]] | None = None
    unused_libraries: tuple[str, ...] = ()
    route: KnockoutRoute = TL_SCORES
    #: The string the chat template puts where the image goes, when it is not ``processor.image_token``.
    prompt_image: str | None = None
    layout_note: str = ""  # the image-token layout in a line, for the README's table and errors


__all__ = [
    "TL_SCORES",
    "FeatureCode",
    "Family",
    "KnockoutRoute",
    "auto_processor",
    "default_base_tile",
    "grid_codes",
    "last_tile",
    "pixel_tiles",
    "processor_without_video",
]
