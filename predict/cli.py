"""``rmt-predict``: classify or embed every image of a folder, a list file or tar shards into Parquet,
on this machine (worker processes decode) or on a Ray cluster (``--ray``)."""
from __future__ import annotations

import argparse
import signal
import sys

# rmt-bench's argument checks until the shared CLI vocabulary (issue 18) holds them
from rmt_deploy.benchmarks.cli import _at_least

from .predictor import FILE_BACKENDS, PredictOptions


def build_parser() -> argparse.ArgumentParser:
    from rmt_deploy.runners import BACKENDS
    p = argparse.ArgumentParser(prog="rmt-predict", description=__doc__)
    p.add_argument("--model", default="rmt_t", help="variant name, 'auto' or a JSON config file")
    p.add_argument("--checkpoint", help="released checkpoint (random, seeded weights without one)")
    p.add_argument("--weights", choices=("auto", "ema", "model"), default="auto", help="EMA or raw checkpoint weights")
    p.add_argument("--data", required=True, help="folder (recursive), text file of paths, or 'shards/*.tar'")
    p.add_argument("--output", required=True, help="output folder of Parquet parts (e.g. OUT.parquet)")
    p.add_argument("--backend", choices=[b for b in BACKENDS if b != "tensorrt"], default="eager")
    p.add_argument("--onnx", help=f"ONNX file for {', '.join(FILE_BACKENDS)} (default: export one, cached)")
    p.add_argument("--cache-dir", default=".rmt_cache", help="where exported ONNX files are kept")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32")
    p.add_argument("--image-size", "--img-size", type=_at_least(32), default=224, help="S of the S x S crop")
    p.add_argument("--batch-size", type=_at_least(1), default=8)
    p.add_argument("--workers", type=_at_least(0), help="decoding processes (0: in this process; default: cores-1, max 4)")
    p.add_argument("--top-k", type=_at_least(1), default=5)
    p.add_argument("--embeddings", action="store_true", help="add the pooled pre-head vector (column 'embedding')")
    p.add_argument("--features-pooled", action="store_true",
                   help="features model: one column per stage, globally average-pooled (no classification)")
    p.add_argument("--resume", action="store_true", help="continue into --output, skipping paths already written")
    p.add_argument("--rows-per-file", type=_at_least(1), default=1000, help="rows per Parquet part file")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--threads", type=_at_least(1), help="intra-op threads of the runner (per actor with --ray)")
    ray = p.add_argument_group("Ray Data")
    ray.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                     help="run on Ray: join ADDRESS (ray://host:10001, host:6379, auto) or start a local cluster")
    ray.add_argument("--num-actors", type=_at_least(1), default=1, help="actors, each holding one runner")
    ray.add_argument("--gpus-per-actor", type=_at_least(0, float), default=0.0)
    return p


def options_from(args: argparse.Namespace) -> PredictOptions:
    if args.embeddings and args.features_pooled:
        raise ValueError("--embeddings (classifier's pooled vector) and --features-pooled (features model) exclude "
                         "each other")
    return PredictOptions(model=args.model, checkpoint=args.checkpoint, weights=args.weights, backend=args.backend,
                          onnx=args.onnx, precision=args.precision, device=args.device, threads=args.threads,
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
        return run_ray(options, args.data, args.output, address=args.ray or None, num_actors=args.num_actors,
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
