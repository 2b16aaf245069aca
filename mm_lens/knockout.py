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
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from mm_lens import hook_points
from mm_lens.errors import MMLensError
from mm_lens.regions import ALIASES, REGION_NAMES

if TYPE_CHECKING:
    from mm_lens.regions import RegionMap

HookFn = Callable[..., Tensor]
EdgePositions = tuple[Sequence[int], Sequence[int]]  # (targets, sources), absolute

#: The blocks of the study, in the order its figures use.
STUDY_BLOCKS = ("Image->Question", "Image->Last", "Question->Last", "Last->Last")
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

    ``rows`` selects the batch rows it applies to (None: all; the fast engine batches one window per row) and
    ``heads`` the attention heads (None: all). The blocked set is built once per score shape and device.
    """

    def __init__(
        self,
        edges: Sequence[EdgePositions],
        names: Sequence[str] | None = None,
        rows: Sequence[bool] | Tensor | None = None,
        heads: Sequence[int] | None = None,
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
        self._masks: dict[tuple, tuple[Tensor, Tensor] | None] = {}

    def with_rows(self, rows: Sequence[bool] | Tensor) -> KnockoutHook:
        """The same knockout applied to the batch rows `rows` only (edges already checked)."""
        copy = object.__new__(KnockoutHook)
        copy.edges, copy.names, copy.heads = self.edges, self.names, self.heads
        copy.rows = torch.as_tensor(rows, dtype=torch.bool)
        copy._masks = {}
        return copy

    def _mask(self, scores: Tensor) -> tuple[Tensor, Tensor] | None:
        """(blocked ``[batch|1, head|1, q, k]``, query rows touched) for this score shape; None if nothing."""
        batch, n_heads, q_len, k_len = scores.shape
        key = (batch, n_heads, q_len, k_len, scores.device)
        if key not in self._masks:
            offset = k_len - q_len  # cached positions before the first live query
            blocked = torch.zeros(q_len, k_len, dtype=torch.bool)
            for targets, sources in self.edges:
                rows = targets - offset
                rows = rows[(rows >= 0) & (rows < q_len)]
                cols = sources[sources < k_len]
                if rows.numel() and cols.numel():
                    blocked[rows[:, None], cols[None, :]] = True
            touched = blocked.any(-1).nonzero().flatten()
            if not touched.numel():
                self._masks[key] = None
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
            if self.rows is not None:
                if len(self.rows) != batch:
                    raise MMLensError(f"knockout rows select {len(self.rows)} batch rows but the batch has {batch}")
                mask = mask & self.rows[:, None, None, None]
            self._masks[key] = (mask.to(scores.device), touched.to(scores.device))
        return self._masks[key]

    def __call__(self, scores: Float[Tensor, "batch head q_pos k_pos"], hook=None) -> Tensor:
        found = self._mask(scores)
        if found is None:
            return scores
        mask, touched = found
        floor = torch.finfo(scores.dtype).min  # the bridge's causal/padding mask value
        alive_before = (scores[..., touched, :] > floor).any(-1)
        scores = scores.masked_fill(mask, -torch.inf)
        emptied = alive_before & ~(scores[..., touched, :] > floor).any(-1)
        if bool(emptied.any()):
            row = int(touched[emptied.nonzero()[0, -1]]) + scores.shape[-1] - scores.shape[-2]
            where = f" at {hook.name}" if getattr(hook, "name", None) else ""
            raise MMLensError(
                f"knockout {' + '.join(self.names)}{where} left target position {row} with no visible source "
                "(the attention mask already hid the rest); keep at least one source for every target"
            )
        return scores


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
    return regions.positions(block.target), regions.positions(block.source)


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
