"""Answer logit lens: each layer's last-position residual stream read out through ``ln_final`` + ``unembed``.

For every layer l, ``softmax(unembed(ln_final(resid_post[l][last])))`` gives the probability the model would
assign to the first token of the answer (and of the false option) if it stopped after layer l. The last
layer reproduces the model's own output distribution.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from mm_lens.data.gqa import Sample, SampleSkip, Skip
from mm_lens.errors import MMLensError

if TYPE_CHECKING:
    from PIL.Image import Image

    from mm_lens.model import HookedLlava
    from mm_lens.regions import MultimodalInput

LENS_COLUMNS = ["question_id", "layer", "form", "prob"]


def forward_args(inp: MultimodalInput) -> tuple[Tensor, dict]:
    """``(input_ids, kwargs)`` for ``bridge(...)`` / ``run_with_hooks`` / ``run_with_cache``."""
    kwargs = dict(inp.model_kwargs())
    input_ids = kwargs.pop("input_ids", inp.input_ids)
    return input_ids, kwargs


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


def layer_probs(model: HookedLlava, inp: MultimodalInput) -> Float[Tensor, "layer vocab"]:
    """Next-token distribution at the last position read from every layer's ``hook_resid_post``."""
    bridge = model.bridge
    names = [f"blocks.{layer}.hook_resid_post" for layer in range(model.n_layers)]
    wanted = set(names)
    input_ids, kwargs = forward_args(inp)
    with torch.inference_mode():
        _, cache = bridge.run_with_cache(input_ids, names_filter=lambda n: n in wanted, **kwargs)
        resid = torch.stack([cache[name][:, -1] for name in names], dim=1)  # [batch, layer, d_model]
        logits = bridge.unembed(bridge.ln_final(resid))
        return logits[0].float().softmax(-1)


def answer_lens(model: HookedLlava, inp: MultimodalInput, forms: dict[str, str]) -> pd.DataFrame:
    """Long table ``layer, form, prob``: per layer, the probability of each form's first token."""
    if not forms:
        raise MMLensError("answer_lens needs at least one form, e.g. answer_forms('red')")
    probs = layer_probs(model, inp)
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


def lens_sample(model: HookedLlava, sample: Sample, load_image: Callable[[Sample], Image]) -> pd.DataFrame:
    """Rows ``question_id, layer, form, prob`` of one sample; `SampleSkip` when it cannot be analysed."""
    from mm_lens.regions import prepare

    try:
        inp = prepare(model, load_image(sample), sample.question)
        forms = answer_forms(sample.answer, getattr(sample, "false_option", None))
        if not forms:
            raise SampleSkip("the row gives no answer to track", "empty answer")
    except SampleSkip as skip:
        skip.question_id = skip.question_id or str(sample.question_id)
        raise
    table = answer_lens(model, inp, forms)
    table.insert(0, "question_id", str(sample.question_id))
    return table[LENS_COLUMNS]


def lens_samples(
    model: HookedLlava,
    samples: Iterable[Sample],
    load_image: Callable[[Sample], Image],
    progress: bool = True,
) -> LensResult:
    """Answer lens over every sample (all of them: the lens needs no correct answer).

    `load_image` may raise `SampleSkip` (missing image): that sample is skipped with its reason.
    """
    samples = list(samples)
    tables, skips = [], []
    for sample in tqdm(samples, desc="lens", unit="sample", disable=not progress):
        try:
            tables.append(lens_sample(model, sample, load_image))
        except SampleSkip as skip:
            skips.append(skip.record(str(sample.question_id)))
    table = pd.concat(tables, ignore_index=True)[LENS_COLUMNS] if tables else pd.DataFrame(columns=LENS_COLUMNS)
    return LensResult(table=table, n_samples=len(samples), skips=skips)
