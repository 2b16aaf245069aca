"""Head-level knockout: which attention heads carry a flow.

The layer sweep (`mm_lens.sweep`) says at which layers blocking an edge ``Source->Target`` lowers the answer
probability. The head sweep asks which heads do it: for every layer of a window (by default the window where
the edge's knockout has its largest effect) and every head, the edge is blocked in that one head of that one
layer, and the relative change of the probability of the greedy first answer token is recorded. A head whose
single knockout moves the answer carries (part of) the flow; the effects of many small heads need not add up
to the window's effect, since heads can stand in for each other.

The knockout is the same TransformerLens hook as everywhere (`mm_lens.knockout.KnockoutHook` with ``heads``),
so ``block_hooks(regions, edge, layers, heads=[h])`` reproduces any single cell with ``run_with_hooks``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pandas as pd

from mm_lens.engines import DEFAULT_ENGINE, Engine, clean_pass, get_engine
from mm_lens.errors import MMLensError
from mm_lens.knockout import Edge, parse_edge
from mm_lens.protocol import vocab_softmax
from mm_lens.sweep import Greedy, layer_sweep, layer_window

if TYPE_CHECKING:
    from mm_lens.inputs import MultimodalInput
    from mm_lens.model import HookedLlava

HEAD_COLUMNS = ["question_id", "block", "layer", "head", "base_prob", "knockout_prob", "relative_change_pct"]


def n_heads(model: HookedLlava) -> int:
    """Attention heads per layer of the language model."""
    return int(model.bridge.cfg.n_heads)


def strongest_window(model: HookedLlava, inp: MultimodalInput, edge: str | Edge, window: int | None = None,
                     engine: str | Engine = DEFAULT_ENGINE, greedy: Greedy | None = None) -> range:
    """The layer window where knocking out `edge` changes the answer probability most (most negative change)."""
    table = layer_sweep(model, inp, [edge], window, engine, greedy=greedy)
    centre = int(table.loc[table["relative_change_pct"].idxmin(), "layer"])
    k = inp.protocol.choose_window(window, model.n_layers)
    return layer_window(centre, k, model.n_layers)


def head_sweep(
    model: HookedLlava,
    inp: MultimodalInput,
    edge: str | Edge,
    layers: Sequence[int] | range | None = None,
    heads: Sequence[int] | None = None,
    engine: str | Engine = DEFAULT_ENGINE,
    question_id: str = "",
    greedy: Greedy | None = None,
) -> pd.DataFrame:
    """Rows ``question_id, block, layer, head, base_prob, knockout_prob, relative_change_pct``: `edge` blocked
    in one head of one layer at a time, for every layer of `layers` (default: `strongest_window`) and head.

    `heads` restricts the heads (default: all); an index outside the model's heads is an `MMLensError`.
    """
    parsed = edge if isinstance(edge, Edge) else parse_edge(edge, extra_names=list(inp.regions.spans or {}))
    total = n_heads(model)
    heads = list(range(total)) if heads is None else [int(h) for h in heads]
    bad = [h for h in heads if not 0 <= h < total]
    if bad:
        raise MMLensError(f"head {bad[0]} is out of range: the model has heads 0..{total - 1} per layer")
    run = get_engine(engine)
    clean = greedy.clean if greedy is not None else None
    if clean is None:
        clean = clean_pass(model, inp)
    if greedy is None:
        probs = vocab_softmax(clean.last_logits, inp.vocab_size(model))
        token, base = int(probs.argmax()), float(probs.max())
    else:
        token, base = greedy.first_token, greedy.first_prob
    if layers is None:
        layers = strongest_window(model, inp, parsed, engine=run, greedy=Greedy("", token, base, clean=clean))
    layers = [int(layer) for layer in layers]
    for layer in layers:
        layer_window(layer, 1, model.n_layers)  # a layer outside the model fails with its own message
    windows = [range(layer, layer + 1) for layer in layers]
    rows = []
    for head in heads:
        probs = run(model, inp, [parsed], windows, token, clean=clean, heads=[head])[0]
        for layer, p in zip(layers, probs.tolist(), strict=False):
            rows.append({
                "question_id": str(question_id), "block": str(parsed), "layer": layer, "head": head,
                "base_prob": base, "knockout_prob": p,
                "relative_change_pct": (p - base) / base * 100.0 if base > 0 else float("nan"),
            })
    return pd.DataFrame(rows, columns=HEAD_COLUMNS).sort_values(["layer", "head"], ignore_index=True)


__all__ = ["HEAD_COLUMNS", "head_sweep", "n_heads", "strongest_window"]
