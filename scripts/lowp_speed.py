"""Interleaved CPU speed of low-precision artifacts against float32, with the variants behind the
design choices that rmt-bench does not offer (`rmt-bench --interleave` times what it ships): OpenVINO
fp32 / bf16 (attention on the kernel's bf16 variant, the float32 kernel, or OpenVINO's own) / int8
(float layers bf16 or float32) and ONNX Runtime fp32 / int8 of one model. Per backend, each round runs
every runner once in turn; medians and ratios printed as JSON.

    .venv/bin/python scripts/lowp_speed.py --model rmt_t --image-size 224 --batch-size 8 \
        --calib ../shared/fixtures/calib --rounds 15 --cache-dir /tmp/lowp
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from rmt_deploy import create_model
from rmt_deploy import quantize as q
from rmt_deploy.exporters.onnx_export import export_onnx
from rmt_deploy.runners.onnxruntime import OnnxRuntimeRunner
from rmt_deploy.runners.openvino import OpenVINORunner
from rmt_deploy.benchmarks.machine import machine_info, matmul_peak


def artifacts(args) -> dict[str, Path]:
    root = Path(args.cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    stem = root / f"{args.model}-b{args.batch_size}-{args.image_size}"
    fp32 = stem.with_suffix(".onnx")
    if not fp32.is_file():
        torch.manual_seed(0)
        export_onnx(create_model(args.model), fp32, batch_size=args.batch_size, height=args.image_size,
                    width=args.image_size)
    images = q.calibration_images(args.calib, args.image_size)
    paths = {"fp32": fp32, "ort_int8": Path(f"{stem}-int8.onnx"), "ov_int8": Path(f"{stem}-int8.xml")}
    if not paths["ort_int8"].is_file():
        q.quantize_onnxruntime(fp32, paths["ort_int8"], images, calibration=q.calibration_tag(args.calib))
    if OpenVINORunner.backend in args.backends and not paths["ov_int8"].is_file():
        q.quantize_openvino(fp32, paths["ov_int8"], images, calibration=q.calibration_tag(args.calib))
    return paths


def _float32_kernel_in_bf16(path: Path, threads: int | None) -> OpenVINORunner:
    """A bf16 runner whose attention runs on the kernel's float32 variant (as before the bf16 one existed)."""
    from rmt_deploy.runners import small_attention
    real = small_attention.kernel_unavailable_reason
    small_attention.kernel_unavailable_reason = lambda precision="f32": (
        "left out for the comparison" if precision == "bf16" else real(precision))
    try:
        return OpenVINORunner(path, threads=threads, precision="bf16").load()
    finally:
        small_attention.kernel_unavailable_reason = real


def runner_groups(paths: dict[str, Path], threads: int | None) -> dict[str, dict]:
    """One group per backend, timed one group at a time: an idle ONNX Runtime session's threads spin
    after each run and slowed the OpenVINO rows sharing the process by up to 4x on 2 cores."""
    return {OpenVINORunner.backend: {
                "openvino fp32": lambda: OpenVINORunner(paths["fp32"], threads=threads),
                "openvino bf16": lambda: OpenVINORunner(paths["fp32"], threads=threads, precision="bf16"),
                "openvino bf16, OpenVINO's bf16 attention": lambda: OpenVINORunner(
                    paths["fp32"], threads=threads, precision="bf16", bf16_attention_kernel=False),
                "openvino bf16, float32 attention kernel": lambda: _float32_kernel_in_bf16(paths["fp32"], threads),
                "openvino int8": lambda: OpenVINORunner(paths["ov_int8"], threads=threads),
                "openvino int8, float layers f32": lambda: OpenVINORunner(paths["ov_int8"], threads=threads,
                                                                          int8_float_layers="f32")},
            # spinning off: after its run each idle session's threads would spin on the 2 cores while the
            # other session runs, and slow both (docs/precision.md)
            OnnxRuntimeRunner.backend: {
                "onnxruntime fp32": lambda: OnnxRuntimeRunner(paths["fp32"], threads=threads, spinning=False),
                "onnxruntime int8": lambda: OnnxRuntimeRunner(paths["ort_int8"], threads=threads, spinning=False)}}


def time_group(makers: dict, feed: dict, rounds: int) -> dict[str, dict]:
    """Every runner of the group once per round, in turn; median ms per runner and its metadata."""
    active = {name: make().load() for name, make in makers.items()}
    times = {name: [] for name in active}
    for runner in active.values():
        runner.infer(feed)
    for _ in range(rounds):
        for name, runner in active.items():
            start = time.perf_counter()
            runner.infer(feed)
            times[name].append((time.perf_counter() - start) * 1e3)
    rows = {name: {"median_ms": statistics.median(t),
                   "metadata": {k: v for k, v in active[name].metadata().extra.items()
                                if k in ("inference_precision", "small_head_attention", "providers",
                                         "intra_op_spinning")}}
            for name, t in times.items()}
    for runner in active.values():
        runner.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="rmt_t")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--calib", required=True)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--cache-dir", default=".rmt_cache/lowp")
    parser.add_argument("--backends", default=f"{OpenVINORunner.backend},{OnnxRuntimeRunner.backend}",
                        help="comma list of the groups to time")
    args = parser.parse_args()
    x = {"images": np.random.default_rng(0).standard_normal((args.batch_size, 3, args.image_size, args.image_size),
                                                              dtype=np.float32)}
    rows = {}
    groups = runner_groups(artifacts(args), args.threads)
    for backend, makers in {b: groups[b] for b in args.backends.split(",")}.items():
        group = time_group(makers, x, args.rounds)
        base = group[f"{backend} fp32"]["median_ms"]
        rows.update({name: {**row, "median_ms": round(row["median_ms"], 2),
                            "speedup_vs_fp32": round(base / row["median_ms"], 3)} for name, row in group.items()})
    peaks = {p: {k: v for k, v in matmul_peak("cpu", p).items() if k != "candidates"} for p in ("fp32", "bf16", "int8")}
    info = machine_info("cpu")
    print(json.dumps({"args": vars(args), "cpu": info["cpu"], "loadavg_start": info["loadavg_start"],
                      "rows": rows, "peaks": peaks}, indent=1, default=str))


if __name__ == "__main__":
    main()
