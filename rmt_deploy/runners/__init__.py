"""Backends behind one interface, found through the registry (`get_backend`, `backend_names`).
Heavy libraries (onnxruntime, openvino, tensorrt) load only when used."""
from __future__ import annotations

from .base import INPUT_NAME, Runner, RunnerMetadata, RunnerUnavailable, TensorSpec, Timing, infer_padded
from .registry import (ARTIFACT_FORMATS, Backend, BackendRefused, backend_names, backend_packages, backends_for, device_kind,
                       get_backend, open_backend_runner, precision_names, precision_table, reference_backend)


def open_runner(backend: str, *, model=None, onnx=None, engine=None, device: str | None = None,
                precision: str | None = None, threads: int | None = None, **options) -> Runner:
    """Build (not yet load) the runner for ``backend``: ``get_backend(backend).open(...)`` with the
    artifact given as ``onnx=`` or ``engine=`` (the spelling before the registry). Tools open theirs
    with `open_backend_runner`, which asks the registry first."""
    return get_backend(backend).open(model=model, artifact=onnx if onnx is not None else engine, device=device,
                                     precision=precision, threads=threads, **options)


__all__ = ["ARTIFACT_FORMATS", "Backend", "BackendRefused", "backend_packages", "INPUT_NAME", "Runner", "RunnerMetadata", "RunnerUnavailable", "TensorSpec", "Timing",
           "backend_names", "backends_for", "device_kind", "get_backend", "infer_padded", "open_backend_runner", "open_runner",
           "precision_names", "precision_table", "reference_backend"]
