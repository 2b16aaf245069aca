"""Figures of patch-map tables (`mm_lens.maps`): a placeholder heatmap of the first knockout map.

`maps_figure` is the run folder's ``maps.html`` and `maps_curves` the report's figure; both read a table only
(``question_id`` and `mm_lens.maps.MAP_COLUMNS`), never a model. The full figure comes later; the signatures stay.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go


def _first_map(df: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The rows of the first knockout map (first sample, window, step) on tile 0, and what it is."""
    maps = df[df["method"] == "knockout"] if "method" in df.columns else df
    if maps.empty:
        maps = df
    if maps.empty:
        return maps, "no map"
    first = maps.iloc[0]
    keys = [c for c in ("question_id", "method", "target", "window_start", "window_stop", "step") if c in maps]
    sel = maps
    for k in keys:
        sel = sel[sel[k] == first[k]]
    sel = sel[sel["tile"] == sel["tile"].min()]
    parts = [f"{first['method']}" if "method" in keys else "map"]
    if "question_id" in keys:
        parts.append(f"question {first['question_id']}")
    if "target" in keys:
        parts.append(f"-> {first['target']}")
    if "window_start" in keys:
        parts.append(f"layers {int(first['window_start'])}..{int(first['window_stop']) - 1}")
    return sel, ", ".join(parts)


def maps_figure(df: pd.DataFrame, title: str = "Patch map") -> go.Figure:
    """Heatmap of the first knockout map: value per (row, col) of tile 0, hover with group, pixels and value."""
    sel, what = _first_map(df)
    fig = go.Figure()
    if not sel.empty:
        n_rows = int((sel["row"] + sel.get("rows", 1)).max())
        n_cols = int((sel["col"] + sel.get("cols", 1)).max())
        z = np.full((n_rows, n_cols), np.nan)
        text = np.full((n_rows, n_cols), "", dtype=object)
        for r in sel.itertuples(index=False):
            rr, cc = int(r.row), int(r.col)
            h, w = int(getattr(r, "rows", 1)), int(getattr(r, "cols", 1))
            px = ("?" if pd.isna(getattr(r, "x0", np.nan))
                  else f"({r.x0:.0f}, {r.y0:.0f})-({r.x1:.0f}, {r.y1:.0f})")
            z[rr:rr + h, cc:cc + w] = r.value
            text[rr:rr + h, cc:cc + w] = f"{r.group}<br>pixels {px}<br>value {r.value:.4g}"
        fig.add_trace(go.Heatmap(z=z, text=text, hoverinfo="text", colorscale="RdBu", zmid=0,
                                 colorbar={"title": "value"}))
        fig.update_yaxes(autorange="reversed", title="patch row", scaleanchor="x")
        fig.update_xaxes(title="patch column")
    fig.update_layout(title=f"{title}: {what}", template="plotly_white")
    return fig


def maps_curves(df: pd.DataFrame, title: str = "Patch maps over the image") -> go.Figure:
    """The report's figure of a maps table (for now the same heatmap as `maps_figure`)."""
    return maps_figure(df, title=title)


__all__ = ["maps_curves", "maps_figure"]
