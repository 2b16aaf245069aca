"""Attention between regions, read from ``blocks.{l}.attn.hook_pattern`` (post-softmax weights).

Two readings per input, both averaged over heads:

* `attention_mass`: per layer, how much of its attention a target region (Question, Last) puts on each
  source region (Image, Question, ...) and on the rest of the prompt. For a target with several positions
  the row sums are averaged over its positions. The sources listed plus ``"Rest"`` partition the row, so
  with disjoint sources the masses of one (layer, target) add up to 1.
* `image_attention`: per layer, the weight a target puts on every image token, for patch figures.

The patterns are reduced inside the hooks (one ``[target, source]`` matrix per layer), so nothing of size
``head x pos x pos`` is kept: the same code runs on a 7B model with 600-token prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from mm_lens import hook_points
from mm_lens.analyses import ATTENTION, collect
from mm_lens.errors import MMLensError
from mm_lens.inputs import prepare
from mm_lens.types import Sample, Skip

if TYPE_CHECKING:
    from PIL.Image import Image

    from mm_lens.inputs import MultimodalInput
    from mm_lens.model import HookedLlava
    from mm_lens.protocol import Protocol
    from mm_lens.regions import RegionMap

ATTENTION_COLUMNS = list(ATTENTION.columns)
IMAGE_ATTENTION_COLUMNS = ["layer", "position", "row", "col", "tile", "attention"]
REST = "Rest"
DEFAULT_TARGETS = ("Question", "Last")
DEFAULT_SOURCES = ("Image", "Question")


def pattern_hook_name(layer: int) -> str:
    """Name of the post-softmax attention pattern hook of one language-model layer."""
    return hook_points.attn_pattern(layer)


def _layers(model: HookedLlava, layers: Iterable[int] | None) -> list[int]:
    n = model.n_layers
    out = list(range(n)) if layers is None else sorted({int(layer) for layer in layers})
    bad = [layer for layer in out if not 0 <= layer < n]
    if bad:
        raise MMLensError(f"layer {bad[0]} is outside the model's layers 0..{n - 1}")
    return out


def _run_patterns(
    model: HookedLlava,
    inp: MultimodalInput,
    layers: Sequence[int],
    reduce: Callable[[Float[Tensor, "head q_pos k_pos"]], Tensor],
) -> dict[int, Tensor]:
    """One forward with a hook per layer that reduces its pattern (batch item 0) with `reduce`."""
    out: dict[int, Tensor] = {}

    def make(layer: int):
        def hook(pattern: Float[Tensor, "batch head q_pos k_pos"], hook) -> None:
            out[layer] = reduce(pattern[0].float()).cpu()

        return hook

    input_ids, kwargs = inp.forward_args()
    with torch.inference_mode():
        model.bridge.run_with_hooks(
            input_ids, fwd_hooks=[(pattern_hook_name(layer), make(layer)) for layer in layers], **kwargs
        )
    missing = [layer for layer in layers if layer not in out]
    if missing:
        raise MMLensError(
            f"{pattern_hook_name(missing[0])} never fired; the model's attention does not expose its pattern "
            "(load it with mm_lens.model.load so the bridge uses eager attention)"
        )
    return out


def _region_positions(regions: RegionMap, names: Sequence[str], what: str) -> dict[str, list[int]]:
    if not names:
        raise MMLensError(f"attention_mass needs at least one {what} region, e.g. 'Last'")
    found = {}
    for name in names:
        if name.strip().lower() == REST.lower():
            raise MMLensError(f"{what} region {REST!r} is added automatically; list only named regions")
        positions = regions.positions(name)
        if not positions:
            raise MMLensError(f"{what} region {name!r} has no positions in this input")
        found[name] = positions
    return found


def attention_mass(
    model: HookedLlava,
    inp: MultimodalInput,
    targets: Sequence[str] = DEFAULT_TARGETS,
    sources: Sequence[str] = DEFAULT_SOURCES,
    layers: Iterable[int] | None = None,
) -> pd.DataFrame:
    """Rows ``layer, target, source, mass``: head-averaged attention from each target region to each source
    region (summed over source positions, averaged over target positions), plus ``source="Rest"`` for every
    other position the target can see."""
    regions = inp.regions
    target_pos = _region_positions(regions, targets, "target")
    source_pos = _region_positions(regions, sources, "source")
    layer_list = _layers(model, layers)
    seq_len = int(inp.input_ids.shape[-1])
    # membership matrix [source + rest, k_pos]
    member = torch.zeros(len(source_pos) + 1, seq_len)
    for i, positions in enumerate(source_pos.values()):
        member[i, positions] = 1.0
    member[-1] = (member[:-1].sum(0) == 0).float()

    def reduce(pattern: Float[Tensor, "head q_pos k_pos"]) -> Float[Tensor, "target source"]:
        mean = pattern.mean(0)  # [q_pos, k_pos]
        rows = [mean[positions].mean(0) for positions in target_pos.values()]  # each [k_pos]
        return torch.stack(rows) @ member.T.to(mean.device)

    masses = _run_patterns(model, inp, layer_list, reduce)
    names = [*source_pos, REST]
    rows = [
        {"layer": layer, "target": target, "source": source, "mass": float(masses[layer][t, s])}
        for layer in layer_list
        for t, target in enumerate(target_pos)
        for s, source in enumerate(names)
    ]
    return pd.DataFrame(rows, columns=["layer", "target", "source", "mass"])


def image_attention(
    model: HookedLlava,
    inp: MultimodalInput,
    target: str = "Last",
    layers: Iterable[int] | None = None,
) -> pd.DataFrame:
    """Rows ``layer, position, row, col, tile, attention``: head-averaged attention from `target` (averaged
    over its positions) to every image token, for `mm_lens.plots.patch_values_figure`."""
    regions = inp.regions
    target_pos = _region_positions(regions, [target], "target")[target]
    image_pos = list(regions.image_positions)
    if not image_pos:
        raise MMLensError("the input has no image tokens")
    layer_list = _layers(model, layers)

    def reduce(pattern: Float[Tensor, "head q_pos k_pos"]) -> Float[Tensor, " image"]:
        return pattern.mean(0)[target_pos][:, image_pos].mean(0)

    weights = _run_patterns(model, inp, layer_list, reduce)
    rows = [
        {
            "layer": layer,
            "position": pos,
            "row": regions.patch_row[i],
            "col": regions.patch_col[i],
            "tile": regions.patch_tile[i],
            "attention": float(weights[layer][i]),
        }
        for layer in layer_list
        for i, pos in enumerate(image_pos)
    ]
    return pd.DataFrame(rows, columns=IMAGE_ATTENTION_COLUMNS)


@dataclass
class AttentionResult:
    """Attention mass over many samples: the long table and the samples skipped with their reasons."""

    table: pd.DataFrame
    n_samples: int
    skips: list[Skip] = field(default_factory=list)


def attention_sample(
    model: HookedLlava,
    sample: Sample,
    load_image: Callable[[Sample], Image],
    targets: Sequence[str] = DEFAULT_TARGETS,
    sources: Sequence[str] = DEFAULT_SOURCES,
    protocol: str | Protocol | None = "auto",
) -> pd.DataFrame:
    """`attention_mass` rows of one sample (``ATTENTION_COLUMNS``); `SampleSkip` when it cannot be read."""

    inp = prepare(model, load_image(sample), sample.question, protocol=protocol)
    table = attention_mass(model, inp, targets, sources)
    table.insert(0, "question_id", str(sample.question_id))
    return table[ATTENTION_COLUMNS]


def attention_samples(
    model: HookedLlava,
    samples: Iterable[Sample],
    load_image: Callable[[Sample], Image],
    targets: Sequence[str] = DEFAULT_TARGETS,
    sources: Sequence[str] = DEFAULT_SOURCES,
    progress: bool = True,
    protocol: str | Protocol | None = "auto",
) -> AttentionResult:
    """`attention_sample` for every sample; unreadable samples are skipped with reasons (`mm_lens.runs.
    attention_run` does the same resumably)."""
    samples = list(samples)
    tables, skips = collect(
        samples, lambda s: attention_sample(model, s, load_image, targets, sources, protocol), progress, "attention"
    )
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=ATTENTION_COLUMNS)
    return AttentionResult(table=table[ATTENTION_COLUMNS], n_samples=len(samples), skips=skips)


__all__ = [
    "ATTENTION_COLUMNS",
    "AttentionResult",
    "IMAGE_ATTENTION_COLUMNS",
    "REST",
    "attention_mass",
    "attention_sample",
    "attention_samples",
    "image_attention",
    "pattern_hook_name",
]
