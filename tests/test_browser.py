"""End to end in a real browser: a report renders offline in headless Chromium, every figure draws, no JS error.

Chromium is Debian's ``chromium`` package. When it is not on PATH the session fixture installs it with apt-get
(``apt-get update && apt-get install -y chromium``) if the tests run as root, as CI does; otherwise the tests
skip with the reason. Network is cut off for the page (``--host-resolver-rules``), so a report that fetched
anything (a CDN plotly.js, fonts) would fail to draw.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mm_lens import plots
from mm_lens.report import ReportFigure, build_report, render_html, report_figures

BROWSERS = ("chromium", "chromium-browser")
INSTALL_TIMEOUT = 1200  # seconds: apt-get update + ~100 MB of packages


def _which() -> str | None:
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path of the chromium binary, installed from Debian's registry on first use when running as root."""
    found = _which()
    if found:
        return found
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("chromium is not installed and the tests do not run as root to apt-get install it; "
                    "install Debian's `chromium` package")
    if not shutil.which("apt-get"):
        pytest.skip("chromium is not installed and apt-get is not available to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        done = subprocess.run(
            ["sh", "-c", "apt-get update -q && apt-get install -y -q --no-install-recommends chromium"],
            env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        pytest.skip(f"apt-get install chromium took over {INSTALL_TIMEOUT} s")
    found = _which()
    if done.returncode != 0 or not found:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        pytest.skip(f"apt-get install chromium failed (exit {done.returncode}): {' / '.join(tail)}")
    return found


def run_chromium(binary: str, page: Path, profile: Path, *args: str, timeout: int = 600) -> str:
    """Headless Chromium on a local page, offline, with a fresh profile; returns stdout. (A few seconds on an
    idle machine; the generous timeout is for a CPU shared with training jobs.)"""
    cmd = [
        binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-extensions",
        "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}",
        "--host-resolver-rules=MAP * ~NOTFOUND",  # no network: the page must be self-contained
        "--virtual-time-budget=20000",  # run scripts (and the load event) before dumping / capturing
        *args, page.resolve().as_uri(),
    ]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"chromium did not finish within {timeout} s: {(err.stderr or b'')[-1500:]!r}")
    assert done.returncode == 0, f"chromium exit {done.returncode}: {done.stderr[-2000:]}"
    assert "<html" in done.stdout or "--screenshot" in " ".join(args), f"no DOM dumped: {done.stderr[-2000:]}"
    return done.stdout


class DomSummary(HTMLParser):
    """Per `.mm-plot` container of a dumped DOM: how many `.main-svg` and drawn trace elements it holds."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self):
        super().__init__()
        self.html_attrs: dict[str, str] = {}
        self.plots: list[dict] = []
        self._stack: list[tuple[str, dict | None]] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = set((attrs.get("class") or "").split())
        if tag == "html":
            self.html_attrs = {k: v or "" for k, v in attrs.items()}
        current = next((p for _, p in reversed(self._stack) if p is not None), None)
        if "mm-plot" in classes:
            current = {"main_svg": 0, "traces": 0}
            self.plots.append(current)
            mine = current
        else:
            mine = None
        if current is not None:
            if tag == "svg" and "main-svg" in classes:
                current["main_svg"] += 1
            # scatter / heatmap / image traces as plotly draws them
            if "trace" in classes or ("hm" in classes) or (tag == "image" and current["main_svg"]):
                current["traces"] += 1
        if tag not in self.VOID and not tag.endswith("/"):
            self._stack.append((tag, mine))

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in self.VOID:
            self._stack.pop()

    def handle_endtag(self, tag):
        for i in range(len(self._stack) - 1, -1, -1):
            if self._stack[i][0] == tag:
                del self._stack[i:]
                break


def summarise(dom: str) -> DomSummary:
    parser = DomSummary()
    parser.feed(dom)
    return parser


def hex_rgb(color: str) -> tuple[int, int, int]:
    h = color.lstrip("#")
    return tuple(int(h[i : i + 2], 16) for i in (0, 2, 4))


def write_results(folder: Path) -> None:
    rng = np.random.default_rng(0)
    for task in ("ChooseAttr", "ChooseRel"):
        (folder / task).mkdir(parents=True)
        flow, lens, att = [], [], []
        for q in range(4):
            for layer in range(6):
                for block in ("Image->Question", "Image->Last", "Question->Last", "Last->Last"):
                    dip = -40.0 if block == "Image->Question" and layer < 3 else 0.0
                    flow.append(dict(question_id=f"q{q}", block=block, layer=layer, base_prob=0.6,
                                     knockout_prob=0.5, relative_change_pct=dip + rng.normal(0, 5)))
                for form, base in (("answer_lower", 0.8), ("answer_capitalized", 0.3), ("false_option_lower", 0.1)):
                    lens.append(dict(question_id=f"q{q}", layer=layer, form=form,
                                     prob=float(np.clip(base * layer / 5 + rng.normal(0, 0.05), 0, 1))))
                for target in ("Question", "Last"):
                    for source, m in zip(("Image", "Question", "Rest"), rng.dirichlet([2, 1, 1]), strict=False):
                        att.append(dict(question_id=f"q{q}", layer=layer, target=target, source=source, mass=m))
        pd.DataFrame(flow).to_csv(folder / task / "flow.csv", index=False)
        pd.DataFrame(lens).to_csv(folder / task / "lens.csv", index=False)
        pd.DataFrame(att).to_csv(folder / task / "attention.csv", index=False)


def test_report_draws_every_figure_offline_without_js_errors(chromium, tmp_path):
    results = tmp_path / "results"
    write_results(results)
    page = build_report(results, readings={"flow_tasks": "Image->Question matters in the early layers."})
    n_figures = len(report_figures(results))
    assert n_figures == 11  # flow, lens: pooled + per task panel + 2 tasks; attention: pooled + 2 tasks

    dom = run_chromium(chromium, page, tmp_path / "profile", "--dump-dom")
    found = summarise(dom)
    assert found.html_attrs, f"no <html> element in the dumped DOM: {dom[:500]!r}"
    assert found.html_attrs.get("data-js-errors") == "", found.html_attrs.get("data-js-errors")
    assert found.html_attrs.get("data-figures-total") == str(n_figures)
    assert found.html_attrs.get("data-figures-drawn") == str(n_figures)
    assert len(found.plots) == n_figures
    for i, plot in enumerate(found.plots):
        assert plot["main_svg"] >= 1 and plot["traces"] >= 1, (i, plot)

    shot = tmp_path / "report.png"
    run_chromium(chromium, page, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1200,2400")
    image = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert image.shape[:2] == (2400, 1200)
    # the main figure's blue Image->Question line and its band are on the page, not a blank canvas
    blue = np.abs(image - np.array(hex_rgb(plots.BLOCK_STYLES["Image->Question"]["color"]))).sum(-1) < 40
    assert blue.sum() > 500, blue.sum()
    assert image.std() > 10


def test_patch_figure_draws_and_errors_are_recorded(chromium, tmp_path):
    pixels = np.zeros((32, 32, 3), np.uint8)
    pixels[8:24, 8:24] = (220, 40, 40)
    table = pd.DataFrame([
        dict(position=3 + 4 * r + c, tile=0, row=r, col=c, x0=8 * c, y0=8 * r, x1=8 * c + 8, y1=8 * r + 8,
             value=float(r * 4 + c))
        for r in range(4) for c in range(4)
    ])
    fig = plots.patch_values_figure(Image.fromarray(pixels), table, value_name="attention")
    html = render_html([ReportFigure("patches", "Patches", "Attention from Last per patch.", fig)], title="Patches")
    good = tmp_path / "good.html"
    good.write_text(html)
    found = summarise(run_chromium(chromium, good, tmp_path / "p1", "--dump-dom"))
    assert found.html_attrs.get("data-js-errors") == ""
    assert found.html_attrs.get("data-figures-drawn") == "1" and found.plots[0]["traces"] >= 2  # image + heatmap

    # the error recorder works: a page whose script throws says so in the DOM
    bad = tmp_path / "bad.html"
    bad.write_text(html.replace("</body>", "<script>notAFunction();</script></body>"))
    found = summarise(run_chromium(chromium, bad, tmp_path / "p2", "--dump-dom"))
    assert "notAFunction" in found.html_attrs.get("data-js-errors", "")


def write_config(folder: Path, command: str, n_samples: int) -> None:
    """A run configuration with the keys `mm_lens.run_dir.run_config` records (what the report's header reads)."""
    import json

    config = dict(command=command, dataset=f"/data/{folder.name}.jsonl", n_samples=n_samples, model="toy-llava",
                  dtype="float32", protocol="study", mm_lens_version="0.1.0",
                  versions=dict(mm_lens="0.1.0", torch="2.13.0", transformers="5.25.0", transformer_lens="4.3.0"))
    if command == "flow":
        config.update(window=3, engine="mask")
    (folder / f"{command}.config.json").write_text(json.dumps(config))


def test_screenshot_figures_tell_blocks_and_lens_forms_apart(chromium, tmp_path):
    """A screenshot of the report (kept under tmp_path as report-1400x2000.png) shows the header and every
    study block in its own colour; on the figure objects, each block and each lens form has its own (colour,
    dash) and marker, flat curves do not sit on top of each other, and a block looks the same in every figure."""
    results = tmp_path / "results"
    write_results(results)
    # a flat block (no effect anywhere) next to the others: still visible
    for task in ("ChooseAttr", "ChooseRel"):
        flow = pd.read_csv(results / task / "flow.csv")
        flow.loc[flow.block == "Last->Last", "relative_change_pct"] = 0.0
        flow.to_csv(results / task / "flow.csv", index=False)
        write_config(results / task, "flow", 4)
        write_config(results / task, "lens", 4)
    page = build_report(results)
    figures = {f.key: f.figure for f in report_figures(results)}

    def lines(fig):
        return [t for t in fig.data if t.showlegend is not False and "(interval)" not in (t.name or "")]

    for key in ("flow", "lens", "flow/ChooseAttr", "lens/ChooseRel"):
        drawn = lines(figures[key])
        looks = [(t.line.color, t.line.dash) for t in drawn]
        assert len(drawn) >= 3 and len(set(looks)) == len(looks), (key, looks)
        assert len({t.line.color for t in drawn}) == len(drawn), key  # colour alone tells them apart too
        assert len({t.marker.symbol for t in drawn}) == len(drawn), key
        xs = [np.asarray(t.x, float) for t in drawn]
        assert all(not np.allclose(a, b) for i, a in enumerate(xs) for b in xs[i + 1:]), key
    # the same block is drawn the same way in the pooled figure, a task's figure and the per-task panels
    seen: dict[str, set] = {}
    for key in ("flow", "flow_tasks", "flow/ChooseAttr", "flow/ChooseRel"):
        for t in figures[key].data:
            if "(interval)" not in t.name:
                seen.setdefault(t.name, set()).add((t.line.color, t.line.dash, t.marker.symbol))
    assert set(seen) == {"Image->Question", "Image->Last", "Question->Last", "Last->Last"}
    assert all(len(v) == 1 for v in seen.values()), seen
    for key in ("flow", "flow_tasks"):  # the zero line lies under the curves, not over a flat one
        assert figures[key].layout.shapes and all(s.layer == "below" for s in figures[key].layout.shapes)
    lens = {t.name: t for t in lines(figures["lens"])}
    lower, upper = lens["answer (lower case)"], lens["Answer (capitalised)"]
    assert lower.line.color != upper.line.color and lower.line.dash != upper.line.dash

    shot = tmp_path / "report-1400x2000.png"
    run_chromium(chromium, page, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1400,2000")
    image = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert image.shape[:2] == (2000, 1400)
    for block in ("Image->Question", "Image->Last", "Question->Last", "Last->Last"):
        near = np.abs(image - np.array(hex_rgb(plots.BLOCK_STYLES[block]["color"]))).sum(-1) < 30
        assert near.sum() > 150, (block, int(near.sum()))
    # the flat Last->Last line is drawn over the zero line, not hidden under it (about 3000 of its purple pixels
    # on this page; about 1900, legends and markers only, when the zero line covered it)
    purple = np.abs(image - np.array(hex_rgb(plots.BLOCK_STYLES["Last->Last"]["color"]))).sum(-1) < 30
    assert purple.sum() > 2400, int(purple.sum())
    dom = run_chromium(chromium, page, tmp_path / "profile-dom", "--dump-dom")
    assert "<th>transformer_lens</th><td>4.3.0</td>" in dom and "<th>window</th><td>3</td>" in dom


def test_maps_report_and_map_figure_draw_without_js_errors(chromium, tmp_path):
    """A run folder with only ``maps.csv`` gets its patch-maps section drawn; one sample's map over the image
    (slider over windows, menu over methods, a subplot per tile) draws too, and its slider and menu are there."""
    from mm_lens import map_plots
    from test_map_plots import synthetic

    results = tmp_path / "results"
    results.mkdir()
    table = pd.concat([synthetic(tiles=(0, 1), questions=(q,), seed=i) for i, q in enumerate("abc")])
    table.to_csv(results / "maps.csv", index=False)
    page = build_report(results)
    assert [f.key for f in report_figures(results)] == ["maps"]
    found = summarise(run_chromium(chromium, page, tmp_path / "p1", "--dump-dom"))
    assert found.html_attrs.get("data-js-errors") == "", found.html_attrs.get("data-js-errors")
    assert found.html_attrs.get("data-figures-drawn") == "1" and found.plots[0]["traces"] >= 2

    pixels = np.zeros((32, 32, 3), np.uint8)
    pixels[8:24, 8:24] = (220, 40, 40)
    figures = [
        ReportFigure("map", "Map", "One sample over the image.",
                     map_plots.map_figure(table, image=Image.fromarray(pixels), question_id="b")),
        ReportFigure("side", "Side by side", "Three methods.", map_plots.maps_side_by_side(table)),
    ]
    html = tmp_path / "maps.html"
    html.write_text(render_html(figures, title="Maps"))
    dom = run_chromium(chromium, html, tmp_path / "p2", "--dump-dom")
    found = summarise(dom)
    assert found.html_attrs.get("data-js-errors") == "", found.html_attrs.get("data-js-errors")
    assert found.html_attrs.get("data-figures-drawn") == "2"
    assert all(p["traces"] >= 2 for p in found.plots), found.plots
    assert 'class="slider-container"' in dom or "slider-group" in dom  # the window slider drew
    assert "updatemenu-button" in dom or "updatemenu-header" in dom  # the method menu drew
