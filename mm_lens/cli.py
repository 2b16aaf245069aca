"""``mm-lens`` command line: argument parsing and wiring only (the work lives in the library modules).

The module stays light: ``mm-lens --help`` imports no torch. Its top-level imports are torch-free (the name
lists come from `mm_lens.names` and `mm_lens.data.gqa`); each command imports its library module when it runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from mm_lens.data.gqa import TASKS
from mm_lens.errors import MMLensError
from mm_lens.names import (
    ENGINE_NAMES,
    MAP_BOX_GROUP,
    MAP_METHODS,
    PAIR_MODES,
    PROTOCOL_NAMES,
    READOUTS,
    SITES,
    STUDY_BLOCKS,
)

ENGINE_HELP = f"sweep engine: {' or '.join(ENGINE_NAMES)} (default: the library's, mm_lens.engines.DEFAULT_ENGINE)"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory or hub id (llava / llava_next)")
    p.add_argument("--dataset", required=True, help="task name (e.g. ChooseAttr) or CSV with GQA task columns")
    p.add_argument("--images", required=True, help="folder holding <img_id>.jpg")
    p.add_argument("--out", required=True, help="output folder (created if needed)")
    p.add_argument("--limit", type=int, default=None, help="only the first N rows of the dataset")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda:0 (default: the bridge's choice)")
    p.add_argument("--dtype", default=None,
                   help="float32 | float16 | bfloat16 (default: the protocol's: study float16 on CUDA, else float32)")
    p.add_argument("--protocol", default="auto", choices=PROTOCOL_NAMES,
                   help="inputs and defaults: the study's pipeline, the checkpoint's template and processor, or auto "
                        "(the study's for its model families; default)")
    p.add_argument(
        "--device-map",
        default=None,
        help="spread a model too large for one GPU over several: 'auto' (or balanced, sequential, cpu, JSON dict)",
    )
    p.add_argument(
        "--shard",
        default=None,
        help="run shard i/n of the samples (index modulo n) into OUT/shard-i-of-n; the last shard to finish "
        "merges all into OUT (default under accelerate launch / torchrun: RANK/WORLD_SIZE)",
    )
    p.add_argument(
        "--retry-skips", action="store_true", help="on resume, retry samples an earlier run skipped (e.g. images added)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mm-lens", description="Cross-modal information flow in LLaVA models")
    sub = parser.add_subparsers(dest="command", required=True)

    flow = sub.add_parser("flow", help="attention-knockout layer sweep -> flow.csv, flow.html")
    _common(flow)
    flow.add_argument(
        "--block",
        action="append",
        dest="blocks",
        help=f"knockout block 'Source->Target', repeatable (default: {', '.join(STUDY_BLOCKS)})",
    )
    flow.add_argument("--window", type=int, default=None,
                      help="layers knocked out around each layer (default: the protocol's; study 7 per 32 layers, "
                           "checkpoint 9)")
    flow.add_argument("--all-samples", action="store_true", help="keep samples the model answers wrongly")
    flow.add_argument("--engine", default=None, help=ENGINE_HELP)
    flow.set_defaults(func=cmd_flow)

    lens = sub.add_parser("lens", help="answer logit lens -> lens.csv, lens.html")
    _common(lens)
    _lens_options(lens)
    lens.set_defaults(func=cmd_lens)

    attention = sub.add_parser("attention", help="attention mass between regions -> attention.csv, attention.html")
    _common(attention)
    attention.add_argument("--target", action="append", dest="targets",
                           help="target region whose attention is measured, repeatable (default: Question, Last)")
    attention.add_argument("--source", action="append", dest="sources",
                           help="source region attended to, repeatable (default: Image, Question; the rest is 'Rest')")
    attention.set_defaults(func=cmd_attention)

    patching = sub.add_parser(
        "patching", help="activation patching from counterfactual pairs of the data -> patching.csv, patching.html"
    )
    _common(patching)
    patching.add_argument("--region", action="append", dest="regions",
                          help="region whose positions are patched, repeatable (default: Image)")
    patching.add_argument("--site", default=SITES[0],
                          help=f"activation patched: {', '.join(SITES)} (default {SITES[0]})")
    patching.add_argument("--pairs", default=PAIR_MODES[0], choices=PAIR_MODES,
                          help="corruption: another image whose answer differs (default), or the options swapped")
    patching.set_defaults(func=cmd_patching)

    maps = sub.add_parser("maps", help="patch maps over the image (knockout, attention, gradient) -> maps.csv")
    _common(maps)
    maps.add_argument("--target", default="Question",
                      help="region whose access to the patches is mapped (default: Question; e.g. Last)")
    maps.add_argument("--method", dest="methods", type=_map_methods, default=list(MAP_METHODS),
                      help=f"comma-separated map methods from {', '.join(MAP_METHODS)} (default: all three)")
    maps.add_argument("--group", type=_map_group, default=1,
                      help=f"patches per group side (1: single patches, 2: 2x2, ...), or {MAP_BOX_GROUP!r}: the "
                           "row's object boxes (default 1)")
    maps.add_argument("--layers", action="append", type=_map_layers, default=None, metavar="START:STOP",
                      help="window of layers START..STOP-1, repeatable (default: each sample's strongest window "
                           "of Image->TARGET)")
    maps.add_argument("--all-samples", action="store_true",
                      help="keep samples the model answers wrongly (the study protocol keeps correct ones only)")
    maps.add_argument("--engine", default=None, choices=ENGINE_NAMES, help=ENGINE_HELP)
    maps.set_defaults(func=cmd_maps)

    study = sub.add_parser(
        "study", help="the whole study: six task sets x six blocks + the lens, under the study protocol -> report"
    )
    study.add_argument("--model", required=True, help="checkpoint directory or hub id of a study model")
    study.add_argument("--images", required=True, help="folder holding the GQA images <img_id>.jpg")
    study.add_argument("--out", required=True, help="output folder: one sub-folder per task, report.html")
    study.add_argument("--tasks", nargs="+", default=None, help=f"task sets (default: all six: {', '.join(TASKS)})")
    study.add_argument("--protocol", default="study", choices=PROTOCOL_NAMES,
                       help="default study")
    study.add_argument("--window", type=int, default=None, help="default: the protocol's (7 per 32 layers)")
    study.add_argument("--limit", type=int, default=None, help="only the first N rows of each task set")
    study.add_argument("--device", default=None)
    study.add_argument("--dtype", default=None, help="default: the protocol's (float16 on CUDA)")
    study.add_argument("--device-map", default=None)
    study.add_argument("--shard", default=None, help="shard i/n of every task's samples (see flow --shard)")
    study.add_argument("--engine", default=None, help=ENGINE_HELP)
    study.add_argument("--all-samples", action="store_true", help="keep wrongly answered samples too")
    study.add_argument("--retry-skips", action="store_true")
    study.set_defaults(func=cmd_study)

    report = sub.add_parser("report", help="self-contained HTML report of a results folder -> report.html")
    report.add_argument("results_dir", help="folder with flow.csv / lens.csv / attention.csv (and <Task>/ subfolders)")
    report.add_argument("--out", default=None, help="HTML file to write (default: RESULTS_DIR/report.html)")
    report.add_argument("--title", default=None, help="page title (default: from the folder name)")
    report.add_argument(
        "--format", default="html", choices=("html", "svg", "pdf", "png"),
        help="html: the report only (default); svg / pdf / png: also one publication figure per report figure, "
        "in --figures-dir (needs kaleido: pip install 'mm-lens[export]')",
    )
    report.add_argument("--figures-dir", default=None, help="folder for the figures (default: RESULTS_DIR/figures)")
    report.set_defaults(func=cmd_report)

    merge = sub.add_parser("merge", help="combine finished --shard runs into one flow.csv / lens.csv")
    merge.add_argument("out", help="output folder for the merged run")
    merge.add_argument("shards", nargs="+", help="shard run folders (or folders holding shard-i-of-n/ folders)")
    merge.set_defaults(func=cmd_merge)

    demo = sub.add_parser("demo", help="the whole study on the shipped toy model -> RESULTS/report.html")
    demo.add_argument("--out", default="results/demo", help="output folder (default: results/demo)")
    demo.add_argument("--per-task", type=int, default=30, help="held-out questions per task type (default 30)")
    demo.add_argument("--model", default=None, help="another checkpoint instead of the shipped toy model")
    demo.set_defaults(func=cmd_demo)

    train = sub.add_parser("train-toy", help="train the toy LLaVA on the shapes world (CPU, about 40 minutes)")
    train.add_argument("--out", default="assets/toy-llava", help="checkpoint folder (default: assets/toy-llava)")
    train.add_argument("--minutes", type=float, default=78,
                       help="wall-clock budget in minutes (default 78; "
                            "stops early once every held-out answer is right)")
    train.add_argument("--init-from", default=None, help="continue from this checkpoint's weights")
    train.set_defaults(func=cmd_train_toy)
    return parser


def _lens_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--readout", default=None, choices=READOUTS,
                   help="lens readout below the top layer: raw (the study's) or through the final norm "
                        "(default: the protocol's)")
    p.add_argument("--all-samples", action="store_true",
                   help="keep samples the model answers wrongly (the study protocol's lens keeps correct ones only)")


def _map_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in MAP_METHODS]
    if unknown or not methods:
        raise argparse.ArgumentTypeError(
            f"{text!r}: choose comma-separated methods from {', '.join(MAP_METHODS)}"
        )
    return methods


def _map_group(text: str) -> int | str:
    if text == MAP_BOX_GROUP:
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a positive number of patches per side, or {MAP_BOX_GROUP!r}")
    return int(text)


def _map_layers(text: str) -> range:
    start, sep, stop = text.partition(":")
    if not sep or not start.strip().isdigit() or not stop.strip().isdigit() or int(stop) <= int(start):
        raise argparse.ArgumentTypeError(f"{text!r}: a window START:STOP of layers START..STOP-1, e.g. 2:6")
    return range(int(start), int(stop))


def _device_map(text):
    import json

    if text is None or not text.strip().startswith("{"):
        return text
    try:
        return json.loads(text)
    except ValueError as err:
        raise MMLensError(f"--device-map {text!r} is not valid JSON ({err}); pass 'auto' or a JSON dict") from None


def _run_args(args) -> dict:
    """What every run command shares: where and on what, and the run options (`mm_lens.runs.RunOptions`), as
    keyword arguments of the ``mm_lens.runs.*_run`` functions."""
    return dict(
        out=args.out, model=args.model, dataset=args.dataset, images=args.images, limit=args.limit,
        dtype=args.dtype, device=args.device, device_map=_device_map(args.device_map), shard=args.shard,
        retry_skips=args.retry_skips, protocol=args.protocol,
    )


def _report(summary) -> None:
    """Print a run's summary; a run that analysed nothing because of errors then fails (`raise_if_failed`)."""
    print(summary.text(), file=sys.stderr)
    summary.raise_if_failed()


def cmd_flow(args) -> None:
    from mm_lens.runs import flow_run

    engine = {"engine": args.engine} if args.engine else {}
    summary = flow_run(
        blocks=args.blocks or list(STUDY_BLOCKS), window=args.window, all_samples=args.all_samples,
        **engine, **_run_args(args),
    )
    _report(summary)


def cmd_lens(args) -> None:
    from mm_lens.runs import lens_run

    _report(lens_run(readout=args.readout, all_samples=args.all_samples, **_run_args(args)))


def cmd_attention(args) -> None:
    from mm_lens.runs import attention_run

    _report(attention_run(targets=args.targets, sources=args.sources, **_run_args(args)))


def cmd_patching(args) -> None:
    from mm_lens.runs import patching_run

    _report(patching_run(regions=args.regions or ["Image"], site=args.site, pairs=args.pairs, **_run_args(args)))


def cmd_maps(args) -> None:
    from mm_lens.runs import maps_run

    engine = {"engine": args.engine} if args.engine else {}
    _report(maps_run(target=args.target, methods=args.methods, group=args.group, layers=args.layers,
                     all_samples=args.all_samples, **engine, **_run_args(args)))


def cmd_study(args) -> None:
    from mm_lens.study import run_study

    run_study(
        out=args.out, model=args.model, images=args.images, tasks=args.tasks, protocol=args.protocol,
        window=args.window, limit=args.limit, device=args.device, dtype=args.dtype,
        device_map=_device_map(args.device_map), shard=args.shard, all_samples=args.all_samples,
        retry_skips=args.retry_skips, **({"engine": args.engine} if args.engine else {}),
    )


def cmd_merge(args) -> None:
    from mm_lens.runs import merge_runs

    for summary in merge_runs(args.out, args.shards):
        print(summary.text(), file=sys.stderr)


def cmd_report(args) -> None:
    from mm_lens.report import build_report, export_figures

    fmt = getattr(args, "format", "html")
    if fmt != "html":  # figures first: a missing kaleido stops before anything is written
        paths = export_figures(args.results_dir, out_dir=getattr(args, "figures_dir", None), format=fmt)
        folder = paths[0].parent if paths else "(no figure)"
        print(f"wrote {len(paths)} {fmt} figure{'s' if len(paths) != 1 else ''} to {folder}", file=sys.stderr)
    print(f"wrote {build_report(args.results_dir, out_path=args.out, title=args.title)}", file=sys.stderr)


def cmd_demo(args) -> None:
    from mm_lens.demo import run_demo

    report = run_demo(args.out, n_per_task=args.per_task, model_path=args.model)
    print(f"report: {report}", file=sys.stderr)


def cmd_train_toy(args) -> None:
    from mm_lens.toy.train import main as train_main

    train_main(["--out", args.out, "--minutes", str(args.minutes)]
               + (["--init-from", args.init_from] if args.init_from else []))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; an `MMLensError` becomes one line on stderr and exit code 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MMLensError as err:
        print("mm-lens: error: " + " ".join(str(err).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mm-lens: interrupted; finished samples are saved, re-run the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
