"""Execute the notebooks in place and save their outputs, as they are committed.

    .venv/bin/python scripts/execute_notebooks.py                 # every notebooks/*.ipynb
    .venv/bin/python scripts/execute_notebooks.py notebooks/04_circuits.ipynb
    .venv/bin/python scripts/execute_notebooks.py --check         # execute, report, write nothing

Each notebook runs top to bottom with nbclient in a fresh ``python3`` kernel (this interpreter's ipykernel, so
run it with the venv's python), with notebooks/ as the working directory, ``HF_HUB_OFFLINE=1`` and one CPU
thread (as tests/test_notebooks.py runs them).

Figures: a plotly figure is saved as its interactive JSON (``application/vnd.plotly.v1+json``: JupyterLab,
VS Code) plus, in the same output, a static PNG (``image/png``) drawn with kaleido, which is what GitHub's
notebook viewer shows. kaleido is not a dependency of mm-lens: ``pip install kaleido``; it drives a Chrome or
Chromium found on the machine (``apt-get install chromium``). ``--no-png`` saves the JSON only.

Saved stderr drops progress bars and tqdm's "IProgress not found" warning (a kernel without ipywidgets).
A notebook that raises is not written; the script then exits 1.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import sys
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
PLOTLY = "application/vnd.plotly.v1+json"
KERNEL_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
# stderr lines that are noise in a saved notebook: tqdm bars ("Loading weights: 100%|███| 134/134 [...]") and
# tqdm.auto's warning about the missing ipywidgets (its message line and the source line Python prints after it)
NOISE = re.compile(r"\d+%\|.*\||TqdmWarning: IProgress not found|from \.autonotebook import tqdm")


def clean_stderr(text: str) -> str:
    """`text` without progress bars (every carriage-return rewrite of a line) and tqdm's widget warning."""
    lines = [line.rsplit("\r", 1)[-1] for line in text.split("\n")]
    return "\n".join(line for line in lines if not NOISE.search(line)).strip("\n")


def png_of(figure: dict) -> str:
    """Base64 PNG of a plotly figure given as its JSON (data, layout, frames)."""
    import plotly.io as pio

    spec = {key: figure[key] for key in ("data", "layout", "frames") if key in figure}
    return base64.b64encode(pio.to_image(spec, format="png")).decode("ascii")


def tidy(book, png: bool) -> tuple[int, int]:
    """Add a PNG to every plotly output (when `png`) and drop noise from stderr; returns (figures, PNGs added)."""
    figures = added = 0
    for cell in book.cells:
        if cell.cell_type != "code":
            continue
        kept = []
        for out in cell.outputs:
            if out.output_type == "stream" and out.name == "stderr":
                out.text = clean_stderr(out.text)
                if not out.text.strip():
                    continue
                out.text += "\n"
            data = out.get("data", {})
            if PLOTLY in data:
                figures += 1
                data.pop("text/html", None)  # a renderer's plotly.js page: blank on GitHub, megabytes in git
                if png:
                    data["image/png"] = png_of(data[PLOTLY])
                    added += 1
            kept.append(out)
        cell.outputs = kept
    return figures, added


def execute(path: Path, timeout: int):
    """Run one notebook in a fresh kernel; returns the executed notebook (nbformat node)."""
    import nbclient
    import nbformat

    book = nbformat.read(path, as_version=4)
    with mock.patch.dict(os.environ, KERNEL_ENV):  # the kernel inherits the environment
        client = nbclient.NotebookClient(
            book, timeout=timeout, kernel_name="python3", record_timing=False,
            resources={"metadata": {"path": str(path.parent)}},
        )
        client.execute()
    return book


def check_png() -> str | None:
    """Why kaleido cannot draw a PNG here (None: it can)."""
    try:
        png_of({"data": [{"type": "scatter", "y": [0, 1]}], "layout": {}})
    except Exception as err:  # kaleido missing, or no browser for it
        return f"{type(err).__name__}: {err}".splitlines()[0]
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every notebooks/*.ipynb")
    parser.add_argument("--no-png", action="store_true", help="save plotly figures as JSON only (no kaleido)")
    parser.add_argument("--check", action="store_true", help="execute and report, but write nothing")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell (default 600)")
    args = parser.parse_args(argv)

    import nbformat

    paths = [p.resolve() for p in args.notebooks] or sorted(NOTEBOOKS.glob("*.ipynb"))
    png = not args.no_png
    if png and (why := check_png()):
        print(f"execute_notebooks: kaleido cannot draw PNGs ({why}); pip install kaleido (it needs Chrome or "
              "Chromium), or pass --no-png", file=sys.stderr)
        return 2
    failed = []
    for path in paths:
        start = time.monotonic()
        try:
            book = execute(path, args.timeout)
        except Exception as err:  # CellExecutionError, kernel death, timeouts: report and go on
            failed.append(path.name)
            print(f"{path.name}: FAILED\n{err}", file=sys.stderr)
            continue
        elapsed = time.monotonic() - start
        figures, added = tidy(book, png)
        nbformat.validate(book)
        if not args.check:
            nbformat.write(book, path)
        size = len(nbformat.writes(book)) / 1e6
        print(f"{path.name}: {elapsed:.0f} s, {figures} plotly figures ({added} with PNG), {size:.2f} MB"
              + ("" if args.check else ", saved"))
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
