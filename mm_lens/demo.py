"""`mm-lens demo`: the whole study on the shipped toy LLaVA and a freshly generated held-out shapes-world set.

Per task type: the layer sweep of the six standard blocks (correctly answered samples only, as in the study)
and the answer logit lens; then one self-contained HTML report with a short reading of each figure, computed
from the numbers of this run.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import pandas as pd

from mm_lens.engines import DEFAULT_ENGINE
from mm_lens.errors import MMLensError
from mm_lens.knockout import STANDARD_BLOCKS
from mm_lens.model import load
from mm_lens.report import build_report
from mm_lens.runs import attention_run, flow_run, lens_run
from mm_lens.sweep import layer_window
from mm_lens.toy import world

DEMO_BLOCKS = STANDARD_BLOCKS
#: Seed of the demo's held-out set (training draws from its own random stream).
HELD_OUT_SEED = 20251122


def toy_model_path() -> Path:
    """The shipped toy checkpoint: `mm_lens/_assets/toy-llava` inside an installed wheel, `assets/toy-llava` beside
    the package in a repository checkout (or an editable install of one)."""
    package = Path(__file__).resolve().parent
    candidates = (package / "_assets" / "toy-llava", package.parent / "assets" / "toy-llava")
    for path in candidates:
        if (path / "config.json").is_file():
            return path
    raise MMLensError(
        f"the shipped toy model is missing (looked in {candidates[0]} and {candidates[1]}); reinstall mm-lens, "
        "or train it with `mm-lens train-toy --out assets/toy-llava`"
    )


def demo_window(n_layers: int) -> int:
    """The demo's own knockout window: 9 layers per 32 of the model's depth, rounded, at least 1.

    Neither protocol's default (`mm_lens.protocol.Protocol.window`: the study protocol scales 7 per 32 layers,
    the checkpoint protocol takes 9 layers whatever the depth); `run_demo` passes it to every flow run
    explicitly, and records it in ``summary.json``.
    """
    return max(1, round(9 * n_layers / 32))


def _layer_range(window: range) -> str:
    return f"layers {window.start}-{window.stop - 1}" if len(window) > 1 else f"layer {window.start}"


def flow_readings(flow: pd.DataFrame, n_layers: int, k: int) -> dict[str, str]:
    """One sentence per block: where the mean relative change is most negative, and how large it is."""

    out = {}
    for block, df in flow.groupby("block", sort=False):
        curve = df.groupby("layer")["relative_change_pct"].mean()
        low = int(curve.idxmin())
        window = layer_window(low, k, n_layers)
        flat = curve.abs().max() < 5
        out[block] = (
            f"{block}: no layer window changes the answer probability by more than 5% (largest |change| "
            f"{curve.abs().max():.1f}%)." if flat else
            f"{block}: the largest drop, {curve.min():.1f}% on average, comes from knocking out "
            f"{_layer_range(window)} (window centred on layer {low}); at the last layer the change is "
            f"{curve.iloc[-1]:.1f}%."
        )
    return out


def lens_reading(lens: pd.DataFrame) -> str:
    """Where the lower-case and the capitalised answer first become likely through the layers."""
    curves = lens.groupby(["form", "layer"])["prob"].mean().unstack(0)
    parts = []
    for form in ("answer_lower", "answer_capitalized"):
        if form not in curves:
            continue
        c = curves[form]
        above = c[c >= 0.5]
        first = f"first exceeds 0.5 at layer {int(above.index[0])}" if len(above) else "never exceeds 0.5"
        parts.append(f"{form.replace('_', ' ')} peaks at layer {int(c.idxmax())} (p = {c.max():.2f}) and {first}")
    return "Answer logit lens: " + "; ".join(parts) + "."


class PhaseClock:
    """Wall-clock seconds per phase of the demo (summed over tasks), so its time can be quoted from a run."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = round(self.seconds.get(phase, 0.0) + time.perf_counter() - start, 2)

    def line(self) -> str:
        total = sum(self.seconds.values())
        return f"{total:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in self.seconds.items()) + ")"


def run_demo(out_dir: str | Path = "results/demo", n_per_task: int = 30, model_path: str | Path | None = None,
             engine: str = DEFAULT_ENGINE, progress: bool = True) -> Path:
    """Run the demo into `out_dir` (resumable: re-running skips finished samples); returns the report's path."""

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = str(model_path or toy_model_path())
    clock = PhaseClock()
    with clock("load"):
        hooked = load(model)
    n_layers = hooked.n_layers
    k = demo_window(n_layers)
    with clock("data"):
        csvs = world.write_task_csvs(out / "data", n_per_task, seed=HELD_OUT_SEED)
    images = out / "data" / "images"
    flows, lenses, summary = [], [], {}
    for task, csv in csvs.items():
        print(f"[{task}] {n_per_task} held-out questions", file=sys.stderr)
        with clock("flow"):
            flow = flow_run(out / task, hooked, csv, images, blocks=list(DEMO_BLOCKS), window=k, engine=engine,
                            progress=progress)
        with clock("lens"):
            lens_run(out / task, hooked, csv, images, progress=progress)
        with clock("attention"):
            attention_run(out / task, hooked, csv, images, progress=progress)
        flows.append(pd.read_csv(out / task / "flow.csv", dtype={"question_id": str}).assign(task=task))
        lenses.append(pd.read_csv(out / task / "lens.csv", dtype={"question_id": str}).assign(task=task))
        wrong = sum(s.kind == "wrong answer" for s in flow.skips)
        summary[task] = {"questions": flow.n_samples, "analysed": flow.n_analysed, "answered_wrongly": wrong,
                         "skipped_other": len(flow.skips) - wrong}
    flow_all, lens_all = pd.concat(flows, ignore_index=True), pd.concat(lenses, ignore_index=True)
    acc = ", ".join(f"{t} {s['analysed']}/{s['questions']} ({s['answered_wrongly']} wrong, "
                    f"{s['skipped_other']} other skips)" for t, s in summary.items())
    readings = {"flow": f"Analysed per task (answered right, with usable boxes): {acc}. Knockout window: {k} of "
                        f"{n_layers} layers. " + " ".join(flow_readings(flow_all, n_layers, k).values()),
                "lens": lens_reading(lens_all)}
    for task, df in zip(summary, flows, strict=False):
        if len(df):
            readings[f"flow/{task}"] = " ".join(flow_readings(df, n_layers, k).values())
    with clock("report"):
        report = build_report(out, readings=readings, title="mm-lens demo: the toy LLaVA on the shapes world")
    print(f"demo: {clock.line()}", file=sys.stderr)
    (out / "summary.json").write_text(json.dumps(
        {"model": model, "window": k, "n_layers": n_layers, "tasks": summary, "readings": readings,
         "seconds": clock.seconds}, indent=1))
    return report
