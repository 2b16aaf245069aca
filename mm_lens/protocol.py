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

This module holds the choices only, as data. The two input pipelines that carry them out live side by side in
`mm_lens.encoders`; `mm_lens.model.resolve_protocol` turns a name into a protocol for a loaded model.

``auto`` resolves to ``study`` for the study's model families (LLaVA-1.5 and LLaVA-NeXT with a Llama
language model, a 336 px / patch-14 CLIP tower and a Vicuna/Llama-2 or Llama-3 vocabulary) and to
``checkpoint`` otherwise. Every choice can still be overridden where it is used (``window=``, ``readout=``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from mm_lens.errors import MMLensError
from mm_lens.names import PROTOCOL_NAMES as PROTOCOL_NAMES  # re-exported: the lists live in names.py
from mm_lens.names import READOUTS as READOUTS

if TYPE_CHECKING:
    from mm_lens.model import HookedLlava





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


# ------------------------------------------------------------------------------------------ protocols


@dataclass(frozen=True)
class Protocol:
    """Every choice that decides the numbers, as data. `pipeline` names the input pipeline that encodes
    (image, question) and maps boxes to patches (`mm_lens.encoders.PIPELINES`: ``"study"`` or ``"checkpoint"``).
    """

    name: str
    pipeline: str  # the input pipeline (mm_lens.encoders): "study" | "checkpoint"
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
        """The default knockout window for a model of `n_layers` layers, never more than half its layers.

        The study's rule scales 7 per 32 layers (7 for 32, 9 for 40); the checkpoint's takes 9 whatever the depth.
        Both are capped at half the model: a window covering every layer would make each sweep curve one smeared
        value. For the shipped toy's 8 layers that gives 2 (study) and 4 (checkpoint), not 8; for 4 layers 1 and 2.
        """
        half = max(1, n_layers // 2)
        if self.fixed_window is not None:
            return min(self.fixed_window, half)
        return max(1, min(half, int(round(n_layers * self.window_per_32_layers / 32))))

    def choose_window(self, window: int | None, n_layers: int) -> int:
        """The window a sweep uses: `window` when given, else this protocol's default; the one place both meet."""
        k = self.window(n_layers) if window is None else window
        if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= n_layers:
            raise MMLensError(f"window {k} must be between 1 and the model's {n_layers} layers")
        return k

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
        image_token_id = model.image_token_id
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

    @property
    def needs_conversation(self) -> bool:
        """Whether the protocol's prompt is a conversation chosen per model family (the study's), not yet chosen."""
        return self.pipeline == "study" and self.conversation is None


STUDY = Protocol(
    name="study",
    pipeline="study",
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

CHECKPOINT = Protocol(
    name="checkpoint",
    pipeline="checkpoint",
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


__all__ = [
    "CHECKPOINT",
    "LLAVA_LLAMA_3",
    "PROTOCOL_NAMES",
    "READOUTS",
    "STUDY",
    "VICUNA_V1",
    "AnswerRule",
    "Conversation",
    "LensReadout",
    "Protocol",
    "vocab_softmax",
]
