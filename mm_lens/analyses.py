"""The analyses mm-lens runs over a dataset, one record each, and the per-sample loop they share.

An `Analysis` says everything the run machinery and the report need to know about one kind of result: its
name (the CLI command, the table's file stem ``<name>.csv``, the report's key), its table columns, how to draw
it, and how to build the per-sample function from the run's options. `ANALYSES` lists them:

* ``flow``: the attention-knockout layer sweep (`mm_lens.sweep.flow_sample`);
* ``lens``: the answer logit lens (`mm_lens.lens.lens_sample`);
* ``attention``: attention mass between regions (`mm_lens.attention.attention_sample`);
* ``patching``: activation patching from a counterfactual input (`mm_lens.patching.patching_sample`).

`each_sample` is the one loop over samples: in-memory helpers (``flow_samples``...) and resumable runs
(`mm_lens.runs`) both go through it, so a sample is skipped for the same reasons in both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from mm_lens.errors import MMLensError, SetupError
from mm_lens.types import Sample, SampleSkip, Skip

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

#: A per-sample step: the sample's rows (the analysis's columns), or `SampleSkip`.
Process = Callable[[Sample], "pd.DataFrame"]


def _plot(name: str, module: str = "mm_lens.plots") -> Callable[..., go.Figure]:
    """`module.name`, imported when first drawn (plotly is not needed to run an analysis)."""

    def draw(*args: Any, **kwargs: Any) -> go.Figure:
        import importlib

        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    return draw


@dataclass(frozen=True)
class Analysis:
    """One kind of result: name, table columns, the columns a report needs, its figures and caption."""

    name: str
    title: str  # the report's heading
    columns: tuple[str, ...]  # the CLI contract columns of ``<name>.csv``
    required: tuple[str, ...]  # columns a table must have for the report to draw it
    caption: str  # report caption; ``{n}`` = the samples, ``{level}`` = the confidence level
    figure: Callable[..., go.Figure]  # table -> the run folder's ``<name>.html``
    curves: Callable[..., go.Figure]  # table, level=, title= -> the report's figure
    tasks_figure: Callable[..., go.Figure] | None = None  # {task: table}, level=, title= -> one panel per task
    has_level: bool = True  # whether `curves` takes a confidence level

    def draw(self, table: pd.DataFrame, level: float, title: str) -> go.Figure:
        """The report's figure of one table."""
        return self.curves(table, level=level, title=title) if self.has_level else self.curves(table, title=title)


FLOW = Analysis(
    name="flow",
    title="Attention knockout",
    columns=("question_id", "block", "layer", "base_prob", "knockout_prob", "relative_change_pct"),
    required=("block", "layer", "relative_change_pct"),
    caption=(
        "Relative change (%) of the probability of the model's first answer token when the target positions "
        "may not attend to the source positions in a window of layers centred on each layer (attention "
        "knockout). A drop means information flows along that edge at those layers. Line: mean over {n}; "
        "band: {level:.0%} Student-t confidence interval of the mean. Each block has its own colour, dash and "
        "marker in every figure; curves sit a little apart along the layer axis so that flat ones stay visible."
    ),
    figure=_plot("flow_figure"),
    curves=_plot("flow_curves"),
    tasks_figure=_plot("flow_tasks_figure"),
)
LENS = Analysis(
    name="lens",
    title="Answer logit lens",
    columns=("question_id", "layer", "form", "prob"),
    required=("layer", "form", "prob"),
    caption=(
        "Probability of the first token of the answer (lower case: blue, solid; capitalised: sky blue, dashed) "
        "and of the false option (lower case: vermillion, dotted; capitalised: orange, dash-dot), read at the "
        "last position after each layer through the final norm and unembedding (logit lens). Line: mean over "
        "{n}; band: {level:.0%} Student-t confidence interval of the mean. Curves sit a little apart along the "
        "layer axis so that equal ones stay visible."
    ),
    figure=_plot("lens_figure"),
    curves=_plot("lens_curves"),
    tasks_figure=_plot("lens_tasks_figure"),
)
ATTENTION = Analysis(
    name="attention",
    title="Attention between regions",
    columns=("question_id", "layer", "target", "source", "mass"),
    required=("layer", "target", "source", "mass"),
    caption=(
        "Share of attention (averaged over heads and over the target's positions) that the question tokens and "
        "the last position put on the image, on the question, and on the rest of the prompt, per layer; mean "
        "over {n}. Each (layer, target) row sums to 1 over its sources."
    ),
    figure=_plot("attention_figure"),
    curves=_plot("attention_figure"),
    has_level=False,
)

PATCHING = Analysis(
    name="patching",
    title="Activation patching",
    columns=("question_id", "site", "region", "layer", "prob", "clean_prob", "corrupt_prob", "restoration"),
    required=("site", "region", "layer", "restoration"),
    caption=(
        "Normalised restoration (prob - corrupted) / (clean - corrupted) of the clean answer token's probability "
        "when the clean input's activation at the site is written into the counterfactual run at the region's "
        "positions, one layer at a time: 1 = the clean answer is fully restored, 0 = nothing is. Line: mean over "
        "{n}; band: {level:.0%} Student-t confidence interval of the mean."
    ),
    figure=_plot("patching_figure"),
    curves=_plot("patching_curves"),
)

HEADS = Analysis(
    name="heads",
    title="Knockout per attention head",
    columns=("question_id", "block", "layer", "head", "base_prob", "knockout_prob", "relative_change_pct"),
    required=("layer", "head", "relative_change_pct"),
    caption=(
        "Relative change (%) of the answer probability when the edge is blocked in one attention head of one "
        "layer (`mm_lens.heads.head_sweep`); blue: the head carries part of the flow. Mean over {n}."
    ),
    figure=_plot("head_figure"),
    curves=_plot("head_figure"),
    has_level=False,
)
IMAGE_LENS = Analysis(
    name="image_lens",
    title="Logit lens on the image tokens",
    columns=("layer", "position", "tile", "row", "col", "grid_row", "grid_col", "rank", "token", "token_id", "prob"),
    required=("layer", "position", "rank", "token", "prob"),
    caption=(
        "What each image token's residual stream would predict, read through the unembedding at each layer "
        "(`mm_lens.image_lens.image_token_lens`): colour = top-1 probability, hover = the top tokens; move the "
        "slider through the layers. One input ({n})."
    ),
    figure=_plot("image_lens_figure", "mm_lens.image_lens"),
    curves=_plot("image_lens_figure", "mm_lens.image_lens"),
    has_level=False,
)

MAPS = Analysis(
    name="maps",
    title="Patch maps over the image",
    columns=(
        "question_id", "method", "target", "window_start", "window_stop", "step", "token_id", "group", "tile",
        "row", "col", "rows", "cols", "n_patches", "x0", "y0", "x1", "y1", "value",
    ),  # ("question_id", *mm_lens.maps.MAP_COLUMNS); analyses sits below maps, so the names are written out
    required=("question_id", "method", "group", "tile", "row", "col", "value"),
    caption=(
        "Which image patches the answer needs (`mm_lens.maps.patch_map`), one value per group of patches: "
        "knockout, the relative change (%) of the answer token's probability when the group may not be attended "
        "to by the target positions over the window of layers (a drop: the answer needs it); attention, the mass "
        "the target positions put on the group; gradient, a first-order estimate (x100) of the knockout's effect "
        "on the answer's log-probability. Top: the mean knockout map over {n} (first answer token; red: the "
        "answer's probability drops without the group), one panel per tile; bottom: how far the cheap maps can "
        "be trusted, the Spearman correlation of each sample's attention and gradient map with its knockout map "
        "and the overlap of their top-k groups (`mm_lens.maps.map_agreement`; box: quartiles, dashed: mean)."
    ),
    figure=_plot("maps_figure", "mm_lens.map_plots"),
    curves=_plot("maps_curves", "mm_lens.map_plots"),
    has_level=False,
)

#: Every analysis by name, in report order. flow, lens, attention, patching and maps run over a dataset
#: (`mm_lens.runs`); the report also draws ``heads.csv`` and ``image_lens.csv`` tables saved by hand.
ANALYSES: dict[str, Analysis] = {a.name: a for a in (FLOW, LENS, ATTENTION, PATCHING, HEADS, IMAGE_LENS, MAPS)}


def get_analysis(name: str | Analysis) -> Analysis:
    """The analysis called `name`, else an error listing them."""
    if isinstance(name, Analysis):
        return name
    if name not in ANALYSES:
        raise MMLensError(f"unknown analysis {name!r}; expected one of {', '.join(ANALYSES)}")
    return ANALYSES[name]


def each_sample(
    samples: Sequence[Sample],
    process: Process,
    indices: Sequence[int] | None = None,
    progress: bool = True,
    desc: str = "",
    on_error: Callable[[int, Sample, Exception], None] | None = None,
    resumed: int = 0,
) -> Iterator[tuple[int, Sample, pd.DataFrame | SampleSkip]]:
    """``(index, sample, rows or SampleSkip)`` for each sample in `indices` (default: all), in order.

    A `SampleSkip` is yielded, not raised. A `SetupError` (a failed self-check) always stops the loop. Any other
    error propagates, unless `on_error` is given: then it is
    handed the error (it may raise to stop) and the loop goes on with the next sample. `resumed` counts
    samples an earlier run finished (for the progress bar).
    """
    indices = range(len(samples)) if indices is None else indices
    bar = tqdm(indices, desc=desc, unit="sample", total=len(indices) + resumed, initial=resumed, disable=not progress)
    for index in bar:
        sample = samples[index]
        try:
            result: pd.DataFrame | SampleSkip = process(sample)
        except SampleSkip as skip:
            skip.question_id = skip.question_id or str(sample.question_id)
            result = skip
        except SetupError:
            raise  # every other sample would fail the same way
        except Exception as err:
            if on_error is None:
                raise
            on_error(index, sample, err)
            continue
        yield index, sample, result


def collect(
    samples: Sequence[Sample], process: Process, progress: bool = True, desc: str = ""
) -> tuple[list[pd.DataFrame], list[Skip]]:
    """`each_sample` in memory: the tables of the analysed samples and the skips (with their reasons)."""
    tables: list[pd.DataFrame] = []
    skips: list[Skip] = []
    for _, sample, result in each_sample(samples, process, progress=progress, desc=desc):
        if isinstance(result, SampleSkip):
            skips.append(result.record(str(sample.question_id)))
        else:
            tables.append(result)
    return tables, skips


__all__ = [
    "ANALYSES", "ATTENTION", "FLOW", "HEADS", "IMAGE_LENS", "LENS", "MAPS", "PATCHING", "Analysis", "Process",
    "collect", "each_sample", "get_analysis",
]
