"""Figures from result tables: statistics of the bands, layer curves, facets, patch values, attention heatmap."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
from PIL import Image

from mm_lens import plots
from mm_lens.data.gqa import Box
from mm_lens.errors import MMLensError
from mm_lens.inputs import prepare
from mm_lens.patches import patch_sets

QUESTION = "What color is the ball?"


def flow_table(n_samples=4, tasks=("ChooseAttr",), blocks=("Last->Last", "Image->Question"), n_layers=4, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for task in tasks:
        for q in range(n_samples):
            for block in blocks:
                for layer in range(n_layers):
                    rows.append(dict(task=task, question_id=f"{task}-{q}", block=block, layer=layer, base_prob=0.5,
                                     knockout_prob=0.4, relative_change_pct=float(rng.normal(-layer, 2))))
    return pd.DataFrame(rows)


def lens_table(n_samples=3, n_layers=4, seed=0):
    rng = np.random.default_rng(seed)
    rows = [
        dict(question_id=f"q{q}", layer=layer, form=form, prob=float(np.clip(base + rng.normal(0, 0.3), 0, 1)))
        for q in range(n_samples)
        for layer in range(n_layers)
        for form, base in (("answer_lower", 0.9), ("answer_capitalized", 0.2), ("false_option_lower", 0.05))
    ]
    return pd.DataFrame(rows)


def traces(fig, kind="line"):
    """Mean lines (mode lines+markers) or bands (fill toself) of a curves figure."""
    if kind == "band":
        return [t for t in fig.data if getattr(t, "fill", None) == "toself"]
    return [t for t in fig.data if isinstance(t, go.Scatter) and getattr(t, "fill", None) != "toself"
            and t.mode == "lines+markers"]


# ------------------------------------------------------------------------------------------ statistics


@pytest.mark.parametrize(
    "p, df, expected",
    [(0.975, 1, 12.7062), (0.975, 2, 4.3027), (0.975, 4, 2.7764), (0.975, 9, 2.2622), (0.975, 29, 2.0452),
     (0.995, 5, 4.0321), (0.9, 3, 1.6377), (0.975, 10_000, 1.9602)],
)
def test_t_quantile_matches_tables(p, df, expected):
    assert plots.t_quantile(p, df) == pytest.approx(expected, abs=1e-4)
    assert plots.t_quantile(1 - p, df) == pytest.approx(-expected, abs=1e-4)
    assert plots.t_cdf(expected, df) == pytest.approx(p, abs=1e-5)


def test_t_quantile_rejects_bad_input():
    with pytest.raises(MMLensError, match="0 < p < 1"):
        plots.t_quantile(1.0, 3)


def test_mean_ci_is_the_t_interval_of_the_mean():
    df = pd.DataFrame({"g": ["a", "a", "a", "b"], "v": [1.0, 2.0, 3.0, 5.0]})
    out = plots.mean_ci(df, ["g"], "v").set_index("g")
    half = 4.302652729749464 / math.sqrt(3)  # t_{0.975, 2} * sd (1) / sqrt(3)
    assert out.loc["a", "mean"] == 2.0 and out.loc["a", "n"] == 3
    assert out.loc["a", "lo"] == pytest.approx(2 - half) and out.loc["a", "hi"] == pytest.approx(2 + half)
    assert out.loc["b", "n"] == 1 and math.isnan(out.loc["b", "lo"]) and math.isnan(out.loc["b", "hi"])
    wider = plots.mean_ci(df, ["g"], "v", level=0.99).set_index("g")
    assert wider.loc["a", "hi"] > out.loc["a", "hi"]
    with pytest.raises(MMLensError, match="confidence level"):
        plots.mean_ci(df, ["g"], "v", level=95)


def test_mean_ci_leaves_out_nan_values():
    df = pd.DataFrame({"g": ["a"] * 3, "v": [1.0, float("nan"), 3.0]})
    assert plots.mean_ci(df, ["g"], "v").loc[0, ["mean", "n"]].tolist() == [2.0, 2]


# ------------------------------------------------------------------------------------------ curves


def test_flow_curves_mean_and_band_per_block_in_study_order():
    df = flow_table()
    fig = plots.flow_curves(df)
    lines, bands = traces(fig), traces(fig, "band")
    assert [t.name for t in lines] == ["Image->Question", "Last->Last"]  # STUDY_BLOCKS order, not table order
    summary = plots.mean_ci(df, ["block", "layer"], "relative_change_pct")
    for line, band in zip(lines, bands, strict=False):
        part = summary[summary.block == line.name].sort_values("layer")
        np.testing.assert_allclose(line.y, part["mean"])
        np.testing.assert_allclose(band.y, np.concatenate([part["hi"], part["lo"][::-1]]))
        assert band.legendgroup == line.legendgroup and band.showlegend is False
        assert band.fillcolor == plots._rgba(line.line.color, 0.18)
    assert "4 samples" in fig.layout.title.text and "95% t-interval" in fig.layout.title.text
    fig.to_json()


def test_flow_curves_without_band_for_a_single_sample_and_errors():
    fig = plots.flow_curves(flow_table(n_samples=1))
    assert traces(fig, "band") == [] and len(traces(fig)) == 2
    with pytest.raises(MMLensError, match="relative_change_pct"):
        plots.flow_curves(pd.DataFrame({"block": [], "layer": []}))
    with pytest.raises(MMLensError, match="empty"):
        plots.flow_curves(flow_table().iloc[:0])


def test_flow_tasks_figure_one_panel_per_task_and_one_legend_entry_per_block():
    df = flow_table(tasks=("ChooseAttr", "ChooseRel", "QueryAttr", "LogicalObj"), n_samples=3)
    fig = plots.flow_tasks_figure(df, columns=3)
    titles = [a.text for a in fig.layout.annotations]
    assert titles == ["ChooseAttr (n=3)", "ChooseRel (n=3)", "QueryAttr (n=3)", "LogicalObj (n=3)"]
    lines = traces(fig)
    assert len(lines) == 4 * 2
    assert sorted(t.name for t in lines if t.showlegend is not False) == ["Image->Question", "Last->Last"]
    # the same block has the same colour in every panel, and panels sit on distinct axes
    colours = {t.name: set() for t in lines}
    for t in lines:
        colours[t.name].add(t.line.color)
    assert all(len(c) == 1 for c in colours.values())
    assert len({t.xaxis for t in lines}) == 4
    # a mapping of tables gives the same panels
    by_dict = plots.flow_tasks_figure({t: part for t, part in df.groupby("task", sort=False)}, columns=3)
    assert [a.text for a in by_dict.layout.annotations] == titles
    np.testing.assert_allclose(traces(by_dict)[0].y, lines[0].y)


def test_lens_curves_styles_and_clipped_band():
    df = lens_table()
    fig = plots.lens_curves(df)
    lines = {t.name: t for t in traces(fig)}
    assert set(lines) == {"answer (lower case)", "Answer (capitalised)", "false option (lower case)"}
    assert lines["Answer (capitalised)"].line.dash == "dash" and lines["answer (lower case)"].line.dash == "solid"
    pairs = {(t.line.color, t.line.dash) for t in lines.values()}
    assert len(pairs) == 3 and len({t.line.color for t in lines.values()}) == 3  # colour AND dash differ
    assert len({t.marker.symbol for t in lines.values()}) == 3
    for band in traces(fig, "band"):
        assert min(band.y) >= 0.0 and max(band.y) <= 1.0
    mean = df[df.form == "answer_lower"].groupby("layer")["prob"].mean()
    np.testing.assert_allclose(lines["answer (lower case)"].y, mean.values)
    facets = plots.lens_tasks_figure({"A": df, "B": lens_table(seed=1)})
    assert [a.text for a in facets.layout.annotations] == ["A (n=3)", "B (n=3)"]


def test_old_figures_still_plain_means():
    df = flow_table()
    fig = plots.flow_figure(df)
    assert [t.name for t in fig.data] == ["Image->Question", "Last->Last"]  # study order, as in flow_curves
    np.testing.assert_allclose(
        fig.data[1].y, df[df.block == "Last->Last"].groupby("layer")["relative_change_pct"].mean()
    )
    assert len(plots.lens_figure(lens_table()).data) == 3


# ------------------------------------------------------------------------------------------ patches


def grey(width, height):
    return Image.new("RGB", (width, height), (128, 128, 128))


def test_patch_values_figure_related_mask_on_the_original_image(tiny_llava):
    image = grey(48, 32)  # resized to 48x32 then centre-cropped to 32x32: 8 px cut on each side
    box = Box(8, 0, 8, 8, "corner")  # the top-left patch of the crop
    inp = prepare(tiny_llava, image, QUESTION, boxes=[box])
    found = patch_sets(tiny_llava, image.size, inp.regions, [box])
    table = plots.patch_table(inp.regions, "related", patches=found)
    assert len(table) == 16 and table["value"].sum() == len(found.related) == 1
    fig = plots.patch_values_figure(image, table, value_name="related")
    (heat,) = [t for t in fig.data if isinstance(t, go.Heatmap)]
    # 4x4 grid; the crop starts at x=8 of the original image: edges 8, 16, 24, 32, 40 (minus half a pixel)
    np.testing.assert_allclose(heat.x, [7.5, 15.5, 23.5, 31.5, 39.5])
    np.testing.assert_allclose(heat.y, [-0.5, 7.5, 15.5, 23.5, 31.5])
    z = np.asarray(heat.z)
    assert z[0, 0] == 1.0 and np.nansum(z) == 1.0
    row, col, position, tile = np.asarray(heat.customdata)[0, 0]
    assert (row, col, tile) == (0, 0, 0) and position == found.related[0]
    assert "row %{customdata[0]}" in heat.hovertemplate and "col %{customdata[1]}" in heat.hovertemplate
    assert list(heat.colorbar.ticktext) == ["other", "related"]
    fig.to_json()


def test_patch_values_figure_from_a_long_table_in_tile_pixels(tiny_llava, make_image):
    image = make_image(32, 32, seed=3)
    inp = prepare(tiny_llava, image, QUESTION)
    positions = inp.regions.image_positions
    values = pd.DataFrame(
        [
            dict(layer=layer, position=p, attention=float(layer * 100 + i))
            for layer in (0, 1)
            for i, p in enumerate(positions)
        ]
    )
    with pytest.raises(MMLensError, match="pick one with layer"):
        plots.patch_table(inp.regions, values)
    table = plots.patch_table(inp.regions, values, layer=1)
    fig = plots.patch_values_figure(image, table, value_name="attention")
    (heat,) = [t for t in fig.data if isinstance(t, go.Heatmap)]
    z = np.asarray(heat.z)
    expected = 100 + np.arange(16).reshape(4, 4)  # image tokens are row-major in the 4x4 grid
    np.testing.assert_allclose(z, expected)
    with pytest.raises(MMLensError, match="reach"):
        plots.patch_values_figure(image.resize((16, 16)), table)
    with pytest.raises(MMLensError, match="position"):
        plots.patch_table(inp.regions, pd.DataFrame({"value": [1.0]}))


def test_patch_values_figure_anyres_tiles(tiny_llava_next):
    image = grey(64, 32)
    box = Box(0, 0, 32, 16, "quarter")
    inp = prepare(tiny_llava_next, image, QUESTION, boxes=[box])
    found = patch_sets(tiny_llava_next, image.size, inp.regions, [box])
    table = plots.patch_table(inp.regions, {p: float(p) for p in inp.regions.image_positions}, patches=found)
    base = plots.patch_values_figure(image, table, tiles="base")
    anyres = plots.patch_values_figure(image, table, tiles="anyres")
    base_heat = [t for t in base.data if isinstance(t, go.Heatmap)]
    tile_heat = [t for t in anyres.data if isinstance(t, go.Heatmap)]
    assert len(base_heat) == 1 and len(tile_heat) == len({found.tiles[p] for p in found.footprints} - {0})
    assert sum(t.showscale is not False for t in tile_heat) == 1  # one colour bar for the shared scale
    # each any-res tile covers its own part of the image
    assert sorted(float(t.x[0]) for t in tile_heat) == sorted({float(t.x[0]) for t in tile_heat})
    with pytest.raises(MMLensError, match="tiles="):
        plots.patch_values_figure(image, table, tiles="all")


# ------------------------------------------------------------------------------------------ attention


def attention_table(n_samples=3, n_layers=3, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for q in range(n_samples):
        for layer in range(n_layers):
            for target in ("Question", "Last"):
                shares = rng.dirichlet([1, 1, 1])
                for source, m in zip(("Image", "Question", "Rest"), shares, strict=False):
                    rows.append(dict(question_id=f"q{q}", layer=layer, target=target, source=source, mass=m))
    return pd.DataFrame(rows)


def test_attention_figure_is_layers_by_target_source_means():
    df = attention_table()
    fig = plots.attention_figure(df)
    (heat,) = fig.data
    assert list(heat.x) == [f"{t} ← {s}" for t in ("Question", "Last") for s in ("Image", "Question", "Rest")]
    assert list(heat.y) == [0, 1, 2]
    z = np.asarray(heat.z)
    expected = df[(df.layer == 1) & (df.target == "Last") & (df.source == "Image")]["mass"].mean()
    assert z[1, 3] == pytest.approx(expected)
    np.testing.assert_allclose(z[:, :3].sum(1), 1.0)  # a target's shares add up to 1 per layer
    assert (heat.zmin, heat.zmax) == (0, 1)
    assert "3 samples" in fig.layout.title.text
    with pytest.raises(MMLensError, match="mass"):
        plots.attention_figure(df.drop(columns="mass"))


def test_flow_bands_stop_at_minus_100_percent():
    df = pd.DataFrame([dict(question_id=f"q{q}", block="Image->Question", layer=0, relative_change_pct=v)
                       for q, v in enumerate([-100.0, -10.0, -95.0])])
    (band,) = traces(plots.flow_curves(df), "band")
    assert min(band.y) == -100.0  # the t-interval reaches below -100%, which no probability can
    assert plots.mean_ci(df, ["block"], "relative_change_pct")["lo"].item() < -100
    (facet_band,) = traces(plots.flow_tasks_figure({"A": df}), "band")
    assert min(facet_band.y) == -100.0


# ------------------------------------------------------------------------------------------ styles


def test_block_styles_one_table_for_every_figure():
    from mm_lens.knockout import STANDARD_BLOCKS, STUDY_BLOCKS

    assert set(plots.BLOCK_STYLES) == set(STANDARD_BLOCKS) and set(STUDY_BLOCKS) <= set(STANDARD_BLOCKS)
    looks = {(s["color"], s["dash"]) for s in plots.BLOCK_STYLES.values()}
    assert len(looks) == 6 and len({s["symbol"] for s in plots.BLOCK_STYLES.values()}) == 6
    assert all(s["color"] in plots.PALETTE for s in plots.BLOCK_STYLES.values())
    # a block's style does not depend on which other blocks the figure holds
    assert plots.block_styles(["Last->Last"])["Last->Last"] == plots.BLOCK_STYLES["Last->Last"]
    # unknown blocks take the styles after the standard six, in order of appearance, deterministically
    mine = plots.block_styles(["mine", "Image->Last", "yours"])
    assert list(mine) == ["Image->Last", "mine", "yours"]
    assert mine["mine"] == plots.style(6) and mine["yours"] == plots.style(7)
    assert plots.block_styles(["mine", "yours"]) == {k: mine[k] for k in ("mine", "yours")}
    assert len({(plots.style(i)["color"], plots.style(i)["dash"]) for i in range(48)}) == 48

    flow = flow_table(n_samples=3).assign(block=lambda d: d["block"].map(
        {"Image->Question": "Image->Question", "Last->Last": "Other Image Patches->Question"}))
    for fig in (plots.flow_curves(flow), plots.flow_figure(flow), plots.flow_tasks_figure({"A": flow, "B": flow})):
        for t in traces(fig):
            want = plots.BLOCK_STYLES[t.name]
            assert (t.line.color, t.line.dash, t.marker.symbol) == (want["color"], want["dash"], want["symbol"])


def test_flat_curves_are_offset_along_x_and_hover_shows_the_layer():
    df = flow_table(n_samples=3).assign(relative_change_pct=0.0)
    lines = traces(plots.flow_curves(df))
    xs = [np.asarray(t.x, float) for t in lines]
    assert not np.allclose(xs[0], xs[1])  # both on zero, but not on top of each other
    for x, t in zip(xs, lines, strict=True):
        np.testing.assert_allclose(x.round(), np.asarray(t.customdata)[:, 3].astype(float))
        assert np.abs(x - x.round()).max() <= 0.25
        assert "customdata[3]" in t.hovertemplate
