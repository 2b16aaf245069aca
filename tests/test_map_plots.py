"""mm_lens.map_plots: map figures read a patch-map table only; slider steps are the windows, menu buttons the
methods, subplots the tiles; the run's figure is the mean knockout map plus the agreement of the cheap maps."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mm_lens import map_plots
from mm_lens.analyses import MAPS
from mm_lens.errors import MMLensError
from mm_lens.inputs import prepare
from mm_lens.maps import MAP_COLUMNS, METHODS, map_agreement, patch_map
from mm_lens.report import maps_agreement_summary, report_figures
from mm_lens.types import Box

WINDOWS = [(0, 2), (2, 4), (4, 6)]


def synthetic(tiles=(0,), n=4, questions=("q0",), windows=WINDOWS, seed=0) -> pd.DataFrame:
    """A patch-map table: every method and window of an n x n patch grid per tile, 8 px per patch."""
    rng = np.random.default_rng(seed)
    rows = []
    for q in questions:
        for m in METHODS:
            for start, stop in windows:
                for tile in tiles:
                    for r in range(n):
                        for c in range(n):
                            value = rng.uniform(0, 0.2) if m == "attention" else rng.normal(-10 * (r == c), 2)
                            rows.append(dict(
                                question_id=q, method=m, target="Question", window_start=start, window_stop=stop,
                                step=0, token_id=7, group=f"tile {tile} r{r} c{c}", tile=tile, row=r, col=c, rows=1,
                                cols=1, n_patches=1, x0=8.0 * c, y0=8.0 * r, x1=8.0 * c + 8, y1=8.0 * r + 8,
                                value=value))
    return pd.DataFrame(rows, columns=["question_id", *MAP_COLUMNS])


def heatmaps(fig):
    return [t for t in fig.data if t.type == "heatmap"]


def test_map_figure_has_a_slider_over_windows_a_menu_over_methods_and_a_subplot_per_tile():
    table = synthetic(tiles=(0, 1, 2))
    fig = map_plots.map_figure(table)
    assert [s.label for s in fig.layout.sliders[0].steps] == ["0-1", "2-3", "4-5"]
    assert [f.name for f in fig.frames] == ["0-1", "2-3", "4-5"]
    assert [b.label for b in fig.layout.updatemenus[0].buttons] == list(METHODS)
    maps = heatmaps(fig)
    assert len(maps) == 3 * 3  # method x tile
    assert len({t.xaxis for t in maps}) == 3  # one subplot per tile
    assert [t.visible for t in maps] == [True] * 3 + [False] * 6  # knockout first
    # a button shows its method's traces only
    attention = fig.layout.updatemenus[0].buttons[1].args[0]["visible"]
    assert attention == [False] * 3 + [True] * 3 + [False] * 3
    # diverging around 0 for knockout and gradient (one range over all windows), sequential for attention
    ko, att = maps[0], maps[3]
    assert ko.zmin == -ko.zmax and ko.zmax == pytest.approx(table.loc[table.method == "knockout", "value"].abs().max())
    assert att.zmin == 0 and att.colorscale != ko.colorscale
    # a frame carries every method's map of its window; the values are the table's
    frame = fig.frames[1]
    assert len(frame.data) == 9 and list(frame.traces) == list(range(9))
    cell = table[(table.method == "knockout") & (table.window_start == 2) & (table.tile == 0) & (table.row == 1)
                 & (table.col == 3)].value.iloc[0]
    assert frame.data[0].z[1][3] == pytest.approx(cell)
    hover = maps[0].text[1][3]
    first = table[(table.method == "knockout") & (table.window_start == 0) & (table.tile == 0) & (table.row == 1)
                  & (table.col == 3)].value.iloc[0]
    assert "tile 0 r1 c3" in hover and "pixels (24, 8)-(32, 16)" in hover and f"{first:.4g}" in hover


def test_map_figure_over_the_image_places_the_heatmap_by_pixel_boxes(make_image):
    table = synthetic(n=4)
    image = make_image(32, 32, seed=1)
    fig = map_plots.map_figure(table, image=image)
    assert [t.type for t in fig.data][:1] == ["image"]
    maps = heatmaps(fig)
    assert len(maps) == 3 and all(t.opacity < 1 for t in maps)
    assert list(maps[0].x) == [-0.5 + 8 * i for i in range(5)]  # pixel edges of the 4 columns
    assert list(fig.frames[0].traces) == [1, 2, 3]  # the image stays under the maps
    with pytest.raises(MMLensError, match="pixel boxes reach"):
        map_plots.map_figure(table, image=make_image(16, 16))


def test_map_figure_picks_the_sample_and_step_and_names_what_is_missing():
    table = pd.concat([synthetic(questions=("a",)), synthetic(questions=("b",), seed=1)], ignore_index=True)
    fig = map_plots.map_figure(table, question_id="b")
    assert "question b" in fig.layout.title.text
    want = table[(table.question_id == "b") & (table.method == "knockout") & (table.window_start == 0)
                 & (table.row == 0) & (table.col == 0)].value.iloc[0]
    assert heatmaps(fig)[0].z[0][0] == pytest.approx(want)
    with pytest.raises(MMLensError, match="question_id 'zz'"):
        map_plots.map_figure(table, question_id="zz")
    with pytest.raises(MMLensError, match="step 3"):
        map_plots.map_figure(table, step=3)
    for fn in (map_plots.map_figure, map_plots.maps_side_by_side, map_plots.maps_figure, map_plots.maps_curves):
        with pytest.raises(MMLensError, match="value"):
            fn(table.drop(columns="value"))
    with pytest.raises(MMLensError, match="x0"):
        map_plots.map_figure(table.drop(columns="x0"), image=np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(MMLensError, match="spearman"):
        map_plots.agreement_figure(map_agreement(table).drop(columns="spearman"))


def test_side_by_side_shows_the_three_methods_of_one_window():
    table = synthetic(tiles=(0, 1))
    fig = map_plots.maps_side_by_side(table, window=range(2, 4))
    maps = heatmaps(fig)
    assert len(maps) == 6 and len({t.xaxis for t in maps}) == 6  # method x tile panels
    assert [t.name for t in maps[::2]] == [f"{m}, tile 0" for m in METHODS]
    want = table[(table.method == "gradient") & (table.window_start == 2) & (table.tile == 1) & (table.row == 2)
                 & (table.col == 0)].value.iloc[0]
    assert maps[5].z[2][0] == pytest.approx(want)
    assert "layers 2-3" in fig.layout.title.text
    with pytest.raises(MMLensError, match="window"):
        map_plots.maps_side_by_side(table, window=(1, 3))


def test_agreement_figure_and_the_run_figure():
    table = pd.concat([synthetic(questions=(q,), seed=i) for i, q in enumerate("abcd")], ignore_index=True)
    agreement = map_agreement(table, k=4)
    fig = map_plots.agreement_figure(agreement)
    boxes = [t for t in fig.data if t.type == "box"]
    assert len(boxes) == 4  # (attention, gradient) x (Spearman, top-k)
    assert {t.name for t in boxes} == {"attention", "gradient"}
    assert all(len(t.y) == 4 * len(WINDOWS) for t in boxes)  # a point per sample and window
    # the run's figure: the mean knockout map over samples, then the agreement panels
    run = MAPS.figure(table)
    maps = heatmaps(run)
    assert len(maps) == 1
    mean = table[(table.method == "knockout") & (table.row == 2) & (table.col == 3)].value.mean()
    assert maps[0].z[2][3] == pytest.approx(mean)
    assert "mean of 12 maps" in maps[0].text[2][3]
    assert len([t for t in run.data if t.type == "box"]) == 4
    assert MAPS.draw(table, level=0.95, title="t").layout.title.text.startswith("t")
    # without cheap maps: the mean map only
    alone = map_plots.maps_figure(table[table.method == "knockout"])
    assert [t.type for t in alone.data] == ["heatmap"]
    with pytest.raises(MMLensError, match="empty"):
        map_plots.agreement_figure(agreement.iloc[:0])


def test_report_draws_a_maps_section_with_the_agreement(tmp_path):
    table = pd.concat([synthetic(questions=(q,), seed=i) for i, q in enumerate("abc")], ignore_index=True)
    table.to_csv(tmp_path / "maps.csv", index=False)
    figures = {f.key: f for f in report_figures(tmp_path)}
    assert list(figures) == ["maps"]
    summary = maps_agreement_summary(table)
    assert list(summary.method) == ["attention", "gradient"] and list(summary.n) == [9, 9]
    want = map_agreement(table).groupby("method").spearman.mean()
    assert summary.set_index("method").spearman.to_dict() == pytest.approx(want.to_dict())
    caption = figures["maps"].caption
    assert f"attention mean Spearman {want['attention']:.2f}" in caption and "top-10 overlap" in caption


@pytest.fixture(params=["tiny_llava", "tiny_llava_next"])
def model(request):
    return request.getfixturevalue(request.param)


def test_figures_of_a_real_patch_map(model, make_image):
    image = make_image(56, 40, seed=5)
    inp = prepare(model, image, "Is the square red or blue?")
    table = patch_map(model, inp, "Question", layers=[range(0, 2), range(1, 3)], group=1, method=list(METHODS))
    tiles = sorted(table.tile.unique())
    if model.model_type == "llava_next":
        assert len(tiles) > 1
    fig = map_plots.map_figure(table)
    assert len(fig.layout.sliders[0].steps) == 2 and len(fig.layout.updatemenus[0].buttons) == 3
    assert len({t.xaxis for t in heatmaps(fig)}) == len(tiles)
    over = map_plots.map_figure(table, image=image)
    assert sum(t.type == "image" for t in over.data) == len(tiles)
    for t in heatmaps(over):
        assert -0.5 <= min(t.x) and max(t.x) <= 56 - 0.5 and max(t.y) <= 40 - 0.5
    side = map_plots.maps_side_by_side(table, window=range(1, 3))
    assert len(heatmaps(side)) == 3 * len(tiles)
    run = map_plots.maps_figure(table.assign(question_id="q"))
    assert heatmaps(run) and [t for t in run.data if t.type == "box"]
    # box groups: one cell per box, placed over its patches
    box = Box(8, 4, 24, 20, "square")
    boxed = patch_map(model, prepare(model, image, "Is the square red or blue?", boxes=[box]), "Question",
                      layers=range(0, 2), group="box", boxes=[box], image=image, method=list(METHODS))
    fig = map_plots.map_figure(boxed, image=image)
    assert any("square" in str(cell) for t in heatmaps(fig) for row in t.text for cell in row)
