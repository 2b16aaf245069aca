"""Protocols: every choice between an (image, question) and a number, held in one object.

The same knockout on the same model gives different numbers when the prompt, the tokenisation, the pixels,
the related-patch rule, the window, the lens readout, the answer rule, the precision or the vocabulary of the
softmax differ. A `Protocol` fixes all of them:

* ``study``: the pipeline of *Cross-modal Information Flow in Multimodal Large Language Models* (CVPR 2025),
  as its code runs on LLaVA's own repository:

  - prompt: LLaVA's ``vicuna_v1`` conversation (llava-v1.5-7b/13b, llava-v1.6-vicuna-7b) or ``llava_llama_3``
    (llama3-llava-next-8b, plus the study's trailing ``" \\n"``), user turn ``<image>\\n{question} \\n{instruction}``;
  - tokens: ``tokenizer_image_token`` (the text before and after ``<image>`` tokenised separately, each with
    the tokenizer's special tokens, the BOS of the later chunk dropped); the one image placeholder becomes one
    image token per feature, as the HF model expects;
  - pixels: LLaVA-1.5 pads the image to a square with the mean colour, then resizes (PIL); LLaVA-NeXT uses
    its any-resolution tiles and the squashed base image (PIL backends, whatever else is installed);
  - related patches: the boxes drawn red on a green mask, sent through the same preprocessing without
    rescaling or normalising; a patch is related when it holds one pure red pixel;
  - window 7 per 32 layers (9 for a 40-layer model), the first generated token tracked, the answer right when
    the greedy decoding (up to 128 tokens, special tokens skipped) stripped and lower-cased equals the gold;
  - lens: the last position after each of layers 0..L (0 = input embeddings) times the unembedding, no
    final norm below the top (the top is the model's output); correctly answered samples only;
  - softmax over the original vocabulary (the ids below ``<image>``: llava-hf padded the output rows);
  - float16 on CUDA (float32 on a CPU).

* ``checkpoint``: the checkpoint's own chat template and processor (one user turn), mm-lens's exact-geometry
  related patches, window 9, the lens after each block through the final norm on every sample, the full
  vocabulary. It runs any LLaVA-format model, the shipped toy included.

``auto`` resolves to ``study`` for the study's model families (LLaVA-1.5 and LLaVA-NeXT with a Llama
language model, a 336 px / patch-14 CLIP tower and a Vicuna/Llama-2 or Llama-3 vocabulary) and to
``checkpoint`` otherwise. Every choice can still be overridden where it is used (``window=``, ``readout=``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mm_lens.errors import MMLensError

if TYPE_CHECKING:
    from PIL.Image import Image

    from mm_lens.model import HookedLlava

PROTOCOL_NAMES = ("auto", "study", "checkpoint")
READOUTS = ("raw", "norm")


# ------------------------------------------------------------------------------------------ conversations


@dataclass(frozen=True)
class Conversation:
    """A LLaVA conversation template with one user turn and the assistant's open turn.

    ``template`` holds ``{system}`` and ``{text}`` (the user turn after ``<image>\\n``); ``pieces`` maps the
    tokenizer's piece characters back to text, as the study does to find a substring's tokens.
    """

    name: str
    system: str
    template: str
    pieces: tuple[tuple[str, str], ...]

    def prompt(self, text: str) -> str:
        """The full prompt, ``<image>`` included once."""
        return self.template.replace("{system}", self.system).replace("{text}", text)

    def piece_text(self, piece: str) -> str:
        """A token piece as the study reads it (``▁`` -> space for SentencePiece, ``Ġ``/``Ċ`` for byte BPE)."""
        for old, new in self.pieces:
            piece = piece.replace(old, new)
        return piece


VICUNA_V1 = Conversation(
    name="vicuna_v1",
    system=(
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    ),
    template="{system} USER: <image>\n{text} ASSISTANT:",
    pieces=(("▁", " "),),
)

LLAVA_LLAMA_3 = Conversation(
    name="llava_llama_3",
    system=(
        "You are a helpful language and vision assistant. "
        "You are able to understand the visual content that the user provides, "
        "and assist the user with a variety of tasks using natural language."
    ),
    # Meta-Llama-3-8B-Instruct's chat template (system, user, generation prompt), then the study's " \n".
    template=(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n<image>\n{text}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n \n"
    ),
    pieces=(("Ġ", " "), ("Ċ", "\n")),
)

IMAGE_PLACEHOLDER = "<image>"


# ------------------------------------------------------------------------------------------ small choices


@dataclass(frozen=True)
class AnswerRule:
    """How the greedy answer is decoded and compared with the gold answer."""

    max_new_tokens: int
    stop_at_newline: bool  # stop decoding at the first newline
    first_line_only: bool  # keep only the text before the first newline
    drop_final_period: bool

    def normalise(self, text: str) -> str:
        """The decoded answer as it is compared: stripped, lower case (first line, no final period if set)."""
        if self.first_line_only:
            text = text.split("\n", 1)[0]
        text = text.strip().lower()
        if self.drop_final_period and text.endswith("."):
            text = text[:-1].rstrip()
        return text

    def gold(self, answer: str) -> str:
        """The gold answer as it is compared."""
        if self.drop_final_period:  # the checkpoint rule normalises both sides alike
            return self.normalise(answer)
        return str(answer)


STUDY_ANSWER = AnswerRule(max_new_tokens=128, stop_at_newline=False, first_line_only=False, drop_final_period=False)
CHECKPOINT_ANSWER = AnswerRule(max_new_tokens=10, stop_at_newline=True, first_line_only=True, drop_final_period=True)


@dataclass(frozen=True)
class LensReadout:
    """Where the answer lens reads the residual stream and how it maps it to the vocabulary.

    ``from_embeddings``: L+1 points, point l = the stream entering block l (0 = the input embeddings) and point
    L = the model's output; otherwise L points, point l = the stream leaving block l. ``final_norm``: apply
    ``ln_final`` before the unembedding below the top point (the top point is always the model's output).
    """

    from_embeddings: bool
    final_norm: bool

    @property
    def name(self) -> str:
        return "norm" if self.final_norm else "raw"


def vocab_softmax(logits: Float[Tensor, "... vocab"], n_vocab: int | None) -> Float[Tensor, "... n_vocab"]:
    """Softmax over the first `n_vocab` vocabulary rows (all rows when None), in float32."""
    return logits[..., :n_vocab].float().softmax(-1)


# ------------------------------------------------------------------------------------------ the encoding


@dataclass
class Encoding:
    """What a protocol makes of (image, question): model tensors plus the text positions it located."""

    input_ids: Int[Tensor, "1 pos"]
    pixel_values: Float[Tensor, "..."]
    image_sizes: Int[Tensor, "1 2"] | None  # llava_next: (height, width)
    prompt: str
    question: list[int]  # positions of the question's tokens
    spans: dict[str, list[int]]  # positions of each named substring of the user text


# ------------------------------------------------------------------------------------------ protocols


@dataclass(frozen=True)
class Protocol:
    """Every choice that decides the numbers; `StudyProtocol` and `CheckpointProtocol` implement the two.

    Subclasses provide `encode` (prompt, ids, pixels, text positions) and `patch_sets` (related / other image
    tokens for boxes); everything else is data.
    """

    name: str
    conversation: Conversation | None
    answer: AnswerRule
    readout: LensReadout
    window_per_32_layers: int  # default window, scaled to the model's depth and rounded (7 -> 9 at 40 layers)
    fixed_window: int | None  # a default window whatever the depth (clipped to it), instead of the scaled one
    lens_correct_only: bool  # the lens keeps correctly answered samples only
    original_vocab: bool  # softmax over the ids below <image> (the unpadded vocabulary)
    half_on_cuda: bool  # float16 by default on CUDA
    keep_sample_without_boxes: bool  # unusable boxes drop the patch blocks only (else the whole sample)

    # -- defaults derived from the model

    def window(self, n_layers: int) -> int:
        """The default knockout window for a model of `n_layers` layers."""
        if self.fixed_window is not None:
            return min(self.fixed_window, n_layers)
        return max(1, min(n_layers, int(round(n_layers * self.window_per_32_layers / 32))))

    def dtype(self, device: str | torch.device | None) -> torch.dtype:
        """The default precision on `device`."""
        on_cuda = device is not None and str(device).startswith("cuda")
        if device is None:
            on_cuda = torch.cuda.is_available()
        return torch.float16 if self.half_on_cuda and on_cuda else torch.float32

    def vocab_size(self, model: HookedLlava) -> int | None:
        """How many leading vocabulary rows the softmax runs over (None: all of them)."""
        if not self.original_vocab:
            return None
        image_token_id = _image_token_id(model.config)
        n_rows = int(model.hf_model.get_output_embeddings().weight.shape[0])
        return image_token_id if image_token_id is not None and 0 < image_token_id < n_rows else None

    def with_readout(self, readout: str | LensReadout | None) -> Protocol:
        """This protocol with another lens readout (``"raw"`` or ``"norm"``); None keeps its own."""
        if readout is None:
            return self
        if isinstance(readout, str):
            if readout not in READOUTS:
                raise MMLensError(f"lens readout {readout!r} is not known; use one of {', '.join(READOUTS)}")
            readout = replace(self.readout, final_norm=readout == "norm")
        return replace(self, readout=readout)

    def describe(self, model: HookedLlava | None = None, device: Any = None) -> dict[str, Any]:
        """The resolved choices, as printed and recorded in a run's configuration."""
        out: dict[str, Any] = {
            "protocol": self.name,
            "template": self.conversation.name if self.conversation else "checkpoint chat template",
            "readout": self.readout.name,
            "lens_points": "embeddings..output (L+1)" if self.readout.from_embeddings else "after each block (L)",
            "answer_rule": asdict(self.answer),
            "original_vocab": self.original_vocab,
            "default_dtype": str(self.dtype(device)).removeprefix("torch."),
        }
        if model is not None:
            out["window"] = self.window(model.n_layers)
            out["vocab_size"] = self.vocab_size(model)
        return out

    # -- implemented by the two protocols

    def encode(
        self, model: HookedLlava, image: Image, question: str, text: str, spans: dict[str, str]
    ) -> Encoding:
        raise NotImplementedError

    def patch_sets(
        self, model: HookedLlava, image: Image, regions: Any, boxes: Sequence[Any]
    ) -> tuple[list[int], list[int]]:
        raise NotImplementedError


@dataclass(frozen=True)
class CheckpointProtocol(Protocol):
    """The checkpoint's chat template and processor, exact-geometry patches (`mm_lens.patches`)."""

    def encode(self, model, image, question, text, spans):
        from mm_lens.regions import encode_with_processor

        return encode_with_processor(model, image, question, text, spans)

    def patch_sets(self, model, image, regions, boxes):
        from mm_lens.patches import related_and_other

        return related_and_other(model, image, regions, boxes)


@dataclass(frozen=True)
class StudyProtocol(Protocol):
    """The study's pipeline (see the module docstring); `conversation` is set when resolved for a model."""

    def for_model(self, model: HookedLlava) -> StudyProtocol:
        """This protocol with the conversation of `model`'s family; an error when it is not a study model."""
        conversation = study_conversation(model.config, model.tokenizer)
        if conversation is None:
            raise MMLensError(
                f"{model.name!r} is not one of the study's model families (LLaVA-1.5 / LLaVA-NeXT with a "
                "Vicuna/Llama-2 or Llama-3 language model and a 336 px CLIP tower); use --protocol checkpoint"
            )
        return replace(self, conversation=conversation)

    def encode(self, model, image, question, text, spans):
        conversation = self.conversation or self.for_model(model).conversation
        prompt = conversation.prompt(text)
        if model.model_type == "llava_next":
            _check_next_layout(model, image.size)
        pixels = study_image_processor(model)(images=image, return_tensors="pt")
        image_sizes = pixels.get("image_sizes")
        n_features = _n_image_features(model, image_sizes)
        before, after = prompt.split(IMAGE_PLACEHOLDER)
        head, tail = tokenizer_image_token(model.tokenizer, before, after)
        image_token_id = _image_token_id(model.config)
        ids = head + [image_token_id] * n_features + tail
        first_tail = len(head) + n_features

        def find(substring: str, what: str) -> list[int]:
            found = find_token_range(model.tokenizer, conversation, tail, substring)
            if found is None:
                from mm_lens.types import SampleSkip

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

    def patch_sets(self, model, image, regions, boxes):
        from mm_lens.patches import red_mask_patches

        return red_mask_patches(study_image_processor(model), image, regions, boxes)


STUDY = StudyProtocol(
    name="study",
    conversation=None,
    answer=STUDY_ANSWER,
    readout=LensReadout(from_embeddings=True, final_norm=False),
    window_per_32_layers=7,
    fixed_window=None,
    lens_correct_only=True,
    original_vocab=True,
    half_on_cuda=True,
    keep_sample_without_boxes=True,
)

CHECKPOINT = CheckpointProtocol(
    name="checkpoint",
    conversation=None,
    answer=CHECKPOINT_ANSWER,
    readout=LensReadout(from_embeddings=False, final_norm=True),
    window_per_32_layers=9,
    fixed_window=9,
    lens_correct_only=False,
    original_vocab=False,
    half_on_cuda=False,
    keep_sample_without_boxes=False,
)

# ------------------------------------------------------------------------------------------ resolution


def resolve_protocol(protocol: str | Protocol | None, model: HookedLlava) -> Protocol:
    """The `Protocol` a name means for `model` (``auto``: the study's for its families, else the checkpoint's)."""
    if isinstance(protocol, Protocol):
        return (
            protocol.for_model(model)
            if isinstance(protocol, StudyProtocol) and protocol.conversation is None
            else protocol
        )
    name = "auto" if protocol is None else str(protocol).strip().lower()
    if name not in PROTOCOL_NAMES:
        raise MMLensError(f"protocol {protocol!r} is not known; use one of {', '.join(PROTOCOL_NAMES)}")
    if name == "auto":
        cached = getattr(model, "_auto_protocol", None)
        if cached is None:
            conversation = study_conversation(model.config, model.tokenizer)
            cached = replace(STUDY, conversation=conversation) if conversation else CHECKPOINT
            try:
                model._auto_protocol = cached  # resolved once per loaded model
            except AttributeError:
                pass
        return cached
    if name == "study":
        return STUDY.for_model(model)
    return CHECKPOINT


def protocol_for_checkpoint(protocol: str | None, path: str) -> Protocol:
    """Resolve a protocol name from a checkpoint's files alone (config and tokenizer, no weights).

    Runs record the resolved protocol in their configuration before the model is loaded.
    """
    name = "auto" if protocol is None else str(protocol).strip().lower()
    if name not in PROTOCOL_NAMES:
        raise MMLensError(f"protocol {protocol!r} is not known; use one of {', '.join(PROTOCOL_NAMES)}")
    if name == "checkpoint":
        return CHECKPOINT
    from transformers import AutoConfig, AutoTokenizer

    from mm_lens.model import offline_if_local

    with offline_if_local(path):
        try:
            config = AutoConfig.from_pretrained(path)
            tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception as exc:  # hub and file errors come in many types
            raise MMLensError(f"cannot read the config / tokenizer of {path!r}: {exc}") from exc
    conversation = study_conversation(config, tokenizer)
    if conversation is None:
        if name == "study":
            raise MMLensError(
                f"{path!r} is not one of the study's model families (LLaVA-1.5 / LLaVA-NeXT with a Vicuna/Llama-2 "
                "or Llama-3 language model and a 336 px CLIP tower); use --protocol checkpoint"
            )
        return CHECKPOINT
    return replace(STUDY, conversation=conversation)


def study_conversation(config: Any, tokenizer: Any) -> Conversation | None:
    """The study's conversation for a checkpoint of one of its families, else None.

    LLaVA-1.5 (``llava``) with a Vicuna (Llama-2 vocabulary) language model -> ``vicuna_v1``; LLaVA-NeXT
    (``llava_next``) with Vicuna -> ``vicuna_v1``, with Llama-3 -> ``llava_llama_3``. The vision tower must be
    CLIP at 336 px with 14 px patches, the language model a Llama.
    """
    model_type = getattr(config, "model_type", None)
    text = getattr(config, "text_config", None)
    vision = getattr(config, "vision_config", None)
    if model_type not in ("llava", "llava_next") or text is None or vision is None:
        return None
    if getattr(text, "model_type", None) != "llama" or getattr(vision, "model_type", None) not in (
        "clip_vision_model", "clip"
    ):
        return None
    if int(getattr(vision, "image_size", 0)) != 336 or int(getattr(vision, "patch_size", 0)) != 14:
        return None
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    if tokenizer.bos_token == "<|begin_of_text|>" and "<|start_header_id|>" in vocab and len(vocab) >= 128256:
        return LLAVA_LLAMA_3 if model_type == "llava_next" else None
    if tokenizer.bos_token == "<s>" and vocab.get("▁") == 29871 and len(vocab) >= 32000:
        return VICUNA_V1
    return None


# ------------------------------------------------------------------------------------------ study pieces


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


def _image_token_id(config: Any) -> int | None:
    token = getattr(config, "image_token_id", None)
    if token is None:
        token = getattr(config, "image_token_index", None)
    return None if token is None else int(token)


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
    from mm_lens.types import SampleSkip

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
    from mm_lens.regions import image_codes

    size = torch.as_tensor(image_sizes)[0] if image_sizes is not None else None
    return len(image_codes(model, size))


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


__all__ = [
    "CHECKPOINT",
    "LLAVA_LLAMA_3",
    "PROTOCOL_NAMES",
    "READOUTS",
    "STUDY",
    "VICUNA_V1",
    "AnswerRule",
    "CheckpointProtocol",
    "Conversation",
    "Encoding",
    "LensReadout",
    "Protocol",
    "StudyProtocol",
    "find_token_range",
    "protocol_for_checkpoint",
    "resolve_protocol",
    "study_conversation",
    "study_image_processor",
    "tokenizer_image_token",
    "vocab_softmax",
]
