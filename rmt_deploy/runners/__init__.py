"""Backends behind one interface. Heavy libraries (onnxruntime, openvino, tensorrt) load only when used."""
from __future__ import annotations

from .base import (INPUT_NAME, Runner, RunnerMetadata, RunnerUnavailable, TensorSpec, Timing, infer_padded,
                   output_names)

BACKENDS = ("eager", "compile", "onnxruntime", "openvino", "tensorrt")


def open_runner(backend: str, *, model=None, onnx=None, engine=None, device: str = "cpu",
                precision: str = "fp32", threads: int | None = None, cuda_graphs: bool = False,
                dynamic_batch: bool = False) -> Runner:
    """Build (not yet load) the runner for ``backend``; each backend takes what it needs
    (``cuda_graphs``, ``dynamic_batch``: the compile backend, see `EagerRunner`)."""
    if backend in ("eager", "compile"):
        from .eager import EagerRunner
        if model is None:
            raise ValueError(f"backend {backend!r} needs a model")
        return EagerRunner(model, device=device, precision=precision, compile=backend == "compile",
                           cuda_graphs=cuda_graphs, dynamic_batch=dynamic_batch)
    if backend == "onnxruntime":
        from .onnxruntime import OnnxRuntimeRunner
        if onnx is None:
            raise ValueError("backend 'onnxruntime' needs an ONNX file")
        return OnnxRuntimeRunner(onnx, device=device, threads=threads)
    if backend == "openvino":
        from .openvino import OpenVINORunner
        if onnx is None:
            raise ValueError("backend 'openvino' needs an ONNX file")
        return OpenVINORunner(onnx, device=device, threads=threads)
    if backend == "tensorrt":
        from .tensorrt import TensorRTRunner
        if engine is None:
            raise ValueError("backend 'tensorrt' needs an engine file")
        return TensorRTRunner(engine)
    raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")


def unavailable_reason(backend: str, device: str) -> str | None:
    """Why a file backend (onnxruntime, openvino, tensorrt) cannot run on ``device`` here, or None:
    asked before exporting or building anything for it."""
    if backend == "onnxruntime":
        from .onnxruntime import unavailable_reason as reason
    elif backend == "openvino":
        from .openvino import unavailable_reason as reason
    elif backend == "tensorrt":
        from .tensorrt import unavailable_reason as reason
    else:
        raise ValueError(f"unknown file backend {backend!r}; choose from onnxruntime, openvino, tensorrt")
    return reason(device)


__all__ = ["BACKENDS", "INPUT_NAME", "Runner", "RunnerMetadata", "RunnerUnavailable", "TensorSpec", "Timing",
           "infer_padded", "unavailable_reason", "open_runner", "output_names"]
