"""Answer logit lens: each layer's last-position residual stream read out through the unembedding.

For a point l of the residual stream at the last position, ``softmax(unembed(x_l))`` is the probability the
model would give the first token of the answer (lower case and capitalised, and the false option) if it
stopped there. The protocol's `LensReadout` says where and how:

* the study reads L+1 points: the input embeddings (``blocks.0.hook_resid_pre``), the stream entering each
  later block, and the model's output; below the top it applies no final norm (``readout="raw"``);
* the checkpoint protocol reads the stream leaving each of the L blocks (``hook_resid_post``) through
  ``ln_final`` (``readout="norm"``).

Either readout works under either protocol; the top point is always the model's own output distribution
(``ln_final`` then ``unembed``), and the softmax runs over the protocol's vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from mm_lens import hook_points
from mm_lens.analyses import LENS, collect
from mm_lens.errors import MMLensError
from mm_lens.inputs import prepare
from mm_lens.protocol import vocab_softmax
from mm_lens.sweep import greedy_answer, require_correct
from mm_lens.types import Sample, SampleSkip, Skip

if TYPE_CHECKING:
    from PIL.Image import Image

    from mm_lens.inputs import MultimodalInput
    from mm_lens.model import HookedLlava
    from mm_lens.protocol import LensReadout, Protocol

LENS_COLUMNS = list(LENS.columns)


def answer_forms(answer: str, false_option: str | None = None) -> dict[str, str]:
    """The spellings the lens tracks: answer (and false option) in lower case and capitalised."""
    forms: dict[str, str] = {}
    for key, text in (("answer", answer), ("false_option", false_option)):
        if text is None or not str(text).strip():
            continue
        low = str(text).strip().lower()
        forms[f"{key}_lower"] = low
        forms[f"{key}_capitalized"] = low[:1].upper() + low[1:]
    return forms


def first_token_id(tokenizer, text: str) -> int:
    """Id of the first token of `text` tokenised on its own (no special tokens)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise MMLensError(f"answer text {text!r} tokenises to nothing; give a non-empty answer")
    return int(ids[0])


def lens_hook_names(n_layers: int, readout: LensReadout) -> list[str]:
    """The residual-stream hooks a readout reads, bottom to top (the last one is the model's final stream)."""
    if readout.from_embeddings:
        return [hook_points.resid_pre(layer) for layer in range(n_layers)] + [hook_points.resid_post(n_layers - 1)]
    return [hook_points.resid_post(layer) for layer in range(n_layers)]


def layer_probs(
    model: HookedLlava, inp: MultimodalInput, readout: str | LensReadout | None = None
) -> Float[Tensor, "point vocab"]:
    """Next-token distribution at the last position read from every point of the readout (see module doc).

    ``readout``: ``"raw"`` / ``"norm"`` (or a `LensReadout`); None takes the input's protocol's.
    """

    lens = inp.protocol.with_readout(readout).readout
    bridge = model.bridge
    names = lens_hook_names(model.n_layers, lens)
    wanted = set(names)
    input_ids, kwargs = inp.forward_args()
    with torch.inference_mode():
        _, cache = bridge.run_with_cache(input_ids, names_filter=lambda n: n in wanted, **kwargs)
        resid = torch.stack([cache[name][:, -1] for name in names], dim=1)  # [batch, point, d_model]
        if lens.final_norm:
            resid = bridge.ln_final(resid)
        else:  # raw below the top; the top point is the model's output
            resid = torch.cat([resid[:, :-1], bridge.ln_final(resid[:, -1:])], dim=1)
        logits = bridge.unembed(resid)
        return vocab_softmax(logits[0], inp.vocab_size(model))


def answer_lens(
    model: HookedLlava, inp: MultimodalInput, forms: dict[str, str], readout: str | LensReadout | None = None
) -> pd.DataFrame:
    """Long table ``layer, form, prob``: per lens point, the probability of each form's first token."""
    if not forms:
        raise MMLensError("answer_lens needs at least one form, e.g. answer_forms('red')")
    probs = layer_probs(model, inp, readout)
    token_ids = {form: first_token_id(model.tokenizer, text) for form, text in forms.items()}
    rows = [
        {"layer": layer, "form": form, "prob": float(probs[layer, tok])}
        for layer in range(probs.shape[0])
        for form, tok in token_ids.items()
    ]
    return pd.DataFrame(rows, columns=["layer", "form", "prob"])


@dataclass
class LensResult:
    """The lens over many samples: the long table and the samples skipped with their reasons."""

    table: pd.DataFrame
    n_samples: int
    skips: list[Skip] = field(default_factory=list)


def lens_sample(
    model: HookedLlava,
    sample: Sample,
    load_image: Callable[[Sample], Image],
    protocol: str | Protocol | None = "auto",
    all_samples: bool = False,
    readout: str | None = None,
) -> pd.DataFrame:
    """Rows ``question_id, layer, form, prob`` of one sample; `SampleSkip` when it cannot be analysed, or
    when the protocol keeps correct answers only (the study's) and the model answers wrongly."""

    try:
        inp = prepare(model, load_image(sample), sample.question, protocol=protocol)
        forms = answer_forms(sample.answer, getattr(sample, "false_option", None))
        if not forms:
            raise SampleSkip("the row gives no answer to track", "empty answer")
    except SampleSkip as skip:
        skip.question_id = skip.question_id or str(sample.question_id)
        raise
    if inp.protocol.lens_correct_only and not all_samples:
        require_correct(greedy_answer(model, inp), inp, sample)
    table = answer_lens(model, inp, forms, readout)
    table.insert(0, "question_id", str(sample.question_id))
    return table[LENS_COLUMNS]


def lens_samples(
    model: HookedLlava,
    samples: Iterable[Sample],
    load_image: Callable[[Sample], Image],
    progress: bool = True,
    protocol: str | Protocol | None = "auto",
    all_samples: bool = False,
    readout: str | None = None,
) -> LensResult:
    """Answer lens over the samples: every one under the checkpoint protocol, the correctly answered ones
    under the study's (unless ``all_samples``).

    `load_image` may raise `SampleSkip` (missing image): that sample is skipped with its reason.
    """
    samples = list(samples)
    tables, skips = collect(
        samples, lambda s: lens_sample(model, s, load_image, protocol, all_samples, readout), progress, "lens"
    )
    table = pd.concat(tables, ignore_index=True)[LENS_COLUMNS] if tables else pd.DataFrame(columns=LENS_COLUMNS)
    return LensResult(table=table, n_samples=len(samples), skips=skips)
