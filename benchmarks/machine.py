"""What the numbers were measured on, and the machine's own matmul peak to hold them against."""
from __future__ import annotations

import os
import platform
import statistics
import time
from importlib import metadata
from pathlib import Path

import psutil
import torch

from rmt_deploy.runners import backend_packages

# The peak reference on GPUs: one square torch matmul per precision (a large cube reaches the peak).
MATMUL_SIZES = {("cuda", "fp32"): 8192, ("cuda", "fp16"): 8192, ("cuda", "bf16"): 8192}
# On CPUs: the best GEMM among the libraries present over a few sizes (MKL, oneDNN through torch
# and OpenVINO, and MLAS reach different peaks on the same CPU). fp16 on CPUs runs torch's slow
# reference kernels, so one small cube keeps it affordable.
CPU_PEAK_SIZES = {"fp32": (1024, 2048, 4096), "bf16": (1024, 2048, 4096), "int8": (1024, 2048, 4096), "fp16": (256,)}
PEAK_SECONDS = 0.5          # timed repeats of one (library, size) stop after this (at least one runs)
PEAK_BUDGET_SECONDS = 4.0   # per precision: larger sizes are skipped once they would overrun it
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info(device: str) -> dict:
    """CPU, cores, GPU and library versions (read from package metadata: nothing heavy is imported)."""
    info = {
        "cpu": _cpu_name(),
        "cores": psutil.cpu_count(logical=False),
        "logical_cpus": psutil.cpu_count(logical=True),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "device": device,
        "gpu": torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") and torch.cuda.is_available() else None,
        "cuda": torch.version.cuda,
        "versions": {"python": platform.python_version(),
                     **{d: _version(d) for d in dict.fromkeys(("rmt-deploy", "torch", "numpy", "onnx",
                                                                *backend_packages()))}},
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        # a busy machine slows every number: say how busy it was (1/5/15-minute load averages)
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    return info


def _best_seconds(gemm, repeats: int, budget: float = PEAK_SECONDS) -> float:
    """Fastest of up to ``repeats`` timed calls after one warm-up, stopping once ``budget`` is spent."""
    gemm()
    times, spent = [], 0.0
    while len(times) < repeats and (not times or spent < budget):
        start = time.perf_counter()
        gemm()
        times.append(time.perf_counter() - start)
        spent += times[-1]
    return min(times)


def _torch_gemm(n: int, precision: str):
    if precision == "int8":
        a = torch.randint(-64, 64, (n, n), dtype=torch.int8)
        b = torch.randint(-64, 64, (n, n), dtype=torch.int8)
        return lambda: torch._int_mm(a, b)
    a, b = (torch.randn(n, n).to(_DTYPES[precision]) for _ in range(2))
    return lambda: a @ b


def _openvino_gemm(n: int, precision: str):
    """One MatMul as a tiny ov.Model; int8 as OpenVINO's low-precision pattern (FakeQuantize on the
    activation, int8 weights dequantized by Convert + Multiply) which its CPU plugin runs as an int8 GEMM."""
    import openvino as ov
    import openvino.opset13 as ops
    import numpy as np
    x = ops.parameter([n, n], ov.Type.f32)
    weights = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    if precision == "int8":
        lo, hi = ops.constant(np.float32(-4)), ops.constant(np.float32(4))
        x_q = ops.fake_quantize(x, lo, hi, lo, hi, 256)
        w = ops.multiply(ops.convert(ops.constant(np.clip(weights * 32, -127, 127).astype(np.int8)), ov.Type.f32),
                         ops.constant(np.float32(1 / 32)))
        out = ops.matmul(x_q, w, False, False)
    else:
        out = ops.matmul(x, ops.constant(weights), False, False)
    hint = {"fp32": "f32", "bf16": "bf16", "int8": "f32", "fp16": "f16"}[precision]
    compiled = ov.Core().compile_model(ov.Model([out], [x]), "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                                                     "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    feed = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    return lambda: request.infer([feed], share_inputs=True)


def _onnxruntime_gemm(n: int, precision: str):
    """One MatMul (fp32) or MatMulInteger (uint8 x int8, what a QDQ graph's int8 GEMMs become)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper
    if precision not in ("fp32", "int8"):
        raise ValueError(f"ONNX Runtime's CPU provider has no {precision} GEMM worth measuring")
    integer = precision == "int8"
    rng = np.random.default_rng(0)
    weights = (rng.integers(-64, 64, (n, n)).astype(np.int8) if integer else rng.standard_normal((n, n), dtype=np.float32))
    node = helper.make_node("MatMulInteger" if integer else "MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph([node], "gemm", [helper.make_tensor_value_info("x", TensorProto.UINT8 if integer else
                                                                            TensorProto.FLOAT, [n, n])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32 if integer else TensorProto.FLOAT,
                                                             [n, n])], [onnx.numpy_helper.from_array(weights, "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {"x": rng.integers(0, 255, (n, n)).astype(np.uint8) if integer else rng.standard_normal((n, n), dtype=np.float32)}
    return lambda: session.run(None, feed)


# GEMM libraries by their own names (the roofline's "library"), not backend names
_CPU_LIBRARIES = {"PyTorch": _torch_gemm, "OpenVINO": _openvino_gemm, "ONNX Runtime": _onnxruntime_gemm}
_CPU_PRECISION_LIBRARIES = {"fp32": ("PyTorch", "OpenVINO", "ONNX Runtime"), "bf16": ("PyTorch", "OpenVINO"),
                            "int8": ("PyTorch", "OpenVINO", "ONNX Runtime"), "fp16": ("PyTorch",)}


def _cpu_peak(precision: str, repeats: int, budget: float = PEAK_BUDGET_SECONDS) -> dict:
    """The best GEMM over the libraries and sizes (sizes ascending, every library at each size); a size
    whose warm-up and one timed call would overrun ``budget`` is not tried. Each (library, size) tried
    is listed, failures with why."""
    candidates, broken, start = [], set(), time.perf_counter()
    for n in CPU_PEAK_SIZES[precision]:
        for library in _CPU_PRECISION_LIBRARIES[precision]:
            best = max((c["gflops"] for c in candidates if c.get("library") == library and "gflops" in c), default=None)
            left = budget - (time.perf_counter() - start)
            if library in broken or (best and 2 * (2 * n**3 / best / 1e9) > left):
                continue
            try:
                seconds = _best_seconds(_CPU_LIBRARIES[library](n, precision), repeats)
            except Exception as exc:  # noqa: BLE001 -- a library missing or refusing a precision: say so, go on
                candidates.append({"library": library, "size": n, "error": f"{type(exc).__name__}: {exc}"[:200]})
                broken.add(library)
                continue
            candidates.append({"library": library, "size": n, "gflops": 2 * n**3 / seconds / 1e9})
    measured = [c for c in candidates if "gflops" in c]
    if not measured:
        raise RuntimeError(f"no {precision} GEMM ran on this CPU: {candidates}")
    best = max(measured, key=lambda c: c["gflops"])
    return {"device": "cpu", "precision": precision, "size": best["size"], "library": best["library"],
            "repeats": repeats, "tf32": False, "gflops": best["gflops"], "candidates": candidates,
            "unit": "GOP/s (int8 multiply-adds count 2)" if precision == "int8" else "GFLOP/s"}


def matmul_peak(device: str, precision: str, repeats: int = 3) -> dict:
    """The (device, precision) peak: on CPUs the best GEMM any library present reaches (`_cpu_peak`),
    on GPUs the median of an n^3 torch matmul (2 n^3 FLOPs), warm-up excluded."""
    kind = "cuda" if device.startswith("cuda") else "cpu"
    if kind == "cpu":
        return _cpu_peak(precision, repeats)
    n = MATMUL_SIZES[(kind, precision)]
    a = torch.randn(n, n, device=device).to(_DTYPES[precision])
    b = torch.randn(n, n, device=device).to(_DTYPES[precision])
    for _ in range(2):
        a @ b
    torch.cuda.synchronize()
    times = []
    for _ in range(max(repeats, 10)):
        start = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"device": device, "precision": precision, "size": n, "repeats": len(times), "library": "PyTorch",
            "tf32": bool(precision == "fp32" and torch.backends.cuda.matmul.allow_tf32),
            "gflops": 2 * n**3 / seconds / 1e9}
