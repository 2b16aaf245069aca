"""`mm-lens demo` end to end on the shipped toy model (a few questions per task), and its readings."""

from __future__ import annotations

import json

import pandas as pd

from mm_lens.cli import main
from mm_lens.demo import DEMO_BLOCKS, demo_window, flow_readings, lens_reading
from mm_lens.toy.world import TASKS


def test_demo_writes_tables_and_report(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--per-task", "3"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["tasks"]) == set(TASKS)
    assert summary["window"] == demo_window(summary["n_layers"])
    for task in TASKS:
        flow = pd.read_csv(out / task / "flow.csv")
        lens = pd.read_csv(out / task / "lens.csv")
        assert set(lens["form"]) >= {"answer_lower", "answer_capitalized"}
        if summary["tasks"][task]["analysed"]:
            assert set(flow["block"]) == set(DEMO_BLOCKS)
            assert sorted(flow["layer"].unique()) == list(range(summary["n_layers"]))
    page = (out / "report.html").read_text()
    assert "Attention knockout" in page and "Answer logit lens" in page
    assert summary["readings"]["lens"] in page
    # Re-running resumes: nothing is recomputed, the tables stay the same.
    before = (out / "ChooseAttr" / "flow.csv").read_text()
    assert main(["demo", "--out", str(out), "--per-task", "3"]) == 0
    assert (out / "ChooseAttr" / "flow.csv").read_text() == before


def test_readings_are_computed_from_the_table():
    rows = [{"block": "Image->Question", "layer": layer, "relative_change_pct": pct}
            for layer, pct in enumerate([-5.0, -60.0, -10.0, 0.0])]
    text = flow_readings(pd.DataFrame(rows), n_layers=4, k=2)["Image->Question"]
    assert "-60.0%" in text and "layers 0-1" in text and "centred on layer 1" in text
    flat = flow_readings(pd.DataFrame([{**r, "relative_change_pct": 1.0} for r in rows]), 4, 2)
    assert "no layer window" in flat["Image->Question"]
    lens = pd.DataFrame([
        {"layer": layer, "form": f, "prob": p}
        for layer, (lo, up) in enumerate([(0.1, 0.2), (0.2, 0.9)])
        for f, p in (("answer_lower", lo), ("answer_capitalized", up))
    ])
    text = lens_reading(lens)
    assert "answer capitalized peaks at layer 1 (p = 0.90) and first exceeds 0.5 at layer 1" in text
    assert "answer lower peaks at layer 1 (p = 0.20) and never exceeds 0.5" in text
