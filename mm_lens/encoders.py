"""The two input pipelines, side by side: how (image, question) becomes token ids, pixels and text positions.

A `Protocol` (`mm_lens.protocol`) names its pipeline; each pipeline has two jobs, kept together here:

* **encode** (image, question) into an `Encoding`: the prompt, the token ids with one image token per image
  feature, the pixels, and the positions of the question and of named spans of the user text;
* **map boxes to patches**: which image tokens are *related* (show an object's box) and which are *other*.

``checkpoint`` (`encode_with_processor`): the checkpoint's chat template and its processor, positions found
through the tokenizer's character offsets; boxes through the exact geometry of the processor
(`mm_lens.patches.related_and_other`).

``study`` (`encode_study`): the study's code path, token for token: LLaVA's conversation template,
``tokenizer_image_token`` (text before and after ``<image>`` tokenised separately), the study's pixels
(`study_image_processor`: mean-colour padding for LLaVA-1.5, any-res tiles for LLaVA-NeXT, PIL resizing), positions
by the study's ``find_token_range``; boxes by the study's red mask (`mm_lens.patches.red_mask_patches`). LLaVA-NeXT
images that transformers lays out differently from the study's code are skipped (`_check_next_layout`).

`encode` and `patch_sets` dispatch on the protocol; `mm_lens.inputs.prepare` is what users call.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mm_lens.errors import MMLensError
from mm_lens.families import family_of
from mm_lens.model import study_protocol
from mm_lens.patches import red_mask_patches, related_and_other
from mm_lens.protocol import IMAGE_PLACEHOLDER, Conversation, Protocol
from mm_lens.regions import image_codes
from mm_lens.types import SampleSkip

if TYPE_CHECKING:
    from PIL.Image import Image

    from mm_lens.model import HookedLlava

DEFAULT_INSTRUCTION = "Answer the question using a single word or phrase."


FALLBACK_TEMPLATE = "USER: <image>\n{text} ASSISTANT:"


@dataclass
class Encoding:
    """What a pipeline makes of (image, question): model tensors plus the text positions it located."""

    input_ids: Int[Tensor, "1 pos"]
    pixel_values: Float[Tensor, "..."]
    image_sizes: Int[Tensor, "1 2"] | None  # llava_next: (height, width)
    prompt: str
    question: list[int]  # positions of the question's tokens
    spans: dict[str, list[int]]  # positions of each named substring of the user text
    #: Every other processor output the model takes (the family's ``model_inputs``: ``token_type_ids``,
    #: ``pixel_attention_mask``, ``image_grid_thw``, ...).
    extra: dict[str, Tensor] = field(default_factory=dict)

    def outputs(self) -> dict[str, Tensor]:
        """Every processor tensor of this encoding but the token ids: what a family's image layout reads."""
        out = {"pixel_values": self.pixel_values, **self.extra}
        if self.image_sizes is not None:
            out["image_sizes"] = self.image_sizes
        return out


def user_text(question: str, instruction: str | None) -> str:
    """What the user turn says: the question, then (when given) the instruction on its own line."""
    return f"{question} \n{instruction}" if instruction else question


# ------------------------------------------------------------------------------------------ the checkpoint's pipeline


def build_prompt(model: HookedLlava, text: str) -> str:
    """The full prompt: the processor's chat template with one user turn [image, text], else LLaVA-1.5."""
    template = getattr(model.processor, "chat_template", None) or getattr(model.tokenizer, "chat_template", None)
    if template:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return model.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image_token = getattr(model.processor, "image_token", "<image>")
    return FALLBACK_TEMPLATE.replace("<image>", image_token).format(text=text)


def encode_with_processor(protocol: Protocol, model: HookedLlava, image: Image, question: str, text: str,
                          spans: dict[str, str]) -> Encoding:
    """The checkpoint protocol's encoding: the checkpoint's chat template and processor, positions found
    through the tokenizer's character offsets (spans: whole word first, then any case, then any substring)."""
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
    family = family_of(model.model_type)
    extra = {key: enc[key] for key in family.model_inputs if key not in ("pixel_values", "image_sizes") and key in enc}
    return Encoding(
        input_ids=enc["input_ids"],
        pixel_values=enc["pixel_values"],
        image_sizes=enc.get("image_sizes") if "image_sizes" in family.model_inputs else None,
        prompt=prompt,
        question=question_pos,
        spans=found_spans,
        extra=extra,
    )


def _question_start(model: HookedLlava, prompt: str, question: str) -> int:
    """Character index of the question in the prompt, after its one image placeholder."""
    image_token = family_of(model.model_type).prompt_image or getattr(model.processor, "image_token", "<image>")
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


def exact_patch_sets(protocol: Protocol, model: HookedLlava, image: Image, regions: Any,
                     boxes: Sequence[Any]) -> tuple[list[int], list[int]]:
    """The checkpoint pipeline's related / other image tokens: the processor's exact geometry."""
    return related_and_other(model, image, regions, boxes)


# ------------------------------------------------------------------------------------------ the study's pipeline


def encode_study(protocol: Protocol, model: HookedLlava, image: Image, question: str, text: str,
                 spans: dict[str, str]) -> Encoding:
    """The study's encoding: its conversation, ``tokenizer_image_token``, the study's pixels, and positions found
    by the study's ``find_token_range`` in the text after the image."""
    conversation = protocol.conversation or study_protocol(model).conversation
    prompt = conversation.prompt(text)
    if model.model_type == "llava_next":
        _check_next_layout(model, image.size)
    pixels = study_image_processor(model)(images=image, return_tensors="pt")
    image_sizes = pixels.get("image_sizes")
    n_features = _n_image_features(model, image_sizes)
    before, after = prompt.split(IMAGE_PLACEHOLDER)
    head, tail = tokenizer_image_token(model.tokenizer, before, after)
    image_token_id = model.image_token_id
    ids = head + [image_token_id] * n_features + tail
    first_tail = len(head) + n_features

    def find(substring: str, what: str) -> list[int]:
        found = find_token_range(model.tokenizer, conversation, tail, substring)
        if found is None:
            raise SampleSkip(f"{what} {substring!r} not found in the text after the image", f"{what} not in prompt")
        return [first_tail + i for i in range(*found)]

    positions = {name: find(str(value), name) for name, value in spans.items()}
    return Encoding(
        input_ids=torch.tensor([ids], dtype=torch.long),
        pixel_values=pixels["pixel_values"],
        image_sizes=torch.as_tensor(image_sizes) if image_sizes is not None else None,
        prompt=prompt,
        question=find(question, "question"),
        spans=positions,
    )


def tokenizer_image_token(tokenizer: Any, before: str, after: str) -> tuple[list[int], list[int]]:
    """LLaVA's ``tokenizer_image_token`` for one image: ids before and after the image placeholder.

    Each chunk is tokenised with the tokenizer's special tokens; when the first chunk starts with BOS, the
    second chunk's first id (its BOS) is dropped, as LLaVA does.
    """
    head = list(tokenizer(before).input_ids)
    tail = list(tokenizer(after).input_ids)
    if head and head[0] == tokenizer.bos_token_id:
        tail = tail[1:]
    return head, tail


def find_token_range(
    tokenizer: Any, conversation: Conversation, ids: Sequence[int], substring: str
) -> tuple[int, int] | None:
    """The study's ``find_token_range``: token indices ``[start, end)`` covering the first occurrence of
    `substring` in the pieces of `ids` joined as text (None when it is not there)."""
    pieces = [conversation.piece_text(p) for p in tokenizer.convert_ids_to_tokens(list(ids))]
    whole = "".join(pieces)
    at = whole.find(substring)
    if at < 0 or not substring:
        return None
    loc, start = 0, None
    for i, piece in enumerate(pieces):
        loc += len(piece)
        if start is None and loc > at:
            start = i
        if loc >= at + len(substring):
            return start, i + 1
    return None


def study_image_processor(model: HookedLlava) -> Any:
    """The checkpoint's image settings in a PIL-backed processor that works as the study's does.

    LLaVA-1.5: pad to a square with ``int(mean * 255)`` first (``expand2square``), then resize and crop;
    LLaVA-NeXT: any-resolution tiles and the squashed base image. PIL resizing either way, so an installed
    torchvision cannot change the pixels.
    """
    cached = getattr(model, "_study_image_processor", None)
    if cached is not None:
        return cached
    import transformers as tf

    source = model.processor.image_processor
    settings = {
        key: _plain(getattr(source, key))
        for key in ("size", "crop_size", "resample", "image_mean", "image_std", "rescale_factor", "do_center_crop")
        if getattr(source, key, None) is not None
    }
    settings["do_convert_rgb"] = True
    if model.model_type == "llava_next":
        pinpoints = getattr(source, "image_grid_pinpoints", None) or model.config.image_grid_pinpoints
        built = tf.LlavaNextImageProcessorPil(image_grid_pinpoints=_plain(pinpoints), **settings)
    else:
        built = tf.LlavaImageProcessorPil(do_pad=True, **settings)
    try:
        model._study_image_processor = built
    except AttributeError:
        pass
    return built


def _plain(value: Any) -> Any:
    """A processor setting as plain JSON data (SizeDict and friends become dicts)."""
    if hasattr(value, "items"):
        return {k: v for k, v in value.items() if v is not None}
    if isinstance(value, tuple):
        return list(value)
    return value


def _next_grid(size: tuple[int, int], pinpoints: Sequence[Sequence[int]], tile: int, study: bool) -> tuple[int, int]:
    """The any-res crop grid (rows, cols) for an image of PIL ``size`` = (width, height).

    The study's LLaVA-NeXT code reads each pinpoint as (width, height); transformers reads it as (height,
    width). Both keep the first best fit, so they disagree only on ties (square images up to one tile).
    """
    from transformers.image_processing_utils import select_best_resolution

    width, height = size
    if study:
        best_h, best_w = select_best_resolution((height, width), [(b, a) for a, b in pinpoints])
    else:
        best_h, best_w = select_best_resolution((height, width), [tuple(p) for p in pinpoints])
    return best_h // tile, best_w // tile


def _unpadded(size: tuple[int, int], rows: int, cols: int, side: int, study: bool) -> tuple[int, int]:
    """Feature rows x cols kept by ``unpad_image``: the study truncates, transformers rounds to 7 decimals first."""
    width, height = size
    cur_h, cur_w = rows * side, cols * side
    cut = int if study else (lambda x: int(round(x, 7)))
    if width / height > cur_w / cur_h:
        new_h = cut(height * (cur_w / width))
        return cur_h - 2 * ((cur_h - new_h) // 2), cur_w
    new_w = cut(width * (cur_h / height))
    return cur_h, cur_w - 2 * ((cur_w - new_w) // 2)


def _check_next_layout(model: HookedLlava, size: tuple[int, int]) -> None:
    """A `SampleSkip` when transformers would lay this image out differently from the study's code.

    The HF model packs the image features itself (from ``image_sizes`` and its config), so mm-lens can feed it
    the study's layout only where both agree: every shipped GQA image but one (a 256x256 square: grid tie).
    """
    vision = model.config.vision_config
    tile, side = int(vision.image_size), int(vision.image_size) // int(vision.patch_size)
    pinpoints = _plain(model.config.image_grid_pinpoints)
    study = _next_grid(size, pinpoints, tile, study=True)
    hf = _next_grid(size, pinpoints, tile, study=False)
    if study == hf and _unpadded(size, *study, side, True) == _unpadded(size, *hf, side, False):
        return
    width, height = size
    raise SampleSkip(
        f"the study's LLaVA-NeXT code and transformers lay out a {width}x{height} image differently "
        f"(grid {study[0]}x{study[1]} vs {hf[0]}x{hf[1]} tiles, or unpad rounding); the HF model cannot be fed "
        "the study's layout for it (use --protocol checkpoint to analyse it the transformers way)",
        "study layout not reproducible",
    )


def _n_image_features(model: HookedLlava, image_sizes: Any) -> int:
    """How many image tokens the model packs for one image (``image_sizes``: NeXT's (height, width))."""
    outputs = {} if image_sizes is None else {"image_sizes": torch.as_tensor(image_sizes)}
    return len(image_codes(model, outputs))


def study_patch_sets(protocol: Protocol, model: HookedLlava, image: Image, regions: Any,
                     boxes: Sequence[Any]) -> tuple[list[int], list[int]]:
    """The study pipeline's related / other image tokens: the red mask through the study's image processor."""
    return red_mask_patches(study_image_processor(model), image, regions, boxes)


# ------------------------------------------------------------------------------------------ dispatch


class Pipeline(NamedTuple):
    """One input pipeline: its encoder and its box-to-patch rule."""

    encode: Callable[..., Encoding]
    patch_sets: Callable[..., tuple[list[int], list[int]]]


#: The input pipelines by the name a `Protocol` gives (``Protocol.pipeline``).
PIPELINES: dict[str, Pipeline] = {
    "study": Pipeline(encode_study, study_patch_sets),
    "checkpoint": Pipeline(encode_with_processor, exact_patch_sets),
}


def pipeline(protocol: Protocol) -> Pipeline:
    """The input pipeline `protocol` names."""
    try:
        return PIPELINES[protocol.pipeline]
    except KeyError:
        raise MMLensError(f"protocol {protocol.name!r} names no known input pipeline ({protocol.pipeline!r}); "
                          f"known: {', '.join(PIPELINES)}") from None


def encode(protocol: Protocol, model: HookedLlava, image: Image, question: str, text: str,
           spans: dict[str, str]) -> Encoding:
    """(image, question) encoded by `protocol`'s pipeline."""
    return pipeline(protocol).encode(protocol, model, image, question, text, spans)


def patch_sets(protocol: Protocol, model: HookedLlava, image: Image, regions: Any,
               boxes: Sequence[Any]) -> tuple[list[int], list[int]]:
    """Related / other image tokens of `regions` for `boxes` (image pixels), by `protocol`'s pipeline."""
    return pipeline(protocol).patch_sets(protocol, model, image, regions, boxes)


__all__ = [
    "DEFAULT_INSTRUCTION",
    "PIPELINES",
    "Encoding",
    "Pipeline",
    "build_prompt",
    "encode",
    "encode_study",
    "encode_with_processor",
    "find_token_range",
    "patch_sets",
    "study_image_processor",
    "tokenizer_image_token",
    "user_text",
]
