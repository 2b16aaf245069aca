"""Layer sweep: probability of the greedy first answer token, base vs. knockout of a block over a window of layers.

For each block and each layer l the knockout is applied at ``layer_window(l, k, n_layers)``; the result is one
row per (block, layer) with the base probability, the knockout probability and the relative change in percent.
How the knockout probabilities are computed is an *engine* (`mm_lens.engines`): ``"reference"`` runs one full forward
per (block, window); faster engines plug in with the same signature.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pandas as pd
import torch

from mm_lens import selfcheck
from mm_lens.analyses import FLOW, collect
from mm_lens.engines import DEFAULT_ENGINE, CleanPass, Engine, clean_pass, get_engine
from mm_lens.errors import MMLensError
from mm_lens.inputs import assign_boxes, prepare
from mm_lens.knockout import Edge, parse_edge
from mm_lens.model import resolve_protocol
from mm_lens.protocol import CHECKPOINT_ANSWER, AnswerRule, Protocol, vocab_softmax
from mm_lens.regions import ALIASES, CENTRAL_OBJECT, FALSE_OPTION, SPAN_NAMES, TRUE_OPTION
from mm_lens.regions import PATCH_REGIONS as _PATCHES
from mm_lens.types import WRONG_ANSWER, Sample, SampleSkip, Skip, boxes_for, check_sample

if TYPE_CHECKING:
    from PIL.Image import Image

    from mm_lens.inputs import MultimodalInput
    from mm_lens.model import HookedLlava

FLOW_COLUMNS = list(FLOW.columns)
PATCH_REGIONS = (*_PATCHES, *(a for a, t in ALIASES.items() if t in _PATCHES))  # regions that need boxes


def layer_window(layer: int, k: int, n_layers: int) -> range:
    """Layers knocked out around `layer`: ``[layer - k//2, layer + ceil(k/2))`` clipped to ``[0, n_layers)``."""
    if not 0 < k <= n_layers:
        raise MMLensError(f"window {k} must be between 1 and the model's {n_layers} layers")
    if not 0 <= layer < n_layers:
        raise MMLensError(f"layer {layer} is outside the model's layers 0..{n_layers - 1}")
    return range(max(0, layer - k // 2), min(n_layers, layer + math.ceil(k / 2)))


# ---------------------------------------------------------------- greedy answer


def normalize_answer(text: str) -> str:
    """Answer as the checkpoint protocol compares it: first line, stripped, lower case, final period dropped."""
    return CHECKPOINT_ANSWER.normalise(text)


@dataclass
class Greedy:
    """The model's greedy answer: normalised text, the first token and its base probability."""

    text: str
    first_token: int
    first_prob: float
    token_ids: list[int] = field(default_factory=list)
    clean: CleanPass | None = field(default=None, repr=False)  # the prompt's clean pass, for the fast engine


def greedy_answer(
    model: HookedLlava,
    inp: MultimodalInput,
    max_new_tokens: int | None = None,
    fwd_hooks=(),
    rule: AnswerRule | None = None,
    cached: bool = True,
) -> Greedy:
    """Greedy decoding with the bridge and its KV cache, as the input's protocol decodes answers.

    The study's rule decodes up to 128 tokens or EOS; the checkpoint's stops at a newline too (10 tokens).
    The argmax and the first token's probability run over the protocol's vocabulary. ``cached=False`` runs a full
    forward per step instead of continuing from the cache (the plain way, for the reference engine). The first
    cached decoding on a model is self-checked against an uncached forward (`mm_lens.selfcheck`).
    """
    bridge, tokenizer = model.bridge, model.tokenizer
    rule = rule or inp.protocol.answer
    limit = rule.max_new_tokens if max_new_tokens is None else max_new_tokens
    n_vocab = inp.vocab_size(model)
    input_ids, kwargs = inp.forward_args()
    eos = {tokenizer.eos_token_id} | set(_as_list(getattr(model.hf_model.generation_config, "eos_token_id", None)))
    eos.discard(None)
    generated: list[int] = []
    clean = None
    with torch.inference_mode(), bridge.hooks(fwd_hooks=list(fwd_hooks)):
        if fwd_hooks:
            logits, cache = bridge(input_ids, return_type="logits_and_cache", logits_to_keep=1, **kwargs)
            last = logits[0, -1]
        else:  # unhooked: keep the pass, knockout engines reuse it
            clean = clean_pass(model, inp)
            last, cache = clean.last_logits, clean.cache
        probs = vocab_softmax(last, n_vocab)
        first = int(probs.argmax())
        first_prob = float(probs[first])
        if cached and clean is not None:
            selfcheck.once(model, "cache", selfcheck.check_cache, inp, clean, first)
        token = first
        for _ in range(limit):
            if token in eos:
                break
            generated.append(token)
            if len(generated) == limit or (
                rule.stop_at_newline and "\n" in tokenizer.decode(generated, skip_special_tokens=True)
            ):
                break
            if cached:
                step = torch.tensor([[token]], device=input_ids.device)
                logits, cache = bridge(step, return_type="logits_and_cache", past_key_values=cache)
            else:
                ids_so_far, kwargs_so_far = inp.forward_args(extra=generated)
                logits = bridge(ids_so_far, **kwargs_so_far)
            token = int(logits[0, -1, :n_vocab].argmax())
    text = rule.normalise(tokenizer.decode(generated, skip_special_tokens=True))
    return Greedy(text=text, first_token=first, first_prob=first_prob, token_ids=generated, clean=clean)


def require_correct(greedy: Greedy, inp: MultimodalInput, sample: Sample) -> None:
    """`SampleSkip` of kind ``"wrong answer"`` unless the greedy answer is the gold one, as the protocol compares."""
    if greedy.text != inp.protocol.answer.gold(str(sample.answer)):
        reason = f"model answered {greedy.text!r}, gold {sample.answer!r}"
        raise SampleSkip(reason, WRONG_ANSWER, str(sample.question_id))


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple, set)) else [value]


# ---------------------------------------------------------------- sweep


def layer_sweep(
    model: HookedLlava,
    inp: MultimodalInput,
    blocks: Sequence[str | Edge],
    window: int | None = None,
    engine: str | Engine = DEFAULT_ENGINE,
    question_id: str = "",
    greedy: Greedy | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Rows ``question_id, block, layer, base_prob, knockout_prob, relative_change_pct`` for one input.

    The tracked token is the greedy first answer token (pass `greedy` to reuse a decoding already done).
    ``window`` defaults to the input's protocol's (the study: 7 per 32 layers; the checkpoint protocol: 9).
    """
    parsed = [b if isinstance(b, Edge) else parse_edge(b, extra_names=list(inp.regions.spans or {})) for b in blocks]
    if not parsed:
        raise MMLensError("sweep needs at least one block, e.g. 'Image->Question'")
    n_layers = model.n_layers
    window = inp.protocol.choose_window(window, n_layers)
    windows = [layer_window(layer, window, n_layers) for layer in range(n_layers)]
    run = get_engine(engine)
    clean = greedy.clean if greedy is not None else None
    if greedy is None:  # one clean pass: it gives the tracked token, and an engine that reuses it gets it
        if getattr(run, "reuses_clean", False):
            clean = clean_pass(model, inp)
            last = clean.last_logits
        else:  # the reference engine's own computation, so a causally invisible edge changes nothing, bit for bit
            with torch.inference_mode():
                input_ids, kwargs = inp.forward_args()
                last = model.bridge(input_ids, **kwargs)[0, -1]
        probs = vocab_softmax(last, inp.vocab_size(model))
        token, base = int(probs.argmax()), float(probs.max())
    else:
        token, base = greedy.first_token, greedy.first_prob
    if getattr(run, "shortcut", False):  # a shortcut engine proves itself on the model's first sweep
        if clean is not None:
            selfcheck.once(model, "cache", selfcheck.check_cache, inp, clean, token)
        selfcheck.once(model, "engine", selfcheck.check_engine, inp, parsed, windows, token, clean)
    ko = run(model, inp, parsed, windows, token, progress=progress, clean=clean)
    rows = []
    for b, block in enumerate(parsed):
        for layer in range(n_layers):
            p = float(ko[b, layer])
            rows.append(
                {
                    "question_id": str(question_id),
                    "block": str(block),
                    "layer": layer,
                    "base_prob": base,
                    "knockout_prob": p,
                    "relative_change_pct": (p - base) / base * 100.0 if base > 0 else float("nan"),
                }
            )
    return pd.DataFrame(rows, columns=FLOW_COLUMNS)


@dataclass
class FlowResult:
    """A sweep over many samples: the long table, how many were kept, and why the others were skipped."""

    table: pd.DataFrame
    n_samples: int  # samples looked at
    n_wrong: int  # skipped because the greedy answer was wrong
    skips: list[Skip] = field(default_factory=list)  # every skipped sample with its reason

    @property
    def n_kept(self) -> int:
        return self.n_samples - len(self.skips)


def sample_spans(sample, blocks: Sequence[Edge]) -> dict[str, str]:
    """Text spans a block set names (options, the central object), from the sample's columns."""
    names = {n for b in blocks for n in (b.source, b.target)}
    if "Question without Options" in names:
        names |= {TRUE_OPTION, FALSE_OPTION}
    spans = {}
    for name, attr in (
        (TRUE_OPTION, "true_option"), (FALSE_OPTION, "false_option"), (CENTRAL_OBJECT, "central_object")
    ):
        if name not in names:
            continue
        if not getattr(sample, attr, None):
            raise SampleSkip(f"the row gives no {name.lower()} (column {name.lower()!r})", f"no {name}")
        spans[name] = getattr(sample, attr)
    return spans


def _needs_boxes(block: Edge) -> bool:
    return block.source in PATCH_REGIONS or block.target in PATCH_REGIONS


def flow_sample(
    model: HookedLlava,
    sample: Sample,
    load_image: Callable[[Sample], Image],
    blocks: Sequence[Edge],
    window: int | None = None,
    all_samples: bool = False,
    engine: str | Engine = DEFAULT_ENGINE,
    protocol: str | Protocol | None = "auto",
) -> pd.DataFrame:
    """The sweep rows of one sample; `SampleSkip` when it cannot be analysed or (unless ``all_samples``)
    the model's greedy answer is wrong (kind ``"wrong answer"``). `blocks` are parsed (`parse_edge`).

    Under the study protocol a sample whose boxes are unusable keeps its rows for the blocks that need no
    boxes (as in the study); under the checkpoint protocol it is skipped.
    """

    try:
        image = load_image(sample)
        inp = prepare(model, image, sample.question, spans=sample_spans(sample, blocks), protocol=protocol)
        if any(_needs_boxes(b) for b in blocks):
            try:
                check_sample(sample, need_boxes=True)
                assign_boxes(model, inp, image, list(boxes_for(sample, *image.size)))
            except SampleSkip:
                blocks = [b for b in blocks if not _needs_boxes(b)]
                if not blocks or not inp.protocol.keep_sample_without_boxes:
                    raise
    except SampleSkip as skip:
        skip.question_id = skip.question_id or str(sample.question_id)
        raise
    greedy = greedy_answer(model, inp, cached=not getattr(get_engine(engine), "plain", False))
    if not all_samples:
        require_correct(greedy, inp, sample)
    return layer_sweep(model, inp, blocks, window, engine, question_id=sample.question_id, greedy=greedy)


def flow_samples(
    model: HookedLlava,
    samples: Iterable[Sample],
    load_image: Callable[[Sample], Image],
    blocks: Sequence[str],
    window: int | None = None,
    all_samples: bool = False,
    engine: str | Engine = DEFAULT_ENGINE,
    progress: bool = True,
    protocol: str | Protocol | None = "auto",
) -> FlowResult:
    """Sweep every sample; wrongly answered ones are skipped and counted unless ``all_samples=True``.

    `load_image` may raise `SampleSkip` (missing image, bad box): that sample is skipped with its reason.
    (`mm_lens.runs` runs the same per-sample step resumably, writing each sample as it finishes.)
    """
    parsed = [parse_edge(b, extra_names=SPAN_NAMES) for b in blocks]
    get_engine(engine)
    protocol = resolve_protocol(protocol, model)
    window = protocol.choose_window(window, model.n_layers)  # a bad window fails before any sample is run
    samples = list(samples)
    tables, skips = collect(
        samples, lambda s: flow_sample(model, s, load_image, parsed, window, all_samples, engine, protocol),
        progress, "flow",
    )
    n_wrong = sum(skip.kind == WRONG_ANSWER for skip in skips)
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=FLOW_COLUMNS)
    return FlowResult(table=table, n_samples=len(samples), n_wrong=n_wrong, skips=skips)


__all__ = [
    "FLOW_COLUMNS",
    "FlowResult",
    "flow_sample",
    "Greedy",
    "greedy_answer",
    "layer_window",
    "normalize_answer",
    "layer_sweep",
    "flow_samples",
]
