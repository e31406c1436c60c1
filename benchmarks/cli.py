"""``rmt-bench``: throughput/latency per backend, precision and batch (default), ``accuracy`` on a
labelled folder, ``serve`` for the load benchmark of a running server."""
from __future__ import annotations

import argparse
import sys

from rmt_deploy.cli_args import at_least

USAGE = """rmt-bench [options]            throughput and latency (see below)
       rmt-bench accuracy --data DIR  top-1/top-5 per backend and precision
       rmt-bench serve ...            load benchmark of a running server (rmt-bench serve -h)"""


def _common(parser: argparse.ArgumentParser) -> None:
    from rmt_deploy.cli_args import (add_backend_arg, add_calib_arg, add_device_args, add_image_size_arg, add_model_args,
                                     add_precision_arg)
    add_model_args(parser, several=True)
    add_backend_arg(parser, sweep=True, default=_default_backends())
    add_precision_arg(parser, sweep=True)
    add_calib_arg(parser)
    add_image_size_arg(parser)
    add_device_args(parser)
    parser.add_argument("--cache-dir", default=".rmt_cache", help="where exported ONNX files and engines are kept")
    parser.add_argument("--json", help="write the full report as JSON")


def _default_backends() -> list[str]:
    """The reference and the backends of ONNX files: what runs on a CPU."""
    from rmt_deploy.runners import backends_for, reference_backend
    return [reference_backend(), *backends_for("onnx")]


def bench_parser() -> argparse.ArgumentParser:
    from rmt_deploy.cli_args import add_batch_size_arg
    parser = argparse.ArgumentParser(prog="rmt-bench", usage=USAGE, description=__doc__)
    _common(parser)
    add_batch_size_arg(parser, sweep=True, default=[1, 8, 64])
    parser.add_argument("--warmup", type=at_least(0), default=5, help="untimed calls before measuring")
    timed = parser.add_mutually_exclusive_group()
    timed.add_argument("--iters", type=at_least(1), help="timed calls per repeat (default 20)")
    timed.add_argument("--duration", type=at_least(0.01, float), help="seconds per repeat instead of --iters")
    parser.add_argument("--repeats", type=at_least(1), default=3, help="images/s is the median over these")
    parser.add_argument("--interleave", action="store_true",
                        help="time the precisions of each backend and batch in turn, repeat by repeat (fair ratios "
                             "on a busy machine; peak memory is not measured)")
    parser.add_argument("--onnx", help="benchmark this ONNX file instead of exporting one")
    parser.add_argument("--engine", help="benchmark this TensorRT engine instead of building one")
    parser.add_argument("--csv", help="write one row per result")
    parser.add_argument("--plot", help="write a PNG of images/s against batch size")
    parser.add_argument("--paper-table", action="store_true", help="also print the paper's Table 9 format")
    return parser


def accuracy_parser() -> argparse.ArgumentParser:
    from rmt_deploy.cli_args import add_batch_size_arg
    parser = argparse.ArgumentParser(prog="rmt-bench accuracy", description=accuracy_main.__doc__)
    _common(parser)
    parser.add_argument("--data", required=True, help="ImageFolder-style directory (class sub-folders)")
    parser.add_argument("--labels", help="labels file of 'relative/path label' lines instead of sub-folders")
    add_batch_size_arg(parser, default=32)
    parser.add_argument("--limit", type=int, help="only the first N images")
    return parser


def _progress(console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True)


def _console():
    """Wide enough for the tables when stdout is a file or pipe (rich would assume 80 columns)."""
    from rich.console import Console
    return Console() if sys.stdout.isatty() else Console(width=220)


def bench_main(argv: list[str]) -> int:
    from rich.console import Console

    from . import report as rpt
    from rmt_deploy.exporters.cache import ArtifactCache
    from .bench import Settings, run_benchmark

    args = bench_parser().parse_args(argv)
    settings = Settings(device=args.device, img_size=args.image_size, warmup=args.warmup,
                        iters=None if args.duration else (args.iters or 20), duration=args.duration,
                        repeats=args.repeats, threads=args.threads, calib=args.calib, interleave=args.interleave)
    console = _console()
    with _progress(Console(stderr=True)) as progress:
        result = run_benchmark(args.model, args.backends, args.precision, args.batch_sizes, settings,
                               checkpoint=args.checkpoint, weights=args.weights, cache=ArtifactCache(args.cache_dir), onnx=args.onnx,
                               engine=args.engine, progress=progress)
    if args.paper_table:
        result["paper_table"] = rpt.paper_table(result)
    rpt.print_report(result, console)
    for path, write in ((args.json, rpt.write_json), (args.csv, rpt.write_csv), (args.plot, rpt.write_plot)):
        if path:
            write(result, path)
            console.print(f"wrote {path}")
    return 0


def accuracy_main(argv: list[str]) -> int:
    """Top-1/top-5 of each backend and precision on a labelled image folder."""
    import json

    from rich.console import Console
    from rich.table import Table

    from .accuracy import run_accuracy
    from rmt_deploy.exporters.cache import ArtifactCache
    from .bench import Settings, parse_models

    args = accuracy_parser().parse_args(argv)
    models = parse_models(args.model)
    if len(models) != 1:
        raise SystemExit("rmt-bench accuracy: give one --model")
    console = _console()
    with _progress(Console(stderr=True)) as progress:
        result = run_accuracy(args.data, models[0], args.backends, args.precision, batch_size=args.batch_size,
                              settings=Settings(device=args.device, img_size=args.image_size, threads=args.threads,
                                                calib=args.calib),
                              checkpoint=args.checkpoint, weights=args.weights, labels_file=args.labels, limit=args.limit,
                              cache=ArtifactCache(args.cache_dir), progress=progress)
    k = result["topk"]
    table = Table(title=f"{result['model']} accuracy on {result['data']} ({result['img_size']}px)")
    for col in ("backend", "precision", "images", "top-1", f"top-{k}", "top-1 agreement"):
        table.add_column(col)
    for r in result["results"]:
        if "skipped" in r:
            table.add_row(r["backend"], r["precision"], f"[yellow]skipped: {r['skipped']}[/yellow]")
        else:
            table.add_row(r["backend"], r["precision"], str(r["images"]), f"{100 * r['top1']:.2f}%",
                          f"{100 * r[f'top{k}']:.2f}%", f"{100 * r['top1_agreement']:.2f}% vs {r['agreement_reference']}")
    console.print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
    return 0


def serve_main(argv: list[str]) -> int:
    from .serve import main
    return main(argv)


SUBCOMMANDS = {"serve": serve_main, "accuracy": accuracy_main}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    try:
        return SUBCOMMANDS[command](argv[1:]) if command else bench_main(argv)
    except (ValueError, OSError) as exc:    # what the user gave is wrong (bad checkpoint or image files, labels)
        print(f"rmt-bench{' ' + command if command else ''}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
