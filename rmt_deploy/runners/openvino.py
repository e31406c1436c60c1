"""OpenVINO runner (CPU) over the same ONNX files ONNX Runtime runs.

OpenVINO's CPU plugin fuses the LayerNorm, GELU and attention chains of the exported graph into
JIT kernels, so on Intel (AVX-512) CPUs it is often the fastest CPU backend. Two settings keep its
numbers honest: float32 files run with float32 inference precision (on AMX/AVX-512-BF16 CPUs the
plugin would otherwise silently compute in bfloat16), and the latency hint (one stream using
every core), which is what one call at a time (the benchmark, the server's batcher) measures.
Before compiling, three output-preserving rewrites (`openvino_graph`): the NaN guards the ONNX reader adds after
attention are dropped where a finite mask makes them the identity (`drop_attention_nan_guards`), the
rotary shifts take the form the plugin fuses into RoPE kernels (`rotary_as_rope`), and attention
within `small_attention`'s limits (every RMT one at 224 px) runs on its kernel, a C++ extension
operation, where it builds (`use_small_head_attention`): its float32 variant in a float32 graph, its
bfloat16 one in a bf16 graph.
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..artifact import ArtifactDescription
from . import small_attention
from .base import Runner, RunnerMetadata, RunnerUnavailable, TensorSpec, Timing
from .onnxruntime import prepare_onnx
from .registry import Backend, cpu_precision_reason, register
from .openvino_graph import drop_attention_nan_guards, rotary_as_rope, use_small_head_attention


def _import_openvino():
    try:
        import openvino
    except ImportError as exc:
        raise RunnerUnavailable("OpenVINO is not installed (pip install 'rmt-deploy[openvino]', or openvino)") from exc
    return openvino


def unavailable_reason(device: str) -> str | None:
    """Why this runner cannot run on ``device`` here (checked before any ONNX file is exported)."""
    if device != "cpu":
        return f"the OpenVINO runner runs on the CPU only (asked for {device!r})"
    try:
        _import_openvino()
    except RunnerUnavailable as exc:
        return str(exc)
    return None


def _onnx_metadata(model) -> dict[str, str]:
    """The exporter's ``rmt.*`` metadata: OpenVINO's ONNX reader keeps metadata_props under 'framework'."""
    if not model.has_rt_info(["framework"]):
        return {}
    props = model.get_rt_info()["framework"]
    return {key: props[key].astype(str) for key in props.keys()}


def _small_head_attention(model, compute: str, kernel_in_bf16: bool) -> str:
    """How many attention nodes now run on the small-head kernel (and in which precision), or why none do.
    In a bf16 graph the kernel's bfloat16 variant runs (its float32 one where this build has none)."""
    if reason := small_attention.kernel_unavailable_reason():
        return reason
    if compute == "bf16" and not kernel_in_bf16:
        return "off in bf16: OpenVINO's own bf16 attention was asked for (bf16_attention_kernel=False)"
    if compute not in ("f32", "bf16"):
        return "the small-head attention kernel computes in float32 or bfloat16 only"
    missing = compute == "bf16" and small_attention.kernel_unavailable_reason("bf16")
    try:
        replaced = use_small_head_attention(model, "f32" if missing else compute)
    except RuntimeError as exc:     # this OpenVINO would not load the built extension: its own attention runs
        return f"the small-head attention extension did not load: {str(exc).strip()[:300]}"
    if compute == "f32":
        return str(replaced)
    return f"{replaced} (float32 variant inside bf16: {missing})" if missing else f"{replaced} (bfloat16 variant)"


class OpenVINORunner(Runner):
    backend = "openvino"

    def __init__(self, path: str | Path, device: str = "cpu", threads: int | None = None, precision: str | None = None,
                 bf16_attention_kernel: bool = True, int8_float_layers: str | None = None):
        """``path``: an ONNX file or an OpenVINO IR (.xml, e.g. NNCF's INT8). ``precision`` "bf16" computes
        in bfloat16 (the CPU must have AVX512_BF16 or AMX); otherwise (None) the file's own precision runs
        (float32 for an fp32 file: never bfloat16 behind the user's back).
        ``int8_float_layers``: what an INT8 IR computes its unquantized layers (attention, LayerNorm,
        GELU, depthwise convolutions) in: "bf16" or "f32"; None takes bf16 where the CPU computes it
        natively (AVX512_BF16 / AMX), as OpenVINO itself does on AMX CPUs, else f32. An INT8 IR opened
        with ``precision="bf16"`` takes bf16. The gate and the server hold the artifact as it runs.
        ``bf16_attention_kernel``: in bf16, attention runs on the small-head kernel's bfloat16 variant
        (faster than OpenVINO's own bf16 attention, docs/precision.md); False lets OpenVINO's run."""
        super().__init__()
        self.path, self.device, self.threads, self.precision = Path(path), device, threads, precision or "fp32"
        if not self.path.is_file():
            raise FileNotFoundError(f"model file not found: {self.path}")
        if device != "cpu":
            raise RunnerUnavailable(unavailable_reason(device))
        if int8_float_layers not in (None, "f32", "bf16"):
            raise ValueError(f"int8_float_layers must be 'f32', 'bf16' or None, not {int8_float_layers!r}")
        if "bf16" in (precision, int8_float_layers) and (reason := cpu_precision_reason("bf16")):
            raise RunnerUnavailable(reason)
        self.requested_precision, self.bf16_attention_kernel = precision, bf16_attention_kernel
        self.int8_float_layers = "bf16" if precision == "bf16" else int8_float_layers or (
            "f32" if cpu_precision_reason("bf16") else "bf16")
        self.compiled = None
        self._lock = threading.Lock()      # one infer request, shared by the server's worker threads

    def _load(self) -> None:
        ov = _import_openvino()
        core = ov.Core()
        model = core.read_model(os.fspath(self.path))
        self._metadata = _onnx_metadata(model)
        self.precision, compute = self._precisions(model, core)
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": compute}
        guards, rotaries = drop_attention_nan_guards(model), rotary_as_rope(model)
        kernel = _small_head_attention(model, compute, self.bf16_attention_kernel)
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = self.threads
        self.compiled = core.compile_model(model, "CPU", config)
        self._request = self.compiled.create_infer_request()
        self._versions = {"openvino": ov.__version__,
                          "inference_precision": self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name(),
                          "attention_nan_guards_removed": str(guards), "rotaries_as_rope": str(rotaries),
                          "small_head_attention": str(kernel)}

    def _precisions(self, model, core) -> tuple[str, str]:
        """(the runner's precision, the plugin's inference precision). An FP16 file computes in FP16
        where the CPU has FP16 arithmetic (AVX512-FP16, AMX-FP16), float32 everywhere else."""
        import openvino as ov
        if self._metadata.get("rmt.precision") == "int8":
            return "int8", self.int8_float_layers
        if self.requested_precision == "int8":
            raise ValueError(f"{self.path} is not an INT8 artifact: quantize it first (rmt_deploy.quantize)")
        if self.requested_precision == "bf16":
            return "bf16", "bf16"
        if model.inputs[0].get_element_type() == ov.Type.f16:
            return "fp16", "f16" if "FP16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES") else "f32"
        return "fp32", "f32"

    @staticmethod
    def _specs(ports, dtype: str | None = None) -> list[TensorSpec]:
        specs = []
        for port in ports:
            dims = tuple(d.get_length() if d.is_static else "dynamic" for d in port.get_partial_shape())
            specs.append(TensorSpec(port.get_any_name(), dims,
                                    dtype or np.dtype(port.get_element_type().to_dtype()).name))
        return specs

    def metadata(self) -> RunnerMetadata:
        if self.compiled is None:
            raise RuntimeError(f"{self.name}: call load() first")
        # outputs are returned as float32 whatever the file computes in (`_infer`)
        described = ArtifactDescription.from_metadata(self._metadata)     # bf16: what it computes in, honestly
        return RunnerMetadata(self._specs(self.compiled.inputs), self._specs(self.compiled.outputs, "float32"),
                              {"path": os.fspath(self.path), **self._versions, **self._metadata},
                              described and described.with_precision(self.precision))

    def _infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            start = time.perf_counter()
            results = self._request.infer(dict(feed), share_inputs=True)
            outs = {port.get_any_name(): np.array(results[port], dtype=np.float32)
                    for port in self.compiled.outputs}
            self.last_timing = Timing(compute_ms=(time.perf_counter() - start) * 1e3)
        return outs

    def close(self) -> None:
        self.compiled = self._request = None
        super().close()


def _open(*, model, artifact, device, precision, threads, **options) -> OpenVINORunner:
    return OpenVINORunner(artifact, device=device, threads=threads, precision=precision, **options)


def _quantize(fp32_onnx: Path, out_xml: Path, images, *, calibration: str = "") -> Path:
    from ..quantize import quantize_openvino
    return quantize_openvino(fp32_onnx, out_xml, images, calibration=calibration)


# The "onnx" artifact kind of this entry is an ONNX file or OpenVINO's own IR of one (.xml + .bin, what
# NNCF's INT8 writes): the runner reads both. bf16 is a runtime precision of the fp32 file.
OPENVINO = register(Backend("openvino", "onnx", {"cpu": ("fp32", "fp16", "bf16", "int8")}, _open, unavailable_reason,
                            prepare_onnx, platform="openvino", title="OpenVINO", packages=("openvino",),
                            quantizer=_quantize, int8_suffix=".xml", options=("int8_float_layers", "bf16_attention_kernel")))
