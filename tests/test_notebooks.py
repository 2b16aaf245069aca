"""The notebooks run top to bottom on the shipped toy model (nbclient, the running interpreter's ipykernel),
and are kept in git executed, outputs included (scripts/execute_notebooks.py), so that a reader browsing the
repository sees every table and figure: each plotly figure carries a static PNG beside its interactive JSON."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from unittest import mock

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NAMES = (
    "01_quickstart.ipynb", "02_reproduce_study.ipynb", "03_custom_experiments.ipynb", "04_circuits.ipynb",
    "05_patch_maps.ipynb",
)
CELL_TIMEOUT = 600  # seconds per cell; the five notebooks take about two minutes in all on 2 CPU cores
PLOTLY = "application/vnd.plotly.v1+json"


def read(name):
    nbformat = pytest.importorskip("nbformat")
    return nbformat.read(NOTEBOOKS / name, as_version=4)


def test_every_notebook_is_listed():
    assert sorted(NAMES) == sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stored_executed(name):
    book = read(name)
    code = [c for c in book.cells if c.cell_type == "code"]
    assert code, name
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), (
        f"{name}: run it top to bottom in one kernel before committing (scripts/execute_notebooks.py)"
    )
    assert not list(outputs(book, "error")), f"{name}: stored with an error output"
    assert list(outputs(book)), name
    for out in outputs(book):
        data = out.get("data", {})
        if PLOTLY in data:
            assert "image/png" in data, f"{name}: a plotly figure without its PNG (GitHub would show nothing)"
            assert "text/html" not in data, f"{name}: a plotly figure with an HTML page (plotly.js) in its output"


def load_script():
    path = NOTEBOOKS.parent / "scripts" / "execute_notebooks.py"
    spec = importlib.util.spec_from_file_location("execute_notebooks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_execute_script_tidies_outputs():
    nbformat = pytest.importorskip("nbformat")
    script = load_script()
    bar = "Loading weights:   0%|          | 0/134 [00:00<?, ?it/s]\rLoading weights: 100%|####| 134/134 [00:00<00:00]"
    warning = "/x/tqdm/auto.py:21: TqdmWarning: IProgress not found. Please update jupyter and ipywidgets.\n" \
              "  from .autonotebook import tqdm as notebook_tqdm"
    assert script.clean_stderr(f"{bar}\n\n{warning}\n") == ""
    assert script.clean_stderr(f"{bar}\nUserWarning: keep me\n") == "UserWarning: keep me"
    v4 = nbformat.v4
    figure = {"data": [{"type": "scatter", "y": [0, 1]}], "layout": {}}
    cell = v4.new_code_cell("fig", execution_count=1, outputs=[
        v4.new_output("stream", name="stderr", text=bar + "\n"),
        v4.new_output("stream", name="stderr", text="a real warning\n"),
        v4.new_output("display_data", data={PLOTLY: figure, "text/html": "<script>plotly.js</script>"}),
    ])
    book = v4.new_notebook(cells=[cell])
    assert script.tidy(book, png=False) == (1, 0)
    assert [o.get("text") for o in cell.outputs] == ["a real warning\n", None]
    assert set(cell.outputs[1]["data"]) == {PLOTLY}


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
    with mock.patch.dict(os.environ, kernel_env):
        start = time.monotonic()
        client = nbclient.NotebookClient(
            book, timeout=CELL_TIMEOUT, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
        )
        client.execute()
        elapsed = time.monotonic() - start
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


def test_circuits_runs(toy_model):
    book = execute("04_circuits.ipynb")
    assert not list(outputs(book, "error"))
    text = text_of(book)
    assert "run_with_hooks" in text and "restoration" in text and "readout" in text
    figures = plotly_figures(book)
    assert len(figures) == 4  # heads, restoration per region, restoration per layer x position, image-token lens
    heads, per_region, per_position, lens = figures
    assert [t["type"] for t in heads["data"]] == ["heatmap"]
    assert len(per_region["data"]) == 4 and all(t["type"] == "scatter" for t in per_region["data"])
    assert [t["type"] for t in per_position["data"]] == ["heatmap"]
    assert lens.get("frames") and lens["data"][-1]["type"] == "heatmap"  # a slider over the layers


def test_patch_maps_runs(toy_model):
    book = execute("05_patch_maps.ipynb")
    assert not list(outputs(book, "error"))
    text = text_of(book)
    assert "the model answers" in text and "spearman" in text and "circle" in text
    figures = plotly_figures(book)
    assert len(figures) == 4  # one map over the image, side by side, agreement, the group=2 map
    first, side, agreement, by_two = figures
    assert len(first["layout"]["sliders"][0]["steps"]) == 2  # the two windows
    assert [b["label"] for b in first["layout"]["updatemenus"][0]["buttons"]] == ["knockout", "attention", "gradient"]
    assert first["data"][0]["type"] == "image" and first["frames"]
    assert sum(t["type"] == "heatmap" for t in side["data"]) == 3
    assert {t["type"] for t in agreement["data"]} == {"box"}
    assert any(t["type"] == "heatmap" for t in by_two["data"])
