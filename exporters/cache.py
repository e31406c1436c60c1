"""ONNX files and TensorRT engines exported on the fly into a cache, keyed by everything that
changes their contents, so a rerun reuses them and a code or weight change never does. The files
come from the export library's own call (`export_artifacts`): the same FP16 route and metadata.
rmt-bench and rmt-predict prepare their artifacts through it."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace
from pathlib import Path

from rmt_deploy.artifact import ExportPlan
from rmt_deploy.runners import RunnerUnavailable

DEFAULT_CACHE = Path(".rmt_cache")
SEED = 0          # random weights (no checkpoint) are seeded so exported files match the eager model


def _source_digest(*modules) -> str:
    digest = hashlib.sha256()
    for module in modules:
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:12]


def model_key(model) -> str:
    """Config + weights identity (checkpoint sha256, or the fixed seed of random weights)."""
    weights = (model.checkpoint or {}).get("sha256") or f"random-seed{SEED}"
    blob = json.dumps({"config": asdict(model.config), "weights": weights}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class ArtifactCache:
    """What `Backend.prepare` exports through: ``onnx(model, plan)`` and ``engine(model, plan)`` for
    the plan's one precision, static shapes (what the runtimes optimise best)."""

    def __init__(self, root: str | Path = DEFAULT_CACHE):
        self.root = Path(root)
        # Hash the model and exporter sources now, next to their import, not at export time: files
        # edited during a long run must not label an export made by the code loaded before.
        # The quantizers are part of it: a changed INT8 recipe must not reuse files of the old one.
        try:
            from rmt_deploy import model as model_module
            from rmt_deploy import qdq_layout, quantize

            from . import export, onnx_export
        except ImportError as exc:
            self._export, self._problem = None, f"the ONNX exporter cannot be imported: {exc}"
        else:
            self._export, self._problem = export, None
            self._tag = _source_digest(model_module, onnx_export, export, quantize, qdq_layout)

    def _manifest(self, model, plan: ExportPlan, kind: str):
        if self._export is None:
            raise RunnerUnavailable(self._problem)
        opset = self._export.default_opset(replace(plan, kinds=("onnx",)))
        stem = f"{model.config.name}-{model_key(model)}-{self._tag}-b{plan.batch.opt}-{plan.height}-opset{opset}"
        if kind == "engine":        # the builder records the GPU in the sidecar: key by it too
            from rmt_deploy.runners.tensorrt_env import current_gpu
            stem += "-" + current_gpu(plan.device)["gpu_name"].replace(" ", "_")
        if kind == "engine":        # an int8 engine needs one QDQ file, not every ONNX backend's int8 file
            plan = replace(plan, kinds=("onnx", kind), backends=(self._export.gate_backend("onnx"),))
        else:
            plan = replace(plan, kinds=("onnx",))
        plan = replace(plan, opset=opset, output_dir=self.root, stem=stem)
        return self._export.export_artifacts(model, plan, reuse=True)

    def onnx(self, model, plan: ExportPlan) -> Path:
        """A static-shape ONNX file of ``model``: with fused Attention nodes, or in the portable opset if asked."""
        return self._manifest(model, plan, "onnx").path("onnx", plan.precision)

    def engine(self, model, plan: ExportPlan) -> Path:
        """A TensorRT engine from the ONNX file of the same precision (TensorRT 11 takes FP16 from the
        graph) for exactly this batch (min = opt = max)."""
        return self._manifest(model, plan, "engine").path("engine", plan.precision)
