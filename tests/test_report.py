"""The HTML report: which figures a results folder yields, readings, offline page, CLI."""

from __future__ import annotations

import json
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


# ------------------------------------------------------------------------------------------ header


def write_config(folder, command, n_samples=3, versions=True, **options):
    """A run configuration as `mm_lens.run_dir.run_config` writes it (the keys the header reads)."""
    config = dict(
        command=command, format=1, mm_lens_version="0.1.0", dataset=f"/data/gqa/{folder.name}.jsonl",
        dataset_sha256="0" * 64, n_samples=n_samples, model="llava-hf/llava-1.5-7b-hf", dtype="float16",
        protocol="study", template="vicuna", vocab="full", limit=None, shard=None,
    )
    if command == "flow":
        config.update(blocks=["Image->Question", "Last->Last"], window=9, engine="mask", all_samples=False)
    if versions:
        config["versions"] = {"mm_lens": "0.1.0", "torch": "2.13.0", "transformers": "5.25.0",
                              "transformer_lens": "4.3.0"}
    config.update(options)
    (folder / f"{command}.config.json").write_text(json.dumps(config))


def test_header_says_what_produced_the_tables(tmp_path):
    from mm_lens.report import NOT_RECORDED, provenance

    for task, n in (("ChooseAttr", 3), ("ChooseCat", 5)):
        write_tables(tmp_path / task, seed=n)
        write_config(tmp_path / task, "flow", n_samples=n)
        write_config(tmp_path / task, "lens", n_samples=n)
    facts = provenance(tmp_path)
    assert facts["model"] == "llava-hf/llava-1.5-7b-hf" and facts["protocol"] == "study"
    assert facts["window"] == "9" and facts["engine"] == "mask" and facts["dtype"] == "float16"
    assert facts["dataset"] == "ChooseAttr.jsonl (ChooseAttr/flow, ChooseAttr/lens); ChooseCat.jsonl " \
        "(ChooseCat/flow, ChooseCat/lens)"
    assert facts["samples"] == "8"  # 3 + 5 per analysis
    assert (facts["mm-lens"], facts["torch"], facts["transformers"], facts["transformer_lens"]) == (
        "0.1.0", "2.13.0", "5.25.0", "4.3.0")
    page = build_report(tmp_path).read_text()
    header = page[page.index('<section class="provenance">'):page.index("</section>")]
    assert page.index(header) < page.index("<figure")
    for label in ("model", "protocol", "window", "engine", "dtype", "dataset", "samples", "mm-lens", "torch",
                  "transformers", "transformer_lens"):
        assert f"<th>{label}</th>" in header
    assert "llava-hf/llava-1.5-7b-hf" in header and "2.13.0" in header and NOT_RECORDED not in header

    # runs that disagree say which run has which value
    write_config(tmp_path / "ChooseCat", "flow", n_samples=5, window=5)
    assert provenance(tmp_path)["window"] == "9 (ChooseAttr/flow); 5 (ChooseCat/flow)"


def test_header_without_versions_or_configuration_says_not_recorded(tmp_path):
    from mm_lens.report import NOT_RECORDED, provenance

    write_tables(tmp_path, attention=False)
    page = build_report(tmp_path).read_text()
    assert "No run configuration" in page and NOT_RECORDED in page
    assert provenance(tmp_path) == {}

    write_config(tmp_path, "lens", versions=False)  # an older run: no "versions" recorded
    facts = provenance(tmp_path)
    assert facts["torch"] == facts["transformers"] == facts["transformer_lens"] == NOT_RECORDED
    assert facts["mm-lens"] == "0.1.0"  # from mm_lens_version, recorded by every run
    assert facts["window"] == facts["engine"] == "not applicable (no flow run)"
    (tmp_path / "flow.config.json").write_text("{not json")
    results = load_results(tmp_path)
    assert any("flow.config.json could not be read" in n for n in results.notes)
    assert f"<th>torch</th><td>{NOT_RECORDED}</td>" in build_report(tmp_path).read_text()


# ------------------------------------------------------------------------------------------ export


def _kaleido_or_skip():
    import importlib.util
    import shutil

    if importlib.util.find_spec("kaleido") is None:
        pytest.skip("kaleido is not installed (pip install 'mm-lens[export]'), so no figure can be exported")
    if not any(map(shutil.which, ("chromium", "chromium-browser", "google-chrome", "chrome"))):
        pytest.skip("kaleido is installed but no Chrome / Chromium is on PATH for it to drive")


@pytest.mark.parametrize("fmt", ["svg", "pdf"])
def test_export_writes_one_figure_file_per_report_figure(tmp_path, fmt):
    from mm_lens.report import export_figures

    _kaleido_or_skip()
    write_tables(tmp_path / "ChooseAttr", seed=0, attention=False)
    write_tables(tmp_path / "ChooseCat", seed=1, attention=False)
    keys = [f.key for f in report_figures(tmp_path)]
    paths = export_figures(tmp_path, tmp_path / "out", format=fmt)
    assert [p.name for p in paths] == [k.replace("/", "-") + f".{fmt}" for k in keys]
    for key, path in zip(keys, paths, strict=True):
        data = path.read_bytes()
        if fmt == "svg":
            assert data.lstrip().startswith(b"<svg") and b'width="900"' in data  # vector, the publication width
            legend = b"Image-&#62;Question" if key.startswith("flow") else b"answer (lower case)"
            assert legend in data, key
        else:
            assert data.startswith(b"%PDF-") and len(data) > 2000
    if fmt == "pdf":  # the CLI: the figures, then the HTML report
        assert main(["report", str(tmp_path), "--format", "pdf", "--figures-dir", str(tmp_path / "cli")]) == 0
        assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == sorted(p.name for p in paths)
        assert (tmp_path / "report.html").is_file()


def test_export_errors(tmp_path, monkeypatch, capsys):
    import importlib.util

    from mm_lens.report import export_figures

    write_tables(tmp_path, attention=False)
    with pytest.raises(MMLensError, match="not one of svg, pdf, png"):
        export_figures(tmp_path, format="eps")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "kaleido" else real(name, *a))
    with pytest.raises(MMLensError, match=r"needs the optional kaleido package: pip install 'mm-lens\[export\]'"):
        export_figures(tmp_path, format="pdf")
    assert main(["report", str(tmp_path), "--format", "svg"]) == 2
    err = capsys.readouterr().err
    assert "mm-lens[export]" in err and not (tmp_path / "report.html").exists()  # nothing written
