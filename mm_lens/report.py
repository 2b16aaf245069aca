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

The page's header says what produced the tables, from each run's configuration (``flow.config.json``, ...;
`mm_lens.run_dir.run_config`): model, protocol, window, engine, dtype, dataset, sample counts and the versions of
mm-lens, torch, transformers and transformer_lens (``"not recorded"`` where a configuration lacks them);
`provenance` returns the same as data.

A ``maps.csv`` (`mm_lens.runs.maps_run`) gets a "Patch maps over the image" section (key ``maps``): the mean
knockout map and the agreement of the cheap maps with it, its caption giving each method's mean Spearman and top-k
overlap (`maps_agreement_summary`, from `mm_lens.maps.map_agreement`).

`export_figures` (``mm-lens report DIR --format svg|pdf|png``) writes each report figure as one publication
figure file; it needs the optional ``kaleido`` package (``pip install 'mm-lens[export]'``) and a Chrome or
Chromium that kaleido can start.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
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
    configs: dict[str, dict[str, dict]] = field(default_factory=dict)  # kind -> task -> the run's config.json


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
    configs: dict[str, dict[str, dict]] = {kind: {} for kind in RESULT_FILES}
    folders = [("", root)] + [
        (d.name, d) for d in sorted(root.iterdir())
        if d.is_dir() and not d.name.startswith(".") and not _SHARD_DIR.match(d.name)
    ]
    for task, folder in folders:
        for kind, name in RESULT_FILES.items():
            config_path = folder / f"{kind}.config.json"
            if config_path.is_file():
                try:
                    config = json.loads(config_path.read_text(encoding="utf-8"))
                except (OSError, ValueError) as err:
                    notes.append(f"{config_path.relative_to(root)} could not be read ({err}); run not described.")
                else:
                    if isinstance(config, dict):
                        configs[kind][task] = config
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
    return Results(root=root, tables=tables, notes=notes, skips=skips, configs=configs)


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


def maps_agreement_summary(df: pd.DataFrame, k: int = 10) -> pd.DataFrame:
    """Per cheap map method of a maps table: how many maps, their mean Spearman correlation with the knockout map
    and mean top-k overlap (`mm_lens.maps.map_agreement`); empty when the table cannot be compared."""
    from mm_lens.maps import MAP_COLUMNS, map_agreement

    columns = ["method", "n", "spearman", "top_k", "top_k_overlap"]
    if any(c not in df.columns for c in MAP_COLUMNS):
        return pd.DataFrame(columns=columns)
    agreement = map_agreement(df, k=k)
    if agreement.empty:
        return pd.DataFrame(columns=columns)
    out = agreement.groupby("method", sort=False).agg(
        n=("spearman", "size"), spearman=("spearman", "mean"), top_k=("top_k", "max"),
        top_k_overlap=("top_k_overlap", "mean"),
    )
    return out.reset_index()[columns]


def _maps_note(df: pd.DataFrame) -> str:
    """The report's sentence on how far the cheap maps agree with the knockout map."""
    summary = maps_agreement_summary(df)
    if summary.empty:
        return " No agreement with knockout: the table lacks a knockout map or a cheap one to compare."
    parts = [
        f"{r.method} mean Spearman {r.spearman:.2f}, mean top-{int(r.top_k)} overlap {r.top_k_overlap:.2f} "
        f"({int(r.n)} map{'s' if r.n != 1 else ''})"
        for r in summary.itertuples()
    ]
    return " Agreement with the knockout map: " + "; ".join(parts) + "."


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
            note = main_note + (_maps_note(main) if kind == "maps" else "")
            out.append(ReportFigure(kind, title, caption.format(n=_n(main), level=level) + note, fig))
        if analysis.tasks_figure is not None and len(tasks) > 1:
            title = f"{heading} per task"
            n_all = sum(df["question_id"].nunique() for df in tasks.values() if "question_id" in df.columns)
            cap = caption.format(n=f"the samples of each task ({n_all} in all)", level=level)
            out.append(ReportFigure(f"{kind}_tasks", title, "One panel per task. " + cap,
                                    analysis.tasks_figure(tasks, level=level, title=title)))
        for task, df in tasks.items():
            title = f"{heading}: {task}"
            fig = analysis.draw(df, level=level, title=title)
            note = _maps_note(df) if kind == "maps" else ""
            out.append(ReportFigure(f"{kind}/{task}", title, caption.format(n=_n(df), level=level) + note, fig))
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
.reading { border-left: 3px solid #0072B2; padding: 0.1rem 0 0.1rem 0.8rem; margin-top: 0.6rem; color: #222; }
table.summary { border-collapse: collapse; font-size: 0.9rem; margin: 0.8rem 0; }
table.summary th, table.summary td { border: 1px solid #ddd; padding: 0.25rem 0.7rem; text-align: right; }
table.summary th:first-child, table.summary td:first-child { text-align: left; }
.notes { font-size: 0.9rem; color: #8a5a00; }
.skipped { color: #888; font-size: 0.85rem; }
.intro { max-width: 900px; line-height: 1.5; }
table.provenance { border-collapse: collapse; font-size: 0.88rem; margin: 0.6rem 0; }
table.provenance caption { text-align: left; color: #666; padding-bottom: 0.2rem; }
table.provenance th { text-align: left; font-weight: 600; padding: 0.15rem 1rem 0.15rem 0; vertical-align: top; }
table.provenance td { padding: 0.15rem 0; font-family: ui-monospace, SFMono-Regular, Menlo, monospace; }
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

NOT_RECORDED = "not recorded"
#: Packages whose versions the header shows: the keys of a run configuration's ``versions``.
VERSION_KEYS = ("mm_lens", "torch", "transformers", "transformer_lens")
_FLOW_ONLY = ("window", "engine")  # options only a flow run has


def _runs(results: Results) -> list[tuple[str, str, dict]]:
    """``(label, kind, config)`` of each run configuration found, label ``<task>/<kind>`` (``<kind>`` at the top)."""
    out = []
    for kind, by_task in results.configs.items():
        for task in sorted(by_task):
            out.append((f"{task}/{kind}" if task else kind, kind, by_task[task]))
    return out


def _versions(config: dict) -> dict[str, str]:
    recorded = config.get("versions")
    recorded = recorded if isinstance(recorded, dict) else {}
    out = {k: str(recorded[k]) if recorded.get(k) else NOT_RECORDED for k in VERSION_KEYS}
    if out["mm_lens"] == NOT_RECORDED and config.get("mm_lens_version"):
        out["mm_lens"] = str(config["mm_lens_version"])
    return out


def _field(config: dict, name: str) -> str:
    if name == "dataset":
        value = config.get("dataset")
        return Path(str(value)).name if value else NOT_RECORDED
    if name.startswith("version:"):
        return _versions(config)[name.removeprefix("version:")]
    value = config.get(name)
    return NOT_RECORDED if value is None or value == "" else str(value)


def _summarise(values: list[tuple[str, str]]) -> str:
    """One value when the runs agree, else each value with the runs that have it."""
    by_value: dict[str, list[str]] = {}
    for label, value in values:
        by_value.setdefault(value, []).append(label)
    if len(by_value) == 1:
        return next(iter(by_value))
    return "; ".join(f"{v} ({', '.join(labels)})" for v, labels in by_value.items())


#: The header's fields: (label, config key); ``version:<package>`` reads ``config["versions"]``.
PROVENANCE_FIELDS = (
    ("model", "model"), ("protocol", "protocol"), ("window", "window"), ("engine", "engine"), ("dtype", "dtype"),
    ("dataset", "dataset"), ("samples", "n_samples"), ("mm-lens", "version:mm_lens"), ("torch", "version:torch"),
    ("transformers", "version:transformers"), ("transformer_lens", "version:transformer_lens"),
)


def provenance(results: Results | str | PathLike) -> dict[str, str]:
    """What produced a results folder, from its runs' configurations: ``{field: value}`` for the fields of
    `PROVENANCE_FIELDS` (model, protocol, window, engine, dtype, dataset, samples, mm-lens, torch, transformers,
    transformer_lens). A value the runs disagree on lists each value with its runs (``"8 (ChooseAttr/flow);
    12 (ChooseRel/flow)"``); ``samples`` is the runs' dataset sizes (after ``--limit``) added up per analysis.
    Window and engine come from flow runs only. Fields no configuration records read `NOT_RECORDED`; a folder
    without any configuration gives ``{}``."""
    if not isinstance(results, Results):
        results = load_results(results)
    runs = _runs(results)
    if not runs:
        return {}
    out: dict[str, str] = {}
    for label, key in PROVENANCE_FIELDS:
        if key == "n_samples":
            totals: dict[str, int] = {}
            for _, kind, config in runs:
                n = config.get("n_samples")
                if isinstance(n, int):
                    totals[kind] = totals.get(kind, 0) + n
            if not totals:
                out[label] = NOT_RECORDED
            elif len(set(totals.values())) == 1:
                out[label] = str(next(iter(totals.values())))
            else:
                out[label] = "; ".join(f"{n} ({kind})" for kind, n in totals.items())
            continue
        chosen = [(name, kind, c) for name, kind, c in runs if key not in _FLOW_ONLY or kind == "flow"]
        if not chosen:
            out[label] = "not applicable (no flow run)"
            continue
        out[label] = _summarise([(name, _field(c, key)) for name, _, c in chosen])
    return out


def _provenance_html(results: Results) -> str:
    facts = provenance(results)
    if not facts:
        return (
            '<section class="provenance"><p class="notes">No run configuration (<code>flow.config.json</code>, ...) '
            "in this folder: model, protocol, window, engine, dtype, dataset and package versions are "
            f"{NOT_RECORDED}.</p></section>"
        )
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in facts.items()
    )
    runs = ", ".join(label for label, _, _ in _runs(results))
    return (
        '<section class="provenance"><table class="provenance">'
        f"<caption>Produced by (from the configuration of {html.escape(runs)})</caption>{rows}</table></section>"
    )



def render_html(
    figures: list[ReportFigure],
    title: str,
    readings: dict[str, str] | None = None,
    intro_html: str = "",
    notes: list[str] | None = None,
    header_html: str = "",
) -> str:
    """The report page: plotly.js inlined once, a header (``header_html``: what produced the tables), then each
    figure with its heading, caption and reading."""
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
        f"<h1>{html.escape(title)}</h1>\n<p class=\"meta\">mm-lens report, {stamp}</p>\n{header_html}"
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
        header_html=_provenance_html(results),
    )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(page, encoding="utf-8")
    except OSError as err:
        raise MMLensError(f"cannot write the report to {str(out)!r}: {err}") from err
    return out


# ------------------------------------------------------------------------------------------ figure export

EXPORT_FORMATS = ("svg", "pdf", "png")
EXPORT_EXTRA = "pip install 'mm-lens[export]'"


def figure_file_name(key: str, format: str) -> str:
    """The file of a report figure: its key with ``/`` as ``-`` (``flow/ChooseAttr`` -> ``flow-ChooseAttr.svg``)."""
    stem = "".join(c if c.isalnum() or c in "_-." else "-" for c in key.replace("/", "-"))
    return f"{stem}.{format}"


def publication_figure(figure: go.Figure, width: int = 900, font_size: int = 14) -> go.Figure:
    """A copy of a report figure styled for print: white background, a sans-serif font of ``font_size``,
    ``width`` pixels wide (its own height, else 500)."""
    fig = go.Figure(figure)
    fig.update_layout(
        template="plotly_white", width=width, height=figure.layout.height or 500, paper_bgcolor="white",
        plot_bgcolor="white", font=dict(family="Helvetica, Arial, sans-serif", size=font_size, color="black"),
    )
    return fig


def _require_kaleido(format: str) -> None:
    import importlib.util

    if importlib.util.find_spec("kaleido") is None:
        raise MMLensError(
            f"exporting figures as {format} needs the optional kaleido package: {EXPORT_EXTRA} "
            "(or pip install 'kaleido>=1.3'); kaleido drives an installed Chrome or Chromium"
        )


def export_figures(
    results_dir: str | PathLike,
    out_dir: str | PathLike | None = None,
    format: str = "svg",
    level: float = 0.95,
    width: int = 900,
    scale: float = 2.0,
) -> list[Path]:
    """Write one publication figure per report figure of ``results_dir`` (`report_figures`) into ``out_dir``
    (default ``results_dir/figures``) as ``format`` (``svg``, ``pdf`` or ``png``; ``scale`` sets png's pixel
    density); returns the paths, in page order, named by `figure_file_name`.

    Needs kaleido (``pip install 'mm-lens[export]'``) and a Chrome / Chromium for it; without kaleido this is an
    `MMLensError` naming the extra, and a failed export an `MMLensError` with kaleido's reason."""
    format = str(format).lower().lstrip(".")
    if format not in EXPORT_FORMATS:
        raise MMLensError(f"figure format {format!r} is not one of {', '.join(EXPORT_FORMATS)}")
    _require_kaleido(format)
    results = load_results(results_dir)
    figures = _figures(results, level)
    out = Path(out_dir).expanduser() if out_dir is not None else results.root / "figures"
    paths = [out / figure_file_name(f.key, format) for f in figures]
    if not figures:
        return []
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MMLensError(f"cannot create the figure folder {str(out)!r}: {err}") from err
    import plotly.io as pio

    figs = [publication_figure(f.figure, width=width) for f in figures]
    try:
        pio.write_images(
            figs, paths, format=format, width=[f.layout.width for f in figs], height=[f.layout.height for f in figs],
            scale=scale if format == "png" else 1,
        )
    except Exception as err:  # kaleido's own errors (no browser, a browser that failed) are not one type
        raise MMLensError(
            f"kaleido could not export the figures as {format}: {type(err).__name__}: {err}. kaleido needs a Chrome "
            "or Chromium: install one (e.g. Debian's chromium) or run `kaleido_get_chrome`"
        ) from err
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise MMLensError(f"kaleido wrote no file for {', '.join(missing)}")
    return paths


__all__ = [
    "EXPORT_FORMATS", "NOT_RECORDED", "PROVENANCE_FIELDS", "RESULT_FILES", "ReportFigure", "Results", "build_report",
    "export_figures", "figure_file_name", "load_results", "maps_agreement_summary", "provenance", "publication_figure",
    "render_html", "report_figures",
]
