"""The HTML report: which figures a results folder yields, readings, offline page, CLI."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from plotly.offline import get_plotlyjs

from mm_lens.cli import main
from mm_lens.errors import MMLensError
from mm_lens.report import build_report, load_results, report_figures


def write_tables(folder, seed=0, n_samples=3, n_layers=4, attention=True, task=None):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    flow, lens, att = [], [], []
    for q in range(n_samples):
        for layer in range(n_layers):
            for block in ("Image->Question", "Last->Last"):
                flow.append(dict(question_id=f"q{q}", block=block, layer=layer, base_prob=0.5, knockout_prob=0.4,
                                 relative_change_pct=float(rng.normal(-5, 3))))
            for form in ("answer_lower", "answer_capitalized"):
                lens.append(dict(question_id=f"q{q}", layer=layer, form=form, prob=float(rng.uniform())))
            for target in ("Question", "Last"):
                for source, m in zip(("Image", "Question", "Rest"), rng.dirichlet([1, 1, 1]), strict=False):
                    att.append(dict(question_id=f"q{q}", layer=layer, target=target, source=source, mass=m))
    frames = {"flow": pd.DataFrame(flow), "lens": pd.DataFrame(lens), "attention": pd.DataFrame(att)}
    for kind, df in frames.items():
        if kind == "attention" and not attention:
            continue
        if task is not None:
            df = df.assign(task=task)
        df.to_csv(folder / f"{kind}.csv", index=False)
    return frames


def test_figures_of_a_folder_with_task_subfolders(tmp_path):
    for i, task in enumerate(("ChooseAttr", "QueryAttr")):
        write_tables(tmp_path / task, seed=i, attention=task == "ChooseAttr")
    keys = [f.key for f in report_figures(tmp_path)]
    assert keys == ["flow", "flow_tasks", "flow/ChooseAttr", "flow/QueryAttr",
                    "lens", "lens_tasks", "lens/ChooseAttr", "lens/QueryAttr",
                    "attention/ChooseAttr"]
    figs = {f.key: f for f in report_figures(tmp_path)}
    assert figs["flow"].title == "Attention knockout: all tasks" and "pooled" in figs["flow"].caption
    assert "6 samples" in figs["flow"].caption  # q0..q2 of two tasks are six distinct samples
    assert "3 samples" in figs["flow/QueryAttr"].caption and "95%" in figs["flow/QueryAttr"].caption


def test_top_level_table_wins_and_a_task_column_splits_it(tmp_path):
    parts = [write_tables(tmp_path / "x", seed=s, attention=False)["flow"].assign(task=t)
             for s, t in enumerate(("A", "B"))]
    pd.concat(parts).to_csv(tmp_path / "flow.csv", index=False)
    (tmp_path / "x" / "flow.csv").unlink()
    (tmp_path / "x" / "lens.csv").unlink()
    keys = [f.key for f in report_figures(tmp_path)]
    assert keys == ["flow", "flow_tasks", "flow/A", "flow/B"]
    assert report_figures(tmp_path)[0].title == "Attention knockout"


def test_build_report_is_one_offline_page(tmp_path):
    write_tables(tmp_path / "ChooseAttr", seed=0)
    write_tables(tmp_path / "ChooseCat", seed=1)
    readings = {"flow_tasks": "Image->Question <matters> early.", "intro": "A toy run.", "flow/Nope": "kept"}
    out = build_report(tmp_path, readings=readings)
    assert out == tmp_path / "report.html"
    page = out.read_text()
    plotly_js = get_plotlyjs()
    assert page.count(plotly_js[:200]) == 1  # plotly.js inlined once, not per figure
    assert not re.search(r"<script[^>]+src=", page) and "<link" not in page  # nothing fetched
    n_figures = len(report_figures(tmp_path))
    assert page.count("Plotly.newPlot(") == n_figures == page.count('class="mm-plot"')
    # the reading sits in its figure, escaped; the intro opens the page; unknown keys are kept at the end
    figure = re.search(r'<figure[^>]*data-key="flow_tasks".*?</figure>', page, re.S).group(0)
    assert "Image-&gt;Question &lt;matters&gt; early." in figure
    assert page.index("A toy run.") < page.index("<figure")
    further = page[page.index("Further notes"):]
    assert "flow/Nope" in further and "kept" in further
    assert 'data-js-errors' in page and "data-figures-drawn" in page
    other = build_report(tmp_path, out_path=tmp_path / "sub" / "r.html", title="My run")
    assert other.is_file() and "<title>My run</title>" in other.read_text()


def test_empty_tables_shard_folders_and_skip_lists(tmp_path):
    write_tables(tmp_path, seed=0)
    pd.DataFrame(columns=["question_id", "block", "layer", "relative_change_pct"]).to_csv(
        tmp_path / "flow.csv", index=False
    )
    write_tables(tmp_path / "shard-0-of-2", seed=1)  # part of a run, not a task
    pd.DataFrame([dict(question_id="q9", kind="wrong answer", reason="said blue")] * 2).to_csv(
        tmp_path / "lens.skips.csv", index=False
    )
    results = load_results(tmp_path)
    assert "shard-0-of-2" not in results.tables["lens"] and "" not in results.tables["flow"]
    assert any("flow.csv has no rows" in n for n in results.notes)
    assert [f.key for f in report_figures(tmp_path)] == ["lens", "attention"]
    page = build_report(tmp_path).read_text()
    assert "flow.csv has no rows" in page and "+2 skipped: wrong answer 2" in page


def test_report_errors_name_the_input(tmp_path):
    with pytest.raises(MMLensError, match="does not exist"):
        build_report(tmp_path / "missing")
    with pytest.raises(MMLensError, match="no flow.csv"):
        build_report(tmp_path)
    pd.DataFrame({"layer": [0], "prob": [0.5]}).to_csv(tmp_path / "lens.csv", index=False)
    with pytest.raises(MMLensError, match=r"lens.csv.*lacks column\(s\) form"):
        build_report(tmp_path)


def test_cli_report(tmp_path, capsys):
    write_tables(tmp_path / "run")
    assert main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").is_file() and "wrote" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "mm-lens: error: results folder" in capsys.readouterr().err
