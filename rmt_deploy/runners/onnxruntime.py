"""ONNX Runtime runner (CPU, or CUDA with onnxruntime-gpu)."""
from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..artifact import ArtifactDescription
from .base import Runner, RunnerMetadata, RunnerUnavailable, TensorSpec, Timing
from .registry import Backend, register

_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64"}


def _import_ort():
    try:
        import onnxruntime
    except ImportError as exc:
        raise RunnerUnavailable("onnxruntime is not installed (pip install onnxruntime, or onnxruntime-gpu)") from exc
    return onnxruntime


def unavailable_reason(device: str) -> str | None:
    """Why this runner cannot run on ``device`` here (checked before any ONNX file is exported)."""
    try:
        ort = _import_ort()
    except RunnerUnavailable as exc:
        return str(exc)
    if device.startswith("cuda") and "CUDAExecutionProvider" not in ort.get_available_providers():
        return ("onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu and CUDA); "
                f"available: {ort.get_available_providers()}")
    return None


class OnnxRuntimeRunner(Runner):
    backend = "onnxruntime"

    def __init__(self, path: str | Path, device: str = "cpu", threads: int | None = None, precision: str | None = None,
                 spinning: bool = True):
        """``precision``: what the file is expected to compute in, until ``load`` reads the file's own.
        ``spinning=False``: the intra-op threads sleep as soon as a run ends instead of spinning (ONNX
        Runtime's default) for the next one; where several sessions share a process they then no longer
        take CPU from the one that is running."""
        super().__init__()
        self.path, self.device, self.threads, self.precision = Path(path), device, threads, precision or "fp32"
        self.spinning = spinning
        self.session = None
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {self.path}")

    def _load(self) -> None:
        reason = unavailable_reason(self.device)
        if reason:
            raise RunnerUnavailable(reason)
        ort = _import_ort()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        if not self.spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if self.device.startswith("cuda"):
            providers = [("CUDAExecutionProvider", {"device_id": int(self.device.partition(":")[2] or 0)}),
                         "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(os.fspath(self.path), options, providers=providers)
        inp = self.session.get_inputs()[0]
        self.precision = "fp16" if inp.type == "tensor(float16)" else "fp32"
        if self.session.get_modelmeta().custom_metadata_map.get("rmt.precision") == "int8":
            self.precision = "int8"     # a QDQ file: float32 in and out, int8 inside

    @staticmethod
    def _specs(values, dtype: str | None = None) -> list[TensorSpec]:
        return [TensorSpec(v.name, tuple(v.shape), dtype or _ORT_TYPES.get(v.type, v.type)) for v in values]

    def metadata(self) -> RunnerMetadata:
        if self.session is None:
            raise RuntimeError(f"{self.name}: call load() first")
        meta = self.session.get_modelmeta().custom_metadata_map
        # outputs are returned as float32 whatever the file computes in (`_infer`)
        return RunnerMetadata(self._specs(self.session.get_inputs()), self._specs(self.session.get_outputs(), "float32"),
                              {"path": os.fspath(self.path), "providers": self.session.get_providers(),
                               "intra_op_spinning": self.spinning, **meta},
                              ArtifactDescription.from_metadata(meta))

    def _infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        names = [o.name for o in self.session.get_outputs()]
        outs = self.session.run(names, dict(feed))
        self.last_timing = Timing(compute_ms=(time.perf_counter() - start) * 1e3)
        return {n: o.astype(np.float32, copy=False) for n, o in zip(names, outs)}

    def close(self) -> None:
        self.session = None
        super().close()


def _open(*, model, artifact, device, precision, threads, spinning: bool = True) -> OnnxRuntimeRunner:
    return OnnxRuntimeRunner(artifact, device=device, threads=threads, precision=precision, spinning=spinning)


def prepare_onnx(model, plan, cache) -> Path:
    """The ONNX file of ``model`` for ``plan``; on GPUs the portable graph (some onnxruntime-gpu
    releases run Attention nodes on the CPU)."""
    return cache.onnx(model, plan.for_one(plan.precision, portable=plan.portable or plan.device.startswith("cuda")))


def quantize_qdq(fp32_onnx: Path, out_path: Path, images, *, calibration: str = "") -> Path:
    """The QDQ INT8 file (ONNX Runtime's static quantizer): what ONNX Runtime and TensorRT's explicit
    quantization run."""
    from ..quantize import quantize_onnxruntime
    return quantize_onnxruntime(fp32_onnx, out_path, images, calibration=calibration)


ONNXRUNTIME = register(Backend("onnxruntime", "onnx", {"cpu": ("fp32", "fp16", "int8"), "cuda": ("fp32", "fp16", "int8")},
                               _open, unavailable_reason, prepare_onnx, platform="onnxruntime_onnx",
                               title="ONNX Runtime", packages=("onnxruntime", "onnxruntime-gpu"), quantizer=quantize_qdq,
                               options=("spinning",), shared_process_options={"spinning": False}))
