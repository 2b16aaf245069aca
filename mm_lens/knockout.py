"""Attention knockout as TransformerLens hooks: blocked (target, source) scores become -inf before softmax.

A knockout is a set of edges ``(target positions, source positions)`` applied at a set of layers. Each layer
gets one hook on ``blocks.{l}.attn.hook_attn_scores`` (pre-softmax scores, ``batch head q_pos k_pos``), so the
softmax renormalises every target row over the sources it may still see and blocked weights are exactly 0.
Positions are absolute; with a KV cache (``q_pos < k_pos``) target ``p`` lives in row ``p - (k_len - q_len)``
and targets outside the live query window are skipped.

A target keeps its own position unless an edge lists it as a source (``"Last->Last"`` does). A request that
would leave a target row with no source at all raises `MMLensError` naming the edge, because the row would
otherwise silently attend to causally masked (future) positions or become NaN.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from mm_lens import hook_points
from mm_lens.errors import MMLensError
from mm_lens.names import STUDY_BLOCKS as STUDY_BLOCKS  # re-exported: the lists live in names.py
from mm_lens.regions import ALIASES, REGION_NAMES

if TYPE_CHECKING:
    from mm_lens.regions import RegionMap

HookFn = Callable[..., Tensor]
EdgePositions = tuple[Sequence[int], Sequence[int]]  # (targets, sources), absolute

#: The six standard blocks: the study's, with the image split into related and other patches.
STANDARD_BLOCKS = (
    "Image->Question",
    "Related Image Patches->Question",
    "Other Image Patches->Question",
    "Question->Last",
    "Image->Last",
    "Last->Last",
)


def hook_name(layer: int) -> str:
    """Name of the pre-softmax attention-score hook of one layer."""
    return hook_points.attn_scores(layer)


@dataclass(frozen=True)
class Edge:
    """A named knockout edge (the study's "block"): the `target` region may no longer attend to the `source` region."""

    source: str
    target: str
    #: Explicit positions instead of the named region's (e.g. one group of image patches, `mm_lens.maps`).
    source_positions: tuple[int, ...] | None = None
    target_positions: tuple[int, ...] | None = None

    def __str__(self) -> str:
        return f"{self.source}->{self.target}"


def parse_edge(text: str, extra_names: Iterable[str] = ()) -> Edge:
    """Parse ``"Source->Target"`` into an `Edge`; names must be region names (or `extra_names`, e.g. spans).

    Names match case-insensitively and come back spelled as in `REGION_NAMES` / the study aliases.
    """
    valid = list(dict.fromkeys([*REGION_NAMES, *ALIASES, *extra_names]))
    by_lower = {n.lower(): n for n in valid}
    hint = f"valid region names: {', '.join(repr(n) for n in valid)}"
    if not isinstance(text, str) or text.count("->") != 1:
        raise MMLensError(
            f"knockout block {text!r} is not of the form 'Source->Target' (e.g. 'Image->Question'); {hint}"
        )
    source, target = (part.strip() for part in text.split("->"))
    for role, name in (("source", source), ("target", target)):
        if not name:
            raise MMLensError(f"knockout block {text!r} has no {role} region; write 'Source->Target' with {hint}")
        if name.lower() not in by_lower:
            raise MMLensError(f"knockout block {text!r}: unknown {role} region {name!r}; {hint}")
    return Edge(source=by_lower[source.lower()], target=by_lower[target.lower()])


def _as_positions(positions: Sequence[int], what: str) -> list[int]:
    out = sorted({int(p) for p in positions})
    if out and out[0] < 0:
        raise MMLensError(f"knockout {what} positions must be absolute (>= 0), got {out[0]}")
    return out


def check_rows(edges: Sequence[EdgePositions], names: Sequence[str] | None = None) -> None:
    """Raise `MMLensError` if the edges together would block every source (0..p) of some target p."""
    blocked: dict[int, set[int]] = {}
    culprit: dict[int, list[str]] = {}
    for i, (targets, sources) in enumerate(edges):
        label = names[i] if names else f"edge {i}"
        src = set(int(s) for s in sources)
        for t in targets:
            blocked.setdefault(int(t), set()).update(src)
            culprit.setdefault(int(t), []).append(label)
    for t, src in blocked.items():
        ordered = sorted(src)
        if bisect.bisect_right(ordered, t) == t + 1:  # every position 0..t is blocked
            raise MMLensError(
                f"knockout {' + '.join(dict.fromkeys(culprit[t]))} would leave target position {t} with no "
                f"position to attend to (all of 0..{t} blocked); keep at least one source for every target, "
                "e.g. do not block the first token or the target itself"
            )


class KnockoutHook:
    """The knockout hook fn: scores of blocked (target, source) pairs become -inf; positions are absolute.

    ``rows`` selects the batch rows it applies to (None: all) and ``heads`` the attention heads (None: all).
    `per_row` stacks several knockouts into one hook, one per batch row (the fast engine runs blocks x windows
    as one batch). The blocked set is built once per score shape and device (`prepare` builds it ahead).

    After the knockout the hook checks that no target row lost its last visible source to the attention mask
    (padding); ``check=False`` skips that check, for callers whose mask is causal only, where the check at
    construction (`check_rows`) already covers it. ``inplace=True`` writes the -inf into the scores tensor it is
    given instead of a copy, for callers that own that tensor (other hooks on the point would see the change).
    """

    def __init__(
        self,
        edges: Sequence[EdgePositions],
        names: Sequence[str] | None = None,
        rows: Sequence[bool] | Tensor | None = None,
        heads: Sequence[int] | None = None,
        check: bool = True,
        inplace: bool = False,
    ):
        self.edges = [
            (
                torch.tensor(_as_positions(t, "target"), dtype=torch.long),
                torch.tensor(_as_positions(s, "source"), dtype=torch.long),
            )
            for t, s in edges
        ]
        self.names = list(names) if names else [f"edge {i}" for i in range(len(edges))]
        check_rows([(t.tolist(), s.tolist()) for t, s in self.edges], self.names)
        self.rows = None if rows is None else torch.as_tensor(rows, dtype=torch.bool)
        self.heads = None if heads is None else _as_heads(heads)
        self.check, self.inplace = check, inplace
        self._row_hooks: list[KnockoutHook | None] | None = None
        self._masks: dict[tuple, tuple[Tensor, Tensor | slice] | None] = {}
        self._blocked_cache: dict[tuple, Tensor | None] = {}

    def _copy(self) -> KnockoutHook:
        copy = object.__new__(KnockoutHook)
        copy.edges, copy.names, copy.heads, copy.rows, copy.check, copy.inplace = (
            self.edges, self.names, self.heads, self.rows, self.check, self.inplace)
        copy._row_hooks, copy._masks, copy._blocked_cache = self._row_hooks, {}, self._blocked_cache
        return copy

    def with_rows(self, rows: Sequence[bool] | Tensor) -> KnockoutHook:
        """The same knockout applied to the batch rows `rows` only (edges already checked)."""
        copy = self._copy()
        copy.rows = torch.as_tensor(rows, dtype=torch.bool)
        return copy

    @staticmethod
    def per_row(hooks: Sequence[KnockoutHook | None], check: bool = True, inplace: bool = False) -> KnockoutHook:
        """One hook for a batch whose row ``i`` gets the knockout ``hooks[i]`` (None: no knockout in that row).

        Each row keeps its hook's edges and heads (its ``rows`` selection does not apply); the rows' edges were
        checked when their hooks were built.
        """
        present = [h for h in hooks if h is not None]
        copy = object.__new__(KnockoutHook)
        copy.edges = [edge for h in dict.fromkeys(present) for edge in h.edges]
        copy.names = list(dict.fromkeys(name for h in present for name in h.names))
        copy.heads, copy.rows, copy.check, copy.inplace = None, None, check, inplace
        copy._row_hooks = list(hooks)
        copy._masks, copy._blocked_cache = {}, {}
        return copy

    def _blocked(self, q_len: int, k_len: int, n_heads: int, device) -> Tensor | None:
        """Blocked ``[1, head|1, q, k]`` of this hook's own edges and heads for one score shape; None if nothing."""
        key = (q_len, k_len, n_heads, device)
        if key not in self._blocked_cache:
            offset = k_len - q_len  # cached positions before the first live query
            blocked = torch.zeros(q_len, k_len, dtype=torch.bool)
            for targets, sources in self.edges:
                rows = targets - offset
                rows = rows[(rows >= 0) & (rows < q_len)]
                cols = sources[sources < k_len]
                if rows.numel() and cols.numel():
                    blocked[rows[:, None], cols[None, :]] = True
            if not bool(blocked.any()):
                self._blocked_cache[key] = None
                return None
            mask = blocked[None, None]
            if self.heads is not None:
                if self.heads[-1] >= n_heads:
                    raise MMLensError(
                        f"knockout head {self.heads[-1]} is out of range: the model has heads 0..{n_heads - 1}"
                    )
                head_sel = torch.zeros(n_heads, dtype=torch.bool)
                head_sel[self.heads] = True
                mask = mask & head_sel[None, :, None, None]
            self._blocked_cache[key] = mask.to(device)
        return self._blocked_cache[key]

    def prepare(self, shape: Sequence[int], device: torch.device | str) -> None:
        """Build the blocked set for scores of `shape` (``batch head q k``) on `device` ahead of the forward pass."""
        self._mask_for(tuple(int(n) for n in shape), torch.device(device))

    def _mask(self, scores: Tensor) -> tuple[Tensor, Tensor | slice] | None:
        """(blocked ``[batch|1, head|1, q, k]``, query rows touched) for this score shape; None if nothing."""
        return self._mask_for(tuple(scores.shape), scores.device)

    def _mask_for(self, shape: tuple, device: torch.device) -> tuple[Tensor, Tensor | slice] | None:
        batch, n_heads, q_len, k_len = shape
        key = (batch, n_heads, q_len, k_len, device)
        if key in self._masks:
            return self._masks[key]
        if self._row_hooks is not None:
            if len(self._row_hooks) != batch:
                raise MMLensError(f"knockout rows name {len(self._row_hooks)} batch rows but the batch has {batch}")
            parts = {id(h): h._blocked(q_len, k_len, n_heads, device) for h in self._row_hooks if h is not None}
            parts = {k: v for k, v in parts.items() if v is not None}
            if not parts:
                self._masks[key] = None
                return None
            width = max(p.shape[1] for p in parts.values())
            empty = torch.zeros(1, width, q_len, k_len, dtype=torch.bool, device=device)
            rows = [parts.get(id(h), empty) if h is not None else empty for h in self._row_hooks]
            mask = torch.cat([r.expand(1, width, q_len, k_len) for r in rows])
        else:
            mask = self._blocked(q_len, k_len, n_heads, device)
            if mask is None:
                self._masks[key] = None
                return None
            if self.rows is not None:
                if len(self.rows) != batch:
                    raise MMLensError(f"knockout rows select {len(self.rows)} batch rows but the batch has {batch}")
                mask = mask & self.rows.to(device)[:, None, None, None]
        touched = mask.any(-1).any(1).any(0).nonzero().flatten().cpu()
        if not touched.numel():
            self._masks[key] = None
            return None
        lo, hi = int(touched[0]), int(touched[-1]) + 1
        rows_touched: Tensor | slice = slice(lo, hi) if hi - lo == touched.numel() else touched.to(device)
        self._masks[key] = (mask, rows_touched)
        return self._masks[key]

    def __call__(self, scores: Float[Tensor, "batch head q_pos k_pos"], hook=None) -> Tensor:
        found = self._mask(scores)
        if found is None:
            return scores
        mask, touched = found
        if self.check:
            floor = torch.finfo(scores.dtype).min  # the bridge's causal/padding mask value
            alive = scores[..., touched, :] > floor
            emptied = alive.any(-1) & ~(alive & ~mask[..., touched, :]).any(-1)
            if bool(emptied.any()):
                where_row = emptied.nonzero()[0, -1]
                row = (touched.start + int(where_row) if isinstance(touched, slice) else int(touched[where_row]))
                row += scores.shape[-1] - scores.shape[-2]
                where = f" at {hook.name}" if getattr(hook, "name", None) else ""
                raise MMLensError(
                    f"knockout {' + '.join(self.names)}{where} left target position {row} with no visible source "
                    "(the attention mask already hid the rest); keep at least one source for every target"
                )
        return scores.masked_fill_(mask, -torch.inf) if self.inplace else scores.masked_fill(mask, -torch.inf)


def _as_heads(heads: Sequence[int]) -> list[int]:
    out = sorted({int(h) for h in heads})
    if not out:
        raise MMLensError("knockout heads is empty; pass None for all heads or at least one head index")
    if out[0] < 0:
        raise MMLensError(f"knockout head {out[0]} is out of range: heads count from 0")
    return out


def knockout_hook(
    targets: Sequence[int], sources: Sequence[int], name: str | None = None, heads: Sequence[int] | None = None
) -> HookFn:
    """Hook fn for ``hook_attn_scores`` blocking attention from `targets` to `sources` (absolute positions)."""
    return KnockoutHook([(targets, sources)], [name] if name else None, heads=heads)


def knockout_hooks(
    edges: Sequence[EdgePositions],
    layers: Iterable[int],
    names: Sequence[str] | None = None,
    heads: Sequence[int] | None = None,
) -> list[tuple[str, HookFn]]:
    """One ``(hook name, fn)`` per layer applying all `edges` (in `heads` only, if given); for ``run_with_hooks``."""
    edges = list(edges)
    if not edges:
        return []
    fn = KnockoutHook(edges, names, heads=heads)
    return [(hook_name(int(layer)), fn) for layer in sorted(set(layers))]


def edge_positions(regions: RegionMap, block: str | Edge) -> EdgePositions:
    """``(targets, sources)`` of a named block, resolved through `RegionMap.positions`."""
    if not isinstance(block, Edge):
        block = parse_edge(block, extra_names=list(getattr(regions, "spans", None) or {}))
    targets = list(block.target_positions) if block.target_positions is not None else regions.positions(block.target)
    sources = list(block.source_positions) if block.source_positions is not None else regions.positions(block.source)
    return targets, sources


def block_hooks(
    regions: RegionMap,
    block: str | Edge | Sequence[str | Edge],
    layers: Iterable[int],
    heads: Sequence[int] | None = None,
) -> list[tuple[str, HookFn]]:
    """Hooks knocking out one named edge (the study's "block"; or several together) at `layers`
    (`heads`: only those)."""
    blocks = [block] if isinstance(block, (str, Edge)) else list(block)
    edges = [edge_positions(regions, b) for b in blocks]
    return knockout_hooks(edges, layers, names=[str(b) for b in blocks], heads=heads)


# ------------------------------------------------------------------------------------------ is the knockout live?


def check_live(model: Any) -> float:
    """Prove on a loaded model that a knockout cuts what it names; returns the attention weight it removed.

    One short text-only forward with a knockout of the last position's attention to positions 1.. at the first
    and the last layer: the pattern (``hook_pattern``) at the blocked pairs must drop from a positive weight to 0.
    Where the score hook is not what the attention uses (an adapter that keeps HF's native attention and discards
    edits of ``hook_attn_scores``), the pattern does not change and mm-lens refuses the model: a knockout that
    silently changes nothing would give plausible, wrong science.
    """
    bridge = model.bridge
    ids = list(model.tokenizer("one two three four five six seven", add_special_tokens=True).input_ids)[:8]
    if len(ids) < 4:
        return 0.0
    target = len(ids) - 1
    layers = sorted({0, int(bridge.cfg.n_layers) - 1})
    hook = KnockoutHook([([target], range(1, target))], ["live check"])
    seen: dict[tuple[str, int], Tensor] = {}

    def grab(kind: str, layer: int):
        def fn(pattern: Tensor, hook=None) -> Tensor:
            seen[(kind, layer)] = pattern[0, :, target, 1:target].detach().float().clone()
            return pattern

        return fn

    input_ids = torch.tensor([ids], device=model.device)
    with torch.inference_mode():
        for kind in ("clean", "knocked"):
            hooks = [(hook_points.attn_pattern(layer), grab(kind, layer)) for layer in layers]
            if kind == "knocked":
                hooks = [(hook_name(layer), hook) for layer in layers] + hooks
            bridge.run_with_hooks(input_ids, fwd_hooks=hooks)
    removed = min(float(seen[("clean", layer)].sum(-1).min()) for layer in layers)
    left = max(float(seen[("knocked", layer)].abs().max()) for layer in layers)
    if not (removed > 1e-6 and left <= 1e-6):
        raise MMLensError(
            f"knockout is not live on {model.name!r} ({model.model_type}): blocking the last position's attention to "
            f"earlier positions left weight {left:.3g} where {removed:.3g} was (layers {layers}); the edits of "
            "blocks.{l}.attn.hook_attn_scores do not reach this model's attention (TransformerLens keeps HF's native "
            "attention on this adapter). mm-lens refuses to run a knockout that changes nothing; the family needs "
            "its knockout route (mm_lens.families)"
        )
    return removed
