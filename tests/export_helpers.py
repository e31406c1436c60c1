"""Helpers shared by the export and runner tests: the eager-vs-file parity check, TensorRT's parser ops."""
from __future__ import annotations

from importlib import resources

import numpy as np

from rmt_deploy.parity import check_parity
from rmt_deploy.runners import open_runner


def trt_supported_ops() -> set[str]:
    text = resources.files("rmt_deploy.exporters").joinpath("tensorrt_onnx_ops.txt").read_text()
    return {line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")}


def eager_vs_onnx(model, path, shapes, tolerance, backend="onnxruntime"):
    eager = open_runner("eager", model=model).load()
    runtime = open_runner(backend, onnx=path).load()
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    return check_parity(eager, runtime, batches, tolerance)
