"""Resumable runs of an analysis over a dataset: ``flow_run``, ``lens_run``, ``attention_run``, ``patching_run``,
``maps_run``.

A run validates everything it can before the model loads (dataset, images folder, options, the protocol
resolved from the checkpoint's files), records its configuration, then analyses each sample not done yet and
writes it at once into the run directory (`mm_lens.run_dir`): killed at any point, the same command resumes
where it stopped. Skipped samples are recorded with their reasons; unexpected per-sample errors are recorded
too, and retried by the next run. ``--shard i/n`` splits the samples (`mm_lens.shards`), and the last shard
to finish merges them.

One generic run, thin specialisations (as TransformerLens's ``get_act_patch_resid_pre`` is
``generic_activation_patch`` with its own parts): `run_analysis` is the run; what every analysis's run shares
(limit, dtype, device, device_map, shard, retry_skips, progress, protocol) is one record, `RunOptions`, decided
once here; each ``*_run`` adds only its analysis's own parameters and hands `run_analysis` a `RunSpec` (how to
make the per-sample step, what to record, what to check on the loaded model). The run options are
keyword-only: pass them as keywords (``lens_run(out, model, dataset, images, limit=5, dtype="float32")``, as
before), or as one record (``options=RunOptions(limit=5)``; keywords given besides override its fields). An
unknown keyword is a `TypeError` listing the run's own parameters and the run options.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from mm_lens.analyses import Analysis, Process, each_sample, get_analysis
from mm_lens.attention import DEFAULT_SOURCES, DEFAULT_TARGETS, attention_sample
from mm_lens.data.gqa import load_task, open_image
from mm_lens.engines import DEFAULT_ENGINE
from mm_lens.errors import MMLensError
from mm_lens.expectations import wrong_answer_warning
from mm_lens.inputs import prepare
from mm_lens.knockout import STUDY_BLOCKS, Edge, parse_edge
from mm_lens.lens import lens_sample
from mm_lens.maps import MAP_COLUMNS, METHODS, map_agreement, patch_groups, patch_map
from mm_lens.model import check_checkpoint, load, offline_if_local, protocol_for_checkpoint, resolve_protocol
from mm_lens.names import MAP_BOX_GROUP
from mm_lens.patching import PAIR_MODES, SITES, counterfactual_pairs, patching_sample
from mm_lens.regions import SPAN_NAMES
from mm_lens.run_dir import (
    ERROR_KIND,
    RunDir,
    RunSummary,
    Shard,
    config_differences,
    dtype_name,
    model_id,
    parse_shard,
    run_config,
)
from mm_lens.shards import local_device, merge_if_complete, merge_runs, shard_from_env
from mm_lens.sweep import flow_sample, get_engine, greedy_answer, layer_window, require_correct, sample_spans
from mm_lens.types import Sample, SampleSkip, boxes_for, check_sample

#: The analyses a run can be (`mm_lens.analyses.ANALYSES`).
COMMANDS = ("flow", "lens", "attention", "patching", "maps")
MAX_CONSECUTIVE_ERRORS = 5  # this many unexpected failures in a row stop the run (a set-up problem)


def execute(
    run: RunDir,
    samples: Sequence[Sample],
    indices: Iterable[int],
    process: Process,
    retry_skips: bool = False,
    progress: bool = True,
) -> int:
    """Run `process` on every sample of `indices` not done yet, recording each result or skip as it finishes.

    `SampleSkip` is recorded with its reason. Any other exception is recorded as a skip of kind
    ``"error (Type)"`` (its traceback in ``COMMAND.errors.log``) and retried by the next run;
    `MAX_CONSECUTIVE_ERRORS` of them in a row stop the run with `MMLensError`. Returns the samples done now.
    """
    indices = list(indices)
    done = run.done(retry_skips)
    todo = [i for i in indices if i not in done]
    failures: list[str] = []

    def on_error(index: int, sample: Sample, err: Exception) -> None:
        qid = str(sample.question_id)
        kind = f"{ERROR_KIND} ({type(err).__name__})"
        reason = " ".join(str(err).split()) or type(err).__name__
        run.add_skip(index, qid, kind, reason)
        run.log_error(index, qid, traceback.format_exc())
        _free_memory()
        failures.append(f"question {qid}: {kind}: {reason}")
        tqdm.write(f"mm-lens: warning: {failures[-1]}", file=sys.stderr)
        if len(failures) >= MAX_CONSECUTIVE_ERRORS:
            raise MMLensError(
                f"stopped after {len(failures)} samples in a row failed (last: {failures[-1][:300]}); "
                f"tracebacks in {run.file('errors.log')}. Fix the cause and re-run the same command: finished "
                "samples are kept and the failed ones are retried"
            ) from err

    steps = each_sample(samples, process, todo, progress, run.command, on_error, resumed=len(indices) - len(todo))
    for index, sample, result in steps:
        if isinstance(result, SampleSkip):
            run.add_skip(index, str(sample.question_id), result.kind, result.reason)
        else:
            run.add_result(index, str(sample.question_id), result)
        failures.clear()
    return len(todo)


def _free_memory() -> None:
    """Give cached GPU memory back after a failed sample (an out-of-memory error must not doom the next)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _samples(dataset: str | Path, limit: int | None) -> list[Sample]:

    samples = load_task(dataset)
    if limit is not None:
        if limit < 1:
            raise MMLensError(f"--limit {limit} must be at least 1")
        samples = samples[:limit]
    return samples


def _image_loader(images: str | Path) -> tuple[Path, Callable[[Sample], Any]]:

    folder = Path(images).expanduser()
    if not folder.is_dir():
        raise MMLensError(f"--images {str(images)!r} is not a folder; pass the folder holding <img_id>.jpg")
    return folder.resolve(), lambda sample: open_image(folder, sample)


@dataclass(frozen=True)
class RunOptions:
    """How a run goes, the same for every analysis: the options each ``*_run`` takes besides its own.

    ``limit``: only the first N samples; ``dtype`` / ``device`` / ``device_map``: how the model loads (dtype None
    = the protocol's on the device); ``shard``: ``"i/n"`` or a `Shard` (None: from ``RANK`` / ``WORLD_SIZE``
    under a launcher); ``retry_skips``: on resume, retry recorded skips; ``progress``: the progress bar;
    ``protocol``: ``"auto"``, ``"study"`` or ``"checkpoint"``.
    """

    limit: int | None = None
    dtype: Any = None
    device: str | None = None
    device_map: Any = None
    shard: Shard | str | None = None
    retry_skips: bool = False
    progress: bool = True
    protocol: str | None = "auto"

    @classmethod
    def build(
        cls, options: RunOptions | None = None, overrides: Mapping[str, Any] | None = None, caller: str = "run",
        own: Sequence[str] = (),
    ) -> RunOptions:
        """`options` (default all defaults) with the keyword `overrides` applied; an unknown keyword is a
        `TypeError` naming `caller`, its `own` parameters and the run options."""
        if options is not None and not isinstance(options, RunOptions):
            raise TypeError(f"{caller}() options= takes a RunOptions, not {type(options).__name__}")
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - set(RUN_OPTIONS))
        if unknown:
            mine = f"its own parameters are {', '.join(own)}; " if own else ""
            raise TypeError(
                f"{caller}() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; {mine}"
                f"the run options are {', '.join(RUN_OPTIONS)}"
            )
        return replace(options or cls(), **overrides)


#: The names of the run options (`RunOptions`' fields), in order.
RUN_OPTIONS = tuple(f.name for f in fields(RunOptions))


@dataclass
class RunSpec:
    """What a resumable run needs besides its analysis: where, on what, the analysis's own parts, and how.

    `options` gives the analysis's options (recorded in the configuration) given the resolved `RunProtocol`;
    `make_process` the per-sample step given the loaded model, the image loader and the protocol; `check_model`
    validates options against the loaded model; `window` (flow) and `readout` (lens), None for the protocol's,
    are resolved with the protocol by `run_analysis` after the dataset and images are checked. `run` holds the
    options every analysis shares (`RunOptions`).
    """

    out: str | Path
    model: Any  # a path / hub id, or a loaded HookedLlava
    dataset: str | Path
    images: str | Path
    make_process: Callable[[Any, Callable[[Sample], Any], Any], Process]
    options: Callable[[Any], dict[str, Any]] = lambda resolved: {}
    check_model: Callable[[Any, Any], None] = lambda model, resolved: None
    window: int | None = None  # flow: None = the protocol's
    readout: str | None = None  # lens: None = the protocol's
    run: RunOptions = field(default_factory=RunOptions)


def run_analysis(analysis: str | Analysis, spec: RunSpec) -> RunSummary:
    """Run `analysis` resumably as `spec` says: everything is validated before the model loads, and the model
    is not loaded at all when every sample is already done. The resolved protocol and the analysis's options
    are recorded in the configuration."""
    analysis = get_analysis(analysis)
    command = analysis.name
    opts = spec.run
    shard, device = opts.shard, opts.device
    if isinstance(shard, str):
        shard = parse_shard(shard)
    if shard is None:
        shard = shard_from_env()
        if shard is not None and device is None and opts.device_map is None:
            device = local_device()
    if shard is not None and shard.count == 1:
        shard = None
    samples = _samples(spec.dataset, opts.limit)
    images_dir, load_image = _image_loader(spec.images)
    dtype = opts.dtype
    if dtype is not None:
        dtype_name(dtype)  # a bad --dtype fails before the checkpoint is read
    protocol = resolve_run_protocol(
        spec.model, opts.protocol, dtype, device, window=spec.window, readout=spec.readout, command=command
    )
    if protocol is not None and dtype is None:
        dtype = protocol.dtype
    config = run_config(
        command,
        spec.dataset,
        len(samples),
        model=model_id(spec.model),
        images=str(images_dir),
        limit=opts.limit,
        dtype=dtype_name(dtype),
        **(protocol.record if protocol is not None else {}),
        **spec.options(protocol),
        shard=None if shard is None else str(shard),
    )
    out = Path(spec.out).expanduser()
    indices = shard.indices(len(samples)) if shard else range(len(samples))
    with RunDir(out / shard.dirname if shard else out, command).open(config) as run:
        n_resumed = len(run.done(opts.retry_skips) & set(indices))
        if n_resumed < len(indices):

            loaded = not isinstance(spec.model, (str, os.PathLike))
            hooked = spec.model if loaded else load(spec.model, device=device, dtype=dtype, device_map=opts.device_map)
            spec.check_model(hooked, protocol)
            if protocol is not None:
                print(f"mm-lens: {protocol.line()}", file=sys.stderr)
            process = spec.make_process(hooked, load_image, protocol)
            execute(run, samples, indices, process, opts.retry_skips, opts.progress)
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
        warning = wrong_answer_warning(config["model"], spec.dataset, summary.n_analysed + summary.n_wrong,
                                       summary.n_wrong)
        summary.warnings += [warning] if warning else []
    if shard is not None:
        summary.merged = merge_if_complete(command, out, shard.count)
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
        parts = [
            f"protocol {self.protocol.name}", f"template {self.record['template']}", f"dtype {dtype_name(self.dtype)}"
        ]
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

    if isinstance(model, (str, os.PathLike)):

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
    engine: str = DEFAULT_ENGINE,
    *,
    options: RunOptions | None = None,
    **run_options: Any,
) -> RunSummary:
    """The attention-knockout sweep as a resumable run into `out` (``flow.csv``, ``flow.html``, skips).

    ``blocks`` default `mm_lens.knockout.STUDY_BLOCKS`; ``window`` None = the protocol's; ``engine`` default
    `mm_lens.engines.DEFAULT_ENGINE`. The run options (`RunOptions`: ``limit``, ``dtype``, ``device``, ...,
    ``protocol``) as keywords or ``options=``; dtype None = the protocol's on the device (the study: float16
    on CUDA).
    """

    run = RunOptions.build(options, run_options, "flow_run", ("blocks", "window", "all_samples", "engine"))
    parsed = [parse_edge(b, extra_names=SPAN_NAMES) for b in (blocks or STUDY_BLOCKS)]
    get_engine(engine)
    if window is not None and (not isinstance(window, int) or window < 1):
        raise MMLensError(f"window {window!r} must be a positive number of layers")

    def record(resolved):
        return {"blocks": [str(b) for b in parsed], "window": resolved.window, "engine": engine,
                "all_samples": all_samples}

    def make_process(model_, load_image, resolved):
        proto, k = resolved.protocol, resolved.window
        return lambda sample: flow_sample(model_, sample, load_image, parsed, k, all_samples, engine, proto)

    def check_model(model_, resolved):
        layer_window(0, resolved.window, model_.n_layers)

    return run_analysis("flow", RunSpec(
        out, model, dataset, images, make_process, record, check_model, window=window, run=run
    ))


def lens_run(
    out: str | Path,
    model: Any,  # a path / hub id, or a loaded HookedLlava
    dataset: str | Path,
    images: str | Path,
    *,
    readout: str | None = None,
    all_samples: bool = False,
    options: RunOptions | None = None,
    **run_options: Any,
) -> RunSummary:
    """The answer logit lens as a resumable run into `out` (``lens.csv``, ``lens.html``, skips).

    Under the study protocol only correctly answered samples count (``all_samples`` keeps every one);
    ``readout`` ``"raw"`` / ``"norm"`` overrides the protocol's. Run options as in `flow_run`.
    """

    run = RunOptions.build(options, run_options, "lens_run", ("readout", "all_samples"))

    def make_process(model_, load_image, resolved):
        proto = resolved.protocol
        return lambda sample: lens_sample(model_, sample, load_image, proto, all_samples, resolved.readout)

    def record(resolved):
        return {"all_samples": all_samples} if all_samples else {}

    return run_analysis("lens", RunSpec(out, model, dataset, images, make_process, record, readout=readout, run=run))


def attention_run(
    out: str | Path,
    model: Any,  # a path / hub id, or a loaded HookedLlava
    dataset: str | Path,
    images: str | Path,
    targets: Sequence[str] | None = None,
    sources: Sequence[str] | None = None,
    *,
    options: RunOptions | None = None,
    **run_options: Any,
) -> RunSummary:
    """Attention mass between regions as a resumable run into `out` (``attention.csv``, ``attention.html``).

    ``targets`` / ``sources`` default `mm_lens.attention.DEFAULT_TARGETS` / ``DEFAULT_SOURCES``. Run options as
    in `flow_run`.
    """

    run = RunOptions.build(options, run_options, "attention_run", ("targets", "sources"))
    targets, sources = list(targets or DEFAULT_TARGETS), list(sources or DEFAULT_SOURCES)

    def record(resolved):
        return {"targets": targets, "sources": sources}

    def make_process(model_, load_image, resolved):
        proto = resolved.protocol
        return lambda sample: attention_sample(model_, sample, load_image, targets, sources, proto)

    return run_analysis("attention", RunSpec(out, model, dataset, images, make_process, record, run=run))


def patching_run(
    out: str | Path,
    model: Any,  # a path / hub id, or a loaded HookedLlava
    dataset: str | Path,
    images: str | Path,
    regions: Sequence[str] = ("Image",),
    site: str = "resid_pre",
    pairs: str = "image",
    *,
    options: RunOptions | None = None,
    **run_options: Any,
) -> RunSummary:
    """Activation patching over a task set as a resumable run into `out` (``patching.csv``, ``patching.html``).

    Each sample is paired from the data (`mm_lens.patching.counterfactual_pairs`: ``pairs="image"``, another
    image whose answer differs; ``"options"``, the options swapped) and patched at `site` over every layer, for
    each of `regions`. A sample without a partner, or whose pair changes the layout, is skipped with the reason.
    Run options as in `flow_run`.
    """

    run = RunOptions.build(options, run_options, "patching_run", ("regions", "site", "pairs"))
    regions = list(regions)
    if site not in SITES:
        raise MMLensError(f"--site {site!r} is not a patching site; choose one of {', '.join(SITES)}")
    if pairs not in PAIR_MODES:
        raise MMLensError(f"--pairs {pairs!r} is not known; choose one of {', '.join(PAIR_MODES)}")
    by_id = {str(p.sample.question_id): p for p in counterfactual_pairs(_samples(dataset, run.limit), pairs)}

    def record(resolved):
        return {"regions": regions, "site": site, "pairs": pairs}

    def make_process(model_, load_image, resolved):
        proto = resolved.protocol

        def process(sample: Sample):
            pair = by_id.get(str(sample.question_id))
            if pair is None:
                raise SampleSkip(f"no {pairs} counterfactual for this sample in the dataset", "no counterfactual")
            tables = [patching_sample(model_, pair, load_image, region, site, proto) for region in regions]
            return pd.concat(tables, ignore_index=True)

        return process

    return run_analysis("patching", RunSpec(out, model, dataset, images, make_process, record, run=run))


def _map_windows(layers: Any) -> list[range] | None:
    """`maps_run`'s ``layers`` as a list of windows (None: each sample's strongest window)."""
    if layers is None:
        return None
    if isinstance(layers, range) or (isinstance(layers, Sequence) and all(isinstance(x, int) for x in layers)):
        layers = [layers]
    windows = []
    for w in layers:
        w = w if isinstance(w, range) else range(min(w), max(w) + 1) if len(w) else range(0)
        if not len(w) or w.step != 1 or w.start < 0:
            raise MMLensError(f"layers {w} must be a non-empty window of consecutive layers from 0 up")
        windows.append(w)
    return windows


def _map_group(group: Any) -> int | str:
    if group == MAP_BOX_GROUP:
        return group
    if isinstance(group, str) and group.strip().isdigit():
        group = int(group)
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise MMLensError(f"--group {group!r} must be a positive number of patches per side, or {MAP_BOX_GROUP!r}")
    return group


def maps_sample(
    model: Any,
    sample: Sample,
    load_image: Callable[[Sample], Any],
    target: str = "Question",
    methods: Sequence[str] = METHODS,
    group: int | str = 1,
    layers: range | Sequence[range] | None = None,
    all_samples: bool = False,
    engine: str = DEFAULT_ENGINE,
    protocol: Any = "auto",
) -> pd.DataFrame:
    """The patch maps of one sample (`mm_lens.maps.patch_map`) with a leading ``question_id`` column.

    `SampleSkip` when it cannot be analysed: ``group="box"`` and the row has no usable box, a span target the
    row does not give, or (under a protocol that keeps correct answers only, the study's, unless
    ``all_samples``) the model answers wrongly (kind ``"wrong answer"``).
    """
    try:
        image = load_image(sample)
        inp = prepare(model, image, sample.question, spans=sample_spans(sample, [Edge("Image", target)]),
                      protocol=protocol)
        boxes = None
        if group == MAP_BOX_GROUP:
            check_sample(sample, need_boxes=True)
            boxes = list(boxes_for(sample, *image.size))
            if not patch_groups(model, inp, group, boxes, image):
                raise SampleSkip("no box of the row covers an image patch", "no box")
    except SampleSkip as skip:
        skip.question_id = skip.question_id or str(sample.question_id)
        raise
    greedy = greedy_answer(model, inp, cached=not getattr(get_engine(engine), "plain", False))
    if inp.protocol.lens_correct_only and not all_samples:
        require_correct(greedy, inp, sample)
    table = patch_map(model, inp, target, layers=layers, group=group, method=list(methods), boxes=boxes,
                      image=image, engine=engine, greedy=greedy)
    table.insert(0, "question_id", str(sample.question_id))
    return table[["question_id", *MAP_COLUMNS]]


def maps_run(
    out: str | Path,
    model: Any,  # a path / hub id, or a loaded HookedLlava
    dataset: str | Path,
    images: str | Path,
    target: str = "Question",
    methods: Sequence[str] = METHODS,
    group: int | str = 1,
    layers: range | Sequence[range] | None = None,
    all_samples: bool = False,
    engine: str = DEFAULT_ENGINE,
    *,
    options: RunOptions | None = None,
    **run_options: Any,
) -> RunSummary:
    """Patch maps over the image as a resumable run into `out` (``maps.csv``, ``maps.html``, skips).

    Per sample, one map per method (`mm_lens.maps.METHODS`) of the answer's first token: which groups of
    patches (``group`` k: k x k patches; ``"box"``: the row's object boxes) the `target` positions need, over
    ``layers`` (a window or a list of windows; None: each sample's strongest ``Image -> target`` window).
    Under the study protocol only correctly answered samples count (``all_samples`` keeps every one). Run
    options as in `flow_run`.
    """

    run = RunOptions.build(options, run_options, "maps_run",
                           ("target", "methods", "group", "layers", "all_samples", "engine"))
    methods = [methods] if isinstance(methods, str) else list(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise MMLensError(f"--method {','.join(unknown) or '(none)'} is not a map method; choose from "
                          f"{', '.join(METHODS)}")
    parse_edge(f"Image->{target}", extra_names=SPAN_NAMES)  # an unknown target fails before the model loads
    group = _map_group(group)
    windows = _map_windows(layers)
    get_engine(engine)

    def check_windows(n_layers: int) -> None:
        for w in windows or ():
            if w.stop > n_layers:
                raise MMLensError(f"--layers {w.start}:{w.stop} reaches past the model's {n_layers} layers")

    def record(resolved):
        check_windows(resolved.n_layers)  # before the model loads
        return {"target": target, "methods": methods, "group": group,
                "layers": None if windows is None else [[w.start, w.stop] for w in windows],
                "engine": engine, "all_samples": all_samples}

    def make_process(model_, load_image, resolved):
        proto = resolved.protocol
        return lambda sample: maps_sample(model_, sample, load_image, target, methods, group, windows, all_samples,
                                          engine, proto)

    def check_model(model_, resolved):
        check_windows(model_.n_layers)

    summary = run_analysis("maps", RunSpec(out, model, dataset, images, make_process, record, check_model, run=run))
    for finished in (summary, summary.merged):  # how far the cheap maps agree with the knockout map, per sample
        if finished is not None and (finished.path / "maps.csv").exists():
            written = write_map_agreement(finished.path)
            if written is not None:
                finished.written.append(written)
    return summary


def write_map_agreement(folder: Path, k: int = 10) -> Path | None:
    """``maps_agreement.csv`` beside a run's ``maps.csv``: per sample, window and answer step, the Spearman
    correlation of the attention and gradient maps with the knockout map, and their top-k overlap."""
    table = pd.read_csv(folder / "maps.csv", dtype={"question_id": str})
    if table.empty:
        return None
    path = folder / "maps_agreement.csv"
    map_agreement(table, k=k).to_csv(path, index=False)
    return path


__all__ = [
    "COMMANDS",
    "RUN_OPTIONS",
    "RunDir",
    "RunOptions",
    "RunSpec",
    "RunSummary",
    "Shard",
    "attention_run",
    "config_differences",
    "execute",
    "flow_run",
    "lens_run",
    "maps_run",
    "maps_sample",
    "merge_runs",
    "patching_run",
    "parse_shard",
    "run_analysis",
    "run_config",
    "shard_from_env",
]
