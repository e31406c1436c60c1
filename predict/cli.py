"""``rmt-predict``: classify or embed every image of a folder, a list file or tar shards into Parquet,
on this machine (worker processes decode) or on a Ray cluster (``--ray``)."""
from __future__ import annotations

import argparse
import signal
import sys

from rmt_deploy.cli_args import (add_backend_arg, add_batch_size_arg, add_device_args, add_image_size_arg,
                                 add_model_args, add_precision_arg, add_ray_address, at_least, ray_address)

from .predictor import PredictOptions


def build_parser() -> argparse.ArgumentParser:
    from rmt_deploy.runners import backends_for, reference_backend
    p = argparse.ArgumentParser(prog="rmt-predict", description=__doc__)
    add_model_args(p)
    add_backend_arg(p, default=reference_backend())
    add_precision_arg(p, default=(None,))     # None: fp32, or the given file's own
    add_image_size_arg(p)
    add_batch_size_arg(p, default=8)
    add_device_args(p)
    p.add_argument("--data", required=True, help="folder (recursive), text file of paths, or 'shards/*.tar'")
    p.add_argument("--output", required=True, help="output folder of Parquet parts (e.g. OUT.parquet)")
    own = "; it runs in its own precision (refused if --precision says another)"
    p.add_argument("--onnx", help=f"ONNX file for {', '.join(backends_for('onnx'))} (default: export one, cached){own}")
    p.add_argument("--engine", help=f"TensorRT engine for {', '.join(backends_for('engine'))} (default: build one, "
                   f"cached){own}")
    p.add_argument("--cache-dir", default=".rmt_cache", help="where prepared ONNX files and engines are kept")
    p.add_argument("--workers", type=at_least(0),
                   help="decoding processes (0: in this process; default: cores-1, max 4)")
    p.add_argument("--top-k", type=at_least(1), default=5)
    p.add_argument("--embeddings", action="store_true", help="add the pooled pre-head vector (column 'embedding')")
    p.add_argument("--features-pooled", action="store_true",
                   help="features model: one column per stage, globally average-pooled (no classification)")
    p.add_argument("--resume", action="store_true", help="continue into --output, skipping paths already written")
    p.add_argument("--rows-per-file", type=at_least(1), default=1000, help="rows per Parquet part file")
    ray = p.add_argument_group("Ray Data")
    add_ray_address(ray)
    ray.add_argument("--num-actors", type=at_least(1), default=1,
                     help="actors, each holding one runner (of --threads threads)")
    ray.add_argument("--gpus-per-actor", type=at_least(0, float), default=0.0)
    return p


def options_from(args: argparse.Namespace) -> PredictOptions:
    if args.embeddings and args.features_pooled:
        raise ValueError("--embeddings (classifier's pooled vector) and --features-pooled (features model) exclude "
                         "each other")
    return PredictOptions(model=args.model, checkpoint=args.checkpoint, weights=args.weights, backend=args.backend,
                          onnx=args.onnx, engine=args.engine, precision=args.precision, device=args.device,
                          threads=args.threads,
                          image_size=args.image_size, batch_size=args.batch_size, top_k=args.top_k,
                          embeddings=args.embeddings, features_pooled=args.features_pooled, cache_dir=args.cache_dir)


def _progress_bar():
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TimeRemainingColumn
    from rich.text import Text

    class ImagesPerSecond(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed or 0:.1f} images/s")

    return Progress("rmt-predict", BarColumn(), MofNCompleteColumn(), ImagesPerSecond(), TimeRemainingColumn(),
                    console=Console(stderr=True))


def _stop_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C: rows already computed are written before the process exits."""
    def stop(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, stop)


def run(args: argparse.Namespace):
    options = options_from(args)
    if args.ray is not None:
        from .ray_job import run_ray
        return run_ray(options, args.data, args.output, address=ray_address(args.ray), num_actors=args.num_actors,
                       gpus_per_actor=args.gpus_per_actor, resume=args.resume,
                       rows_per_file=args.rows_per_file)
    from .local import run_local
    with _progress_bar() as bar:
        task = bar.add_task("images", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, total=total, advance=done)
        return run_local(options, args.data, args.output, workers=args.workers, resume=args.resume,
                         rows_per_file=args.rows_per_file, progress=progress)


def main(argv: list[str] | None = None) -> int:
    from rmt_deploy.ray_cluster import RayMissing
    from rmt_deploy.runners import RunnerUnavailable
    args = build_parser().parse_args(argv)
    _stop_on_sigterm()
    try:
        summary = run(args)
    except KeyboardInterrupt as exc:
        print(f"rmt-predict: interrupted ({exc or 'Ctrl-C'}); rows computed so far are written: rerun with --resume",
              file=sys.stderr)
        return 130
    except (ValueError, OSError, RunnerUnavailable, RayMissing) as exc:
        print(f"rmt-predict: {exc}", file=sys.stderr)
        return 2
    print(f"rmt-predict: {summary.written} rows written to {args.output} ({summary.errors} with an error, "
          f"{summary.skipped} already there of {summary.images} listed) in {summary.seconds:.1f} s, "
          f"{summary.images_per_s:.1f} images/s" + (f" ({summary.steady_images_per_s:.1f} after the first batch)"
                                                     if summary.steady_images_per_s else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
