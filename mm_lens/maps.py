"""Maps over the image: which image patches the answer needs, by three methods on the same grid.

A *patch map* gives one value per group of neighbouring image patches (``group=k``: k x k patches of one tile;
``group="box"``: the patches under each of the sample's boxes):

* ``knockout`` (causal): the group may not be attended to by the `target` positions over a window of layers
  (the knockout ``group -> target`` of the layer sweep), and the value is the relative change (%) of the answer
  token's probability, exactly as `mm_lens.sweep.layer_sweep` defines it. Every group is one batch row of the
  fast engine, so a map of 576 patches costs a few forward passes' worth of work, not 576.
* ``attention`` (observational): the attention mass the target positions put on the group, averaged over the
  window's layers, the heads (or ``heads=``) and the target positions.
* ``gradient`` (first order): attribution patching on attention edges. Knocking group g out of row t renormalises
  that row: ``p'_j = p_j / (1 - m)`` off the group, 0 on it (m: the row's mass on g), so the pattern change
  ``dp = p' - p`` has a closed form. Its effect on the answer's log-probability is estimated as
  ``sum(dlogp/dpattern * dp)`` over the window's layers, heads and target rows, from one forward and one backward
  pass; ``100 * estimate`` is comparable with the knockout's relative change. (TransformerLens's attribution
  patching takes token inputs only; this one runs with the image.)

Multi-token answers get a map per answer token (``steps``): step s is teacher-forced on the greedy answer's first
s tokens and tracks its token s. `map_agreement` says how far the cheap maps can be trusted on an input: the
Spearman rank correlation of each with the knockout map and the overlap of their top-k groups, importance read
as ``-value`` for knockout and gradient (a drop means the answer needs the patch) and ``value`` for attention.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from scipy.stats import spearmanr
from torch import Tensor

from mm_lens import hook_points
from mm_lens.encoders import patch_sets
from mm_lens.engines import DEFAULT_ENGINE, Engine, clean_pass, get_engine
from mm_lens.errors import MMLensError
from mm_lens.heads import strongest_window
from mm_lens.inputs import MultimodalInput
from mm_lens.knockout import Edge, edge_positions
from mm_lens.names import MAP_METHODS as METHODS
from mm_lens.patches import patch_sets as exact_patch_sets
from mm_lens.protocol import vocab_softmax
from mm_lens.sweep import Greedy, greedy_answer
from mm_lens.types import Box

if TYPE_CHECKING:
    from PIL.Image import Image

    from mm_lens.model import HookedLlava

MAP_COLUMNS = (
    "method", "target", "window_start", "window_stop", "step", "token_id", "group", "tile", "row", "col", "rows",
    "cols", "n_patches", "x0", "y0", "x1", "y1", "value",
)
AGREEMENT_COLUMNS = ("target", "window_start", "window_stop", "step", "method", "spearman", "top_k", "top_k_overlap")


@dataclass(frozen=True)
class PatchGroup:
    """A group of image tokens mapped as one: where it sits (tile, first patch row / column, extent) and the pixel
    box of the original image it covers (None where unknown, e.g. padding only)."""

    name: str
    tile: int
    row: int
    col: int
    rows: int
    cols: int
    positions: tuple[int, ...]
    box: tuple[float, float, float, float] | None = None


def _footprints(model: HookedLlava, inp: MultimodalInput) -> dict[int, tuple[float, float, float, float]]:
    """Original-image pixel rectangle of every image token (exact geometry of the processor)."""
    if inp.image_size is None:
        return {}
    width, height = inp.image_size
    return exact_patch_sets(model, (width, height), inp.regions, [Box(0, 0, width, height)]).footprints


def _union(rects: Iterable[tuple[float, float, float, float]]) -> tuple[float, float, float, float] | None:
    rects = list(rects)
    if not rects:
        return None
    a = np.array(rects)
    return float(a[:, 0].min()), float(a[:, 1].min()), float(a[:, 2].max()), float(a[:, 3].max())


def patch_groups(model: HookedLlava, inp: MultimodalInput, group: int | str = 1, boxes: Sequence[Any] | None = None,
                 image: Image | None = None) -> list[PatchGroup]:
    """The groups a map has a value for: k x k patches of a tile (``group=k``), or each box's related patches
    (``group="box"``, needs `boxes` and the `image`, mapped by the input's protocol's patch rule)."""
    feet = _footprints(model, inp)
    tokens = [t for t in inp.regions.image_tokens if t.box is not None]  # patches: no row separators, no CLS
    if group == "box":
        if not boxes or image is None:
            raise MMLensError("group='box' needs the sample's boxes and its image: patch_map(..., boxes=, image=)")
        rows_of = {t.position: t for t in tokens}
        out = []
        for i, box in enumerate(boxes):
            related, _ = patch_sets(inp.protocol, model, image, inp.regions, [box])
            members = [rows_of[p] for p in related if p in rows_of]
            if not members:
                continue
            tile = members[0].tile
            r = [t.row for t in members]
            c = [t.col for t in members]
            name = getattr(box, "name", "") or f"box {i}"
            out.append(PatchGroup(name, tile, min(r), min(c), max(r) - min(r) + 1, max(c) - min(c) + 1,
                                  tuple(related), _union(feet[p] for p in related if p in feet)))
        return out
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise MMLensError(f"group={group!r} must be a positive number of patches per side, or 'box'")
    cells: dict[tuple[int, int, int], list] = {}
    for t in tokens:
        cells.setdefault((t.tile, t.row // group, t.col // group), []).append(t)
    out = []
    for (tile, gr, gc), members in cells.items():
        positions = tuple(t.position for t in members)
        rows = max(t.row for t in members) - gr * group + 1
        cols = max(t.col for t in members) - gc * group + 1
        out.append(PatchGroup(f"tile {tile} r{gr * group} c{gc * group}", tile, gr * group, gc * group, rows, cols,
                              positions, _union(feet[p] for p in positions if p in feet)))
    return out


def teacher_forced(inp: MultimodalInput, answer: Sequence[int]) -> MultimodalInput:
    """`inp` with `answer` tokens appended: the input that predicts the answer's next token (``Last`` moves)."""
    if not answer:
        return inp
    ids, kwargs = inp.forward_args(extra=list(answer))
    seq = int(ids.shape[1])
    return replace(inp, input_ids=ids, attention_mask=kwargs["attention_mask"],
                   regions=replace(inp.regions, seq_len=seq, last=seq - 1))


def _windows(model: HookedLlava, inp: MultimodalInput, target: str, layers: Any) -> list[range]:
    if layers is None:
        return [strongest_window(model, inp, Edge("Image", target))]
    if isinstance(layers, range) or (isinstance(layers, Sequence) and all(isinstance(x, int) for x in layers)):
        layers = [layers]
    windows = [range(min(w), max(w) + 1) if not isinstance(w, range) else w for w in layers]
    for w in windows:
        if not len(w) or w.start < 0 or w.stop > model.n_layers:
            raise MMLensError(f"layers {w} must be a non-empty window inside the model's 0..{model.n_layers - 1}")
    return windows


def _rows(groups: Sequence[PatchGroup], method: str, target: str, window: range, step: int, token: int,
          values: Sequence[float]) -> list[dict[str, Any]]:
    rows = []
    for g, v in zip(groups, values, strict=True):
        x0, y0, x1, y1 = g.box if g.box is not None else (np.nan,) * 4
        rows.append({"method": method, "target": target, "window_start": window.start, "window_stop": window.stop,
                     "step": step, "token_id": token, "group": g.name, "tile": g.tile, "row": g.row, "col": g.col,
                     "rows": g.rows, "cols": g.cols, "n_patches": len(g.positions), "x0": x0, "y0": y0, "x1": x1,
                     "y1": y1, "value": float(v)})
    return rows


def knockout_values(model: HookedLlava, inp: MultimodalInput, groups: Sequence[PatchGroup], target: str,
                    window: range, token: int, heads: Sequence[int] | None = None,
                    engine: str | Engine = DEFAULT_ENGINE) -> list[float]:
    """Relative change (%) of the probability of `token` when each group is knocked out of `target` at `window`."""
    run = get_engine(engine)
    clean = clean_pass(model, inp) if getattr(run, "reuses_clean", False) else None
    with torch.inference_mode():
        if clean is not None:
            last = clean.last_logits
        else:
            ids, kwargs = inp.forward_args()
            last = model.bridge(ids, **kwargs)[0, -1]
    base = float(vocab_softmax(last, inp.vocab_size(model))[token])
    edges = [Edge(g.name, target, source_positions=g.positions) for g in groups]
    probs = run(model, inp, edges, [window], token, clean=clean, heads=heads)[:, 0]
    return [(float(p) - base) / base * 100.0 if base > 0 else float("nan") for p in probs]


def _patterns(model: HookedLlava, inp: MultimodalInput, window: range, grad: bool):
    """The window's attention patterns ``[head, query, key]`` (and the forward's logits), kept in the graph."""
    kept: dict[int, Tensor] = {}

    def keep(layer: int):
        def hook(pattern: Tensor, hook) -> Tensor:
            if grad:
                pattern.retain_grad()
            kept[layer] = pattern
            return pattern

        return hook

    ids, kwargs = inp.forward_args()
    hooks = [(hook_points.attn_pattern(layer), keep(layer)) for layer in window]
    logits = model.bridge.run_with_hooks(ids, fwd_hooks=hooks, **kwargs)
    return logits, kept


def _indicator(groups: Sequence[PatchGroup], seq: int, device, dtype) -> Float[Tensor, "pos group"]:
    ind = torch.zeros(seq, len(groups), device=device, dtype=dtype)
    for i, g in enumerate(groups):
        ind[list(g.positions), i] = 1
    return ind


def attention_values(model: HookedLlava, inp: MultimodalInput, groups: Sequence[PatchGroup], target: str,
                     window: range, heads: Sequence[int] | None = None) -> list[float]:
    """Attention mass of the `target` positions on each group, averaged over the window, heads and targets."""
    targets, _ = edge_positions(inp.regions, Edge("Image", target))
    with torch.inference_mode():
        _, kept = _patterns(model, inp, window, grad=False)
        rows = torch.stack([p[0][:, targets] if heads is None else p[0][list(heads)][:, targets]
                            for p in kept.values()]).float()  # [layer, head, target, key]
        mass = rows.mean(dim=(0, 1, 2)) @ _indicator(groups, rows.shape[-1], rows.device, rows.dtype)
    return mass.tolist()


def gradient_values(model: HookedLlava, inp: MultimodalInput, groups: Sequence[PatchGroup], target: str,
                    window: range, token: int, heads: Sequence[int] | None = None) -> list[float]:
    """First-order estimate (x100) of each group's knockout effect on the answer's log-probability (module doc)."""
    targets, _ = edge_positions(inp.regions, Edge("Image", target))
    with torch.enable_grad():
        logits, kept = _patterns(model, inp, window, grad=True)
        logp = logits[0, -1, :inp.vocab_size(model)].float().log_softmax(-1)[token]
        grads = torch.autograd.grad(logp, list(kept.values()))
    total = torch.zeros(len(groups), dtype=torch.float64)
    with torch.no_grad():
        for pattern, grad in zip(kept.values(), grads, strict=True):
            p, g = pattern[0].double(), grad[0].double()  # [head, query, key]
            if heads is not None:
                p, g = p[list(heads)], g[list(heads)]
            p, g = p[:, targets], g[:, targets]
            ind = _indicator(groups, p.shape[-1], p.device, p.dtype)
            mass = p @ ind  # [head, target, group]: the row's mass on each group
            gp = g * p
            on_group = gp @ ind
            off_group = gp.sum(-1, keepdim=True) - on_group
            total += (mass / (1 - mass).clamp_min(1e-12) * off_group - on_group).sum(dim=(0, 1)).cpu()
    return (100.0 * total).tolist()


def patch_map(
    model: HookedLlava,
    inp: MultimodalInput,
    target: str = "Question",
    layers: range | Sequence[range] | None = None,
    group: int | str = 1,
    method: str | Sequence[str] = "knockout",
    heads: Sequence[int] | None = None,
    boxes: Sequence[Any] | None = None,
    image: Image | None = None,
    steps: int | str = 1,
    engine: str | Engine = DEFAULT_ENGINE,
    greedy: Greedy | None = None,
) -> pd.DataFrame:
    """One row per (method, window, answer step, patch group): where the group sits, its pixel box, its value.

    `layers` None: the strongest window of the ``Image -> target`` sweep (as `mm_lens.heads.head_sweep`); a range
    or a list of ranges (one map each). `steps`: how many greedy answer tokens get a map (``"all"``: every one);
    `greedy`: the input's greedy answer when the caller has decoded it already.
    """
    methods = [method] if isinstance(method, str) else list(method)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise MMLensError(f"unknown map method(s) {', '.join(map(repr, unknown))}; choose from {', '.join(METHODS)}")
    inp.regions.positions(target)  # an unknown region fails here, naming the valid ones
    groups = patch_groups(model, inp, group, boxes, image)
    if not groups:
        raise MMLensError("the input has no image patches to map")
    greedy = greedy or greedy_answer(model, inp)
    answer = list(greedy.token_ids) or [greedy.first_token]
    n_steps = len(answer) if steps == "all" else int(steps)
    if n_steps < 1:
        raise MMLensError(f"steps={steps!r} must be at least 1 (or 'all')")
    rows: list[dict[str, Any]] = []
    for step in range(min(n_steps, len(answer))):
        forced = teacher_forced(inp, answer[:step])
        token = answer[step]
        for window in _windows(model, forced, target, layers):
            for m in methods:
                if m == "knockout":
                    values = knockout_values(model, forced, groups, target, window, token, heads, engine)
                elif m == "attention":
                    values = attention_values(model, forced, groups, target, window, heads)
                else:
                    values = gradient_values(model, forced, groups, target, window, token, heads)
                rows += _rows(groups, m, target, window, step, token, values)
    return pd.DataFrame(rows, columns=list(MAP_COLUMNS))


def map_agreement(table: pd.DataFrame, k: int = 10) -> pd.DataFrame:
    """Per (target, window, step) and cheap method: Spearman correlation with the knockout map and top-k overlap."""
    missing = [c for c in MAP_COLUMNS if c not in table.columns]
    if missing:
        raise MMLensError(f"map table lacks column(s) {', '.join(missing)}; pass the table patch_map returns")
    keys = ["target", "window_start", "window_stop", "step"]
    extra = [c for c in ("question_id",) if c in table.columns]
    rows = []
    for key, df in table.groupby(extra + keys, sort=False):
        ko = df[df.method == "knockout"].set_index("group")["value"]
        if ko.empty:
            continue
        for method in ("attention", "gradient"):
            other = df[df.method == method].set_index("group")["value"]
            if other.empty:
                continue
            joined = pd.concat([-ko, other if method == "attention" else -other], axis=1, join="inner").dropna()
            n = min(k, len(joined))
            rho = spearmanr(joined.iloc[:, 0], joined.iloc[:, 1]).statistic if len(joined) > 2 else float("nan")
            top_a = set(joined.iloc[:, 0].nlargest(n).index)
            top_b = set(joined.iloc[:, 1].nlargest(n).index)
            overlap = len(top_a & top_b) / n if n else float("nan")
            rows.append({**dict(zip(extra + keys, key if isinstance(key, tuple) else (key,), strict=True)),
                         "method": method, "spearman": float(rho), "top_k": n, "top_k_overlap": overlap})
    return pd.DataFrame(rows, columns=extra + list(AGREEMENT_COLUMNS))


__all__ = [
    "AGREEMENT_COLUMNS", "MAP_COLUMNS", "METHODS", "PatchGroup", "attention_values", "gradient_values",
    "knockout_values", "map_agreement", "patch_groups", "patch_map", "teacher_forced",
]
