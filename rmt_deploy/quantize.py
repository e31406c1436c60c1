"""Low precision: calibration images and INT8 post-training quantization of an exported float32
graph with the libraries that own it (ONNX Runtime's static QDQ quantizer, NNCF for OpenVINO).

Everything takes a float32 artifact path and writes a new file: exporting is the tools' job. Which
(backend, precision, CPU) combinations run is the registry's `Backend.unavailable_reason`, asked
before anything is exported or calibrated; INT8 is never calibrated on anything but real image files.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from .preprocess import image_files, load_images
from .qdq_layout import consumers, pointwise_matrix, rewrite_for_ort_int8
from .runners.base import INPUT_NAME


CALIBRATION_SUFFIXES = {".jpg", ".jpeg", ".png"}
MIN_CALIBRATION_IMAGES = 32        # fewer real images give activation ranges of a handful of pictures
MAX_CALIBRATION_IMAGES = 300       # NNCF's default subset size; more only costs time
# Linear algebra is what INT8 speeds up; LayerNorm, softmax / attention (with its decay-bias mask)
# and the residual adds stay float: the known failure points of quantized transformers. Of the Adds
# only the output projection's input is quantized (`_projection_adds`).
ORT_QUANTIZED_OPS = ("Conv", "Gemm", "MatMul", "Add")
# OpenVINO's CPU plugin runs depthwise (group) convolutions in float whatever quantizes their input
# (docs/precision.md), so a FakeQuantize before one would only add a quantize-dequantize pass.
OPENVINO_FLOAT_OPS = ("ScaledDotProductAttention", "Softmax", "MVN", "GroupConvolution")


class CalibrationError(ValueError):
    """The calibration folder cannot give a meaningful INT8 calibration; the message says why."""


def calibration_images(folder: str | Path, image_size: int, *, min_images: int = MIN_CALIBRATION_IMAGES,
                       max_images: int = MAX_CALIBRATION_IMAGES) -> np.ndarray:
    """Real JPEG/PNG images under ``folder`` (recursive, sorted, evenly thinned to ``max_images``),
    decoded and preprocessed exactly as the server does: (N, 3, S, S) float32."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CalibrationError(f"calibration folder {folder} does not exist or is not a directory")
    paths = [p for p in image_files(folder) if p.suffix.lower() in CALIBRATION_SUFFIXES]
    if len(paths) < min_images:
        raise CalibrationError(f"calibration folder {folder} has {len(paths)} JPEG/PNG images; INT8 calibration "
                               f"needs at least {min_images} real images (a few hundred is best)")
    if len(paths) > max_images:
        paths = [paths[i] for i in np.linspace(0, len(paths) - 1, max_images).round().astype(int)]
    return load_images(paths, image_size)


def calibration_tag(folder: str | Path) -> str:
    """``<folder name>-<8 hex>``: the digest of the calibration images' relative paths and sizes, so an
    INT8 file named by it is never reused for other images."""
    import hashlib
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in image_files(folder):
        digest.update(f"{path.relative_to(folder)}:{path.stat().st_size}\n".encode())
    return f"{folder.resolve().name}-{digest.hexdigest()[:8]}"


def calibration_batches(images: np.ndarray, batch: int) -> list[np.ndarray]:
    """Full batches of ``batch`` rows (what a static-batch graph takes); the last one wraps around to
    the first images instead of padding with zeros, which would skew the activation ranges."""
    count = -(-len(images) // batch)
    return [images[np.arange(i * batch, (i + 1) * batch) % len(images)] for i in range(count)]


def _onnx_batch(proto) -> int | None:
    dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    return dim.dim_value or None


class _BatchReader:
    """ONNX Runtime's CalibrationDataReader protocol over preprocessed batches."""

    def __init__(self, batches: Sequence[np.ndarray]):
        self._batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def _projection_adds(proto) -> set[str]:
    """Adds read only by 1x1 convolutions: in RMT attention + LePE, the output projection's input, which
    is rounded to uint8 for the projection anyway. A QLinearAdd there saves a DequantizeLinear and a
    float add. The residual adds stay float: quantized, they failed the gate on the degraded fixture
    (docs/precision.md)."""
    initializers, readers = {i.name: i for i in proto.graph.initializer}, consumers(proto.graph)
    return {n.name for n in proto.graph.node if n.op_type == "Add" and readers.get(n.output[0])
            and all(pointwise_matrix(r, initializers) is not None for r in readers[n.output[0]])}


def _float_nodes(proto, quantized_adds: set[str]) -> list[str]:
    """Nodes of ORT_QUANTIZED_OPS' types that stay float: MatMuls of two activations (attention in the
    portable export), the Adds not in ``quantized_adds``, and the first convolution (three image
    channels: ONNX Runtime's int8 kernel gains nothing there, and the image itself would be rounded)."""
    constants = {i.name for i in proto.graph.initializer}
    constants |= {o for n in proto.graph.node if n.op_type == "Constant" for o in n.output}
    image = proto.graph.input[0].name
    return [n.name for n in proto.graph.node
            if (n.op_type == "MatMul" and not set(n.input) & constants)
            or (n.op_type == "Add" and n.name not in quantized_adds)
            or (n.op_type == "Conv" and image in n.input)]


def _name_every_node(proto) -> None:
    """Give each unnamed node a name no other node has: the quantizer excludes nodes by name."""
    taken = {node.name for node in proto.graph.node}
    for index, node in enumerate(proto.graph.node):
        if node.name:
            continue
        while f"rmt_{node.op_type}_{index}" in taken:
            index += 1
        node.name = f"rmt_{node.op_type}_{index}"
        taken.add(node.name)


def quantize_onnxruntime(fp32_onnx: str | Path, out_path: str | Path, images: np.ndarray, *,
                         calibration: str = "", per_channel: bool = True) -> Path:
    """A QDQ INT8 copy of a float32 ONNX file (activations uint8, weights int8 per output channel,
    MinMax calibration over ``images``), the input of ONNX Runtime's CPU int8 kernels and of
    TensorRT's explicit quantization. Conv/Gemm/MatMul with a weight operand (but the first
    convolution) and the output projections' input Adds are quantized, on the graph as
    `qdq_layout.rewrite_for_ort_int8` leaves it (1x1 convolutions as Gemms)."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quant_pre_process, quantize_static

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    proto = onnx.load(os.fspath(fp32_onnx))
    batch = _onnx_batch(proto) or 8
    # temporary names in the same folder, renamed into place at the end: a killed run leaves no file
    # under the final name for a later run to reuse
    partial = out_path.with_name(f".{out_path.stem}.{os.getpid()}.partial.onnx")
    prepared = partial.with_suffix(".prep.onnx")
    try:
        # shape inference and ORT's graph fusions first, as ONNX Runtime's docs advise for static quantization
        quant_pre_process(os.fspath(fp32_onnx), os.fspath(prepared), skip_symbolic_shape=True)
        prepared_proto = onnx.load(os.fspath(prepared))
        _name_every_node(prepared_proto)
        quantized_adds = _projection_adds(prepared_proto)
        rewrites = rewrite_for_ort_int8(prepared_proto)
        onnx.save(prepared_proto, os.fspath(prepared))
        present = {n.op_type for n in prepared_proto.graph.node}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_static(prepared, partial, _BatchReader(calibration_batches(images, batch)),
                            quant_format=QuantFormat.QDQ, per_channel=per_channel,
                            op_types_to_quantize=[t for t in ORT_QUANTIZED_OPS if t in present],
                            nodes_to_exclude=_float_nodes(prepared_proto, quantized_adds),
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False,
                                           # float outputs: QGemm / MatMulIntegerToFloat dequantize in their
                                           # GEMM epilogue, instead of a uint8 tensor and a DequantizeLinear
                                           "OpTypesToExcludeOutputQuantization": ["Gemm", "MatMul"]})
        quantized = onnx.load(os.fspath(partial))
        meta = {p.key: p.value for p in proto.metadata_props}
        meta.update({"rmt.precision": "int8", "rmt.quantizer": "onnxruntime.quantization QDQ (static, MinMax)",
                     "rmt.calibration": _calibration_note(images, calibration),
                     "rmt.graph_rewrites": ", ".join(f"{k}: {v}" for k, v in rewrites.items())})
        del quantized.metadata_props[:]
        for key, value in meta.items():
            quantized.metadata_props.add(key=key, value=value)
        onnx.save(quantized, os.fspath(partial))
        os.replace(partial, out_path)
    finally:
        prepared.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)
    return out_path


def _calibration_note(images: np.ndarray, calibration: str) -> str:
    """What the artifact records about its calibration: the image count and ``calibration``'s last
    part (a `calibration_tag`: folder name and digest), never a path of this machine (served publicly)."""
    return f"{len(images)} images {Path(calibration).name if calibration else ''}".strip()


def _openvino_ignored_scope(model):
    import nncf
    present = {op.get_type_name() for op in model.get_ops()}
    return nncf.IgnoredScope(types=[t for t in OPENVINO_FLOAT_OPS if t in present], validate=False)


def quantize_openvino(fp32_onnx: str | Path, out_xml: str | Path, images: np.ndarray, *, calibration: str = "",
                      validation: tuple[np.ndarray, np.ndarray] | None = None, max_drop: float = 0.01) -> Path:
    """An OpenVINO IR (.xml + .bin) with NNCF's INT8 (transformer model type, mixed preset:
    symmetric weights, asymmetric activations) calibrated on ``images``. With ``validation``
    (preprocessed images, labels) NNCF's accuracy-controlled quantization reverts layers to float
    until top-1 is within ``max_drop`` (a fraction) of the float model.

    The runner's graph rewrites are not applied here: they are output-preserving and the runner
    applies them to the quantized IR when it loads it (a pattern a quantizer changed stays as it was)."""
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    model = ov.Core().read_model(os.fspath(fp32_onnx))
    batch = model.inputs[0].get_partial_shape()[0]
    batch = batch.get_length() if batch.is_static else 8
    calib = calibration_batches(images, batch)
    options = dict(subset_size=len(calib), model_type=nncf.ModelType.TRANSFORMER,
                   preset=nncf.QuantizationPreset.MIXED, ignored_scope=_openvino_ignored_scope(model))
    # SmoothQuant (on by default for the transformer type) moves activation outliers into the weights;
    # on RMT it loses accuracy instead (cosine to float32 eager falls below the int8 gate, see docs/precision.md)
    advanced = AdvancedQuantizationParameters(smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1))
    nncf.set_log_level(logging.WARNING)     # not the per-node "not adding quantizer" lines
    if validation is None:
        quantized = nncf.quantize(model, nncf.Dataset(calib), advanced_parameters=advanced, **options)
    else:
        quantized = nncf.quantize_with_accuracy_control(
            model, nncf.Dataset(calib), nncf.Dataset(_labelled_batches(*validation, batch)), _top1_validation,
            max_drop=max_drop, advanced_quantization_parameters=advanced, **options)
    for key, value in {"rmt.precision": "int8", "rmt.quantizer": f"nncf {nncf.__version__} "
                       f"{'quantize_with_accuracy_control' if validation else 'quantize'} (transformer, mixed, no SmoothQuant)",
                       "rmt.calibration": _calibration_note(images, calibration),
                       "rmt.graph_rewrites": "applied by the runner at load"}.items():
        quantized.set_rt_info(value, ["framework", key])
    out_xml = Path(out_xml)
    out_xml.parent.mkdir(parents=True, exist_ok=True)
    # written into a temporary folder beside it, then the .bin and last the .xml (what reuse looks for)
    # renamed into place: a killed run leaves no .xml that a later run would keep
    staging = Path(tempfile.mkdtemp(prefix=f".{out_xml.stem}.", dir=out_xml.parent))
    try:
        ov.save_model(quantized, os.fspath(staging / out_xml.name), compress_to_fp16=False)
        os.replace(staging / out_xml.with_suffix(".bin").name, out_xml.with_suffix(".bin"))
        os.replace(staging / out_xml.name, out_xml)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_xml


def _labelled_batches(images: np.ndarray, labels: np.ndarray, batch: int) -> list[tuple[np.ndarray, np.ndarray]]:
    batches = calibration_batches(images, batch)
    label_batches = calibration_batches(labels, batch)
    return list(zip(batches, label_batches))


def _top1_validation(compiled_model, data: Iterator[tuple[np.ndarray, np.ndarray]]) -> tuple[float, list[float]]:
    """NNCF's validation function: top-1 of a compiled OpenVINO model, and per-sample hits."""
    output = compiled_model.outputs[0]
    hits: list[float] = []
    for images, labels in data:
        logits = compiled_model(images)[output]
        hits += (np.argmax(logits, axis=1) == labels).astype(float).tolist()
    return float(np.mean(hits)), hits
