"""A run directory: where a long run writes each finished sample at once, so a kill loses nothing.

A run directory holds, per analysis (``flow``, ``lens``, ``attention``; see `mm_lens.analyses`)::

    flow.config.json     the run's configuration; re-running into the directory must match it
    flow.results.jsonl   one line per analysed sample {"index", "question_id", "rows"}: appended, flushed and
                         fsynced as each sample finishes, so a SIGKILL loses at most the sample being computed
    flow.skips.jsonl     one line per skipped sample {"index", "question_id", "kind", "reason"}, likewise
    flow.errors.log      tracebacks of unexpected per-sample errors
    flow.csv             the final table (CLI contract columns), flow.html its figure, flow.skips.csv the skips

``index`` is the sample's row in the dataset (after ``--limit``): it keys resumption, sharding and the row order
of the final table, which therefore equals an uninterrupted run's. A trailing partial line (the process died
mid-write) is dropped on resume. The configuration is the run's identity: `run_config` builds it, and
`config_differences` says how two differ.

A run may be one `Shard` of a larger one (``--shard i/n``): `Shard` lives here, with the run directory it names
(``shard-i-of-n``); `mm_lens.shards` merges shard runs through `RunDir`'s public methods (`RunDir.read`,
`RunDir.lock`, `RunDir.rewrite`). Imports point one way: `mm_lens.shards` imports this module, never the reverse.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from mm_lens.analyses import get_analysis
from mm_lens.data.gqa import task_path
from mm_lens.errors import MMLensError
from mm_lens.model import resolve_dtype
from mm_lens.names import VERSION
from mm_lens.types import WRONG_ANSWER, Skip, summarise_skips

FORMAT = 1  # run-directory format version, recorded in the config
ERROR_KIND = "error"  # skip kinds starting with this are unexpected failures, retried on resume


class RunBusy(MMLensError):
    """Another process holds the run directory's lock (it is writing or merging there)."""


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``: the samples whose dataset index is ``index`` modulo ``count``."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def dirname(self) -> str:
        return f"shard-{self.index}-of-{self.count}"

    def indices(self, n_samples: int) -> range:
        return range(self.index, n_samples, self.count)


def parse_shard(text: str) -> Shard:
    """``"i/n"`` with ``0 <= i < n`` as a `Shard`, else `MMLensError` saying how to write it."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match:
        raise MMLensError(f"--shard {text!r} is not of the form i/n (e.g. 0/4: the first of four shards)")
    index, count = int(match[1]), int(match[2])
    if count < 1:
        raise MMLensError(f"--shard {text!r}: the number of shards must be at least 1")
    if not 0 <= index < count:
        raise MMLensError(f"--shard {text!r}: the shard index must be 0..{count - 1} (shards count from 0)")
    return Shard(index, count)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_id(model: Any) -> str:
    """A local checkpoint as its absolute path (so ``./m`` and ``/abs/m`` agree); a hub id unchanged."""
    model = getattr(model, "name", model)  # a loaded HookedLlava: where it came from
    path = Path(str(model)).expanduser()
    return str(path.resolve()) if path.exists() else str(model)


def dtype_name(dtype: Any) -> str:
    """A dtype (``"float16"``, ``torch.float16``, None for the default) as recorded: ``"float16"``."""

    return str(resolve_dtype(dtype)).removeprefix("torch.")


def run_config(command: str, dataset: str | Path, n_samples: int, **options: Any) -> dict[str, Any]:
    """The configuration recorded in (and compared against) a run directory."""

    path = task_path(dataset)
    config: dict[str, Any] = {
        "command": command,
        "format": FORMAT,
        "mm_lens_version": VERSION,
        "dataset": str(path.resolve()),
        "dataset_sha256": _file_sha256(path),
        "n_samples": n_samples,
        "columns": list(get_analysis(command).columns),
        "versions": package_versions(),
    }
    config.update(options)
    return json.loads(json.dumps(config))  # plain JSON types, as read back from disk


#: Recorded in a run's configuration but not part of its identity: a run resumes across these.
RECORD_ONLY = ("versions",)


def package_versions() -> dict[str, str]:
    """The versions of mm-lens and of the packages whose internals decide its numbers, as a run records them."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"mm_lens": VERSION}
    for name in ("torch", "transformers", "transformer_lens"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def config_differences(old: dict[str, Any], new: dict[str, Any], ignore: Iterable[str] = ()) -> list[str]:
    """``key: old -> new`` for every differing key (missing keys count as None)."""
    skip = set(ignore)
    return [
        f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        for key in sorted(set(old) | set(new))
        if key not in skip and old.get(key) != new.get(key)
    ]


def _read_jsonl(path: Path, repair: bool) -> list[dict[str, Any]]:
    """Complete lines of an append-only JSON-lines file; a trailing partial line is dropped (and cut off
    the file when ``repair``). A damaged line elsewhere is an error naming the file and line."""
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data) and repair:
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    records = []
    for number, line in enumerate(data[:end].splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            int(record["index"])
        except (ValueError, KeyError, TypeError) as err:
            raise MMLensError(
                f"{path} is damaged at line {number} ({err}); remove that line (the sample is then re-run) "
                "or start a new --out"
            ) from None
        records.append(record)
    return records


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file and rename, so a reader never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _dumps(record: dict[str, Any]) -> str:
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n"


class RunDir:
    """The files of one command's run in one directory: its config, results and skips.

    `open` validates (or adopts) the configuration, takes an exclusive lock so two processes never write
    the same run, drops a partial trailing line, and loads the finished samples.
    """

    def __init__(self, path: str | Path, command: str):
        get_analysis(command)  # an unknown command raises with the list of analyses
        self.path = Path(path).expanduser()
        self.command = command
        self.config: dict[str, Any] | None = None
        self.results: dict[int, dict[str, Any]] = {}
        self.skips: dict[int, dict[str, Any]] = {}
        self._lock = None
        self._config_written = False

    # file names
    def file(self, suffix: str) -> Path:
        return self.path / f"{self.command}.{suffix}"

    @property
    def config_path(self) -> Path:
        return self.file("config.json")

    @property
    def results_path(self) -> Path:
        return self.file("results.jsonl")

    @property
    def skips_path(self) -> Path:
        return self.file("skips.jsonl")

    def exists(self) -> bool:
        return self.config_path.is_file()

    def read_config(self) -> dict[str, Any]:
        try:
            return json.loads(self.config_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise MMLensError(f"{self.path} holds no {self.command} run (no {self.config_path.name})") from None
        except (OSError, ValueError) as err:
            raise MMLensError(f"cannot read {self.config_path}: {err}; start a new --out") from None

    def check_config(self, config: dict[str, Any]) -> None:
        """`MMLensError` naming the differing keys when the directory holds a run with another config."""
        if not self.exists():
            if self.results_path.exists() or self.skips_path.exists():
                raise MMLensError(
                    f"{self.path} has {self.command} results but no {self.config_path.name}; pass a new --out"
                )
            return
        old = self.read_config()
        diff = config_differences(old, config, ignore=RECORD_ONLY)
        if diff:
            raise MMLensError(
                f"{self.path} holds a {self.command} run with a different configuration ({'; '.join(diff)}); "
                "re-run with the same options to resume it, or pass a new --out"
            )
        self._config_written = True

    def lock(self, wait: bool = False) -> RunDir:
        """Create the folder and take this command's exclusive lock on it, held until `close` (or the end of a
        ``with`` block); `RunBusy` when another process holds it (``wait``: block until it is free instead).

        The lock is advisory (``fcntl.flock``) and released by the OS even on SIGKILL; without POSIX locking
        (Windows) it is a no-op.
        """
        if self._lock is not None:
            return self
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise MMLensError(f"cannot create the run folder {str(self.path)!r}: {err}") from err
        self._lock = _take_lock(self.path / f".{self.command}.lock", self.path, self.command, wait)
        return self

    @property
    def locked(self) -> bool:
        """Whether this object holds the directory's lock."""
        return self._lock is not None

    def open(self, config: dict[str, Any]) -> RunDir:
        """Create or resume the run; the config file is written with the first record (or at `finish`)."""
        self.lock()
        self.check_config(config)
        self.config = config
        self.load(repair=True)
        return self

    def read(self) -> RunDir:
        """Read the run as it is on disk, without the lock and without repairing anything: its config and its
        finished samples (to inspect or merge a run another process wrote). `MMLensError` if there is none."""
        self.config = self.read_config()
        self.load(repair=False)
        return self

    def load(self, repair: bool = False) -> None:
        """Read the finished samples (later lines for an index replace earlier ones)."""
        self.results = {int(r["index"]): r for r in _read_jsonl(self.results_path, repair)}
        self.skips = {}
        for record in _read_jsonl(self.skips_path, repair):
            self.skips[int(record["index"])] = record

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # state
    def final_skips(self) -> dict[int, dict[str, Any]]:
        """Skips of samples that have no result (a retried sample that succeeded is no longer skipped)."""
        return {i: s for i, s in self.skips.items() if i not in self.results}

    def done(self, retry_skips: bool = False) -> set[int]:
        """Indices not to run again: analysed ones, and skipped ones unless retried."""
        done = set(self.results)
        if not retry_skips:
            done |= {i for i, s in self.final_skips().items() if not str(s["kind"]).startswith(ERROR_KIND)}
        return done

    def recorded(self) -> set[int]:
        """Every index with a final record (analysed or skipped, errors included)."""
        return set(self.results) | set(self.skips)

    # writing
    def _ensure_config(self) -> None:
        if not self._config_written:
            if self.config is None:
                raise MMLensError("the run was not opened with a configuration")
            _write_text(self.config_path, json.dumps(self.config, indent=2) + "\n")
            self._config_written = True

    def _append(self, path: Path, record: dict[str, Any]) -> None:
        try:
            self._ensure_config()
            with open(path, "ab") as f:
                f.write(_dumps(record).encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:  # disk full, folder removed, ...: what is on disk stays resumable
            raise MMLensError(
                f"cannot write to {path}: {err}; fix that and re-run the same command to resume"
            ) from err

    def rewrite(
        self, config: dict[str, Any], results: dict[int, dict[str, Any]], skips: dict[int, dict[str, Any]]
    ) -> None:
        """Replace the run's config, results and skips files with these records (each file written whole and
        renamed into place), as when merging shards into one run. Needs the lock (`lock`)."""
        if self._lock is None:
            raise MMLensError(f"{self.path}: rewriting a {self.command} run needs its lock (RunDir.lock)")
        self.config, self.results, self.skips = config, dict(results), dict(skips)
        try:
            _write_text(self.config_path, json.dumps(config, indent=2) + "\n")
            self._config_written = True
            _write_text(self.results_path, "".join(_dumps(r) for _, r in sorted(self.results.items())))
            _write_text(self.skips_path, "".join(_dumps(s) for _, s in sorted(self.skips.items())))
        except OSError as err:
            raise MMLensError(f"cannot write the {self.command} run in {self.path}: {err}") from err

    def add_result(self, index: int, question_id: str, table: pd.DataFrame) -> None:
        """Append one sample's rows (all of them in one line, so a sample is never half recorded)."""
        rows = table[list(get_analysis(self.command).columns)].to_dict("split")["data"]
        record = {"index": int(index), "question_id": str(question_id), "rows": rows}
        self._append(self.results_path, record)
        self.results[int(index)] = record

    def add_skip(self, index: int, question_id: str, kind: str, reason: str) -> None:
        record = {"index": int(index), "question_id": str(question_id), "kind": kind, "reason": reason}
        self._append(self.skips_path, record)
        self.skips[int(index)] = record

    def log_error(self, index: int, question_id: str, text: str) -> None:
        with open(self.file("errors.log"), "a", encoding="utf-8") as f:
            f.write(f"--- sample {index} (question {question_id})\n{text}\n")

    # outputs
    def table(self) -> pd.DataFrame:
        """The results of every analysed sample, in dataset order."""
        cols = list(get_analysis(self.command).columns)
        rows = [row for i in sorted(self.results) for row in self.results[i]["rows"]]
        return pd.DataFrame(rows, columns=cols)

    def skip_list(self) -> list[Skip]:
        return [
            Skip(str(s["question_id"]), str(s["reason"]), str(s["kind"]))
            for _, s in sorted(self.final_skips().items())
        ]

    def finish(self, outputs: bool = True) -> list[Path]:
        """Write the skip list and (``outputs``) the table and its figure; returns the paths written.

        A shard writes no table: ``mm-lens report`` would take its folder for a task.
        """
        self._ensure_config()
        skips = self.skip_list()
        skips_path = self.file("skips.csv")
        frame = pd.DataFrame([s.__dict__ for s in skips], columns=["question_id", "kind", "reason"])
        _atomic_write(skips_path, lambda tmp: frame.to_csv(tmp, index=False))
        if not outputs:
            return [skips_path]
        table = self.table()
        csv_path = self.file("csv")
        _atomic_write(csv_path, lambda tmp: table.to_csv(tmp, index=False))
        fig = get_analysis(self.command).figure(table)
        html_path = self.file("html")
        _atomic_write(html_path, lambda tmp: fig.write_html(tmp, include_plotlyjs=True))
        return [csv_path, html_path, skips_path]


def _take_lock(path: Path, folder: Path, command: str, wait: bool = False):
    """An exclusive advisory lock held while the returned file stays open (released even on SIGKILL)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        return open(path, "a")
    handle = open(path, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        handle.close()
        raise RunBusy(
            f"another mm-lens {command} process is writing to {folder}; wait for it to finish or pass another --out"
        ) from None
    return handle


@dataclass
class RunSummary:
    """What a run did: samples in it, analysed, resumed from earlier runs, skipped (with reasons), files."""

    command: str
    path: Path
    n_samples: int
    n_analysed: int
    n_resumed: int
    skips: list[Skip] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)
    shard: Shard | None = None
    merged: RunSummary | None = None  # set when this shard completed the set and merged it
    warnings: list[str] = field(default_factory=list)  # e.g. a wrong-answer rate far above the model's known one

    @property
    def n_wrong(self) -> int:
        """Samples skipped because the model answered them wrongly."""
        return sum(s.kind == WRONG_ANSWER for s in self.skips)

    @property
    def n_errors(self) -> int:
        """Samples that failed on an unexpected error (not a recorded skip), retried by the next run."""
        return sum(str(s.kind).startswith(ERROR_KIND) for s in self.skips)

    def raise_if_failed(self) -> None:
        """`MMLensError` when the run analysed nothing and errors were the cause (skips alone are no failure)."""
        if self.n_analysed == 0 and self.n_errors:
            raise MMLensError(
                f"{self.command}: no sample analysed, {self.n_errors} of {self.n_samples} failed with errors; "
                f"tracebacks in {self.path / (self.command + '.errors.log')}"
            )

    def text(self) -> str:
        """The end-of-run report: counts, skip reasons per kind, files written."""
        what = self.command if self.shard is None else f"{self.command} shard {self.shard}"
        lines = [f"{what}: {self.n_analysed} of {self.n_samples} sample(s) analysed"]
        if self.n_resumed:
            lines[0] += f" ({self.n_resumed} finished by an earlier run, resumed)"
        if self.skips:
            lines.append(summarise_skips(self.skips))
        lines += [f"warning: {w}" for w in self.warnings]
        lines += [f"wrote {p}" for p in self.written]
        if self.merged is not None:
            lines.append(f"all shards finished; merged into {self.merged.path}:")
            lines.append(self.merged.text())
        return "\n".join(lines)
