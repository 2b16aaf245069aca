"""A self-contained HTML report of a run: every figure of its result tables, with a caption each.

The report reads ``flow.csv``, ``lens.csv`` and ``attention.csv`` from a results folder and from its
per-task subfolders (``RESULTS_DIR/<Task>/flow.csv``), draws the figures of `mm_lens.plots`, and writes one
HTML file that opens offline: plotly.js is inlined once in the page head, no file or network is fetched.
The page records JavaScript errors in ``<html data-js-errors>`` and, once loaded, how many figures drew in
``data-figures-drawn`` / ``data-figures-total`` (a browser test reads them).

Figure keys (for ``readings``): ``flow``, ``flow_tasks``, ``flow/<Task>``, ``lens``, ``lens_tasks``,
``lens/<Task>``, ``attention``, ``attention/<Task>``; `report_figures` lists those a folder yields. The
reading ``intro`` opens the page. Skip lists written by a run (``flow.skips.csv``) are counted in the
summary table; ``shard-i-of-n`` folders are parts of a run, not tasks, and are left out.
"""

from __future__ import annotations

import datetime as _dt
import html
import re
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from mm_lens.analyses import ANALYSES
from mm_lens.errors import MMLensError

RESULT_FILES = {name: f"{name}.csv" for name in ANALYSES}  # each analysis writes <name>.csv
INTRO = "intro"  # reading shown at the top of the page
_SHARD_DIR = re.compile(r"^shard-\d+-of-\d+$")


@dataclass
class ReportFigure:
    """One figure of the report: its key (for readings), heading, caption and the figure itself."""

    key: str
    title: str
    caption: str
    figure: go.Figure


@dataclass
class Results:
    """The tables of a results folder: ``tables[kind][task]``, task ``""`` for the folder's own files."""

    root: Path
    tables: dict[str, dict[str, pd.DataFrame]]
    notes: list[str]
    skips: dict[str, dict[str, pd.DataFrame]] = field(default_factory=dict)  # kind -> task -> skip list


def _read(path: Path, kind: str) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, dtype={"question_id": str})
    except (OSError, ValueError) as err:
        raise MMLensError(f"cannot read {str(path)!r}: {err}") from err
    need = ANALYSES[kind].required
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise MMLensError(
            f"{str(path)!r} lacks column(s) {', '.join(missing)}; it is not a {kind} table written by mm-lens"
        )
    return df


def load_results(results_dir: str | PathLike) -> Results:
    """Every result table in ``results_dir`` and its direct subfolders (one per task)."""
    root = Path(results_dir).expanduser()
    if not root.is_dir():
        raise MMLensError(f"results folder {str(root)!r} does not exist; pass the --out folder of mm-lens flow/lens")
    tables: dict[str, dict[str, pd.DataFrame]] = {kind: {} for kind in RESULT_FILES}
    notes: list[str] = []
    skips: dict[str, dict[str, pd.DataFrame]] = {kind: {} for kind in RESULT_FILES}
    folders = [("", root)] + [
        (d.name, d) for d in sorted(root.iterdir())
        if d.is_dir() and not d.name.startswith(".") and not _SHARD_DIR.match(d.name)
    ]
    for task, folder in folders:
        for kind, name in RESULT_FILES.items():
            skip_path = folder / f"{kind}.skips.csv"
            if skip_path.is_file():
                try:
                    skips[kind][task] = pd.read_csv(skip_path, dtype=str)
                except (OSError, ValueError):
                    notes.append(f"{skip_path.relative_to(root)} could not be read; skips not counted.")
            path = folder / name
            if not path.is_file():
                continue
            df = _read(path, kind)
            where = f"{task}/{name}" if task else name
            if df.empty:
                notes.append(f"{where} has no rows (no sample kept), so it has no figure.")
                continue
            tables[kind][task] = df
    if not any(tables.values()) and not notes:
        raise MMLensError(
            f"no {', '.join(RESULT_FILES.values())} in {str(root)!r} or its subfolders; "
            "run `mm-lens flow/lens --out DIR` first"
        )
    return Results(root=root, tables=tables, notes=notes, skips=skips)


def _per_task(found: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Task tables: the subfolders', else the top-level table split by its ``task`` column (two tasks or more)."""
    tasks = {t: df for t, df in found.items() if t}
    if not tasks and "" in found and "task" in found[""].columns and found[""]["task"].nunique() > 1:
        tasks = {str(t): df for t, df in found[""].groupby("task", sort=True)}
    return tasks


def _n(df: pd.DataFrame) -> str:
    n = df["question_id"].nunique() if "question_id" in df.columns else None
    return f"{n} sample{'s' if n != 1 else ''}" if n is not None else "the samples"


def _pooled(tasks: dict[str, pd.DataFrame]) -> pd.DataFrame:
    parts = []
    for task, df in tasks.items():
        df = df.copy()
        if "question_id" in df.columns:
            df["question_id"] = task + "/" + df["question_id"].astype(str)
        parts.append(df)
    return pd.concat(parts, ignore_index=True)


def report_figures(results_dir: str | PathLike, level: float = 0.95) -> list[ReportFigure]:
    """The report's figures for a results folder, in page order (keys as in the module docstring)."""
    results = load_results(results_dir)
    return _figures(results, level)


def _figures(results: Results, level: float) -> list[ReportFigure]:
    out: list[ReportFigure] = []
    for kind, analysis in ANALYSES.items():
        heading, caption = analysis.title, analysis.caption
        found = results.tables[kind]
        tasks = _per_task(found)
        main = found.get("")
        main_note = ""
        if main is None and len(tasks) > 1:
            main, main_note = _pooled(tasks), f" All {len(tasks)} tasks pooled."
        if main is not None:
            title = f"{heading}: all tasks" if main_note else heading
            fig = analysis.draw(main, level=level, title=title)
            out.append(ReportFigure(kind, title, caption.format(n=_n(main), level=level) + main_note, fig))
        if analysis.tasks_figure is not None and len(tasks) > 1:
            title = f"{heading} per task"
            n_all = sum(df["question_id"].nunique() for df in tasks.values() if "question_id" in df.columns)
            cap = caption.format(n=f"the samples of each task ({n_all} in all)", level=level)
            out.append(ReportFigure(f"{kind}_tasks", title, "One panel per task. " + cap,
                                    analysis.tasks_figure(tasks, level=level, title=title)))
        for task, df in tasks.items():
            title = f"{heading}: {task}"
            fig = analysis.draw(df, level=level, title=title)
            out.append(ReportFigure(f"{kind}/{task}", title, caption.format(n=_n(df), level=level), fig))
    return out


_HEAD_SCRIPT = """
(function () {
  var errors = [];
  function record(msg) {
    errors.push(String(msg));
    document.documentElement.setAttribute('data-js-errors', errors.join(' | '));
  }
  document.documentElement.setAttribute('data-js-errors', '');
  window.addEventListener('error', function (e) { record(e.message || 'error'); });
  window.addEventListener('unhandledrejection', function (e) {
    record('unhandled rejection: ' + ((e.reason && e.reason.message) || e.reason));
  });
})();
"""

_TAIL_SCRIPT = """
(function () {
  // count the figures that drew; plotly may finish some asynchronously, so look again for a few seconds
  var tries = 0;
  function count() {
    var plots = document.querySelectorAll('.mm-plot');
    var drawn = 0;
    plots.forEach(function (p) { if (p.querySelector('.main-svg .plot, .main-svg .draglayer')) drawn++; });
    document.documentElement.setAttribute('data-figures-total', String(plots.length));
    document.documentElement.setAttribute('data-figures-drawn', String(drawn));
    if (drawn < plots.length && ++tries < 50) setTimeout(count, 200);
  }
  window.addEventListener('load', count);
})();
"""

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; color: #222;
       background: #fafafa; }
main { max-width: 1100px; margin: 0 auto; padding: 1.5rem 1.5rem 4rem; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; }
.meta { color: #666; font-size: 0.9rem; }
figure.mm-figure { background: #fff; border: 1px solid #e3e3e3; border-radius: 6px; margin: 1.5rem 0;
                   padding: 0.8rem 1rem; }
figure.mm-figure h2 { font-size: 1.15rem; margin: 0.2rem 0 0.4rem; }
figcaption { font-size: 0.92rem; color: #444; line-height: 1.45; }
.reading { border-left: 3px solid #1f77b4; padding: 0.1rem 0 0.1rem 0.8rem; margin-top: 0.6rem; color: #222; }
table.summary { border-collapse: collapse; font-size: 0.9rem; margin: 0.8rem 0; }
table.summary th, table.summary td { border: 1px solid #ddd; padding: 0.25rem 0.7rem; text-align: right; }
table.summary th:first-child, table.summary td:first-child { text-align: left; }
.notes { font-size: 0.9rem; color: #8a5a00; }
.skipped { color: #888; font-size: 0.85rem; }
.intro { max-width: 900px; line-height: 1.5; }
nav { display: flex; flex-wrap: wrap; gap: 0.3rem 0.9rem; font-size: 0.9rem; }
"""


def _paragraphs(text: str, cls: str) -> str:
    parts = [p.strip() for p in str(text).split("\n\n") if p.strip()]
    return "".join(f'<p class="{cls}">{html.escape(p)}</p>' for p in parts)


def _summary_table(results: Results) -> str:
    """Samples per table and task; with a run's skip lists, how many were skipped and why."""
    found = {t for f in results.tables.values() for t in f} | {t for f in results.skips.values() for t in f}
    tasks = sorted(found - {""})
    rows = [("all" if not tasks else "(top level)", "")] if "" in found else []
    rows += [(t, t) for t in tasks]
    kinds = [k for k in RESULT_FILES if results.tables[k] or results.skips.get(k)]
    if not rows or not kinds:
        return ""
    head = "".join(f"<th>{k}</th>" for k in kinds)
    body = ""
    for label, task in rows:
        cells = ""
        for kind in kinds:
            df = results.tables[kind].get(task)
            text = str(df["question_id"].nunique()) if df is not None and "question_id" in df else "–"
            skipped = results.skips.get(kind, {}).get(task)
            if skipped is not None and len(skipped):
                why = skipped["kind"].value_counts() if "kind" in skipped else pd.Series({"skipped": len(skipped)})
                detail = ", ".join(f"{k} {v}" for k, v in why.items())
                text += f" <span class=\"skipped\">(+{len(skipped)} skipped: {html.escape(detail)})</span>"
            cells += f"<td>{text}</td>"
        body += f"<tr><td>{html.escape(label)}</td>{cells}</tr>"
    return f'<table class="summary"><tr><th>samples per table</th>{head}</tr>{body}</table>'


def render_html(
    figures: list[ReportFigure],
    title: str,
    readings: dict[str, str] | None = None,
    intro_html: str = "",
    notes: list[str] | None = None,
) -> str:
    """The report page: plotly.js inlined once, then each figure with its heading, caption and reading."""
    from plotly.offline import get_plotlyjs

    readings = dict(readings or {})
    intro = _paragraphs(readings.pop(INTRO), "intro") if INTRO in readings else ""
    keys = {f.key for f in figures}
    sections, nav = [], []
    for i, fig in enumerate(figures):
        anchor = "fig-" + "".join(c if c.isalnum() else "-" for c in fig.key)
        height = fig.figure.layout.height or 470
        div = fig.figure.to_html(
            full_html=False, include_plotlyjs=False, include_mathjax=False, div_id=f"plot-{i}",
            default_width="100%", default_height=f"{height}px",
            config={"responsive": True, "displaylogo": False},
        )
        reading = _paragraphs(readings[fig.key], "reading") if fig.key in readings else ""
        sections.append(
            f'<figure class="mm-figure" id="{anchor}" data-key="{html.escape(fig.key)}">'
            f"<h2>{html.escape(fig.title)}</h2>"
            f'<div class="mm-plot">{div}</div>'
            f"<figcaption>{html.escape(fig.caption)}{reading}</figcaption></figure>"
        )
        nav.append(f'<a href="#{anchor}">{html.escape(fig.key)}</a>')
    extra = [(k, v) for k, v in readings.items() if k not in keys]
    if extra:  # readings for figures this folder does not have: kept, not dropped
        body = "".join(f"<h3>{html.escape(k)}</h3>{_paragraphs(v, 'reading')}" for k, v in extra)
        sections.append(f'<section class="further"><h2>Further notes</h2>{body}</section>')
    notes_html = "".join(f'<p class="notes">{html.escape(n)}</p>' for n in notes or [])
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(title)}</title>\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<style>{_CSS}</style>\n<script>{_HEAD_SCRIPT}</script>\n"
        f'<script type="text/javascript">{get_plotlyjs()}</script>\n</head>\n<body>\n<main>\n'
        f"<h1>{html.escape(title)}</h1>\n<p class=\"meta\">mm-lens report, {stamp}</p>\n"
        f"{intro}{intro_html}{notes_html}<nav>{''.join(nav)}</nav>\n"
        + "\n".join(sections)
        + f"\n</main>\n<script>{_TAIL_SCRIPT}</script>\n</body>\n</html>\n"
    )


def build_report(
    results_dir: str | PathLike,
    out_path: str | PathLike | None = None,
    readings: dict[str, str] | None = None,
    title: str | None = None,
    level: float = 0.95,
) -> Path:
    """Write the HTML report of ``results_dir`` (default ``results_dir/report.html``) and return its path.

    ``readings`` maps a figure key (``"flow"``, ``"flow/ChooseAttr"``, ...; see `report_figures`) to a short
    paragraph shown under that figure's caption; readings for keys the folder has no figure for are kept in
    a closing "Further notes" section.
    """
    results = load_results(results_dir)
    figures = _figures(results, level)
    out = Path(out_path).expanduser() if out_path is not None else results.root / "report.html"
    page = render_html(
        figures,
        title=title or f"mm-lens report: {results.root.resolve().name}",
        readings=readings,
        intro_html=_summary_table(results),
        notes=results.notes,
    )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(page, encoding="utf-8")
    except OSError as err:
        raise MMLensError(f"cannot write the report to {str(out)!r}: {err}") from err
    return out


__all__ = ["RESULT_FILES", "ReportFigure", "Results", "build_report", "load_results", "render_html", "report_figures"]
