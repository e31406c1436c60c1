"""The TensorRT runtime's environment: probing (is TensorRT importable, is CUDA usable), the engine's
JSON sidecar and the check that an engine was built by this TensorRT for this GPU, and the logger.
The runner and the engine builder (rmt-export's tensorrt_build module) both use it; nothing here
imports TensorRT until asked.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from .base import RunnerUnavailable

SIDECAR_SUFFIX = ".json"

INSTALL_HINT = ("pip install tensorrt --extra-index-url https://pypi.nvidia.com "
                "(needs an NVIDIA GPU, its driver and a CUDA build of PyTorch)")


class TensorRTUnavailable(RunnerUnavailable):
    """TensorRT or CUDA is missing here; the message says which and how to get it."""


class EngineIncompatible(RunnerUnavailable):
    """The engine was built by another TensorRT version or for another GPU: rebuild it here."""


# ----------------------------------------------------------------------------------------------
# Environment probing
# ----------------------------------------------------------------------------------------------

def _import_tensorrt():
    try:
        import tensorrt as trt  # noqa: PLC0415 - lazy on purpose
    except ImportError as exc:
        raise TensorRTUnavailable(f"TensorRT is not installed ({exc}); {INSTALL_HINT}") from exc
    except OSError as exc:  # the wheel is there but libnvinfer / CUDA libraries fail to load
        raise TensorRTUnavailable(f"TensorRT is installed but its libraries failed to load: {exc}") from exc
    return trt


def _cuda_problem() -> str | None:
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed (it provides the CUDA device buffers)"
    if not torch.cuda.is_available():
        cuda = getattr(torch.version, "cuda", None)
        build = f"CUDA {cuda} build" if cuda else "CPU-only build"
        return f"CUDA is not available to PyTorch (torch {torch.__version__}, {build}; no usable NVIDIA GPU/driver)"
    return None


def device_index(device: int | str | None) -> int:
    if device is None:
        return 0
    if isinstance(device, int):
        return device
    text = str(device)
    if text in ("cuda", "gpu"):
        return 0
    if text.startswith("cuda:"):
        return int(text.partition(":")[2] or 0)
    if text.isdigit():
        return int(text)
    raise ValueError(f"not a CUDA device: {device!r} (use 'cuda:N')")


def current_gpu(device: int | str | None = 0) -> dict:
    """``{"gpu_name": ..., "compute_capability": "9.0"}`` of a CUDA device (via PyTorch)."""
    import torch
    index = device_index(device)
    major, minor = torch.cuda.get_device_capability(index)
    return {"gpu_name": torch.cuda.get_device_name(index), "compute_capability": f"{major}.{minor}"}


def tensorrt_available(device: int | str | None = 0) -> tuple[bool, str]:
    """(True, "TensorRT 10.x on <GPU> (sm_90)") or (False, why not) - never raises."""
    problems = []
    version = None
    try:
        trt = _import_tensorrt()
        version = trt.__version__
    except TensorRTUnavailable as exc:
        problems.append(str(exc))
    cuda = _cuda_problem()
    if cuda:
        problems.append(cuda)
    if problems:
        return False, "; ".join(problems)
    try:
        gpu = current_gpu(device)
    except Exception as exc:  # noqa: BLE001 - report, do not raise
        return False, f"TensorRT {version} is installed but CUDA device {device!r} is unusable: {exc}"
    return True, f"TensorRT {version} on {gpu['gpu_name']} ({_sm(gpu['compute_capability'])})"


def require_tensorrt(device: int | str | None = 0):
    """Import TensorRT and check CUDA, or raise `TensorRTUnavailable` with the reason."""
    trt = _import_tensorrt()
    cuda = _cuda_problem()
    if cuda:
        raise TensorRTUnavailable(f"TensorRT {trt.__version__} is installed but {cuda}")
    return trt


# ----------------------------------------------------------------------------------------------
# Sidecar and compatibility
# ----------------------------------------------------------------------------------------------

def engine_sidecar_path(engine_path: str | os.PathLike) -> Path:
    """``model.engine`` -> ``model.engine.json``."""
    return Path(os.fspath(engine_path) + SIDECAR_SUFFIX)


def read_sidecar(engine_path: str | os.PathLike) -> dict | None:
    path = engine_sidecar_path(engine_path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"unreadable engine sidecar {path}: {exc}") from exc


def _sm(cc: str | None) -> str:
    return "sm_" + str(cc).replace(".", "") if cc else "sm_?"


def _norm(text) -> str:
    return " ".join(str(text).split()).lower()


def check_engine_compatible(sidecar: Mapping, *, tensorrt_version: str | None = None,
                            gpu_name: str | None = None, compute_capability: str | None = None,
                            device: int | str | None = 0) -> str | None:
    """The reason ``sidecar``'s engine cannot run here, or None when it matches.

    Pass the current values to use it as a pure function; any left as None are detected
    (TensorRT version from ``tensorrt``, GPU from PyTorch) when possible and otherwise not compared.
    Fields missing from the sidecar are not compared either.
    """
    if tensorrt_version is None:
        try:
            tensorrt_version = _import_tensorrt().__version__
        except TensorRTUnavailable:
            pass
    if gpu_name is None or compute_capability is None:
        try:
            if _cuda_problem() is None:
                gpu = current_gpu(device)
                gpu_name = gpu_name or gpu["gpu_name"]
                compute_capability = compute_capability or gpu["compute_capability"]
        except Exception:  # noqa: BLE001 - undetectable: not compared
            pass

    built_trt, built_gpu, built_cc = (sidecar.get("tensorrt_version"), sidecar.get("gpu_name"),
                                      sidecar.get("compute_capability"))
    mismatches = []
    if built_trt and tensorrt_version and str(built_trt).strip() != str(tensorrt_version).strip():
        mismatches.append("TensorRT version")
    if built_cc and compute_capability and str(built_cc).strip() != str(compute_capability).strip():
        mismatches.append("compute capability")
    if built_gpu and gpu_name and _norm(built_gpu) != _norm(gpu_name):
        mismatches.append("GPU")
    if not mismatches:
        return None
    return (f"engine built with TensorRT {built_trt or '?'} for {built_gpu or '?'} ({_sm(built_cc)}); "
            f"this machine has TensorRT {tensorrt_version or '?'} / {gpu_name or '?'} ({_sm(compute_capability)}) "
            f"[{', '.join(mismatches)} differ]: rebuild the engine on this machine with rmt-export "
            "(TensorRT engines only run on the TensorRT version and GPU type that built them)")


def write_sidecar(engine_path: str | os.PathLike, sidecar: Mapping) -> Path:
    path = engine_sidecar_path(engine_path)
    path.write_text(json.dumps(dict(sidecar), indent=2, sort_keys=True, default=str) + "\n")
    return path


def make_logger(trt, verbose: bool = False):
    """An ILogger that prints warnings and keeps errors for the exception message."""

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
            limit = trt.ILogger.Severity.VERBOSE if verbose else trt.ILogger.Severity.WARNING
            if int(severity) <= int(limit):  # lower value = more severe
                print(f"[TensorRT] {severity.name}: {msg}", flush=True)

    return _Logger()


__all__ = ["EngineIncompatible", "INSTALL_HINT", "SIDECAR_SUFFIX", "TensorRTUnavailable", "check_engine_compatible",
           "current_gpu", "device_index", "engine_sidecar_path", "make_logger", "read_sidecar", "require_tensorrt",
           "tensorrt_available", "write_sidecar"]
