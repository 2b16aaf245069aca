"""Activation patching with images: which layers and positions carry what makes the clean answer.

Activation patching (causal tracing) runs the model on a *corrupted* input (another image, or the same image
with the question's options swapped) and, at one layer, overwrites an activation at some positions with its
value from the *clean* run. If the probability of the clean answer comes back, those activations carried the
information that the corruption removed. For each layer l::

    clean       = p(answer | clean input)
    corrupt     = p(answer | corrupted input)
    prob        = p(answer | corrupted input, activation at layer l and the region's positions := clean's)
    restoration = (prob - corrupt) / (clean - corrupt)      # 0: nothing restored, 1: the clean run

``answer`` is the clean run's greedy first answer token (the argmax of the clean last-position distribution).
Writing *every* position of the residual stream entering layer 0 gives the clean run back exactly; writing no
position gives the corrupted run. Patching the image tokens' residual stream layer by layer shows how long the
answer still lives on the image positions before the question and the last position have read it (in
LLaVA, the image is read into the question early and the image positions stop mattering in the middle layers).

Sites are TransformerLens hook points of the language model's blocks (``blocks.{l}.hook_{site}``):

* ``resid_pre`` / ``resid_post``: the residual stream entering / leaving block l;
* ``resid_mid``: the stream between attention and MLP. On a `TransformerBridge` the hook named
  ``hook_resid_mid`` is the MLP norm's input, and writing it changes the MLP's input only, not the residual
  stream the MLP output is added to; mm-lens therefore patches it through ``hook_attn_out`` (the attention
  output is set to ``clean resid_mid - resid_pre``), which sets the stream itself;
* ``attn_out`` / ``mlp_out``: the attention / MLP output added to the stream in block l.

The clean and corrupted inputs must have the same layout (sequence length, image, question and last
positions), because the clean activation of position p is written at position p of the corrupted run.
Positions of a named region come from the clean input's region map (spans such as ``True Option`` may move
in the corrupted prompt; the position is what is patched).

Counterfactual pairs come from task data (`counterfactual_pairs`): ``"image"`` asks the clean question
about another image of the same task with a different answer; ``"options"`` asks the question with its two
options swapped, about the same image. `patching_sample` prepares both inputs and runs the sweep, raising
`SampleSkip` for pairs whose layouts differ so a run can skip them with a reason.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from mm_lens import hook_points
from mm_lens.errors import MMLensError
from mm_lens.inputs import assign_boxes, prepare
from mm_lens.lens import first_token_id
from mm_lens.names import PAIR_MODES as PAIR_MODES  # re-exported: the lists live in names.py
from mm_lens.names import SITES as SITES
from mm_lens.protocol import vocab_softmax
from mm_lens.regions import ALIASES, CENTRAL_OBJECT, FALSE_OPTION, PATCH_REGIONS, QUESTION_WITHOUT_OPTIONS, TRUE_OPTION
from mm_lens.types import Sample, SampleSkip, Skip, boxes_for, check_sample

if TYPE_CHECKING:
    from PIL.Image import Image

    from mm_lens.inputs import MultimodalInput
    from mm_lens.model import HookedLlava
    from mm_lens.protocol import Protocol

#: Columns of `patching_sample`'s table (``position`` follows ``layer`` when ``per_position=True``).
PATCHING_COLUMNS = ["question_id", "site", "region", "layer", "prob", "clean_prob", "corrupt_prob", "restoration"]
LAYOUT_MISMATCH = "layout mismatch"  # skip kind of a pair whose two inputs cannot be patched position by position


def site_hook(layer: int, site: str) -> str:
    """TransformerLens hook name of a patching site: ``blocks.{layer}.hook_{site}``."""
    return hook_points.site(layer, site)


def layout_difference(clean: MultimodalInput, corrupt: MultimodalInput) -> str | None:
    """What differs between the two inputs' layouts (None when position p means the same slot in both)."""
    a, b = clean.regions, corrupt.regions
    if a.seq_len != b.seq_len:
        return f"sequence length {a.seq_len} vs {b.seq_len}"
    if a.image_positions != b.image_positions:
        return f"image tokens {len(a.image_positions)} vs {len(b.image_positions)} (or at other positions)"
    if (a.patch_tile, a.patch_row, a.patch_col) != (b.patch_tile, b.patch_row, b.patch_col):
        return "image tokens stand for different patches (another any-resolution tile grid)"
    if a.question != b.question:
        return f"question positions {_span(a.question)} vs {_span(b.question)}"
    if a.last != b.last:
        return f"last position {a.last} vs {b.last}"
    return None


def check_layout(clean: MultimodalInput, corrupt: MultimodalInput) -> None:
    """Raise `MMLensError` (one line: what differs, what to do) unless the two inputs share their layout."""
    diff = layout_difference(clean, corrupt)
    if diff is not None:
        raise MMLensError(
            f"clean and corrupted inputs differ in layout ({diff}); patching writes each clean position into the "
            "same position of the corrupted run, so use images that give the same image tokens (same size for "
            "LLaVA-NeXT tiles) and questions that tokenise to the same length"
        )


def _span(positions: Sequence[int]) -> str:
    return f"{positions[0]}..{positions[-1]}" if positions else "none"


def region_positions(inp: MultimodalInput, region: str | Sequence[int]) -> list[int]:
    """Sorted positions of a region name (``inp.regions.positions``) or of a list of positions (checked)."""
    if isinstance(region, str):
        positions = inp.regions.positions(region)
    else:
        positions = [int(p) for p in region]
    bad = [p for p in positions if not 0 <= p < inp.regions.seq_len]
    if bad:
        raise MMLensError(f"positions {bad[:5]} lie outside the input's 0..{inp.regions.seq_len - 1}")
    return sorted(set(positions))


def region_label(region: str | Sequence[int]) -> str:
    """The region as a table cell: its name, or ``"positions a,b,c"`` for a list."""
    if isinstance(region, str):
        return region
    return "positions " + ",".join(str(int(p)) for p in region)


# ------------------------------------------------------------------------------------------ sweep


@dataclass(frozen=True)
class _Job:
    layer: int
    positions: tuple[int, ...]
    position: int | None  # the one position of a per-position job (None: the whole region)


def _patch_hooks(jobs: Sequence[_Job], site: str, clean: dict[str, Tensor]) -> list[tuple[str, Callable[..., Tensor]]]:
    """Hooks writing, in batch row i, the clean activation of `jobs[i]` at its layer and positions."""
    by_layer: dict[int, tuple[list[int], list[int]]] = {}
    for row, job in enumerate(jobs):
        rows, poss = by_layer.setdefault(job.layer, ([], []))
        rows.extend([row] * len(job.positions))
        poss.extend(job.positions)
    hooks = []
    for layer, (rows, poss) in by_layer.items():
        if not poss:
            continue
        row_idx, pos_idx = torch.tensor(rows), torch.tensor(poss)
        if site == "resid_mid":
            hooks.extend(_resid_mid_hooks(layer, row_idx, pos_idx, clean[site_hook(layer, site)]))
            continue
        source = clean[site_hook(layer, site)]

        def write(act: Float[Tensor, "batch pos d_model"], hook, r=row_idx, p=pos_idx, src=source) -> Tensor:
            out = act.clone()
            out[r.to(act.device), p.to(act.device)] = src[0, p.to(src.device)].to(device=act.device, dtype=act.dtype)
            return out

        hooks.append((site_hook(layer, site), write))
    return hooks


def _resid_mid_hooks(layer: int, rows: Tensor, poss: Tensor, clean_mid: Tensor):
    """Set the residual stream between attention and MLP: attn_out := clean resid_mid - this run's resid_pre."""
    seen: dict[str, Tensor] = {}

    def read_pre(act: Float[Tensor, "batch pos d_model"], hook) -> Tensor:
        seen["pre"] = act
        return act

    def write_attn(act: Float[Tensor, "batch pos d_model"], hook) -> Tensor:
        r, p = rows.to(act.device), poss.to(act.device)
        out = act.clone()
        target = clean_mid[0, poss.to(clean_mid.device)].to(device=act.device, dtype=act.dtype)
        out[r, p] = target - seen["pre"][r, p].to(act.dtype)
        return out

    return [(site_hook(layer, "resid_pre"), read_pre), (site_hook(layer, "attn_out"), write_attn)]


def _copies(value: Any, n: int) -> Any:
    """`n` copies of one input's model argument, as the processor batches `n` equal samples: every tensor
    concatenated `n` times along its first dimension, whether that is the batch (``input_ids``,
    ``pixel_values`` of shape ``[1, tiles, ...]``) or a list of images, tiles or patches of all samples
    (``pixel_values`` of ``[tiles, ...]`` or ``[patches, dim]``, ``image_grid_thw``); anything else unchanged."""
    if not torch.is_tensor(value):
        return value
    return value.repeat(n, *([1] * (value.dim() - 1)))


def _last_probs(model: HookedLlava, logits: Tensor, inp: MultimodalInput) -> Float[Tensor, "batch vocab"]:

    return vocab_softmax(logits[:, -1], inp.vocab_size(model))


def _token_id(model: HookedLlava, token: int | str) -> int:
    if isinstance(token, str):

        return first_token_id(model.tokenizer, token)
    return int(token)


def patching_sweep(
    model: HookedLlava,
    clean: MultimodalInput,
    corrupt: MultimodalInput,
    region: str | Sequence[int],
    site: str = "resid_pre",
    layers: Iterable[int] | None = None,
    per_position: bool = False,
    token: int | str | None = None,
    batch_size: int = 8,
) -> pd.DataFrame:
    """Patch the clean activation at ``blocks.{l}.hook_{site}`` and the region's positions into the corrupted run.

    One row per layer (``layer, prob, clean_prob, corrupt_prob, restoration``), or per layer x position with
    ``per_position=True`` (column ``position``: that one position patched alone). ``region``: a region name of
    the clean input or a list of positions. ``token``: the tracked token (an id, or a text whose first token
    is taken); default the clean run's greedy first answer token. Probabilities are softmaxes of the
    last-position logits over the protocol's vocabulary. ``batch_size`` patched runs go through the model as
    one batch (each row is a full forward pass, image encoding included; lower it for large models or long
    LLaVA-NeXT inputs). ``restoration`` is NaN when the clean and corrupted probabilities are equal.
    The table's ``attrs`` hold ``token``, ``site`` and ``region``.
    """
    if site not in SITES:
        raise MMLensError(f"patching site {site!r} is not known; use one of {', '.join(SITES)}")
    if batch_size < 1:
        raise MMLensError(f"batch_size must be at least 1, got {batch_size}")
    check_layout(clean, corrupt)
    n_layers = model.n_layers
    layer_list = list(range(n_layers)) if layers is None else [int(layer) for layer in layers]
    bad = [layer for layer in layer_list if not 0 <= layer < n_layers]
    if bad:
        raise MMLensError(f"layers {bad} are outside the model's layers 0..{n_layers - 1}")
    positions = region_positions(clean, region)
    if per_position:
        jobs = [_Job(layer, (p,), p) for layer in layer_list for p in positions]
    else:
        jobs = [_Job(layer, tuple(positions), None) for layer in layer_list]

    bridge = model.bridge
    wanted = {site_hook(layer, site) for layer in layer_list}
    clean_ids, clean_kw = clean.forward_args()
    ids, kw = corrupt.forward_args()
    with torch.inference_mode():
        logits, cache = bridge.run_with_cache(
            clean_ids, names_filter=lambda name: name in wanted, logits_to_keep=1, **clean_kw
        )
        clean_dist = _last_probs(model, logits, clean)[0]
        tracked = int(clean_dist.argmax()) if token is None else _token_id(model, token)
        if not 0 <= tracked < clean_dist.shape[-1]:
            raise MMLensError(f"token id {tracked} is outside the vocabulary 0..{clean_dist.shape[-1] - 1}")
        clean_prob = float(clean_dist[tracked])
        corrupt_prob = float(_last_probs(model, bridge(ids, logits_to_keep=1, **kw), corrupt)[0, tracked])
        stored = {name: cache[name] for name in wanted}
        del cache
        probs: list[float] = []
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            n = len(chunk)
            batch_kw = {k: _copies(v, n) for k, v in kw.items()}
            out = bridge.run_with_hooks(
                ids.expand(n, -1), fwd_hooks=_patch_hooks(chunk, site, stored), logits_to_keep=1, **batch_kw
            )
            probs.extend(_last_probs(model, out, corrupt)[:, tracked].tolist())

    gap = clean_prob - corrupt_prob
    rows = []
    for job, prob in zip(jobs, probs, strict=True):
        row = {"layer": job.layer}
        if per_position:
            row["position"] = job.position
        row.update(
            prob=prob,
            clean_prob=clean_prob,
            corrupt_prob=corrupt_prob,
            restoration=(prob - corrupt_prob) / gap if gap != 0 else float("nan"),
        )
        rows.append(row)
    columns = ["layer", *(["position"] if per_position else []), "prob", "clean_prob", "corrupt_prob", "restoration"]
    table = pd.DataFrame(rows, columns=columns)
    table.attrs.update(token=tracked, site=site, region=region_label(region))
    return table


# ------------------------------------------------------------------------------------------ pairs from data


@dataclass(frozen=True)
class PatchPair:
    """A clean sample and its corruption: the question ``corrupt_question`` asked about image ``corrupt_img_id``.

    ``mode`` says how it was built (``"image"``: another image; ``"options"``: options swapped); ``partner_id``
    is the question id of the sample whose image was borrowed (image mode).
    """

    sample: Sample
    corrupt_img_id: str
    corrupt_question: str
    mode: str = "image"
    partner_id: str | None = None


@dataclass
class PatchPairs:
    """The pairs built from a sample list, and the samples left without a pair (with their reasons)."""

    pairs: list[PatchPair] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)

    def __iter__(self) -> Iterator[PatchPair]:
        return iter(self.pairs)

    def __len__(self) -> int:
        return len(self.pairs)


def _norm(text: str | None) -> str:
    return " ".join(str(text or "").lower().split())


def swap_options(question: str, true_option: str, false_option: str) -> str:
    """The question with every whole-word occurrence of each option replaced by the other (case kept on the
    first letter); `SampleSkip` when an option is missing from the question or the two are equal."""
    return _swap(question, true_option, false_option)[0]


def _swap(question: str, true_option: str, false_option: str) -> tuple[str, list[tuple[int, int]]]:
    """`swap_options`, plus the end of each replaced occurrence in the question and in the swapped question."""
    a, b = str(true_option or "").strip(), str(false_option or "").strip()
    if not a or not b:
        raise SampleSkip("the row gives no true and false option to swap", "no options")
    if a.lower() == b.lower():
        raise SampleSkip(f"the two options are the same ({a!r})", "no options")
    pattern = re.compile(
        r"(?<!\w)(" + "|".join(re.escape(o) for o in sorted((a, b), key=len, reverse=True)) + r")(?!\w)",
        re.IGNORECASE,
    )
    matches = list(pattern.finditer(question))
    found = {m.group(0).lower() for m in matches}
    missing = [o for o in (a, b) if o.lower() not in found]
    if missing:
        raise SampleSkip(f"option {missing[0]!r} is not a word of the question {question!r}", "options not in question")
    pieces, ends, at = [], [], 0
    for m in matches:
        text = m.group(0)
        new = b if text.lower() == a.lower() else a
        new = new[:1].upper() + new[1:] if text[:1].isupper() else new
        pieces += [question[at : m.start()], new]
        at = m.end()
        ends.append((m.end(), sum(len(p) for p in pieces)))
    return "".join(pieces) + question[at:], ends


def options_keep_layout(tokenizer, question: str, true_option: str, false_option: str) -> bool:
    """Whether swapping the options leaves every other token of the question where it was: the question up to
    the end of each option occurrence tokenises to as many tokens before and after the swap."""
    swapped, ends = _swap(question, true_option, false_option)

    def n_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return all(n_tokens(question[:i]) == n_tokens(swapped[:j]) for i, j in ends)


def counterfactual_pairs(samples: Iterable[Sample], mode: str = "image", tokenizer=None) -> PatchPairs:
    """Pair each sample with a corrupted input built from the data.

    ``"image"``: the clean question about another image of the same task whose answer differs, preferring a
    sample with the same question text, then one with the same two options, then the first other one (input
    order). ``"options"``: the same image with the true and false options swapped in the question (`swap_options`).
    With a ``tokenizer``, an options pair whose swapped question tokenises to another length is skipped at once
    (it could not keep the layout); without one `patching_sample` finds out. Samples left without a pair are
    in ``.skips`` with their reason.
    """
    if mode not in PAIR_MODES:
        raise MMLensError(f"pair mode {mode!r} is not known; use one of {', '.join(PAIR_MODES)}")
    samples = list(samples)
    out = PatchPairs()
    by_task: dict[str, list[Sample]] = {}
    for s in samples:
        by_task.setdefault(s.task, []).append(s)
    for s in samples:
        try:
            if mode == "image":
                out.pairs.append(_image_pair(s, by_task[s.task]))
            else:
                out.pairs.append(_options_pair(s, tokenizer))
        except SampleSkip as skip:
            out.skips.append(skip.record(str(s.question_id)))
    return out


def _image_pair(sample: Sample, pool: Sequence[Sample]) -> PatchPair:
    answer = _norm(sample.answer)
    candidates = [o for o in pool if str(o.img_id) != str(sample.img_id) and _norm(o.answer) != answer]
    if not candidates:
        raise SampleSkip(
            f"no other image of task {sample.task!r} has an answer other than {sample.answer!r}", "no counterfactual"
        )
    options = {_norm(o) for o in sample.options}

    def preference(o: Sample) -> int:
        if _norm(o.question) == _norm(sample.question):
            return 0
        if options and {_norm(x) for x in o.options} == options:
            return 1
        return 2

    partner = min(candidates, key=preference)  # min is stable: the first of the best kind
    return PatchPair(sample, str(partner.img_id), sample.question, "image", str(partner.question_id))


def _options_pair(sample: Sample, tokenizer) -> PatchPair:
    true, false = sample.true_option or "", sample.false_option or ""
    swapped = swap_options(sample.question, true, false)
    if tokenizer is not None and not options_keep_layout(tokenizer, sample.question, true, false):
        raise SampleSkip(
            f"the options {true!r} and {false!r} tokenise to different lengths, so swapping them moves the "
            "question's other tokens",
            LAYOUT_MISMATCH,
        )
    return PatchPair(sample, str(sample.img_id), swapped, "options")


# ------------------------------------------------------------------------------------------ one sample


def _spans_for(sample: Sample, region: str | Sequence[int]) -> dict[str, str]:
    """The text spans a region name needs, from the sample's columns."""

    if not isinstance(region, str):
        return {}
    key = region.strip().lower()
    wanted = {TRUE_OPTION, FALSE_OPTION} if key == QUESTION_WITHOUT_OPTIONS.lower() else set()
    wanted |= {n for n in (TRUE_OPTION, FALSE_OPTION, CENTRAL_OBJECT) if n.lower() == key}
    columns = {
        TRUE_OPTION: sample.true_option,
        FALSE_OPTION: sample.false_option,
        CENTRAL_OBJECT: sample.central_object,
    }
    spans = {}
    for name in sorted(wanted):
        if not columns[name]:
            raise SampleSkip(f"the row gives no {name.lower()} (region {region!r})", f"no {name}")
        spans[name] = str(columns[name])
    return spans


def patching_sample(
    model: HookedLlava,
    pair: PatchPair,
    load_image: Callable[[Sample], Image],
    region: str | Sequence[int],
    site: str = "resid_pre",
    protocol: str | Protocol | None = "auto",
    layers: Iterable[int] | None = None,
    per_position: bool = False,
    token: int | str | None = None,
    batch_size: int = 8,
) -> pd.DataFrame:
    """Rows ``PATCHING_COLUMNS`` (plus ``position`` when ``per_position``) of one pair.

    Prepares the clean sample and its corruption with `mm_lens.regions.prepare` (the corrupted image is
    ``load_image`` of the sample with ``img_id = pair.corrupt_img_id``), then runs `patching_sweep`. A pair
    whose two inputs do not share their layout raises `SampleSkip` (kind ``"layout mismatch"``), as do a
    missing image, span or box, so a run can skip the pair and record why.
    """

    sample = pair.sample
    qid = str(sample.question_id)
    try:
        image = load_image(sample)
        spans = _spans_for(sample, region)
        options = {}
        if pair.mode == "options":
            options = {TRUE_OPTION: str(sample.true_option or ""), FALSE_OPTION: str(sample.false_option or "")}
        clean = prepare(model, image, sample.question, spans={**spans, **options}, protocol=protocol)
        if isinstance(region, str) and _needs_boxes(region):
            check_sample(sample, need_boxes=True)
            assign_boxes(model, clean, image, list(boxes_for(sample, *image.size)))
        same_image = str(pair.corrupt_img_id) == str(sample.img_id)
        corrupt_image = image if same_image else load_image(replace(sample, img_id=pair.corrupt_img_id))
        corrupt = prepare(model, corrupt_image, pair.corrupt_question, spans=options, protocol=clean.protocol)
        diff = layout_difference(clean, corrupt) or (options and _options_moved(clean, corrupt))
        if diff:
            raise SampleSkip(f"clean and corrupted inputs differ in layout ({diff})", LAYOUT_MISMATCH)
    except SampleSkip as skip:
        skip.question_id = skip.question_id or qid
        raise
    table = patching_sweep(model, clean, corrupt, region, site, layers, per_position, token, batch_size)
    table.insert(0, "question_id", qid)
    table.insert(1, "site", site)
    table.insert(2, "region", region_label(region))
    columns = list(PATCHING_COLUMNS)
    if per_position:
        columns.insert(columns.index("layer") + 1, "position")
    return table[columns]


def _options_moved(clean: MultimodalInput, corrupt: MultimodalInput) -> str | None:
    """With the options swapped, each option must sit where the other one was and every other token stay put."""

    a, b = clean.regions.spans, corrupt.regions.spans
    if a[TRUE_OPTION] != b[FALSE_OPTION] or a[FALSE_OPTION] != b[TRUE_OPTION]:
        return (
            f"the options tokenise to different lengths: true option at {a[TRUE_OPTION]} and false option at "
            f"{a[FALSE_OPTION]}, swapped at {b[FALSE_OPTION]} and {b[TRUE_OPTION]}"
        )
    keep = torch.ones(clean.regions.seq_len, dtype=torch.bool)
    keep[a[TRUE_OPTION] + a[FALSE_OPTION]] = False
    ids_a, ids_b = clean.input_ids[0].cpu(), corrupt.input_ids[0].cpu()
    if not torch.equal(ids_a[keep], ids_b[keep]):
        moved = int((ids_a != ids_b)[keep].nonzero()[0])
        return f"token {int(keep.nonzero()[moved])} outside the options changed with the swap"
    return None


def _needs_boxes(region: str) -> bool:
    """Whether a region name is a related / other patch set (it needs the sample's boxes)."""

    names = {n.lower() for n in PATCH_REGIONS} | {a.lower() for a, t in ALIASES.items() if t in PATCH_REGIONS}
    return region.strip().lower() in names


__all__ = [
    "LAYOUT_MISMATCH",
    "PAIR_MODES",
    "PATCHING_COLUMNS",
    "SITES",
    "PatchPair",
    "PatchPairs",
    "check_layout",
    "counterfactual_pairs",
    "layout_difference",
    "patching_sample",
    "patching_sweep",
    "region_positions",
    "site_hook",
    "swap_options",
]
