"""A logit lens on the image tokens: what each image patch "says" in words, layer by layer.

The logit lens reads a residual-stream vector as if the model stopped there: ``softmax(unembed(x))`` (through
``ln_final`` first for the ``"norm"`` readout). On the last position that is the answer lens
(`mm_lens.lens`). On an *image* token it shows what the language model has written into that patch's stream:
in LLaVA the middle layers of an object's patches often put the object's name, colour or shape among the top
tokens, although no image token is ever trained to predict a word. Which layers those words appear in, and
whether they appear on the patches under the object (``Related Image Patches``) rather than elsewhere, says
where the image is turned into something the question can read.

`image_token_lens` returns, for every image token (its tile / row / column in the vision tower's patch grid;
LLaVA-NeXT's base tile, any-resolution crops and row separators included) and every lens point:

* ``.top``: the top-k tokens and their probabilities (``rank`` 1 = most probable);
* ``.words``: the probability of the first token of each given word (the object's name, the answer, ...).

Lens points follow the readout of `mm_lens.lens`: with the protocol's or the given readout, point l is the
stream leaving block l (``"norm"`` readout of the checkpoint protocol; L points) or entering it (the study's
``"raw"`` readout from the embeddings; L+1 points, the last the model's output). The top point is always the
model's own output distribution at that position (``ln_final`` then ``unembed``), and the softmax runs over the
protocol's vocabulary.

Memory: one forward pass keeps the residual stream at the image positions only (a hook per lens point copies
those rows), and the unembedding runs per point in chunks of image tokens, so a 7B model's 2,880 LLaVA-NeXT
image tokens never need a ``tokens x vocab`` matrix per layer at once.

`image_lens_figure` draws the tables (never the model): the patch grid coloured by a word's probability (or
the top-1 probability), the top tokens on hover, a slider over the layers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from mm_lens.errors import MMLensError
from mm_lens.lens import first_token_id, lens_hook_names
from mm_lens.protocol import vocab_softmax

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from mm_lens.inputs import MultimodalInput
    from mm_lens.model import HookedLlava
    from mm_lens.protocol import LensReadout

#: Per-image-token columns of both tables (``grid_row`` / ``grid_col``: LLaVA-NeXT's joined any-res grid).
TOKEN_COLUMNS = ["layer", "position", "tile", "row", "col", "grid_row", "grid_col"]
TOP_COLUMNS = [*TOKEN_COLUMNS, "rank", "token", "token_id", "prob"]
WORD_COLUMNS = [*TOKEN_COLUMNS, "word", "token", "token_id", "prob"]


@dataclass
class ImageLensResult:
    """The image-token lens of one input: ``top`` (``TOP_COLUMNS``, k rows per layer x image token) and
    ``words`` (``WORD_COLUMNS``, one row per layer x image token x word; empty without words)."""

    top: pd.DataFrame
    words: pd.DataFrame
    readout: str  # "raw" | "norm"
    k: int


def _word_ids(tokenizer, words: Sequence[str] | Mapping[str, str] | None) -> dict[str, int]:
    """``{label: first token id}``; a list of words is labelled by the words themselves."""

    if words is None:
        return {}
    if isinstance(words, str):
        words = [words]
    items = words.items() if isinstance(words, Mapping) else ((str(w), str(w)) for w in words)
    return {str(label): first_token_id(tokenizer, str(text)) for label, text in items}


def image_resid(
    model: HookedLlava, inp: MultimodalInput, readout: LensReadout
) -> Float[Tensor, "point image_token d_model"]:
    """The residual stream at every image position, at every point of `readout` (one forward pass; only the
    image rows are kept)."""

    names = lens_hook_names(model.n_layers, readout)
    positions = torch.tensor(inp.regions.image_positions, dtype=torch.long)
    kept: dict[str, Tensor] = {}

    def keeper(name: str):
        def keep(act: Float[Tensor, "batch pos d_model"], hook) -> Tensor:
            kept[name] = act[0, positions.to(act.device)].detach().clone()
            return act

        return keep

    input_ids, kwargs = inp.forward_args()
    with torch.inference_mode():
        model.bridge.run_with_hooks(
            input_ids, fwd_hooks=[(name, keeper(name)) for name in dict.fromkeys(names)], logits_to_keep=1, **kwargs
        )
    return torch.stack([kept[name] for name in names])


def image_token_lens(
    model: HookedLlava,
    inp: MultimodalInput,
    layers: Iterable[int] | None = None,
    k: int = 5,
    words: Sequence[str] | Mapping[str, str] | None = None,
    readout: str | LensReadout | None = None,
    chunk_size: int = 256,
) -> ImageLensResult:
    """The logit lens at every image token and lens point (see the module doc).

    ``layers``: the lens points to read (default all: L, or L+1 for the study's readout); ``k``: top tokens
    per image token; ``words``: a list of words, or ``{label: word}``, whose first token's probability is
    tracked (e.g. ``["ball", "red"]``); ``readout``: ``"raw"`` / ``"norm"`` (default: the input's protocol's);
    ``chunk_size``: image tokens unembedded at once.
    """

    lens = inp.protocol.with_readout(readout).readout
    regions = inp.regions
    if not regions.image_positions:
        raise MMLensError("the input has no image tokens; prepare it with an image")
    n_points = model.n_layers + (1 if lens.from_embeddings else 0)
    points = list(range(n_points)) if layers is None else [int(layer) for layer in layers]
    bad = [p for p in points if not 0 <= p < n_points]
    if bad:
        raise MMLensError(f"lens points {bad} are outside 0..{n_points - 1} ({lens.name} readout: {n_points} points)")
    if k < 1:
        raise MMLensError(f"k must be at least 1, got {k}")
    if chunk_size < 1:
        raise MMLensError(f"chunk_size must be at least 1, got {chunk_size}")
    word_ids = _word_ids(model.tokenizer, words)
    n_vocab = inp.vocab_size(model)

    resid = image_resid(model, inp, lens)  # [point, image_token, d_model]
    bridge = model.bridge
    n_img = resid.shape[1]
    top_p, top_i, word_p = [], [], []
    with torch.inference_mode():
        for point in points:
            norm = lens.final_norm or point == n_points - 1  # the top point is the model's output
            tp, ti, wp = [], [], []
            for start in range(0, n_img, chunk_size):
                x = resid[point, start : start + chunk_size][None]
                probs = vocab_softmax(bridge.unembed(bridge.ln_final(x) if norm else x)[0], n_vocab)
                values, ids = probs.topk(min(k, probs.shape[-1]), dim=-1)  # sorted, most probable first
                tp.append(values.cpu())
                ti.append(ids.cpu())
                if word_ids:
                    wp.append(probs[:, list(word_ids.values())].cpu())
            top_p.append(torch.cat(tp))
            top_i.append(torch.cat(ti))
            if word_ids:
                word_p.append(torch.cat(wp))

    coords = _token_coords(inp)
    top = _top_table(model.tokenizer, points, coords, torch.stack(top_p), torch.stack(top_i))
    if word_ids:
        words_table = _word_table(model.tokenizer, points, coords, word_ids, torch.stack(word_p))
    else:
        words_table = pd.DataFrame(columns=WORD_COLUMNS)
    return ImageLensResult(top=top, words=words_table, readout=lens.name, k=int(top_i[0].shape[-1]))


def _token_coords(inp: MultimodalInput) -> dict[str, np.ndarray]:
    regions = inp.regions
    n = len(regions.image_positions)

    def column(values: list[int], default: list[int]) -> np.ndarray:
        return np.asarray(values if len(values) == n else default, dtype=np.int64)

    return {
        "position": np.asarray(regions.image_positions, dtype=np.int64),
        "tile": column(regions.patch_tile, [0] * n),
        "row": column(regions.patch_row, [-1] * n),
        "col": column(regions.patch_col, [-1] * n),
        "grid_row": column(regions.grid_row, regions.patch_row),
        "grid_col": column(regions.grid_col, regions.patch_col),
    }


def _token_texts(tokenizer, ids: np.ndarray) -> np.ndarray:
    unique = np.unique(ids)
    text = {int(i): tokenizer.decode([int(i)]) for i in unique}
    return np.asarray([text[int(i)] for i in ids.ravel()], dtype=object).reshape(ids.shape)


def _top_table(tokenizer, points, coords, probs: Tensor, ids: Tensor) -> pd.DataFrame:
    """Long table from ``[point, image_token, k]`` probabilities and ids."""
    n_points, n_img, k = ids.shape
    ids_np = ids.numpy()
    data: dict[str, Any] = {"layer": np.repeat(np.asarray(points, dtype=np.int64), n_img * k)}
    for name, values in coords.items():
        data[name] = np.tile(np.repeat(values, k), n_points)
    data["rank"] = np.tile(np.arange(1, k + 1), n_points * n_img)
    data["token"] = _token_texts(tokenizer, ids_np).ravel()
    data["token_id"] = ids_np.ravel().astype(np.int64)
    data["prob"] = probs.numpy().ravel().astype(float)
    return pd.DataFrame(data, columns=TOP_COLUMNS)


def _word_table(tokenizer, points, coords, word_ids: dict[str, int], probs: Tensor) -> pd.DataFrame:
    """Long table from ``[point, image_token, word]`` probabilities."""
    n_points, n_img, n_words = probs.shape
    data: dict[str, Any] = {"layer": np.repeat(np.asarray(points, dtype=np.int64), n_img * n_words)}
    for name, values in coords.items():
        data[name] = np.tile(np.repeat(values, n_words), n_points)
    labels = list(word_ids)
    ids = np.asarray(list(word_ids.values()), dtype=np.int64)
    data["word"] = np.tile(np.asarray(labels, dtype=object), n_points * n_img)
    data["token"] = np.tile(_token_texts(tokenizer, ids), n_points * n_img)
    data["token_id"] = np.tile(ids, n_points * n_img)
    data["prob"] = probs.numpy().ravel().astype(float)
    return pd.DataFrame(data, columns=WORD_COLUMNS)


# ------------------------------------------------------------------------------------------ figure


def _layout_cells(cells: pd.DataFrame) -> tuple[pd.DataFrame, int, int, list[tuple[str, float, float, float, float]]]:
    """Canvas coordinates (``x``, ``y``) of each patch: the base tile (tile 0) on the left, LLaVA-NeXT's
    any-resolution crops to its right as the joined grid the model packs (``grid_row`` / ``grid_col``), or
    tile after tile when those are absent. Returns the cells, the canvas size and each panel's extent."""
    cells = cells[(cells["row"] >= 0) & (cells["col"] >= 0)].copy()  # no row separators, no CLS feature
    if cells.empty:
        raise MMLensError("the table holds no image patch with a row and a column")
    base = cells[cells["tile"] == 0]
    side_w = int(base["col"].max()) + 1 if not base.empty else 0
    side_h = int(base["row"].max()) + 1 if not base.empty else 0
    cells["x"] = cells["col"].astype(int)
    cells["y"] = cells["row"].astype(int)
    panels = [("base", -0.5, -0.5, side_w - 0.5, side_h - 0.5)] if not base.empty else []
    hd = cells["tile"] > 0
    width, height = side_w, side_h
    if hd.any():
        gap = 1 if side_w else 0
        if {"grid_row", "grid_col"} <= set(cells.columns):
            gx, gy = cells.loc[hd, "grid_col"].astype(int), cells.loc[hd, "grid_row"].astype(int)
            gx, gy = gx - gx.min(), gy - gy.min()
        else:  # tiles side by side
            tile_w = int(cells.loc[hd, "col"].max()) + 1
            gx = (cells.loc[hd, "tile"].astype(int) - 1) * tile_w + cells.loc[hd, "col"].astype(int)
            gy = cells.loc[hd, "row"].astype(int)
        cells.loc[hd, "x"] = side_w + gap + gx
        cells.loc[hd, "y"] = gy
        hd_w, hd_h = int(gx.max()) + 1, int(gy.max()) + 1
        panels.append(("any-res", side_w + gap - 0.5, -0.5, side_w + gap + hd_w - 0.5, hd_h - 0.5))
        width, height = side_w + gap + hd_w, max(side_h, hd_h)
    return cells, width, height, panels


def image_lens_figure(
    result: ImageLensResult | pd.DataFrame,
    word: str | None = None,
    image: Any = None,
    title: str | None = None,
    n_hover: int = 5,
) -> go.Figure:
    """The image-token lens as a patch grid with a slider over the layers (one plotly frame per layer).

    ``result``: an `ImageLensResult` (or its ``top`` table). Colour: the probability of ``word`` (a label of
    the ``words`` table), or the top-1 probability when None, on one colour scale for all layers; hover: the
    patch's tile / row / column / position and its top ``n_hover`` tokens. LLaVA-NeXT inputs show the base
    tile on the left and the any-resolution crops, joined as the model packs them, on the right. ``image``
    (PIL image or array) is drawn under each panel, stretched to it.
    """
    import plotly.graph_objects as go

    top = result.top if isinstance(result, ImageLensResult) else result
    words = result.words if isinstance(result, ImageLensResult) else pd.DataFrame(columns=WORD_COLUMNS)
    missing = [c for c in ["layer", "position", "tile", "row", "col", "rank", "token", "prob"] if c not in top.columns]
    if missing:
        raise MMLensError(f"image lens table lacks column(s) {', '.join(missing)}; pass image_token_lens's result")
    if top.empty:
        raise MMLensError("the image lens table is empty")
    if word is not None:
        if words.empty or word not in set(words["word"]):
            known = sorted(set(words["word"])) if not words.empty else []
            raise MMLensError(
                f"word {word!r} is not in the lens result (words: {known or 'none'}); "
                f"pass words=[{word!r}] to image_token_lens"
            )
        values = words[words["word"] == word][["layer", "position", "prob"]]
        value_name = f"p({word})"
    else:
        values = top[top["rank"] == 1][["layer", "position", "prob"]]
        value_name = "top-1 prob"

    cells, width, height, panels = _layout_cells(top.drop_duplicates(["layer", "position"]))
    cells = cells[["layer", "position", "tile", "row", "col", "x", "y"]]
    hover = (
        top[top["rank"] <= n_hover]
        .sort_values(["layer", "position", "rank"])
        .assign(
            line=lambda t: t["rank"].astype(str) + ". " + t["token"].map(repr) + " " + t["prob"].map("{:.3f}".format)
        )
        .groupby(["layer", "position"])["line"]
        .agg("<br>".join)
        .rename("hover")
        .reset_index()
    )
    cells = cells.merge(values, on=["layer", "position"], how="left").merge(hover, on=["layer", "position"], how="left")
    layers = sorted(cells["layer"].unique())
    zmax = float(np.nanmax(cells["prob"].to_numpy(float))) if cells["prob"].notna().any() else 1.0
    zmax = zmax if zmax > 0 else 1.0

    def heatmap(layer: int) -> go.Heatmap:
        part = cells[cells["layer"] == layer]
        z = np.full((height, width), np.nan)
        text = np.full((height, width), "", dtype=object)
        ys, xs = part["y"].to_numpy(int), part["x"].to_numpy(int)
        z[ys, xs] = part["prob"].to_numpy(float)
        text[ys, xs] = [
            f"tile {r.tile}, row {r.row}, col {r.col} · position {r.position}<br>{value_name}: {r.prob:.4g}"
            f"<br><br>{r.hover}"
            for r in part.itertuples()
        ]
        return go.Heatmap(
            z=z,
            x=np.arange(width),
            y=np.arange(height),
            text=text,
            hovertemplate="%{text}<extra></extra>",
            hoverongaps=False,
            zmin=0.0,
            zmax=zmax,
            colorscale="Viridis",
            opacity=0.65 if image is not None else 1.0,
            colorbar=dict(title=value_name),
            name=f"layer {layer}",
        )

    traces = _background(image, panels) if image is not None else []
    fig = go.Figure(data=[*traces, heatmap(layers[0])])
    index = len(traces)
    fig.frames = [go.Frame(data=[heatmap(layer)], traces=[index], name=str(layer)) for layer in layers]
    steps = [
        dict(
            method="animate",
            label=str(layer),
            args=[
                [str(layer)],
                dict(mode="immediate", frame=dict(duration=0, redraw=True), transition=dict(duration=0)),
            ],
        )
        for layer in layers
    ]
    fig.update_layout(
        title=title or f"Logit lens on the image tokens: {value_name}",
        sliders=[dict(active=0, steps=steps, currentvalue=dict(prefix="layer "), pad=dict(t=30))],
        template="plotly_white",
    )
    fig.update_xaxes(range=[-0.5, width - 0.5], visible=False)
    fig.update_yaxes(range=[height - 0.5, -0.5], visible=False, scaleanchor="x")
    return fig


def _background(image: Any, panels) -> list:
    """The image stretched over each panel of the patch grid (``go.Image`` puts pixel i at ``x0 + i * dx``)."""
    import plotly.graph_objects as go

    pixels = np.asarray(image.convert("RGB")) if hasattr(image, "convert") else np.asarray(image)
    h, w = pixels.shape[:2]
    out = []
    for name, x0, y0, x1, y1 in panels:
        dx, dy = (x1 - x0) / w, (y1 - y0) / h
        out.append(go.Image(z=pixels, x0=x0 + dx / 2, y0=y0 + dy / 2, dx=dx, dy=dy, name=name, hoverinfo="skip"))
    return out


__all__ = [
    "ImageLensResult",
    "TOP_COLUMNS",
    "WORD_COLUMNS",
    "image_lens_figure",
    "image_resid",
    "image_token_lens",
]
