"""ONNX files and TensorRT engines exported on the fly into a cache, keyed by everything that
changes their contents, so a rerun reuses them and a code or weight change never does."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

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
    def __init__(self, root: str | Path = DEFAULT_CACHE):
        self.root = Path(root)
        # Hash the model and exporter sources now, next to their import, not at export time: files
        # edited during a long run must not label an export made by the code loaded before.
        try:
            from rmt_deploy import model as model_module
            from rmt_deploy.exporters import onnx_export
        except ImportError as exc:
            self._exporter, self._problem = None, f"the ONNX exporter cannot be imported: {exc}"
        else:
            self._exporter, self._problem = onnx_export, None
            self._tag = _source_digest(model_module, onnx_export)

    def onnx(self, model, *, batch_size: int, size: int, fp16: bool = False, portable: bool = False) -> Path:
        """A static-shape ONNX file of ``model`` (static shapes give the runtimes the most to fuse):
        with fused Attention nodes, or in the portable opset (TensorRT, GPU providers) if asked."""
        if self._exporter is None:
            raise RunnerUnavailable(self._problem)
        opset = self._exporter.PORTABLE_OPSET if portable else self._exporter.ATTENTION_OPSET
        path = self.root / (f"{model.config.name}-{model_key(model)}-{self._tag}-b{batch_size}-{size}-"
                            f"{'fp16' if fp16 else 'fp32'}-opset{opset}.onnx")
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".partial.onnx")
            written = self._exporter.export_onnx(model, tmp, batch_size=batch_size, height=size, width=size, fp16=fp16,
                                                 opset=opset)
            Path(written).replace(path)
        return path

    def engine(self, onnx_path: Path, *, batch_size: int, size: int, fp16: bool, device: str) -> Path:
        """A TensorRT engine of ``onnx_path`` (the ONNX of the same precision: TensorRT 11 takes
        FP16 from the graph) for exactly this batch (min = opt = max). The builder writes the
        engine and its sidecar atomically; the sidecar records the GPU, so key by it too."""
        from rmt_deploy.exporters import tensorrt_build
        gpu = tensorrt_build.current_gpu(device)["gpu_name"].replace(" ", "_")
        path = onnx_path.with_name(f"{onnx_path.stem}-{gpu}-trt-{'fp16' if fp16 else 'fp32'}.engine")
        if not path.is_file():
            shape = (batch_size, 3, size, size)
            tensorrt_build.build_engine(onnx_path, path, fp16=fp16, min_shape=shape, opt_shape=shape, max_shape=shape,
                                        device=device)
        return path

