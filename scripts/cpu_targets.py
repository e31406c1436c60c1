"""CPU speed targets of the core and benchmark issues, measured interleaved in one process.

eager fp32 and every ONNX backend the registry has (ONNX Runtime, OpenVINO when installed), fp32, on rmt_t at batch 1 and 8,
224x224, the runtimes on the static-shape exports rmt-bench uses (its artifact cache), against a
1024x1024x1024 torch matmul timed in the same process (warm, median of 10 per round); each round
times every variant once (after a short pause, so one runtime's spinning worker threads do not
steal cores from the next), so machine noise hits all of them alike. Prints medians, fractions of
the matmul peak and ratios.
Usage: .venv/bin/python scripts/cpu_targets.py [--rounds 7] [--cache-dir .rmt_cache]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from rmt_deploy.exporters.cache import ArtifactCache
from rmt_deploy.benchmarks.bench import load_model
from rmt_deploy.flops import count_macs
from rmt_deploy.artifact import ExportPlan, Range
from rmt_deploy.runners import RunnerUnavailable, backends_for, get_backend, reference_backend

BATCHES = (1, 8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--cache-dir", default=".rmt_cache", help="the artifact cache of exported ONNX files (rmt-bench's)")
    args = ap.parse_args()
    model = load_model("rmt_t")
    macs = count_macs(model.config)["total"]
    cache, reference = ArtifactCache(args.cache_dir), reference_backend()
    eager = get_backend(reference).open(model=model).load()
    runners = {(reference, bs): eager for bs in BATCHES}
    for backend in backends_for("onnx"):
        entry = get_backend(backend)
        try:
            runners.update({(backend, bs): entry.open(artifact=entry.prepare(
                model, ExportPlan(batch=Range.fixed(bs)), cache)).load() for bs in BATCHES})
        except RunnerUnavailable as exc:
            print(f"{backend} skipped: {exc}")
    inputs = {bs: np.random.default_rng(0).standard_normal((bs, 3, 224, 224), dtype=np.float32) for bs in BATCHES}
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    runs = {key: [] for key in runners}
    peaks = []
    for (_, bs), runner in runners.items():
        runner.infer({"images": inputs[bs]})
    for _ in range(args.rounds):
        samples = []
        for _ in range(10):     # warm, back to back: the conservative (higher) peak, as rmt-bench measures it
            start = time.perf_counter()
            a @ b
            samples.append(2 * 1024**3 / (time.perf_counter() - start) / 1e9)
        peaks.append(statistics.median(samples))
        for (name, bs), runner in runners.items():
            time.sleep(0.2)     # let the other runtime's worker threads stop spinning first
            start = time.perf_counter()
            runner.infer({"images": inputs[bs]})
            runs[(name, bs)].append(bs / (time.perf_counter() - start))
    peak = statistics.median(peaks)
    print(f"matmul peak (median over {len(peaks)} rounds of warm 10-matmul medians): {peak:.1f} GFLOP/s; "
          f"rmt_t {macs / 1e9:.3f} G multiply-adds")
    ips = {k: statistics.median(v) for k, v in runs.items()}
    for (name, bs), value in ips.items():
        print(f"{name:12s} batch {bs}: {value:6.2f} images/s  {2 * macs * value / 1e9 / peak:6.1%} of peak")
    for name in dict.fromkeys(name for name, _ in runners if name != reference):
        for bs in BATCHES:
            print(f"{name} / {reference} at batch {bs}: {ips[(name, bs)] / ips[(reference, bs)]:.2f}x")


if __name__ == "__main__":
    main()
