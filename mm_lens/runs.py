"""Run directories: long ``flow`` / ``lens`` runs that lose nothing when killed, record skipped samples with
their reasons, resume where they stopped, and split into shards that merge back into one table.

A run directory holds, per command (``flow`` or ``lens``)::

    flow.config.json     the run's configuration; re-running into the directory must match it
    flow.results.jsonl   one line per analysed sample {"index", "question_id", "rows"}: appended, flushed and
                         fsynced as each sample finishes, so a SIGKILL loses at most the sample being computed
    flow.skips.jsonl     one line per skipped sample {"index", "question_id", "kind", "reason"}, likewise
    flow.errors.log      tracebacks of unexpected per-sample errors
    flow.csv             the final table (CLI contract columns), flow.html its figure, flow.skips.csv the skips

``index`` is the sample's row in the dataset (after ``--limit``): it keys resumption, sharding and the row order
of the final table, which therefore equals an uninterrupted run's. A trailing partial line (the process died
mid-write) is dropped on resume. Skipped samples are not retried, except those that failed with an unexpected
error (kind ``"error ..."``, e.g. out of memory), which are retried by the next run.

Shard ``i/n`` of a run takes the samples whose index is ``i`` modulo ``n`` and lives in ``OUT/shard-i-of-n/``;
the shard process that completes the set merges all shards into ``OUT`` (same files as an unsharded run).
`merge_runs` does the same for shard directories gathered by hand.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from mm_lens.types import Sample, SampleSkip, Skip, summarise_skips
from mm_lens.errors import MMLensError

COMMANDS = ("flow", "lens")
FORMAT = 1  # run-directory format version, recorded in the config
ERROR_KIND = "error"  # skip kinds starting with this are unexpected failures, retried on resume
MAX_CONSECUTIVE_ERRORS = 5  # this many unexpected failures in a row stop the run (a set-up problem)
SHARD_DIR = re.compile(r"^shard-(\d+)-of-(\d+)$")
# Config keys shards may differ in: the shard, and where the images and CSV sit on each machine (the CSV's
# content must still agree: dataset_sha256, n_samples).
MERGE_IGNORES = ("shard", "images", "dataset")


def columns(command: str) -> list[str]:
    """The CLI contract columns of a command's table."""
    if command == "flow":
        from mm_lens.sweep import FLOW_COLUMNS

        return list(FLOW_COLUMNS)
    if command == "lens":
        from mm_lens.lens import LENS_COLUMNS

        return list(LENS_COLUMNS)
    raise MMLensError(f"unknown run command {command!r}; expected one of {', '.join(COMMANDS)}")


# ------------------------------------------------------------------------------------------------ shards


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


def _local_device(environ: dict[str, str] | None = None) -> str | None:
    """``cuda:LOCAL_RANK`` for a launcher-started process on a CUDA machine (one GPU per process), else None."""
    env = os.environ if environ is None else environ
    local = env.get("LOCAL_RANK")
    if local is None or not local.isdigit():
        return None
    import torch

    return f"cuda:{local}" if torch.cuda.is_available() else None


# ------------------------------------------------------------------------------------------ configuration


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _model_id(model: Any) -> str:
    """A local checkpoint as its absolute path (so ``./m`` and ``/abs/m`` agree); a hub id unchanged."""
    model = getattr(model, "name", model)  # a loaded HookedLlava: where it came from
    path = Path(str(model)).expanduser()
    return str(path.resolve()) if path.exists() else str(model)


def _dtype_name(dtype: Any) -> str:
    from mm_lens.model import _resolve_dtype

    return str(_resolve_dtype(dtype)).removeprefix("torch.")


def run_config(command: str, dataset: str | Path, n_samples: int, **options: Any) -> dict[str, Any]:
    """The configuration recorded in (and compared against) a run directory."""
    from mm_lens import __version__
    from mm_lens.data.gqa import task_path

    path = task_path(dataset)
    config: dict[str, Any] = {
        "command": command,
        "format": FORMAT,
        "mm_lens_version": __version__,
        "dataset": str(path.resolve()),
        "dataset_sha256": _file_sha256(path),
        "n_samples": n_samples,
        "columns": columns(command),
    }
    config.update(options)
    return json.loads(json.dumps(config))  # plain JSON types, as read back from disk


def config_differences(old: dict[str, Any], new: dict[str, Any], ignore: Iterable[str] = ()) -> list[str]:
    """``key: old -> new`` for every differing key (missing keys count as None)."""
    skip = set(ignore)
    return [
        f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        for key in sorted(set(old) | set(new))
        if key not in skip and old.get(key) != new.get(key)
    ]


# ------------------------------------------------------------------------------------------ run directory


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
        if command not in COMMANDS:
            columns(command)  # raises with the list of commands
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
        diff = config_differences(old, config)
        if diff:
            raise MMLensError(
                f"{self.path} holds a {self.command} run with a different configuration ({'; '.join(diff)}); "
                "re-run with the same options to resume it, or pass a new --out"
            )
        self._config_written = True

    def open(self, config: dict[str, Any]) -> RunDir:
        """Create or resume the run; the config file is written with the first record (or at `finish`)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise MMLensError(f"cannot create the run folder {str(self.path)!r}: {err}") from err
        self._lock = _lock(self.path / f".{self.command}.lock", self.path, self.command)
        self.check_config(config)
        self.config = config
        self.load(repair=True)
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

    def add_result(self, index: int, question_id: str, table: pd.DataFrame) -> None:
        """Append one sample's rows (all of them in one line, so a sample is never half recorded)."""
        rows = table[columns(self.command)].to_dict("split")["data"]
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
        cols = columns(self.command)
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
        from mm_lens.plots import flow_figure, lens_figure

        fig = (flow_figure if self.command == "flow" else lens_figure)(table)
        html_path = self.file("html")
        _atomic_write(html_path, lambda tmp: fig.write_html(tmp, include_plotlyjs=True))
        return [csv_path, html_path, skips_path]


def _lock(path: Path, folder: Path, command: str, wait: bool = False):
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
        raise MMLensError(
            f"another mm-lens {command} process is writing to {folder}; wait for it to finish or pass another --out"
        ) from None
    return handle


# ------------------------------------------------------------------------------------------------ runs


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

    def text(self) -> str:
        """The end-of-run report: counts, skip reasons per kind, files written."""
        what = self.command if self.shard is None else f"{self.command} shard {self.shard}"
        lines = [f"{what}: {self.n_analysed} of {self.n_samples} sample(s) analysed"]
        if self.n_resumed:
            lines[0] += f" ({self.n_resumed} finished by an earlier run, resumed)"
        if self.skips:
            lines.append(summarise_skips(self.skips))
        lines += [f"wrote {p}" for p in self.written]
        if self.merged is not None:
            lines.append(f"all shards finished; merged into {self.merged.path}:")
            lines.append(self.merged.text())
        return "\n".join(lines)


def execute(
    run: RunDir,
    samples: Sequence[Sample],
    indices: Iterable[int],
    process: Callable[[Sample], pd.DataFrame],
    retry_skips: bool = False,
    progress: bool = True,
) -> int:
    """Run `process` on every sample of `indices` not done yet, recording each result or skip as it finishes.

    `SampleSkip` is recorded with its reason. Any other exception is recorded as a skip of kind
    ``"error (Type)"`` (its traceback in ``COMMAND.errors.log``) and retried by the next run;
    `MAX_CONSECUTIVE_ERRORS` of them in a row stop the run with `MMLensError`. Returns the samples done now.
    """
    from tqdm.auto import tqdm

    indices = list(indices)
    done = run.done(retry_skips)
    todo = [i for i in indices if i not in done]
    failures: list[str] = []
    bar = tqdm(todo, desc=run.command, unit="sample", total=len(indices), initial=len(indices) - len(todo),
               disable=not progress)
    for index in bar:
        sample = samples[index]
        qid = str(sample.question_id)
        try:
            table = process(sample)
        except SampleSkip as skip:
            run.add_skip(index, qid, skip.kind, skip.reason)
            failures.clear()
            continue
        except Exception as err:  # noqa: BLE001 - one bad sample must not end a long run
            kind = f"{ERROR_KIND} ({type(err).__name__})"
            reason = " ".join(str(err).split()) or type(err).__name__
            run.add_skip(index, qid, kind, reason)
            run.log_error(index, qid, traceback.format_exc())
            _free_memory()
            failures.append(f"question {qid}: {kind}: {reason}")
            bar.write(f"mm-lens: warning: {failures[-1]}", file=sys.stderr)
            if len(failures) >= MAX_CONSECUTIVE_ERRORS:
                raise MMLensError(
                    f"stopped after {len(failures)} samples in a row failed (last: {failures[-1][:300]}); "
                    f"tracebacks in {run.file('errors.log')}. Fix the cause and re-run the same command: finished "
                    "samples are kept and the failed ones are retried"
                ) from err
            continue
        run.add_result(index, qid, table)
        failures.clear()
    return len(todo)


def _free_memory() -> None:
    """Give cached GPU memory back after a failed sample (an out-of-memory error must not doom the next)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _samples(dataset: str | Path, limit: int | None) -> list[Sample]:
    from mm_lens.data.gqa import load_task

    samples = load_task(dataset)
    if limit is not None:
        if limit < 1:
            raise MMLensError(f"--limit {limit} must be at least 1")
        samples = samples[:limit]
    return samples


def _image_loader(images: str | Path) -> tuple[Path, Callable[[Sample], Any]]:
    from mm_lens.data.gqa import open_image

    folder = Path(images).expanduser()
    if not folder.is_dir():
        raise MMLensError(f"--images {str(images)!r} is not a folder; pass the folder holding <img_id>.jpg")
    return folder.resolve(), lambda sample: open_image(folder, sample)


def _run(
    command: str,
    out: str | Path,
    dataset: str | Path,
    images: str | Path,
    model: Any,
    options: Callable[[Any], dict[str, Any]],
    make_process: Callable[[Any, Callable, Any], Callable[[Sample], pd.DataFrame]],
    limit: int | None,
    dtype: Any,
    device: str | None,
    device_map: Any,
    shard: Shard | str | None,
    retry_skips: bool,
    progress: bool,
    check_model: Callable[[Any, Any], None] = lambda model, resolved: None,
    resolve: Callable[[], Any] = lambda: None,
) -> RunSummary:
    """Shared body of `flow_run` / `lens_run`: everything is validated before the model loads, and the
    model is not loaded at all when every sample is already done. `resolve` gives the run's `RunProtocol`
    (after the dataset and images are checked); `options` the command's options given it. Both are recorded
    in the configuration."""
    if isinstance(shard, str):
        shard = parse_shard(shard)
    if shard is None:
        shard = shard_from_env()
        if shard is not None and device is None and device_map is None:
            device = _local_device()
    if shard is not None and shard.count == 1:
        shard = None
    samples = _samples(dataset, limit)
    images_dir, load_image = _image_loader(images)
    if dtype is not None:
        _dtype_name(dtype)  # a bad --dtype fails before the checkpoint is read
    protocol = resolve()
    if protocol is not None and dtype is None:
        dtype = protocol.dtype
    config = run_config(
        command,
        dataset,
        len(samples),
        model=_model_id(model),
        images=str(images_dir),
        limit=limit,
        dtype=_dtype_name(dtype),
        **(protocol.record if protocol is not None else {}),
        **options(protocol),
        shard=None if shard is None else str(shard),
    )
    out = Path(out).expanduser()
    indices = shard.indices(len(samples)) if shard else range(len(samples))
    with RunDir(out / shard.dirname if shard else out, command).open(config) as run:
        n_resumed = len(run.done(retry_skips) & set(indices))
        if n_resumed < len(indices):
            from mm_lens.model import load

            loaded = not isinstance(model, (str, os.PathLike))
            hooked = model if loaded else load(model, device=device, dtype=dtype, device_map=device_map)
            check_model(hooked, protocol)
            if protocol is not None:
                print(f"mm-lens: {protocol.line()}", file=sys.stderr)
            execute(run, samples, indices, make_process(hooked, load_image, protocol), retry_skips, progress)
        written = run.finish(outputs=shard is None)
        summary = RunSummary(
            command,
            run.path,
            n_samples=len(indices),
            n_analysed=len(set(run.results) & set(indices)),
            n_resumed=n_resumed,
            skips=run.skip_list(),
            written=written,
            shard=shard,
        )
    if shard is not None:
        summary.merged = _merge_if_complete(command, out, shard.count)
    return summary


@dataclass(frozen=True)
class RunProtocol:
    """A run's protocol resolved from the checkpoint's files before loading it, with the defaults it implies."""

    protocol: Any  # mm_lens.protocol.Protocol
    n_layers: int
    dtype: Any
    window: int | None = None  # flow only
    readout: str | None = None  # lens only

    @property
    def record(self) -> dict[str, Any]:
        """What the run's configuration records (and a resumed run must match)."""
        out: dict[str, Any] = {
            "protocol": self.protocol.name,
            "template": self.protocol.conversation.name if self.protocol.conversation else "checkpoint chat template",
            "vocab": "original (ids below <image>)" if self.protocol.original_vocab else "full",
        }
        if self.readout is not None:
            out["readout"] = self.readout
            out["lens_points"] = "embeddings..output" if self.protocol.readout.from_embeddings else "after each block"
        return out

    def line(self) -> str:
        """One line saying what was resolved, for the terminal."""
        parts = [f"protocol {self.protocol.name}", f"template {self.record['template']}", f"dtype {_dtype_name(self.dtype)}"]
        if self.window is not None:
            parts.append(f"window {self.window} of {self.n_layers} layers")
        if self.readout is not None:
            parts.append(f"lens readout {self.readout}")
        return ", ".join(parts)


def resolve_run_protocol(
    model: Any, protocol: str | None, dtype: Any, device: str | None, window: int | None = None,
    readout: str | None = None, command: str = "flow",
) -> RunProtocol:
    """Resolve ``--protocol`` (default auto), and the dtype / window / readout it implies when not given."""
    from mm_lens.protocol import protocol_for_checkpoint, resolve_protocol

    if isinstance(model, (str, os.PathLike)):
        from mm_lens.model import check_checkpoint

        check_checkpoint(str(model))  # the load's own errors, before anything reads the files
        proto, n_layers = protocol_for_checkpoint(protocol, str(model)), _n_layers(str(model))
    else:  # a loaded HookedLlava
        proto, n_layers = resolve_protocol(protocol, model), model.n_layers
        dtype = next(model.hf_model.parameters()).dtype if dtype is None else dtype
    proto = proto.with_readout(readout)
    return RunProtocol(
        protocol=proto,
        n_layers=n_layers,
        dtype=proto.dtype(device) if dtype is None else dtype,
        window=(proto.window(n_layers) if window is None else window) if command == "flow" else None,
        readout=proto.readout.name if command == "lens" else None,
    )


def _n_layers(model: str) -> int:
    from transformers import AutoConfig

    from mm_lens.model import offline_if_local

    with offline_if_local(model):
        config = AutoConfig.from_pretrained(model)
    return int(config.text_config.num_hidden_layers)


def flow_run(
    out: str | Path,
    model: Any,  # a path / hub id, or a loaded HookedLlava
    dataset: str | Path,
    images: str | Path,
    blocks: Sequence[str] | None = None,
    window: int | None = None,
    all_samples: bool = False,
    engine: str = "fast",
    limit: int | None = None,
    dtype: Any = None,
    device: str | None = None,
    device_map: Any = None,
    shard: Shard | str | None = None,
    retry_skips: bool = False,
    progress: bool = True,
    protocol: str | None = "auto",
) -> RunSummary:
    """The attention-knockout sweep as a resumable run into `out` (``flow.csv``, ``flow.html``, skips).

    ``protocol`` (default auto) decides the inputs and the defaults: window None = the protocol's, dtype
    None = the protocol's on the device (the study: float16 on CUDA).
    """
    from mm_lens.knockout import STUDY_BLOCKS, parse_edge
    from mm_lens.regions import SPAN_NAMES
    from mm_lens.sweep import flow_sample, get_engine, layer_window

    parsed = [parse_edge(b, extra_names=SPAN_NAMES) for b in (blocks or STUDY_BLOCKS)]
    get_engine(engine)
    if window is not None and (not isinstance(window, int) or window < 1):
        raise MMLensError(f"window {window!r} must be a positive number of layers")
    def resolve():
        return resolve_run_protocol(model, protocol, dtype, device, window=window, command="flow")

    def options(resolved):
        return {"blocks": [str(b) for b in parsed], "window": resolved.window, "engine": engine,
                "all_samples": all_samples}

    def make_process(model_, load_image, resolved):
        proto, k = resolved.protocol, resolved.window
        return lambda sample: flow_sample(model_, sample, load_image, parsed, k, all_samples, engine, proto)

    def check_model(model_, resolved):
        layer_window(0, resolved.window, model_.n_layers)

    return _run("flow", out, dataset, images, model, options, make_process, limit, dtype, device, device_map,
                shard, retry_skips, progress, check_model, resolve)


def lens_run(
    out: str | Path,
    model: Any,  # a path / hub id, or a loaded HookedLlava
    dataset: str | Path,
    images: str | Path,
    limit: int | None = None,
    dtype: Any = None,
    device: str | None = None,
    device_map: Any = None,
    shard: Shard | str | None = None,
    retry_skips: bool = False,
    progress: bool = True,
    protocol: str | None = "auto",
    readout: str | None = None,
    all_samples: bool = False,
) -> RunSummary:
    """The answer logit lens as a resumable run into `out` (``lens.csv``, ``lens.html``, skips).

    Under the study protocol only correctly answered samples count (``all_samples`` keeps every one);
    ``readout`` ``"raw"`` / ``"norm"`` overrides the protocol's.
    """
    from mm_lens.lens import lens_sample

    def resolve():
        return resolve_run_protocol(model, protocol, dtype, device, readout=readout, command="lens")

    def make_process(model_, load_image, resolved):
        proto = resolved.protocol
        return lambda sample: lens_sample(model_, sample, load_image, proto, all_samples, resolved.readout)

    return _run("lens", out, dataset, images, model, lambda resolved: {"all_samples": all_samples} if all_samples else {},
                make_process, limit, dtype, device, device_map, shard, retry_skips, progress, resolve=resolve)


# ------------------------------------------------------------------------------------------------ merge


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
        commands = [c for c in COMMANDS if any(_holds(d, c) for d in shard_dirs)]
        if not commands:
            raise MMLensError(f"no flow or lens shard runs found in {', '.join(map(str, shard_dirs))}")
    return [_merge(command, Path(out).expanduser(), _shard_dirs(shard_dirs, command)) for command in commands]


def _holds(path: str | Path, command: str) -> bool:
    path = Path(path).expanduser()
    if RunDir(path, command).exists():
        return True
    return path.is_dir() and any(SHARD_DIR.match(p.name) and RunDir(p, command).exists() for p in path.iterdir())


def _merge(command: str, out: Path, dirs: list[Path]) -> RunSummary:
    runs = []
    for path in dirs:
        run = RunDir(path, command)
        run.config = run.read_config()
        run.load(repair=False)
        runs.append(run)
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
    target = RunDir(out, command)
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(_lock(out / f".{command}.lock", out, command)):
        target.check_config(merged_config)
        target.config = merged_config
        for run in shards.values():
            target.results.update(run.results)
            target.skips.update(run.skips)
        _write_text(target.config_path, json.dumps(merged_config, indent=2) + "\n")
        target._config_written = True
        _write_text(target.results_path, "".join(_dumps(r) for _, r in sorted(target.results.items())))
        _write_text(target.skips_path, "".join(_dumps(s) for _, s in sorted(target.skips.items())))
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


def _merge_if_complete(command: str, out: Path, count: int) -> RunSummary | None:
    """Merge ``out/shard-*-of-count`` into `out` when every shard has finished (called by each shard at its end;
    the last one to finish does the merge). None when some shard is still running or missing."""
    dirs = [out / Shard(i, count).dirname for i in range(count)]
    for i, path in enumerate(dirs):
        run = RunDir(path, command)
        if not run.exists():
            return None
        run.config = run.read_config()
        run.load(repair=False)
        if not set(Shard(i, count).indices(int(run.config["n_samples"]))) <= run.recorded():
            return None
    try:
        return _merge(command, out, dirs)
    except MMLensError as err:
        if "is writing to" in str(err):  # another shard finished at the same moment and is merging
            return None
        raise


__all__ = [
    "COMMANDS",
    "RunDir",
    "RunSummary",
    "Shard",
    "config_differences",
    "execute",
    "flow_run",
    "lens_run",
    "merge_runs",
    "parse_shard",
    "run_config",
    "shard_from_env",
]
