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
