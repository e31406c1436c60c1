"""rmt-predict's throughput against rmt-bench's offline figure, and the cost of --ray, interleaved.

Each round runs, back to back on the same machine: rmt-bench (the runner alone on one random batch),
rmt-predict locally per backend (decoding JPEGs in worker processes, writing Parquet) and
rmt-predict --ray. Shared machines drift, so the ratios are taken within a round and the medians
over rounds are reported. Usage (from the checkout, with the .venv):

    .venv/bin/python scripts/bench_predict.py --images 200 --rounds 3 --json predict-bench.json
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SUMMARY = re.compile(r"in ([\d.]+) s, ([\d.]+) images/s(?: \(([\d.]+) after the first batch\))?")


def make_jpegs(folder: Path, count: int, fixtures: Path) -> None:
    """``count`` real JPEGs (Shapes10 images enlarged to 320x256 and re-encoded by Pillow)."""
    from PIL import Image
    sources = sorted((fixtures / "shapes10_val").rglob("*.png"))
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        img = Image.open(sources[i % len(sources)]).convert("RGB").resize((320, 256), Image.BICUBIC)
        img.save(folder / f"img_{i:05d}.jpg", quality=90)


def bench_offline(args, backends: list[str], out: Path, threads: int) -> dict[str, float]:
    cmd = [sys.executable, "-m", "rmt_deploy.benchmarks.cli", "--threads", str(threads), "--model", args.model, "--backends", ",".join(backends),
           "--batch-sizes", str(args.batch_size), "--image-size", str(args.image_size), "--cache-dir", args.cache_dir,
           "--warmup", "2", "--iters", str(args.bench_iters), "--repeats", "3", "--json", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return {r["backend"]: r["images_per_s"] for r in json.loads(out.read_text())["results"] if "skipped" not in r}


def predict(args, data: Path, output: Path, backend: str, ray: bool, threads: int) -> dict[str, float]:
    shutil.rmtree(output, ignore_errors=True)
    cmd = [sys.executable, "-m", "rmt_deploy.predict.cli", "--model", args.model, "--backend", backend, "--data",
           str(data), "--output", str(output), "--batch-size", str(args.batch_size), "--image-size",
           str(args.image_size), "--cache-dir", args.cache_dir, "--threads", str(threads)]
    if ray:
        cmd += ["--ray", "--num-actors", "1"]
    start = time.perf_counter()
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    process_seconds = time.perf_counter() - start
    seconds, rate, steady = SUMMARY.search(done.stdout).groups()
    return {"seconds": float(seconds), "images_per_s": float(rate), "steady_images_per_s": float(steady or rate),
            "process_seconds": process_seconds}


def main() -> int:
    from rmt_deploy.cli_args import add_backend_arg, add_batch_size_arg, add_image_size_arg, one_of
    from rmt_deploy.runners import backend_names, backends_for, reference_backend
    onnx_backend = backends_for("onnx")[0]      # the reference and the first ONNX backend by default
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="rmt_t")
    add_backend_arg(ap, sweep=True, default=[reference_backend(), onnx_backend])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    add_batch_size_arg(ap, default=8)
    add_image_size_arg(ap)
    ap.add_argument("--bench-iters", type=int, default=10, help="rmt-bench's timed calls per repeat (3 repeats)")
    ap.add_argument("--threads", default="2,1", help="runner threads to compare at, comma-separated (the first "
                    "one also for the Ray actor's CPUs and threads)")
    ap.add_argument("--ray-backend", type=one_of(backend_names), default=onnx_backend)
    ap.add_argument("--cache-dir", default=".rmt_cache")
    ap.add_argument("--fixtures", default=str(Path(__file__).resolve().parents[2] / "shared" / "fixtures"))
    ap.add_argument("--json")
    args = ap.parse_args()
    backends = args.backends
    work = Path(tempfile.mkdtemp(prefix="rmt-predict-bench-"))
    make_jpegs(work / "jpegs", args.images, Path(args.fixtures))
    threads = [int(t) for t in args.threads.split(",")]
    rounds = []
    for n in range(args.rounds):
        row = {}
        for t in threads:
            row[f"bench-t{t}"] = bench_offline(args, backends, work / "bench.json", t)
            for backend in backends:
                row[f"predict-{backend}-t{t}"] = predict(args, work / "jpegs", work / "out.parquet", backend, False, t)
        row["ray"] = predict(args, work / "jpegs", work / "out.parquet", args.ray_backend, True, threads[0])
        rounds.append(row)
        print(f"round {n + 1}: {json.dumps(row)}", flush=True)
    summary = {}
    for t in threads:
        for backend in backends:
            runs = [r[f"predict-{backend}-t{t}"] for r in rounds]
            summary[f"{backend}-t{t}"] = {
                "bench_images_per_s": statistics.median(r[f"bench-t{t}"][backend] for r in rounds),
                "predict_steady_images_per_s": statistics.median(p["steady_images_per_s"] for p in runs),
                "predict_end_to_end_images_per_s": statistics.median(p["images_per_s"] for p in runs),
                "steady_over_bench": statistics.median(p["steady_images_per_s"] / r[f"bench-t{t}"][backend]
                                                       for p, r in zip(runs, rounds))}
    local = f"predict-{args.ray_backend}-t{threads[0]}"
    for key in ("seconds", "process_seconds"):       # the job alone; the whole command (start-up included)
        summary[f"ray_over_local_{key}"] = statistics.median(r["ray"][key] / r[local][key] for r in rounds)
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rounds": rounds, "summary": summary}, indent=2))
    shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
