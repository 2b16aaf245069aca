"""Figures read from result tables (never from models); each function returns a plotly ``Figure``."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from mm_lens.errors import MMLensError


def _need(df: pd.DataFrame, columns: list[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise MMLensError(f"{what} table lacks column(s) {', '.join(missing)}; pass the table the CLI writes")


def flow_figure(df: pd.DataFrame, title: str = "Attention knockout: change in answer probability") -> go.Figure:
    """Mean relative change (%) of the answer probability per layer, one line per block."""
    _need(df, ["block", "layer", "relative_change_pct"], "flow")
    fig = go.Figure()
    for block, group in df.groupby("block", sort=False):
        mean = group.groupby("layer")["relative_change_pct"].mean().sort_index()
        fig.add_trace(go.Scatter(x=mean.index, y=mean.values, mode="lines+markers", name=str(block)))
    fig.add_hline(y=0, line_dash="dot", line_color="gray")
    fig.update_layout(title=title, xaxis_title="layer", yaxis_title="relative change in probability (%)")
    return fig


def lens_figure(df: pd.DataFrame, title: str = "Answer logit lens") -> go.Figure:
    """Mean probability of each answer form per layer, read through the final norm and unembedding."""
    _need(df, ["form", "layer", "prob"], "lens")
    fig = go.Figure()
    for form, group in df.groupby("form", sort=False):
        mean = group.groupby("layer")["prob"].mean().sort_index()
        fig.add_trace(go.Scatter(x=mean.index, y=mean.values, mode="lines+markers", name=str(form)))
    fig.update_layout(title=title, xaxis_title="layer", yaxis_title="probability", yaxis_range=[0, 1])
    return fig


def patches_figure(image, patches, boxes=(), tiles: str = "auto", title: str = "Related image patches") -> go.Figure:
    """The image with its related patches outlined (other patches faintly, boxes dashed), to check the
    box -> patch mapping by eye. ``patches`` is a `mm_lens.patches.PatchSets`; ``tiles`` picks which
    patch grid to draw: "auto" (LLaVA-NeXT's any-res tiles when present, else the image), "base", "all"."""
    import numpy as np

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
