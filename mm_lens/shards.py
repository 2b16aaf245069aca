"""Shards: one run split over processes or machines, merged back into the table one process would write.

Shard ``i/n`` of a run takes the samples whose dataset index is ``i`` modulo ``n`` and lives in
``OUT/shard-i-of-n/``; the shard process that completes the set merges all shards into ``OUT`` (the same files
as an unsharded run). `merge_runs` does the same for shard directories gathered by hand. Shards must agree on
the configuration except where `MERGE_IGNORES` says.

`Shard` and `parse_shard` live with the run directory (`mm_lens.run_dir`, re-exported here); this module adds
which shard a launcher-started process is (`shard_from_env`, `local_device`) and the merge (`merge_runs`,
`merge_if_complete`). It works through `RunDir`'s public methods only, and `mm_lens.run_dir` never imports it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from mm_lens.analyses import ANALYSES
from mm_lens.errors import MMLensError
from mm_lens.run_dir import RECORD_ONLY, RunBusy, RunDir, RunSummary, Shard, config_differences, parse_shard

SHARD_DIR = re.compile(r"^shard-(\d+)-of-(\d+)$")
# Config keys shards may differ in: the shard, and where the images and CSV sit on each machine (the CSV's
# content must still agree: dataset_sha256, n_samples).
MERGE_IGNORES = ("shard", "images", "dataset", *RECORD_ONLY)


def shard_from_env(environ: dict[str, str] | None = None) -> Shard | None:
    """The shard of a process started by ``accelerate launch`` / ``torchrun`` (``RANK`` of ``WORLD_SIZE``).

    None when ``WORLD_SIZE`` is unset or 1.
    """
    env = os.environ if environ is None else environ
    world = env.get("WORLD_SIZE")
    if world in (None, ""):
        return None
    try:
        count, index = int(world), int(env.get("RANK", "0"))
    except ValueError:
        raise MMLensError(
            f"WORLD_SIZE={world!r} / RANK={env.get('RANK')!r} are not integers; unset them or pass --shard i/n"
        ) from None
    if count <= 1:
        return None
    return parse_shard(f"{index}/{count}")


def local_device(environ: dict[str, str] | None = None) -> str | None:
    """``cuda:LOCAL_RANK`` for a launcher-started process on a CUDA machine (one GPU per process), else None."""
    env = os.environ if environ is None else environ
    local = env.get("LOCAL_RANK")
    if local is None or not local.isdigit():
        return None
    import torch

    return f"cuda:{local}" if torch.cuda.is_available() else None


def _shard_dirs(paths: Iterable[str | Path], command: str) -> list[Path]:
    """The given folders, each either a shard run or a folder whose ``shard-i-of-n`` subfolders are."""
    out = []
    for raw in paths:
        path = Path(raw).expanduser()
        run = RunDir(path, command)
        if run.exists() and run.read_config().get("shard") is not None:
            out.append(path)
            continue
        subs = sorted(p for p in path.iterdir() if SHARD_DIR.match(p.name) and RunDir(p, command).exists())
        if subs:  # a --out folder of sharded runs (it may also hold their merge)
            out.extend(subs)
        elif run.exists():
            out.append(path)  # not a shard run: _merge says so
        else:
            raise MMLensError(f"{path} holds no {command} shard run (no {command}.config.json, no shard-i-of-n/)")
    return out


def merge_runs(
    out: str | Path, shard_dirs: Sequence[str | Path], commands: Sequence[str] | None = None
) -> list[RunSummary]:
    """Merge finished shard runs into `out`, as one unsharded run would have written it.

    The shards' configurations must agree except for the shard and the folders of images and CSV (each machine
    may keep them elsewhere; the CSV's checksum must agree); shards must neither overlap nor be missing, and
    each must be finished. Commands default to every command the shard folders hold.
    """
    if not shard_dirs:
        raise MMLensError("merge needs at least one shard folder")
    for raw in shard_dirs:
        if not Path(raw).expanduser().is_dir():
            raise MMLensError(f"shard folder {str(raw)!r} does not exist")
    if commands is None:
        commands = [c for c in ANALYSES if any(_holds(d, c) for d in shard_dirs)]
        if not commands:
            raise MMLensError(f"no shard runs ({', '.join(ANALYSES)}) found in {', '.join(map(str, shard_dirs))}")
    return [_merge(command, Path(out).expanduser(), _shard_dirs(shard_dirs, command)) for command in commands]


def _holds(path: str | Path, command: str) -> bool:
    path = Path(path).expanduser()
    if RunDir(path, command).exists():
        return True
    return path.is_dir() and any(SHARD_DIR.match(p.name) and RunDir(p, command).exists() for p in path.iterdir())


def _merge(command: str, out: Path, dirs: list[Path]) -> RunSummary:
    runs = [RunDir(path, command).read() for path in dirs]
    first = runs[0]
    for run in runs:
        if run.config.get("shard") is None:
            raise MMLensError(f"{run.path} is not a shard run (it was run without --shard); nothing to merge")
        diff = config_differences(first.config, run.config, ignore=MERGE_IGNORES)
        if diff:
            raise MMLensError(
                f"shard runs {first.path} and {run.path} were run with different configurations "
                f"({'; '.join(diff)}); merge only shards of one command line"
            )
    shards: dict[int, RunDir] = {}
    counts = set()
    for run in runs:
        shard = parse_shard(run.config["shard"])
        counts.add(shard.count)
        if shard.index in shards and shards[shard.index].path.resolve() != run.path.resolve():
            raise MMLensError(
                f"overlapping shards: {shards[shard.index].path} and {run.path} are both shard {shard}; "
                "pass each shard once"
            )
        shards[shard.index] = run
    if len(counts) != 1:
        raise MMLensError(f"the shard runs split the samples differently ({', '.join(f'n={n}' for n in counts)})")
    count = counts.pop()
    missing = [f"{i}/{count}" for i in range(count) if i not in shards]
    if missing:
        raise MMLensError(
            f"missing shard(s) {', '.join(missing)} of the {command} run; run them with --shard and merge again"
        )
    n_samples = int(first.config["n_samples"])
    for index, run in sorted(shards.items()):
        wanted = set(Shard(index, count).indices(n_samples))
        have = run.recorded() & wanted
        if have != wanted or not run.exists():
            raise MMLensError(
                f"shard {index}/{count} in {run.path} is unfinished ({len(have)} of {len(wanted)} samples); "
                "re-run its command to resume it, then merge again"
            )
    if out.resolve() in {r.path.resolve() for r in runs}:
        raise MMLensError(f"merge output {out} is one of the shard folders; pass another output folder")
    merged_config = dict(first.config, shard=None)
    results: dict[int, dict] = {}
    skips: dict[int, dict] = {}
    for run in shards.values():
        results.update(run.results)
        skips.update(run.skips)
    with RunDir(out, command).lock() as target:
        target.check_config(merged_config)
        target.rewrite(merged_config, results, skips)
        written = target.finish(outputs=True)
    return RunSummary(
        command,
        out,
        n_samples=n_samples,
        n_analysed=len(target.results),
        n_resumed=0,
        skips=target.skip_list(),
        written=written,
    )


def merge_if_complete(command: str, out: str | Path, count: int) -> RunSummary | None:
    """Merge ``out/shard-*-of-count`` into `out` when every shard has finished (called by each shard at its end;
    the last one to finish does the merge). None when some shard is still running or missing."""
    out = Path(out).expanduser()
    dirs = [out / Shard(i, count).dirname for i in range(count)]
    for i, path in enumerate(dirs):
        run = RunDir(path, command)
        if not run.exists():
            return None
        run.read()
        if not set(Shard(i, count).indices(int(run.config["n_samples"]))) <= run.recorded():
            return None
    try:
        return _merge(command, out, dirs)
    except RunBusy:  # another shard finished at the same moment and is merging
        return None


__all__ = [
    "MERGE_IGNORES", "Shard", "local_device", "merge_if_complete", "merge_runs", "parse_shard", "shard_from_env"
]
