"""CPU speed targets of the core and export issues, measured interleaved in one process.

eager fp32 and ONNX Runtime fp32 (an rmt_t export) at batch 1 and 8, 224x224, against a
1024x1024x1024 torch matmul timed in the same process (warm, median of 10 per round); each round
times every variant once (after a short pause, so one runtime's spinning worker threads do not
steal cores from the next), so machine noise hits all of them alike. Prints medians, fractions of
the matmul peak and ratios.
Usage: .venv/bin/python scripts/cpu_targets.py [--onnx exports/rmt_t/rmt_t_fp32.onnx] [--rounds 7]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from rmt_deploy import VARIANTS, create_model
from rmt_deploy.flops import count_macs
from rmt_deploy.runners import open_runner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--onnx", default="exports/rmt_t/rmt_t_fp32.onnx", help="a dynamic-batch rmt_t export")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    macs = count_macs(VARIANTS["rmt_t"])["total"]
    eager = open_runner("eager", model=create_model("rmt_t")).load()
    ort = open_runner("onnxruntime", onnx=args.onnx).load()
    inputs = {b: np.random.default_rng(0).standard_normal((b, 3, 224, 224), dtype=np.float32) for b in (1, 8)}
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    runs = {(name, bs): [] for name in ("eager", "onnxruntime") for bs in (1, 8)}
    peaks = []
    for runner in (eager, ort):
        for x in inputs.values():
            runner.infer({"images": x})
    for _ in range(args.rounds):
        samples = []
        for _ in range(10):     # warm, back to back: the conservative (higher) peak, as rmt-bench measures it
            start = time.perf_counter()
            a @ b
            samples.append(2 * 1024**3 / (time.perf_counter() - start) / 1e9)
        peaks.append(statistics.median(samples))
        for name, runner in (("eager", eager), ("onnxruntime", ort)):
            for bs, x in inputs.items():
                time.sleep(0.2)     # let the other runtime's worker threads stop spinning first
                start = time.perf_counter()
                runner.infer({"images": x})
                runs[(name, bs)].append(bs / (time.perf_counter() - start))
    peak = statistics.median(peaks)
    print(f"matmul peak (median over {len(peaks)} rounds of warm 10-matmul medians): {peak:.1f} GFLOP/s; rmt_t {macs / 1e9:.3f} G multiply-adds")
    ips = {k: statistics.median(v) for k, v in runs.items()}
    for (name, bs), value in ips.items():
        print(f"{name:12s} batch {bs}: {value:6.2f} images/s  {2 * macs * value / 1e9 / peak:6.1%} of peak")
    for bs in (1, 8):
        print(f"onnxruntime / eager at batch {bs}: {ips[('onnxruntime', bs)] / ips[('eager', bs)]:.2f}x")


if __name__ == "__main__":
    main()
