"""Figures of patch-map tables (`mm_lens.maps.patch_map`, a run's ``maps.csv``); they read tables, never a model.

* `map_figure`: one sample's map, one subplot per tile (LLaVA-NeXT: the base image and each any-resolution crop),
  each cell a patch group at its (row, col), or, given the original ``image``, the image with a semi-transparent
  heatmap placed by the groups' pixel boxes (``x0..y1``); a slider over the windows of layers and a menu over the
  methods. Hover: the group, its pixel box in the original image, the value.
* `maps_side_by_side`: the three methods of one sample, window and answer step next to each other.
* `agreement_figure`: a `mm_lens.maps.map_agreement` table, Spearman and top-k overlap per cheap method over
  samples (box with every map's point).
* `maps_figure` / `maps_curves` (the run folder's ``maps.html`` and the report's figure, `mm_lens.analyses.MAPS`):
  a whole run, the mean knockout map over samples per (tile, row, col) and the agreement summary under it.

Colours: knockout and gradient diverge around 0 (``RdBu``: red = the answer's probability drops without the
group, i.e. the answer needs it; blue = it rises), symmetric over every window so that the slider compares like
with like; attention is sequential (``Blues``, from 0). A table missing a column is an `MMLensError` naming it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from mm_lens.errors import MMLensError
from mm_lens.names import MAP_METHODS
from mm_lens.plots import PALETTE, _need

#: The columns a map figure reads (`map_figure`, `maps_side_by_side`); the pixel box ``x0..y1`` too with an image.
MAP_FIGURE_COLUMNS = ("method", "window_start", "window_stop", "step", "group", "tile", "row", "col", "value")
PIXEL_COLUMNS = ("x0", "y0", "x1", "y1")
AGREEMENT_FIGURE_COLUMNS = ("method", "spearman", "top_k_overlap")
#: How each method is coloured and labelled.
METHOD_STYLES: dict[str, dict[str, Any]] = {
    "knockout": dict(colorscale="RdBu", diverging=True, label="change in p (%)", short="Δp (%)"),
    "attention": dict(colorscale="Blues", diverging=False, label="attention mass", short="mass"),
    "gradient": dict(colorscale="RdBu", diverging=True, label="estimated change (%)", short="est. Δp (%)"),
}
METHOD_COLORS = {m: PALETTE[i] for i, m in enumerate(MAP_METHODS)}
IMAGE_OPACITY = 0.6


def _methods(df: pd.DataFrame) -> list[str]:
    present = [str(m) for m in dict.fromkeys(df["method"])]
    return [m for m in MAP_METHODS if m in present] + [m for m in present if m not in MAP_METHODS]


def _style(method: str) -> dict[str, Any]:
    return METHOD_STYLES.get(method, dict(colorscale="Viridis", diverging=False, label="value", short="value"))


def _range(method: str, values: np.ndarray) -> tuple[float, float]:
    """One colour range for a method over all its maps: symmetric around 0 when diverging, else from 0 (or min)."""
    finite = values[np.isfinite(values)]
    if not finite.size:
        return (-1.0, 1.0) if _style(method)["diverging"] else (0.0, 1.0)
    if _style(method)["diverging"]:
        limit = float(np.abs(finite).max()) or 1.0
        return -limit, limit
    lo, hi = min(0.0, float(finite.min())), float(finite.max())
    return lo, hi if hi > lo else lo + 1.0


def _one_sample(table: pd.DataFrame, question_id: Any, step: int, what: str) -> tuple[pd.DataFrame, str]:
    """The rows of one sample (the first when ``question_id`` is None) at answer step ``step``, one target."""
    df = table
    label = ""
    if "question_id" in df.columns:
        ids = list(dict.fromkeys(df["question_id"].astype(str)))
        if not ids:
            raise MMLensError(f"the {what} table is empty")
        qid = ids[0] if question_id is None else str(question_id)
        if qid not in ids:
            shown = ", ".join(ids[:8]) + (", ..." if len(ids) > 8 else "")
            raise MMLensError(f"question_id {question_id!r} is not in the map table (it has {shown})")
        df = df[df["question_id"].astype(str) == qid]
        label = f"question {qid}"
    elif question_id is not None:
        raise MMLensError("question_id= needs a table with a question_id column (a run's maps.csv)")
    if df.empty:
        raise MMLensError(f"the {what} table is empty")
    steps = sorted(int(s) for s in df["step"].unique())
    if int(step) not in steps:
        raise MMLensError(f"step {step} is not in the map table (steps: {', '.join(map(str, steps))})")
    df = df[df["step"] == int(step)]
    if "target" in df.columns:
        df = df[df["target"] == df["target"].iloc[0]]
        label += f"{', ' if label else ''}target {df['target'].iloc[0]}"
    label += f"{', ' if label else ''}answer step {int(step)}"
    if "token_id" in df.columns:
        label += f" (token {int(df['token_id'].iloc[0])})"
    return df, label


def _windows(df: pd.DataFrame) -> list[tuple[int, int]]:
    pairs = df[["window_start", "window_stop"]].drop_duplicates().astype(int)
    return sorted(map(tuple, pairs.to_numpy().tolist()))


def _window_label(window: tuple[int, int]) -> str:
    start, stop = window
    return f"{start}" if stop - start == 1 else f"{start}-{stop - 1}"


def _pixels(row: Any) -> str:
    x0 = getattr(row, "x0", np.nan)
    if pd.isna(x0):
        return "no pixel box (padding only or unknown)"
    return f"pixels ({row.x0:.0f}, {row.y0:.0f})-({row.x1:.0f}, {row.y1:.0f})"


def _hover(row: Any, value_name: str, extra: str = "") -> str:
    size = ""
    if hasattr(row, "n_patches") and not pd.isna(row.n_patches):
        size = f", {int(row.n_patches)} patch{'es' if int(row.n_patches) != 1 else ''}"
    return (f"<b>{row.group}</b><br>tile {int(row.tile)}, row {int(row.row)}, col {int(row.col)}{size}"
            f"<br>{_pixels(row)}<br>{value_name}: {row.value:.4g}{extra}")


def _grid(cells: pd.DataFrame, value_name: str, shape: tuple[int, int] | None = None,
          extra: pd.Series | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``z`` and hover text over the tile's patch grid: each group fills its rows x cols patches."""
    n_rows, n_cols = shape or _grid_shape(cells)
    z = np.full((n_rows, n_cols), np.nan)
    text = np.full((n_rows, n_cols), "", dtype=object)
    for i, r in enumerate(cells.itertuples(index=False)):
        rr, cc = int(r.row), int(r.col)
        h = int(getattr(r, "rows", 1)) if not pd.isna(getattr(r, "rows", 1)) else 1
        w = int(getattr(r, "cols", 1)) if not pd.isna(getattr(r, "cols", 1)) else 1
        z[rr:rr + h, cc:cc + w] = r.value
        text[rr:rr + h, cc:cc + w] = _hover(r, value_name, "" if extra is None else extra.iloc[i])
    return z, text


def _grid_shape(cells: pd.DataFrame) -> tuple[int, int]:
    rows = cells["rows"] if "rows" in cells.columns else 1
    cols = cells["cols"] if "cols" in cells.columns else 1
    return int((cells["row"] + rows).max()), int((cells["col"] + cols).max())


def _pixel_grid(cells: pd.DataFrame, value_name: str, edges: tuple[np.ndarray, np.ndarray]):
    """``z`` and hover text over the pixel grid of ``edges`` (x, y): each cell takes the group whose pixel box
    holds its centre (the smaller box on top where boxes overlap)."""
    xe, ye = edges
    z = np.full((len(ye) - 1, len(xe) - 1), np.nan)
    text = np.full(z.shape, "", dtype=object)
    xc, yc = (xe[:-1] + xe[1:]) / 2, (ye[:-1] + ye[1:]) / 2
    boxed = cells.dropna(subset=list(PIXEL_COLUMNS))
    area = (boxed["x1"] - boxed["x0"]) * (boxed["y1"] - boxed["y0"])
    for r in boxed.loc[area.sort_values(ascending=False).index].itertuples(index=False):
        cols = (xc >= r.x0) & (xc < r.x1)
        rows = (yc >= r.y0) & (yc < r.y1)
        z[np.ix_(rows, cols)] = r.value
        text[np.ix_(rows, cols)] = _hover(r, value_name)
    return z, text


def _edges_of(cells: pd.DataFrame, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    boxed = cells.dropna(subset=list(PIXEL_COLUMNS))
    xe = np.unique(np.round(np.clip(np.r_[boxed["x0"], boxed["x1"], 0, width], 0, width), 3))
    ye = np.unique(np.round(np.clip(np.r_[boxed["y0"], boxed["y1"], 0, height], 0, height), 3))
    return xe, ye


def _dtick(n: int) -> int:
    """Whole-patch ticks: every patch on a small grid, else every 2nd, 4th, ..."""
    return max(1, 2 ** int(np.ceil(np.log2(max(n, 1) / 12)))) if n > 12 else 1


def _image_pixels(image: Any) -> np.ndarray:
    return np.asarray(image.convert("RGB")) if hasattr(image, "convert") else np.asarray(image)


def _tile_titles(tiles: list[int]) -> list[str]:
    if len(tiles) == 1 and tiles[0] == 0:
        return ["image"]
    return ["tile 0 (base image)" if t == 0 else f"tile {t}" for t in tiles]


def map_figure(table: pd.DataFrame, image: Any = None, question_id: Any = None, step: int = 0,
               title: str = "Patch map") -> go.Figure:
    """One sample's patch maps: one subplot per tile, a slider over the windows of layers, a menu over the methods.

    ``table``: `mm_lens.maps.patch_map`'s table (or a run's ``maps.csv``: ``question_id`` picks the sample, the
    first by default). ``step``: the answer step. ``image`` (PIL, the original image): drawn under each tile's
    subplot, with the heatmap placed by the groups' pixel boxes; without it each cell is a patch at (row, col).
    Each method keeps one colour range over all windows (diverging around 0 for knockout and gradient).
    """
    _need(table, list(MAP_FIGURE_COLUMNS) + (list(PIXEL_COLUMNS) if image is not None else []), "map")
    df, label = _one_sample(table, question_id, step, "map")
    methods = _methods(df)
    windows = _windows(df)
    tiles = sorted(int(t) for t in df["tile"].unique())
    if image is not None:
        pixels = _image_pixels(image)
        height, width = pixels.shape[:2]
        if df["x1"].max() > width + 1 or df["y1"].max() > height + 1:
            raise MMLensError(
                f"pixel boxes reach ({df['x1'].max():g}, {df['y1'].max():g}) but the image is {width}x{height}; "
                "pass the original image the map was made of"
            )
        edges = {t: _edges_of(df[df["tile"] == t], width, height) for t in tiles}
    shapes = {t: _grid_shape(df[df["tile"] == t]) for t in tiles}
    ranges = {m: _range(m, df.loc[df["method"] == m, "value"].to_numpy(float)) for m in methods}
    fig = make_subplots(rows=1, cols=len(tiles), subplot_titles=_tile_titles(tiles), horizontal_spacing=0.04)

    def heatmap(method: str, window: tuple[int, int], tile: int, visible: bool | None = None) -> go.Heatmap:
        cells = df[(df["method"] == method) & (df["tile"] == tile) & (df["window_start"] == window[0])
                   & (df["window_stop"] == window[1])]
        style = _style(method)
        lo, hi = ranges[method]
        kw: dict[str, Any] = dict(
            zmin=lo, zmax=hi, colorscale=style["colorscale"], hoverongaps=False, name=f"{method}, tile {tile}",
            hovertemplate=f"%{{text}}<br>layers {_window_label(window)}<extra>{method}</extra>",
            showscale=tile == tiles[0], colorbar=dict(title=f"{method}<br>{style['short']}"),
        )
        if visible is not None:
            kw["visible"] = visible
        if image is None:
            z, text = _grid(cells, style["label"], shapes[tile])
            return go.Heatmap(z=z, text=text, x=np.arange(z.shape[1]), y=np.arange(z.shape[0]), **kw)
        z, text = _pixel_grid(cells, style["label"], edges[tile])
        xe, ye = edges[tile]
        return go.Heatmap(z=z, text=text, x=xe - 0.5, y=ye - 0.5, opacity=IMAGE_OPACITY, **kw)

    n_images = 0
    if image is not None:
        for j, _ in enumerate(tiles):
            fig.add_trace(go.Image(z=pixels, name="image", hoverinfo="skip"), row=1, col=j + 1)
            n_images += 1
    for m in methods:
        for j, t in enumerate(tiles):
            fig.add_trace(heatmap(m, windows[0], t, visible=m == methods[0]), row=1, col=j + 1)
    heat = list(range(n_images, n_images + len(methods) * len(tiles)))
    fig.frames = [
        go.Frame(data=[heatmap(m, w, t) for m in methods for t in tiles], traces=heat, name=_window_label(w))
        for w in windows
    ]
    visible = [True] * n_images
    buttons = [
        dict(method="restyle", label=m, args=[{"visible": visible + [mm == m for mm in methods for _ in tiles]}])
        for m in methods
    ]
    steps = [
        dict(method="animate", label=_window_label(w), args=[
            [_window_label(w)],
            dict(mode="immediate", frame=dict(duration=0, redraw=True), transition=dict(duration=0)),
        ])
        for w in windows
    ]
    fig.update_layout(
        title=f"{title}: {label}" if label else title,
        template="plotly_white",
        updatemenus=[dict(type="dropdown", buttons=buttons, active=0, x=1, xanchor="right", y=1.1, yanchor="bottom",
                          showactive=True)],
        sliders=[dict(active=0, steps=steps, currentvalue=dict(prefix="layers "), pad=dict(t=30))],
        margin=dict(t=130),
        height=470,
    )
    for j, t in enumerate(tiles):
        ax = dict(row=1, col=j + 1)
        if image is not None:
            fig.update_xaxes(range=[-0.5, width - 0.5], visible=False, constrain="domain", **ax)
            fig.update_yaxes(range=[height - 0.5, -0.5], visible=False, scaleanchor=f"x{j + 1 if j else ''}",
                             constrain="domain", **ax)
        else:
            n_rows, n_cols = shapes[t]
            fig.update_xaxes(range=[-0.5, n_cols - 0.5], title="patch column", showgrid=False, dtick=_dtick(n_cols),
                             constrain="domain", **ax)
            fig.update_yaxes(range=[n_rows - 0.5, -0.5], title="patch row" if j == 0 else None, showgrid=False,
                             dtick=_dtick(n_rows),
                             scaleanchor=f"x{j + 1 if j else ''}", constrain="domain", **ax)
    return fig


def _pick_window(df: pd.DataFrame, window: Any) -> tuple[int, int]:
    windows = _windows(df)
    if window is None:
        return windows[0]
    if isinstance(window, range):
        wanted = (window.start, window.stop)
    elif isinstance(window, (int, np.integer)):
        wanted = (int(window), int(window) + 1)
    else:
        wanted = tuple(int(x) for x in window)
    if wanted not in windows:
        shown = ", ".join(f"range({a}, {b})" for a, b in windows)
        raise MMLensError(f"window {window!r} is not in the map table (its windows: {shown})")
    return wanted  # type: ignore[return-value]


def maps_side_by_side(table: pd.DataFrame, question_id: Any = None, window: Any = None, step: int = 0,
                      title: str = "Patch maps side by side") -> go.Figure:
    """The methods of one sample next to each other (one column each; one row per tile), for one window of
    layers (``window``: a range or ``(start, stop)``; default the first) and answer step."""
    _need(table, list(MAP_FIGURE_COLUMNS), "map")
    df, label = _one_sample(table, question_id, step, "map")
    start, stop = _pick_window(df, window)
    df = df[(df["window_start"] == start) & (df["window_stop"] == stop)]
    methods = _methods(df)
    tiles = sorted(int(t) for t in df["tile"].unique())
    names = [m if len(tiles) == 1 else f"{m}, {tt}" for tt in _tile_titles(tiles) for m in methods]
    fig = make_subplots(rows=len(tiles), cols=len(methods), subplot_titles=names, horizontal_spacing=0.1,
                        vertical_spacing=0.12 if len(tiles) > 1 else 0.1)
    for j, m in enumerate(methods):
        style = _style(m)
        lo, hi = _range(m, df.loc[df["method"] == m, "value"].to_numpy(float))
        left, right = fig.layout[f"xaxis{j + 1 if j else ''}"].domain
        for i, t in enumerate(tiles):
            cells = df[(df["method"] == m) & (df["tile"] == t)]
            z, text = _grid(cells, style["label"])
            fig.add_trace(go.Heatmap(
                z=z, text=text, x=np.arange(z.shape[1]), y=np.arange(z.shape[0]), zmin=lo, zmax=hi,
                colorscale=style["colorscale"], hoverongaps=False, name=f"{m}, tile {t}",
                hovertemplate=f"%{{text}}<extra>{m}</extra>", showscale=i == 0,
                colorbar=dict(title=dict(text=style["label"], side="top"), orientation="h", x=(left + right) / 2,
                              xanchor="center", y=-0.08, yanchor="top", len=right - left, thickness=12),
            ), row=i + 1, col=j + 1)
            n_rows, n_cols = z.shape
            anchor = f"x{i * len(methods) + j + 1 if i or j else ''}"
            fig.update_xaxes(range=[-0.5, n_cols - 0.5], showgrid=False, constrain="domain", dtick=_dtick(n_cols),
                             row=i + 1, col=j + 1)
            fig.update_yaxes(range=[n_rows - 0.5, -0.5], showgrid=False, scaleanchor=anchor, constrain="domain",
                             dtick=_dtick(n_rows), row=i + 1, col=j + 1)
    what = f"{label}, layers {_window_label((start, stop))}"
    fig.update_layout(title=f"{title}: {what}", template="plotly_white", height=max(380, 300 * len(tiles) + 80))
    return fig


def _agreement_traces(fig: go.Figure, agreement: pd.DataFrame, row: int, cols: tuple[int, int]) -> None:
    """Spearman (first column) and top-k overlap (second) per method: a box over the maps with each point."""
    for method in [m for m in MAP_METHODS if m in set(agreement["method"])] + sorted(
            set(agreement["method"]) - set(MAP_METHODS)):
        part = agreement[agreement["method"] == method]
        color = METHOD_COLORS.get(method, PALETTE[-2])
        who = part["question_id"].astype(str) if "question_id" in part.columns else pd.Series([""] * len(part))
        if "window_start" in part.columns:
            who = who + " layers " + part["window_start"].astype(str) + "-" + (part["window_stop"] - 1).astype(str)
        for col, value, name in ((cols[0], "spearman", "Spearman"), (cols[1], "top_k_overlap", "top-k overlap")):
            fig.add_trace(go.Box(
                y=part[value], x=[method] * len(part), name=method, legendgroup=method, showlegend=False,
                boxpoints="all", jitter=0.4, pointpos=0, marker=dict(color=color, size=6), line=dict(color=color),
                boxmean=True, customdata=who, hovertemplate=f"{method}<br>%{{customdata}}<br>{name} %{{y:.3f}}"
                "<extra></extra>",
            ), row=row, col=col)


def _agreement_label(agreement: pd.DataFrame) -> str:
    k = int(agreement["top_k"].max()) if "top_k" in agreement.columns and len(agreement) else None
    return f"top-{k} overlap" if k else "top-k overlap"


def agreement_figure(agreement_table: pd.DataFrame, title: str = "Agreement of the cheap maps with knockout"
                     ) -> go.Figure:
    """Spearman correlation with the knockout map and top-k overlap, per method, over the maps of a
    `mm_lens.maps.map_agreement` table (box: quartiles and mean; points: each sample's map)."""
    _need(agreement_table, list(AGREEMENT_FIGURE_COLUMNS), "map agreement")
    if agreement_table.empty:
        raise MMLensError("the map agreement table is empty: the maps need a knockout map and a cheap one")
    topk = _agreement_label(agreement_table)
    fig = make_subplots(rows=1, cols=2, subplot_titles=["Spearman vs knockout", f"{topk} with knockout"])
    _agreement_traces(fig, agreement_table, 1, (1, 2))
    fig.update_yaxes(range=[-1.05, 1.05], title="Spearman ρ", zeroline=True, row=1, col=1)
    fig.update_yaxes(range=[-0.05, 1.05], title="share of the top groups", row=1, col=2)
    n = agreement_table["question_id"].nunique() if "question_id" in agreement_table.columns else None
    sub = f"<br><sup>{n} sample{'s' if n != 1 else ''}; box: quartiles, dashed: mean</sup>" if n else ""
    fig.update_layout(title=f"{title}{sub}", template="plotly_white", height=420)
    return fig


def mean_map(df: pd.DataFrame, method: str = "knockout", step: int = 0) -> pd.DataFrame:
    """Mean over samples (and windows) of one method's map at one answer step, per (tile, row, col):
    ``tile, row, col, rows, cols, group, x0..y1, value, n`` (n: the maps averaged)."""
    part = df[(df["method"] == method) & (df["step"] == step)]
    keys = ["tile", "row", "col"]
    agg: dict[str, Any] = {"value": ("value", "mean"), "n": ("value", "size"), "group": ("group", "first")}
    for c in ("rows", "cols", "n_patches", *PIXEL_COLUMNS):
        if c in part.columns:
            agg[c] = (c, "first")
    return part.groupby(keys, as_index=False).agg(**agg)


def maps_figure(df: pd.DataFrame, title: str = "Patch maps over the image") -> go.Figure:
    """A whole run's maps (``maps.csv``): the mean knockout map over the samples per (tile, row, col), one
    subplot per tile, and under it how far the cheap maps agree with knockout (`mm_lens.maps.map_agreement`):
    Spearman and top-k overlap per method over samples. Falls back to the first method when no knockout map."""
    _need(df, ["method", "group", "tile", "row", "col", "value"], "maps")
    if df.empty:
        raise MMLensError("the maps table is empty")
    df = df if "step" in df.columns else df.assign(step=0)
    step = int(df["step"].min())
    methods = _methods(df)
    method = "knockout" if "knockout" in methods else methods[0]
    mean = mean_map(df, method, step)
    agreement = _agreement_of(df)
    tiles = sorted(int(t) for t in mean["tile"].unique())
    n_cols = max(len(tiles), 2 if agreement is not None else 1)
    top = [[{"colspan": n_cols}] + [None] * (n_cols - 1)] if len(tiles) == 1 else [[{}] * n_cols]
    names = _tile_titles(tiles) + [""] * (n_cols - len(tiles) if len(tiles) > 1 else 0)
    specs, heights = top, [1.0]
    if agreement is not None:
        half = n_cols // 2
        specs = top + [[{"colspan": half}] + [None] * (half - 1) + [{"colspan": n_cols - half}]
                       + [None] * (n_cols - half - 1)]
        names += ["Spearman vs knockout", f"{_agreement_label(agreement)} with knockout"]
        heights = [0.62, 0.38]
    fig = make_subplots(rows=len(specs), cols=n_cols, specs=specs, subplot_titles=names, row_heights=heights,
                        vertical_spacing=0.14, horizontal_spacing=0.06)
    style = _style(method)
    lo, hi = _range(method, mean["value"].to_numpy(float))
    n_samples = df["question_id"].nunique() if "question_id" in df.columns else 1
    for j, t in enumerate(tiles):
        cells = mean[mean["tile"] == t]
        extra = cells["n"].map(lambda n: f"<br>mean of {n} map{'s' if n != 1 else ''}")
        z, text = _grid(cells, f"mean {style['label']}", extra=extra)
        fig.add_trace(go.Heatmap(
            z=z, text=text, x=np.arange(z.shape[1]), y=np.arange(z.shape[0]), zmin=lo, zmax=hi,
            colorscale=style["colorscale"], hoverongaps=False, name=f"mean {method}, tile {t}",
            hovertemplate="%{text}<extra></extra>", showscale=j == 0,
            colorbar=dict(title=f"mean {method}<br>{style['short']}", len=0.55 if agreement is not None else 1,
                          y=1, yanchor="top"),
        ), row=1, col=j + 1)
        n_rows, n_c = z.shape
        anchor = f"x{j + 1 if j else ''}"
        fig.update_xaxes(range=[-0.5, n_c - 0.5], showgrid=False, title="patch column", constrain="domain",
                         dtick=_dtick(n_c), row=1, col=j + 1)
        fig.update_yaxes(range=[n_rows - 0.5, -0.5], showgrid=False, scaleanchor=anchor, constrain="domain",
                         dtick=_dtick(n_rows), row=1, col=j + 1,
                         title="patch row" if j == 0 else None)
    if agreement is not None:
        half = n_cols // 2
        _agreement_traces(fig, agreement, 2, (1, half + 1))
        fig.update_yaxes(range=[-1.05, 1.05], title="Spearman ρ", row=2, col=1)
        fig.update_yaxes(range=[-0.05, 1.05], title="overlap", row=2, col=half + 1)
    sub = f"mean {method} map over {n_samples} sample{'s' if n_samples != 1 else ''}, answer step {step}"
    if agreement is not None:
        sub += "; agreement of the cheap maps with knockout"
    fig.update_layout(title=f"{title}<br><sup>{sub}</sup>", template="plotly_white",
                      height=760 if agreement is not None else 470)
    return fig


def _agreement_of(df: pd.DataFrame) -> pd.DataFrame | None:
    """`mm_lens.maps.map_agreement` of a table when it has the columns and maps to compare, else None."""
    from mm_lens.maps import MAP_COLUMNS, map_agreement

    if any(c not in df.columns for c in MAP_COLUMNS):
        return None
    agreement = map_agreement(df)
    return agreement if not agreement.empty else None


def maps_curves(df: pd.DataFrame, title: str = "Patch maps over the image") -> go.Figure:
    """The report's figure of a maps table: the same as `maps_figure`."""
    return maps_figure(df, title=title)


__all__ = [
    "AGREEMENT_FIGURE_COLUMNS", "MAP_FIGURE_COLUMNS", "METHOD_STYLES", "agreement_figure", "map_figure",
    "maps_curves", "maps_figure", "maps_side_by_side", "mean_map",
]
