"""The notebooks run top to bottom on the shipped toy model (nbclient, the running interpreter's ipykernel),
and are kept in git with their outputs stripped."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NAMES = ("01_quickstart.ipynb", "02_reproduce_study.ipynb", "03_custom_experiments.ipynb")
CELL_TIMEOUT = 600  # seconds per cell; the three notebooks take about two minutes in all on 2 CPU cores
PLOTLY = "application/vnd.plotly.v1+json"


def read(name):
    nbformat = pytest.importorskip("nbformat")
    return nbformat.read(NOTEBOOKS / name, as_version=4)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stored_without_outputs(name):
    book = read(name)
    code = [c for c in book.cells if c.cell_type == "code"]
    assert code, name
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, f"{name}: strip outputs before committing"


@pytest.fixture(scope="module")
def toy_model():
    from mm_lens.demo import toy_model_path
    from mm_lens.errors import MMLensError

    try:
        return toy_model_path()
    except MMLensError as err:
        pytest.skip(f"the notebooks run on the shipped toy model: {err}")


def execute(name):
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    book = read(name)
    # The kernel inherits the environment: a local checkpoint never waits for the hub, and one thread is as
    # fast for the toy model while it avoids thread oversubscription when the suite shares the CPU.
    kernel_env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    saved = {k: os.environ.get(k) for k in kernel_env}
    os.environ.update(kernel_env)
    try:
        start = time.monotonic()
        client = nbclient.NotebookClient(
            book, timeout=CELL_TIMEOUT, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
        )
        client.execute()
        elapsed = time.monotonic() - start
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    print(f"{name}: {elapsed:.0f} s")
    return book


def outputs(book, kind=None):
    for cell in book.cells:
        for out in cell.get("outputs", []):
            if kind is None or out.get("output_type") == kind:
                yield out


def text_of(book):
    return "".join(
        out.get("text", "") if out.get("output_type") == "stream" else str(out.get("data", {}).get("text/plain", ""))
        for out in outputs(book)
    )


def plotly_figures(book):
    return [out["data"][PLOTLY] for out in outputs(book) if PLOTLY in out.get("data", {})]


def test_quickstart_runs(toy_model):
    book = execute("01_quickstart.ipynb")
    assert not list(outputs(book, "error"))
    text = text_of(book)
    assert "model answers" in text and "image tokens" in text
    figures = plotly_figures(book)
    # flow, lens, attention heatmap, related patches, attention per patch
    assert len(figures) == 5
    assert any(t.get("type") == "heatmap" for f in figures for t in f["data"])


def test_reproduce_study_runs_on_the_toy_fallback(toy_model):
    book = execute("02_reproduce_study.ipynb")
    assert not list(outputs(book, "error"))
    text = text_of(book)
    assert "falling back to the toy model" in text and "report:" in text
    report = Path(text.split("report: ", 1)[1].split(" (", 1)[0])
    assert report.is_file() and 'data-key="lens_tasks"' in report.read_text()
    assert len(plotly_figures(book)) >= 3  # lens per task, attention, and the sweeps when a sample was kept


def test_custom_experiments_runs(toy_model):
    book = execute("03_custom_experiments.ipynb")
    assert not list(outputs(book, "error"))
    figures = plotly_figures(book)
    assert len(figures) == 2
    bars = [t for t in figures[0]["data"] if t.get("type") == "bar"]
    assert len(bars) == 1 and len(bars[0]["x"]) == 5  # the five ablations side by side
