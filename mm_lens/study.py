"""`mm-lens study`: the whole study on one model in one command.

For each of the six GQA task sets shipped with mm-lens: the layer sweep of the six standard blocks and the
answer logit lens, under the study protocol (its prompt, pixels, regions, window, readout, answer rule and
vocabulary), each a resumable run in ``OUT/<Task>/``; then one report over all of them. Re-running the
same command resumes; ``--shard i/n`` splits every task's samples like ``mm-lens flow --shard``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mm_lens.data.gqa import TASKS
from mm_lens.engines import DEFAULT_ENGINE
from mm_lens.errors import MMLensError
from mm_lens.knockout import STANDARD_BLOCKS
from mm_lens.model import HookedLlava, load
from mm_lens.report import build_report
from mm_lens.runs import RunOptions, flow_run, lens_run, resolve_run_protocol


def run_study(
    out: str | Path,
    model: Any,
    images: str | Path,
    tasks: Sequence[str] | None = None,
    protocol: str = "study",
    window: int | None = None,
    limit: int | None = None,
    device: str | None = None,
    dtype: Any = None,
    device_map: Any = None,
    shard: str | None = None,
    engine: str = DEFAULT_ENGINE,
    all_samples: bool = False,
    retry_skips: bool = False,
    blocks: Sequence[str] = STANDARD_BLOCKS,
    progress: bool = True,
) -> Path | None:
    """Flow and lens of every task set into ``out/<Task>/``; returns the report's path (None for a shard
    finishing while other shards still run: the one that finds every task merged writes it)."""

    tasks = list(tasks or TASKS)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise MMLensError(f"unknown task set(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    out = Path(out).expanduser()
    resolved = resolve_run_protocol(model, protocol, dtype, device, window=window, command="flow")
    print(f"mm-lens study: {resolved.line()}", file=sys.stderr)
    hooked = model if isinstance(model, HookedLlava) else None
    run = RunOptions(limit=limit, device=device, device_map=device_map, shard=shard, retry_skips=retry_skips,
                     progress=progress, protocol=protocol)
    failed: list[str] = []  # runs that analysed nothing because of errors: the study fails at the end
    for task in tasks:
        print(f"[{task}]", file=sys.stderr)
        if hooked is None:  # load once, for all twelve runs
            hooked = load(model, device=device, dtype=resolved.dtype, device_map=device_map)
        flow = flow_run(out / task, hooked, task, images, blocks=list(blocks), window=resolved.window,
                        all_samples=all_samples, engine=engine, options=run)
        lens = lens_run(out / task, hooked, task, images, all_samples=all_samples, options=run)
        for summary in (flow, lens):
            print(summary.text(), file=sys.stderr)
            try:
                summary.raise_if_failed()
            except MMLensError as err:
                failed.append(f"{task}: {err}")
    if failed:
        raise MMLensError("; ".join(failed))
    # A shard writes the report once every task's tables are merged, whichever shard merged them.
    if not all((out / task / f"{command}.csv").exists() for task in tasks for command in ("flow", "lens")):
        return None
    report = build_report(out, title=f"mm-lens study: {Path(str(getattr(model, 'name', model))).name}")
    print(f"report: {report}", file=sys.stderr)
    return report


__all__ = ["run_study"]
