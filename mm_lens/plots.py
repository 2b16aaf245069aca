"""Figures read from result tables, never from models; each function returns a plotly ``Figure``.

The analyses (`mm_lens.knockout`, `mm_lens.lens`, `mm_lens.attention`, ...) run the model and write long
tables, one row per (sample, layer, block / form / region); the CLI saves them as CSV. This module only
reads such tables, so a figure can be redrawn, restyled or combined across runs without loading a model:

* layer curves: `flow_curves` (a knockout table: ``block, layer, relative_change_pct``) and `lens_curves`
  (a logit-lens table: ``form, layer, prob``), one panel per task with `flow_tasks_figure` /
  `lens_tasks_figure`; `flow_figure` / `lens_figure` draw plain means without bands.
* bands: `mean_ci`, the Student-t confidence interval of the mean over samples at each layer.
* image patches: `patch_table` joins per-position values with the patch rectangles of a
  `mm_lens.regions.RegionMap` (or a `mm_lens.patches.PatchSets`), `patch_values_figure` colours them over
  the image, `patches_figure` outlines the related patches.
* attention: `attention_figure`, a layers x (target <- source) heatmap of an ``attention_mass`` table.
* circuits: `patching_curves` / `patching_figure` (restoration per layer, one line per region and site, from a
  ``patching`` table) and `head_figure` (a layer x head heatmap of a ``head_sweep`` table).

Styles: lines use Okabe & Ito's colour-blind-safe `PALETTE` with a dash and a marker symbol each; a block is
drawn the same way in every figure (`BLOCK_STYLES`, `block_styles`), the logit lens's forms differ in colour and
dash (`LENS_STYLES`), and curves sit a fraction of a layer apart (`X_OFFSET`) so flat ones do not hide each other.

A table missing a column is an `MMLensError` that names the column.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from scipy import stats

from mm_lens.errors import MMLensError
from mm_lens.knockout import STUDY_BLOCKS


def _need(df: pd.DataFrame, columns: list[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise MMLensError(f"{what} table lacks column(s) {', '.join(missing)}; pass the table the CLI writes")


def _mean_lines(df: pd.DataFrame, key: str, value: str, styles_for=None) -> go.Figure:
    """One line per group of ``key``: the mean of ``value`` per layer, styled by ``styles_for`` (default
    `_series_styles`) and offset along x as in `_offsets`."""
    fig = go.Figure()
    styles = (styles_for or _series_styles)(df[key].astype(str).unique())
    offsets = _offsets(list(styles))
    for name, style in styles.items():
        group = df[df[key].astype(str) == name]
        mean = group.groupby("layer")[value].mean().sort_index()
        fig.add_trace(go.Scatter(
            x=mean.index.to_numpy(float) + offsets[name], y=mean.values, mode="lines+markers", name=name,
            customdata=mean.index.to_numpy(), line=dict(color=style["color"], dash=style["dash"], width=2),
            marker=dict(symbol=style["symbol"], size=7, color=style["color"]),
            hovertemplate=f"<b>{name}</b><br>layer %{{customdata}}<br>%{{y:.4g}}<extra></extra>",
        ))
    return fig


def flow_figure(df: pd.DataFrame, title: str = "Attention knockout: change in answer probability") -> go.Figure:
    """Mean relative change (%) of the answer probability per layer, one line per block."""
    _need(df, ["block", "layer", "relative_change_pct"], "flow")
    fig = _mean_lines(df, "block", "relative_change_pct", _block_styles)
    fig.add_hline(y=0, line_dash="dot", line_color="gray", layer="below")
    fig.update_layout(title=title, xaxis_title="layer", yaxis_title="relative change in probability (%)")
    return fig


def lens_figure(df: pd.DataFrame, title: str = "Answer logit lens") -> go.Figure:
    """Mean probability of each answer form per layer, read through the final norm and unembedding."""
    _need(df, ["form", "layer", "prob"], "lens")
    fig = _mean_lines(df, "form", "prob", _lens_styles)
    fig.update_layout(title=title, xaxis_title="layer", yaxis_title="probability", yaxis_range=[0, 1])
    return fig


def patches_figure(image, patches, boxes=(), tiles: str = "auto", title: str = "Related image patches") -> go.Figure:
    """The image with its related patches outlined (other patches faintly, boxes dashed), to check the
    box -> patch mapping by eye. ``patches`` is a `mm_lens.patches.PatchSets`; ``tiles`` picks which
    patch grid to draw: "auto" (LLaVA-NeXT's any-res tiles when present, else the image), "base", "all"."""
    if tiles not in ("auto", "base", "all"):
        raise MMLensError(f"tiles={tiles!r} is not one of 'auto', 'base', 'all'")
    pixels = np.asarray(image.convert("RGB"))
    height, width = pixels.shape[:2]
    anyres = any(t > 0 for t in patches.tiles.values())
    wanted = {"base": {0}, "all": None, "auto": None if not anyres else set(patches.tiles.values()) - {0}}[tiles]

    def outlines(positions):
        xs, ys, n = [], [], 0
        for p in positions:
            if p not in patches.footprints or (wanted is not None and patches.tiles.get(p, 0) not in wanted):
                continue
            x0, y0, x1, y1 = patches.footprints[p]
            x0, x1 = max(x0, 0) - 0.5, min(x1, width) - 0.5  # go.Image puts pixel i at [i - 0.5, i + 0.5]
            y0, y1 = max(y0, 0) - 0.5, min(y1, height) - 0.5
            xs += [x0, x1, x1, x0, x0, None]
            ys += [y0, y0, y1, y1, y0, None]
            n += 1
        return xs, ys, n

    fig = go.Figure(go.Image(z=pixels, name="image"))
    for positions, name, line in (
        (patches.other, "other patches", dict(color="rgba(255,255,255,0.45)", width=1)),
        (patches.related, "related patches", dict(color="red", width=2)),
    ):
        xs, ys, n = outlines(positions)
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line=line, name=f"{name} ({n})", hoverinfo="skip"))
    bx, by = [], []
    for b in boxes:
        x, y, w, h = (b.x, b.y, b.w, b.h) if hasattr(b, "x") else tuple(b)
        bx += [x - 0.5, x + w - 0.5, x + w - 0.5, x - 0.5, x - 0.5, None]
        by += [y - 0.5, y - 0.5, y + h - 0.5, y + h - 0.5, y - 0.5, None]
    if bx:
        fig.add_trace(go.Scatter(x=bx, y=by, mode="lines", line=dict(color="yellow", width=2, dash="dash"),
                                 name="object boxes", hoverinfo="skip"))
    fig.update_xaxes(range=[-0.5, width - 0.5], showgrid=False, zeroline=False)
    fig.update_yaxes(range=[height - 0.5, -0.5], showgrid=False, zeroline=False, scaleanchor="x")
    fig.update_layout(title=title, legend=dict(orientation="h"))
    return fig


# ------------------------------------------------------------------------------------------ statistics
#
# Bands are 95% (by default) Student-t confidence intervals of the mean over samples:
# mean +- t_{(1+level)/2, n-1} * sd / sqrt(n). With one sample there is no band.


def t_cdf(t: float, df: float) -> float:
    """Student-t cumulative distribution function (`scipy.stats.t`)."""
    return float(stats.t.cdf(t, df))


def t_quantile(p: float, df: float) -> float:
    """Student-t quantile (inverse CDF, `scipy.stats.t`); e.g. ``t_quantile(0.975, 9) == 2.262...``."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise MMLensError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    return float(stats.t.ppf(p, df))


def mean_ci(df: pd.DataFrame, by: list[str], value: str, level: float = 0.95) -> pd.DataFrame:
    """Per group of ``by``: ``mean``, ``lo``, ``hi`` (Student-t interval of the mean at ``level``), ``n``, ``sd``.

    Groups of one sample get ``lo = hi = NaN`` (no interval). NaN values (e.g. a zero base probability) are
    left out of their group.
    """
    if not 0.0 < level < 1.0:
        raise MMLensError(f"confidence level {level} must be between 0 and 1, e.g. 0.95")
    _need(df, [*by, value], "summary")
    grouped = df.dropna(subset=[value]).groupby(by, sort=True)[value]
    out = grouped.agg(mean="mean", sd="std", n="count").reset_index()
    n = out["n"].to_numpy(float)
    several = n > 1
    half = np.full(len(out), np.nan)
    t = stats.t.ppf((1.0 + level) / 2.0, n[several] - 1)
    half[several] = t * out["sd"].to_numpy(float)[several] / np.sqrt(n[several])
    out["lo"] = out["mean"] - half
    out["hi"] = out["mean"] + half
    return out[[*by, "mean", "lo", "hi", "n", "sd"]]


# ------------------------------------------------------------------------------------------ layer curves

FLOW_CLIP = (-100.0, float("inf"))  # a probability cannot drop by more than 100%: bands stop there
#: Okabe & Ito's colour-blind-safe palette (https://jfly.uni-koeln.de/color/), in the order styles take it:
#: blue, orange, bluish green, reddish purple, vermillion, sky blue, black, yellow.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9", "#000000", "#F0E442")
DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
SYMBOLS = ("circle", "square", "diamond", "triangle-up", "x", "cross", "star", "triangle-down", "pentagon", "hexagon")
#: A fraction of a layer: the k-th of m curves in a figure is drawn at ``layer + (k - (m - 1) / 2) * X_OFFSET``
#: so that flat curves (blocks with no effect sit on zero) do not hide each other; hover shows the true layer.
X_OFFSET = 0.06
LENS_LABELS = {
    "answer_lower": "answer (lower case)",
    "answer_capitalized": "Answer (capitalised)",
    "false_option_lower": "false option (lower case)",
    "false_option_capitalized": "False option (capitalised)",
}


def style(i: int) -> dict[str, str]:
    """The i-th line style: ``color``, ``dash``, ``symbol``. The first 48 differ in (colour, dash): style i takes
    colour ``i mod 8`` and a dash that moves on by one each time the colours wrap round."""
    n = len(PALETTE)
    return dict(
        color=PALETTE[i % n], dash=DASHES[(i % n + i // n) % len(DASHES)], symbol=SYMBOLS[i % len(SYMBOLS)]
    )


#: The one style table of the blocks: every figure draws a block the same way. The study's four blocks come
#: first (blue solid circles, orange dashed squares, green dotted diamonds, purple dash-dot triangles), then the
#: image split into related (vermillion) and other (sky blue) patches. Other blocks: `block_styles`.
BLOCK_ORDER = (
    "Image->Question", "Image->Last", "Question->Last", "Last->Last",
    "Related Image Patches->Question", "Other Image Patches->Question",
)
BLOCK_STYLES = {b: style(i) for i, b in enumerate(BLOCK_ORDER)}
#: The answer forms of the logit lens, told apart by colour and dash: the answer in blue (lower case, solid) and
#: sky blue (capitalised, dashed), the false option in vermillion (dotted) and orange (dash-dot).
LENS_STYLES = {
    "answer_lower": dict(color="#0072B2", dash="solid", symbol="circle"),
    "answer_capitalized": dict(color="#56B4E9", dash="dash", symbol="square"),
    "false_option_lower": dict(color="#D55E00", dash="dot", symbol="diamond"),
    "false_option_capitalized": dict(color="#E69F00", dash="dashdot", symbol="triangle-up"),
}


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    r, g, b = (int(h[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def _block_order(blocks) -> list[str]:
    """Study blocks first in the study's order, then any others in order of appearance."""

    seen = list(dict.fromkeys(str(b) for b in blocks))
    return [b for b in STUDY_BLOCKS if b in seen] + [b for b in seen if b not in STUDY_BLOCKS]


def block_styles(blocks) -> dict[str, dict]:
    """``{block: style}`` in drawing order: a standard block (`mm_lens.knockout.STANDARD_BLOCKS`) always gets its
    `BLOCK_STYLES` entry; other blocks, in order of appearance, the styles after them (``style(6)``, ...)."""
    out, extra = {}, len(BLOCK_ORDER)
    for b in _block_order(blocks):
        if b in BLOCK_STYLES:
            out[b] = dict(BLOCK_STYLES[b])
        else:
            out[b], extra = style(extra), extra + 1
    return out


_block_styles = block_styles


def _series_styles(names) -> dict[str, dict]:
    """Styles for lines that are not blocks nor lens forms (patching's region @ site): ``style(0)``, ..."""
    return {str(n): style(i) for i, n in enumerate(dict.fromkeys(str(n) for n in names))}


def _lens_styles(forms) -> dict[str, dict]:
    """The `LENS_STYLES` of the known forms; other forms get the styles not used by them (black, green, ...)."""
    styles, extra = {}, 0
    taken = {(s["color"], s["dash"]) for s in LENS_STYLES.values()}
    for form in dict.fromkeys(str(f) for f in forms):
        if form in LENS_STYLES:
            styles[form] = dict(LENS_STYLES[form])
            continue
        while (style(extra)["color"], style(extra)["dash"]) in taken:
            extra += 1
        styles[form], extra = style(extra), extra + 1
    return styles


def _offsets(names: list[str]) -> dict[str, float]:
    """x offset (in layers) of each of the figure's curves, centred on the layer; see `X_OFFSET`."""
    m = len(names)
    return {n: (k - (m - 1) / 2) * X_OFFSET for k, n in enumerate(names)}


def _add_curves(
    fig: go.Figure,
    summary: pd.DataFrame,
    key: str,
    styles: dict[str, dict],
    labels: dict[str, str],
    unit: str,
    clip: tuple[float, float] | None = None,
    row: int | None = None,
    col: int | None = None,
    legend_shown: set | None = None,
) -> None:
    """A mean line and a shaded interval per group of ``key``; one legend entry per group per figure."""
    where = dict(row=row, col=col) if row is not None else {}
    fmt = ".1f" if unit == "%" else ".3f"
    offsets = _offsets(list(styles))
    for name, style in styles.items():
        part = summary[summary[key] == name].sort_values("layer")
        if part.empty:
            continue
        label = labels.get(name, name)
        color = style["color"]
        lo, hi = part["lo"].to_numpy(float), part["hi"].to_numpy(float)
        if clip is not None:
            lo, hi = np.clip(lo, *clip), np.clip(hi, *clip)
        ok = ~np.isnan(lo)
        layers = part["layer"].to_numpy()
        x_all = layers.astype(float) + offsets[name]
        if ok.any():
            x = x_all[ok]
            fig.add_trace(
                go.Scatter(
                    x=np.concatenate([x, x[::-1]]),
                    y=np.concatenate([hi[ok], lo[ok][::-1]]),
                    fill="toself",
                    mode="lines",
                    fillcolor=_rgba(color, 0.18),
                    line=dict(width=0),
                    hoverinfo="skip",
                    legendgroup=label,
                    showlegend=False,
                    name=f"{label} (interval)",
                ),
                **where,
            )
        show = legend_shown is None or label not in legend_shown
        if legend_shown is not None:
            legend_shown.add(label)
        fig.add_trace(
            go.Scatter(
                x=x_all,
                y=part["mean"],
                customdata=np.stack([lo, hi, part["n"].to_numpy(), layers], axis=1),
                mode="lines+markers",
                marker=dict(size=6, symbol=style.get("symbol", "circle"), color=color),
                line=dict(color=color, width=2, dash=style.get("dash", "solid")),
                name=label,
                legendgroup=label,
                showlegend=show,
                hovertemplate=(
                    f"<b>{label}</b><br>layer %{{customdata[3]}}<br>mean %{{y:{fmt}}}{unit}"
                    f"<br>CI [%{{customdata[0]:{fmt}}}, %{{customdata[1]:{fmt}}}]<br>n = %{{customdata[2]}}"
                    "<extra></extra>"
                ),
            ),
            **where,
        )


def _n_samples(df: pd.DataFrame) -> int:
    return int(df["question_id"].nunique()) if "question_id" in df.columns else 0


def _subtitle(df: pd.DataFrame, level: float) -> str:
    n = _n_samples(df)
    if n == 1:
        return "<sup>one sample (no confidence band)</sup>"
    samples = f"{n} samples, " if n else ""
    return f"<sup>mean over {samples}band: {level:.0%} t-interval of the mean</sup>"


def _curves_figure(
    df: pd.DataFrame,
    key: str,
    value: str,
    what: str,
    groups: list[str] | None,
    styles_for,
    labels: dict[str, str],
    unit: str,
    clip: tuple[float, float],
    level: float,
    empty: str,
    title: str,
    **layout,
) -> go.Figure:
    """A figure with a mean line and a `level` band of ``value`` per layer for each group of ``key``
    (``groups``, else every group of the table); ``empty``: the error for a table without rows;
    ``title`` gets the samples / band subtitle, ``layout`` goes to ``update_layout``."""
    _need(df, [key, "layer", value], what)
    if df.empty:
        raise MMLensError(empty)
    summary = mean_ci(df, [key, "layer"], value, level)
    fig = go.Figure()
    styles = styles_for(list(groups) if groups else df[key].unique())
    _add_curves(fig, summary, key, styles, labels, unit, clip=clip)
    fig.update_layout(title=f"{title}<br>{_subtitle(df, level)}", template="plotly_white", **layout)
    return fig


def flow_curves(
    df: pd.DataFrame,
    blocks: list[str] | None = None,
    level: float = 0.95,
    title: str = "Attention knockout: change in answer probability",
    legend_title: str = "block (source->target)",
    xaxis_title: str = "layer (centre of the knocked-out window)",
) -> go.Figure:
    """The study's main figure: per layer, the mean relative change (%) of the answer probability when a block
    is knocked out around that layer, one line per block with a `level` Student-t confidence band.
    Any table with ``block, layer, relative_change_pct`` works (e.g. your own ablations in ``block``).

    Each block keeps its `BLOCK_STYLES` colour (Okabe-Ito), dash and marker symbol in every figure; unknown
    blocks take the next styles (`block_styles`). Curves are offset by a fraction of a layer each (`X_OFFSET`)
    so that blocks with no effect, all on zero, stay visible side by side; hover shows the true layer."""
    fig = _curves_figure(
        df, "block", "relative_change_pct", "flow", blocks, _block_styles, {}, "%", FLOW_CLIP, level,
        empty="the flow table is empty (no sample kept); run more samples or pass all_samples=True",
        title=title,
        xaxis_title=xaxis_title,
        yaxis_title="relative change in probability (%)",
        legend_title_text=legend_title,
        hovermode="closest",
    )
    fig.add_hline(y=0, line_dash="dot", line_color="gray", layer="below")
    return fig


def lens_curves(
    df: pd.DataFrame,
    forms: list[str] | None = None,
    level: float = 0.95,
    title: str = "Answer logit lens",
) -> go.Figure:
    """Per layer, the mean probability of each answer form (lower case / capitalised answer and false option)
    read through the final norm and unembedding, with a `level` t-interval band (clipped to [0, 1]).
    The forms differ in colour and dash (`LENS_STYLES`) and are offset along x as in `flow_curves`."""
    return _curves_figure(
        df, "form", "prob", "lens", forms, _lens_styles, LENS_LABELS, "", (0.0, 1.0), level,
        empty="the lens table is empty; run the lens on at least one sample",
        title=title,
        xaxis_title="layer",
        yaxis_title="probability of the first token",
        yaxis_range=[0, 1],
    )


def _by_task(tables) -> dict[str, pd.DataFrame]:
    """``{task: table}`` from a mapping, or from one table with a ``task`` column."""
    if isinstance(tables, pd.DataFrame):
        _need(tables, ["task"], "per-task")
        return {str(t): part for t, part in tables.groupby("task", sort=False)}
    return {str(t): part for t, part in dict(tables).items()}


def _facets(
    tables,
    key: str,
    value: str,
    styles_for,
    labels: dict[str, str],
    unit: str,
    level: float,
    title: str,
    y_title: str,
    clip: tuple[float, float] | None,
    columns: int,
) -> go.Figure:
    import math

    from plotly.subplots import make_subplots

    per_task = {t: df for t, df in _by_task(tables).items() if not df.empty}
    if not per_task:
        raise MMLensError("no task has any row to plot; pass tables with at least one sample")
    for task, df in per_task.items():
        _need(df, [key, "layer", value], f"{task!r}")
    columns = max(1, min(columns, len(per_task)))
    rows = math.ceil(len(per_task) / columns)
    titles = [f"{t} (n={_n_samples(df)})" if _n_samples(df) else t for t, df in per_task.items()]
    fig = make_subplots(
        rows=rows, cols=columns, subplot_titles=titles, shared_yaxes=True,
        horizontal_spacing=0.04, vertical_spacing=0.12 if rows > 1 else 0.1,
    )
    styles = styles_for(pd.concat([df[key] for df in per_task.values()]).unique())
    shown: set = set()
    for i, df in enumerate(per_task.values()):
        r, c = divmod(i, columns)
        summary = mean_ci(df, [key, "layer"], value, level)
        _add_curves(fig, summary, key, styles, labels, unit, clip=clip, row=r + 1, col=c + 1, legend_shown=shown)
        if unit == "%":
            fig.add_hline(y=0, line_dash="dot", line_color="gray", layer="below", row=r + 1, col=c + 1)
    fig.update_xaxes(title_text="layer", row=rows)
    fig.update_yaxes(title_text=y_title, col=1)
    if clip is not None and all(map(math.isfinite, clip)):
        fig.update_yaxes(range=list(clip))
    fig.update_layout(
        title=f"{title}<br><sup>band: {level:.0%} t-interval of the mean over samples</sup>",
        template="plotly_white",
        height=max(380, 300 * rows + 80),
        legend=dict(orientation="h", yanchor="top", y=-0.22 if rows == 1 else -0.1, x=0),
        margin=dict(b=110),
    )
    return fig


def flow_tasks_figure(
    tables, level: float = 0.95, columns: int = 3, title: str = "Attention knockout per task"
) -> go.Figure:
    """The main figure across tasks: one panel per task (shared y axis, each block in its `BLOCK_STYLES` style).
    ``tables`` is ``{task: flow table}`` or one flow table with a ``task`` column."""
    return _facets(
        tables, "block", "relative_change_pct", _block_styles, {}, "%", level, title,
        "relative change (%)", FLOW_CLIP, columns,
    )


def lens_tasks_figure(tables, level: float = 0.95, columns: int = 3, title: str = "Answer logit lens per task"):
    """The logit lens across tasks: one panel per task; ``tables`` as for `flow_tasks_figure`."""
    return _facets(
        tables, "form", "prob", _lens_styles, LENS_LABELS, "", level, title, "probability", (0.0, 1.0), columns
    )


# ------------------------------------------------------------------------------------------ patches


def patch_table(regions, values, patches=None, column: str | None = None, layer: int | None = None) -> pd.DataFrame:
    """One row per image patch: ``position, tile, row, col, x0, y0, x1, y1, value``.

    ``values``: ``{position: value}``, a Series indexed by position, a long table with a ``position`` column
    (e.g. `mm_lens.attention.image_attention`; pick ``layer`` and the value ``column``), or ``"related"`` for
    the related (1) / other (0) mask. Rectangles come from ``patches.footprints`` (original image pixels, a
    `mm_lens.patches.PatchSets`) when given, else from ``regions.patch_box`` (processed tile pixels).
    """
    if isinstance(values, str):
        if values != "related":
            raise MMLensError(f"values={values!r}: pass a mapping position -> value, a table, or 'related'")
        related = set(patches.related if patches is not None else (regions.related or []))
        other = set(patches.other if patches is not None else (regions.other or []))
        if not related:
            raise MMLensError("no related patches to show; pass patches=patch_sets(...) or prepare(..., boxes=...)")
        mapping = {p: 1.0 for p in related} | {p: 0.0 for p in other}
    elif isinstance(values, pd.DataFrame):
        if "position" not in values.columns:
            raise MMLensError("a values table needs a 'position' column (absolute image-token positions)")
        part = values
        if "layer" in part.columns:
            layers = sorted(part["layer"].unique())
            if layer is None and len(layers) > 1:
                raise MMLensError(f"the values table holds layers {layers}; pick one with layer=...")
            if layer is not None:
                part = part[part["layer"] == layer]
                if part.empty:
                    raise MMLensError(f"layer {layer} is not in the values table (layers: {layers})")
        if column is None:
            column = next((c for c in ("value", "attention", "mass") if c in part.columns), None)
        if column is None or column not in part.columns:
            raise MMLensError(
                f"values column {column!r} not in the table; pass column=... (one of {list(part.columns)})"
            )
        mapping = dict(zip(part["position"].astype(int), part[column].astype(float), strict=True))
    else:
        mapping = {int(k): float(v) for k, v in dict(values).items()}
    rows = []
    for token in regions.image_tokens:
        if token.is_newline or token.position not in mapping:
            continue
        rect = patches.footprints.get(token.position) if patches is not None else token.box
        if rect is None:
            continue
        rows.append(
            dict(position=token.position, tile=token.tile, row=token.row, col=token.col,
                 x0=rect[0], y0=rect[1], x1=rect[2], y1=rect[3], value=mapping[token.position])
        )
    if not rows:
        raise MMLensError("none of the given positions is an image patch of this region map")
    out = pd.DataFrame(rows)
    out["value"] = out["value"].astype(float).replace([np.inf, -np.inf], np.nan)
    return out


def _edges(starts, stops) -> list[float]:
    return [*starts, stops[-1]]


def patch_values_figure(
    image,
    table: pd.DataFrame,
    value_name: str = "value",
    tiles: str = "base",
    title: str = "Image patches",
    colorscale: str = "Viridis",
    opacity: float = 0.6,
    zrange: tuple[float, float] | None = None,
) -> go.Figure:
    """The image with its patches coloured by a per-patch value (a `patch_table`); hovering a patch shows its
    tile, row, column, sequence position and value. ``tiles``: "base" (tile 0, the whole image) or "anyres"
    (LLaVA-NeXT's high-resolution crops). The rectangles must be in the pixel frame of ``image``."""
    _need(table, ["tile", "row", "col", "x0", "y0", "x1", "y1", "value", "position"], "patch")
    if tiles not in ("base", "anyres"):
        raise MMLensError(f"tiles={tiles!r} is not one of 'base', 'anyres'")
    pixels = np.asarray(image.convert("RGB")) if hasattr(image, "convert") else np.asarray(image)
    height, width = pixels.shape[:2]
    part = table[(table["tile"] == 0) if tiles == "base" else (table["tile"] > 0)]
    part = part[(part["row"] >= 0) & (part["col"] >= 0)]
    if part.empty:
        raise MMLensError(f"no patch of the table lies in the {tiles!r} tile(s)")
    if part["x1"].max() > width + 1 or part["y1"].max() > height + 1:
        raise MMLensError(
            f"patch rectangles reach ({part['x1'].max():g}, {part['y1'].max():g}) but the image is {width}x{height}; "
            "pass the original image with patches=patch_sets(...) in patch_table, or the processed tile"
        )
    values = part["value"].to_numpy(float)
    is_mask = set(np.unique(values[~np.isnan(values)])) <= {0.0, 1.0}
    lo, hi = zrange or (np.nanmin(values), np.nanmax(values))
    fig = go.Figure(go.Image(z=pixels, name="image", hoverinfo="skip"))
    for k, (tile, cells) in enumerate(part.groupby("tile", sort=True)):
        rows_ = sorted(cells["row"].unique())
        cols_ = sorted(cells["col"].unique())
        by_col = cells.groupby("col")
        by_row = cells.groupby("row")
        x_edges = _edges(by_col["x0"].median().loc[cols_].to_numpy(), by_col["x1"].median().loc[cols_].to_numpy())
        y_edges = _edges(by_row["y0"].median().loc[rows_].to_numpy(), by_row["y1"].median().loc[rows_].to_numpy())
        z = np.full((len(rows_), len(cols_)), np.nan)
        custom = np.full((len(rows_), len(cols_), 4), np.nan)
        r_at = {r: i for i, r in enumerate(rows_)}
        c_at = {c: j for j, c in enumerate(cols_)}
        for rec in cells.itertuples():
            i, j = r_at[rec.row], c_at[rec.col]
            z[i, j] = rec.value
            custom[i, j] = (rec.row, rec.col, rec.position, rec.tile)
        fig.add_trace(
            go.Heatmap(
                x=np.clip(np.asarray(x_edges, float), 0, width) - 0.5,
                y=np.clip(np.asarray(y_edges, float), 0, height) - 0.5,
                z=z,
                customdata=custom,
                zmin=lo,
                zmax=hi,
                colorscale=[[0, "rgb(40,90,220)"], [1, "rgb(230,40,40)"]] if is_mask else colorscale,
                opacity=opacity,
                hoverongaps=False,
                showscale=k == 0,
                colorbar=dict(title=value_name, tickvals=[0, 1], ticktext=["other", "related"]) if is_mask
                else dict(title=value_name),
                name=f"tile {tile}",
                hovertemplate=(
                    "tile %{customdata[3]}, row %{customdata[0]}, col %{customdata[1]}"
                    f"<br>position %{{customdata[2]}}<br>{value_name}: %{{z:.4g}}<extra></extra>"
                ),
            )
        )
    fig.update_xaxes(range=[-0.5, width - 0.5], showgrid=False, zeroline=False, visible=False)
    fig.update_yaxes(range=[height - 0.5, -0.5], showgrid=False, zeroline=False, scaleanchor="x", visible=False)
    fig.update_layout(title=title, template="plotly_white")
    return fig


# ------------------------------------------------------------------------------------------ attention


def attention_figure(
    df: pd.DataFrame,
    title: str = "Attention between regions",
    targets: list[str] | None = None,
    sources: list[str] | None = None,
) -> go.Figure:
    """Heatmap of layers x (target <- source): the mean (over samples) share of a target region's attention on
    each source region, from a `mm_lens.attention.attention_mass` table (``layer, target, source, mass``)."""
    _need(df, ["layer", "target", "source", "mass"], "attention")
    if df.empty:
        raise MMLensError("the attention table is empty; run attention_mass on at least one sample")
    targets = list(targets or dict.fromkeys(df["target"]))
    sources = list(sources or dict.fromkeys(df["source"]))
    summary = mean_ci(df, ["layer", "target", "source"], "mass")
    layers = sorted(summary["layer"].unique())
    columns = [(t, s) for t in targets for s in sources]
    z = np.full((len(layers), len(columns)), np.nan)
    n = np.zeros_like(z)
    at = {(r.layer, r.target, r.source): (r.mean, r.n) for r in summary.itertuples()}
    for i, layer in enumerate(layers):
        for j, (t, s) in enumerate(columns):
            z[i, j], n[i, j] = at.get((layer, t, s), (np.nan, 0))
    labels = [f"{t} ← {s}" for t, s in columns]
    fig = go.Figure(
        go.Heatmap(
            x=labels,
            y=layers,
            z=z,
            customdata=n,
            zmin=0,
            zmax=1,
            colorscale="Blues",
            texttemplate="%{z:.2f}",
            colorbar=dict(title="share of<br>attention"),
            hovertemplate="layer %{y}<br>%{x}<br>mean share %{z:.3f}<br>n = %{customdata}<extra></extra>",
        )
    )
    for j in range(len(sources), len(columns), len(sources)):  # separate the targets
        fig.add_vline(x=j - 0.5, line_color="white", line_width=4)
    n_samples = _n_samples(df)
    over = "one sample" if n_samples == 1 else f"mean over {n_samples} samples"
    sub = f"<br><sup>{over}, all heads averaged; target ← source</sup>" if n_samples else ""
    fig.update_layout(title=f"{title}{sub}", xaxis_title="target ← source", yaxis_title="layer",
                      yaxis=dict(dtick=1 if len(layers) <= 40 else None), template="plotly_white",
                      height=max(380, 18 * len(layers) + 200))
    return fig


# ------------------------------------------------------------------------------------------------ circuits


def patching_figure(df: pd.DataFrame, title: str = "Activation patching: restoration per layer") -> go.Figure:
    """Mean normalised restoration per layer, one line per (region, site); plain means, no bands."""
    _need(df, ["region", "site", "layer", "restoration"], "patching")
    lines = df.assign(line=df["region"].astype(str) + " @ " + df["site"].astype(str))
    fig = _mean_lines(lines, "line", "restoration")
    fig.add_hline(y=0, line_dash="dot", line_color="gray", layer="below")
    fig.update_layout(title=title, xaxis_title="layer patched", yaxis_title="restoration (0 = corrupted, 1 = clean)")
    return fig


def patching_curves(
    df: pd.DataFrame, level: float = 0.95, title: str = "Activation patching: restoration per layer"
) -> go.Figure:
    """Per layer, the mean normalised restoration of the clean answer when the clean activation is patched in at
    a region, one line per (region, site) with a `level` Student-t band over samples."""
    _need(df, ["region", "site", "layer", "restoration"], "patching")
    lines = df.assign(line=df["region"].astype(str) + " @ " + df["site"].astype(str))
    lines = lines[np.isfinite(lines["restoration"].astype(float))]
    fig = _curves_figure(
        lines, "line", "restoration", "patching", None, _series_styles, {}, "", (-np.inf, np.inf), level,
        empty="the patching table has no finite restoration (clean and corrupted runs agree everywhere)",
        title=title, xaxis_title="layer patched", yaxis_title="restoration (0 = corrupted, 1 = clean)",
        legend_title_text="region @ site", hovermode="closest",
    )
    fig.add_hline(y=0, line_dash="dot", line_color="gray", layer="below")
    fig.add_hline(y=1, line_dash="dot", line_color="gray", layer="below")
    return fig


def head_figure(df: pd.DataFrame, title: str = "Knockout per attention head") -> go.Figure:
    """Heatmap layer x head of the mean relative change (%) of the answer probability when the edge is blocked
    in that one head (a `mm_lens.heads.head_sweep` table); hover shows the values."""
    _need(df, ["layer", "head", "relative_change_pct"], "head sweep")
    if df.empty:
        raise MMLensError("the head-sweep table is empty; run head_sweep on at least one sample")
    grid = df.groupby(["layer", "head"])["relative_change_pct"].mean().unstack("head").sort_index()
    limit = float(np.nanmax(np.abs(grid.to_numpy()))) or 1.0
    fig = go.Figure(go.Heatmap(
        z=grid.to_numpy(), x=[str(h) for h in grid.columns], y=[str(layer) for layer in grid.index],
        colorscale="RdBu", zmid=0, zmin=-limit, zmax=limit, colorbar_title="change (%)",
        hovertemplate="layer %{y}, head %{x}<br>relative change %{z:.3g}%<extra></extra>",
    ))
    blocks = ", ".join(map(str, df["block"].unique())) if "block" in df.columns else ""
    fig.update_layout(title=f"{title}{': ' + blocks if blocks else ''}", xaxis_title="head", yaxis_title="layer",
                      template="plotly_white")
    return fig
