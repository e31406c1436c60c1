"""INT8 post-training quantization of the trained Shapes10 fixture (ONNX Runtime QDQ, OpenVINO NNCF)
held to the low-precision accuracy gate, and what calibration refuses."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from PIL import Image

from rmt_deploy import quantize as q
from rmt_deploy.accuracy import AccuracyDropError, low_precision_gate
from rmt_deploy.parity import ParityError
from rmt_deploy.preprocess import load_images
from rmt_deploy.qdq_layout import rewrite_for_ort_int8
from rmt_deploy.runners import RunnerUnavailable, get_backend, registry
from rmt_deploy.runners.onnxruntime import OnnxRuntimeRunner
import shapes10
from shapes10 import BATCH, CALIB, SIZE, export_fixture, needs_fixture

pytestmark = needs_fixture
int8_here = pytest.mark.skipif(bool(get_backend("onnxruntime").unavailable_reason("cpu", "int8")),
                               reason=str(get_backend("onnxruntime").unavailable_reason("cpu", "int8")))


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory):
    return export_fixture(tmp_path_factory.mktemp("shapes10"))


@pytest.fixture(scope="module")
def calib_images():
    return q.calibration_images(CALIB, SIZE)


def _gate(candidate, precision="int8"):
    """The gate against float32 eager on the validation folder and on its degraded copy."""
    return [low_precision_gate(shapes10.reference(), candidate, precision, shapes10.parity_images(), BATCH,
                               labelled=shapes10.labelled()[name]) for name in ("val", "degraded")]


def _write_png(path, value, size=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)


def test_calibration_refuses_missing_empty_and_too_small_folders(tmp_path):
    with pytest.raises(q.CalibrationError, match="does not exist"):
        q.calibration_images(tmp_path / "nowhere", SIZE)
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(q.CalibrationError, match="has 0 JPEG/PNG images"):
        q.calibration_images(tmp_path, SIZE)
    for i in range(3):
        _write_png(tmp_path / "sub" / f"{i}.png", 40 * i)
    with pytest.raises(q.CalibrationError, match=r"has 3 JPEG/PNG images; INT8 calibration needs at least 32"):
        q.calibration_images(tmp_path, SIZE)


def test_calibration_reads_jpeg_and_png_recursively_preprocessed_like_the_server(tmp_path):
    (tmp_path / "deep" / "er").mkdir(parents=True)
    targets = [tmp_path / "a.png", tmp_path / "deep" / "b.jpg", tmp_path / "deep" / "er" / "c.jpeg", tmp_path / "d.png"]
    for src, target in zip(sorted(CALIB.glob("*.png")), targets):
        with Image.open(src) as img:
            img.convert("RGB").save(target)
    images = q.calibration_images(tmp_path, SIZE, min_images=4)
    files = sorted(targets)
    assert images.shape == (4, 3, SIZE, SIZE)
    np.testing.assert_array_equal(images, load_images(files, SIZE))
    batches = q.calibration_batches(images[:3], 2)
    assert [len(b) for b in batches] == [2, 2] and np.array_equal(batches[1][1], images[0])   # wraps, no zeros


@pytest.fixture(scope="module")
def ort_int8(fp32_onnx, calib_images, tmp_path_factory):
    return q.quantize_onnxruntime(fp32_onnx, tmp_path_factory.mktemp("ort_int8") / "int8.onnx", calib_images,
                                  calibration=str(CALIB))


def _perms(proto) -> list[list[int]]:
    return [list(a.ints) for n in proto.graph.node if n.op_type == "Transpose" for a in n.attribute if a.name == "perm"]


def _pointwise_convs(proto) -> int:
    shapes = {i.name: list(i.dims) for i in proto.graph.initializer}
    return sum(n.op_type == "Conv" and shapes.get(n.input[1], [])[2:] == [1, 1] for n in proto.graph.node)


@pytest.mark.parametrize("batch", ["static", "dynamic"])
def test_int8_layout_rewrites_keep_the_float_outputs(fp32_onnx, tmp_path, batch):
    """Static and dynamic-batch exports (rmt-export --dynamic-batch, Triton) are rewritten alike."""
    import onnxruntime as ort
    from rmt_deploy.exporters.onnx_export import export_onnx
    path = fp32_onnx if batch == "static" else export_onnx(shapes10.fixture_model(), tmp_path / "dynamic.onnx",
                                                            dynamic_batch=True, height=SIZE, width=SIZE)
    proto = onnx.load(str(path))
    pointwise, tokens = _pointwise_convs(proto), _perms(proto).count([0, 2, 1])
    assert pointwise and tokens
    assert rewrite_for_ort_int8(proto) == {"channels-last tokens": tokens, "1x1 convs as Gemm": pointwise}
    assert _pointwise_convs(proto) == 0 and [0, 2, 1] not in _perms(proto)
    for images in ([shapes10.parity_images()[:BATCH]] if batch == "static" else
                   [shapes10.parity_images()[:3], shapes10.parity_images()[:1]]):
        before, after = (ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"images": images})[0]
                         for model in (str(path), proto.SerializeToString()))
        np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4)


@int8_here
def test_onnxruntime_int8_session_keeps_no_layout_transposes_and_no_pointwise_dequantize(fp32_onnx, ort_int8, tmp_path):
    """What the rewrites are for, as ONNX Runtime's CPU session optimizes the QDQ file: the transposes
    around its channels-last convolutions all cancel (one may stay at the float first convolution),
    and every 1x1 convolution and linear layer runs as a QGemm with float output (no
    DequantizeLinear after it)."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(ort_int8), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(options.optimized_model_filepath).graph.node
    fp32 = onnx.load(str(fp32_onnx)).graph.node
    ops = [n.op_type for n in optimized]
    assert ops.count("Transpose") <= 1
    assert ops.count("QGemm") == _pointwise_convs(onnx.load(str(fp32_onnx))) + [n.op_type for n in fp32].count("Gemm")
    qgemm_outputs = {o for n in optimized if n.op_type == "QGemm" for o in n.output}
    assert not [n for n in optimized if n.op_type == "DequantizeLinear" and n.input[0] in qgemm_outputs]


@int8_here
def test_onnxruntime_qdq_int8_passes_the_gate(fp32_onnx, ort_int8, calib_images):
    path = ort_int8
    proto = onnx.load(str(path))
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Attention", "LayerNormalization"} <= ops
    int8_weights = [i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    per_channel = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"
                   and n.input[0] in {w.name for w in int8_weights} and any(a.name == "axis" for a in n.attribute)]
    assert len(int8_weights) >= 60 and per_channel        # every Conv / Gemm weight, per output channel
    assert [p.name for p in path.parent.iterdir()] == ["int8.onnx"]   # no temporary file left beside it
    candidate = OnnxRuntimeRunner(path).load()
    meta = candidate.metadata().extra
    assert candidate.precision == "int8" and meta["rmt.precision"] == "int8"
    # served as public model metadata: the folder's name, never the path given
    assert meta["rmt.calibration"] == f"{len(calib_images)} images {CALIB.name}"
    fp32 = onnx.load(str(fp32_onnx))
    assert meta["rmt.graph_rewrites"] == (f"channels-last tokens: {_perms(fp32).count([0, 2, 1])}, "
                                          f"1x1 convs as Gemm: {_pointwise_convs(fp32)}")
    for report in _gate(candidate):
        assert report.passed, report.text()
        assert report.drop <= 1.0
    assert 0.8 <= report.reference_top1.top1 <= 0.95      # the degraded copy can show a one-point drop


def test_a_failed_quantization_leaves_no_file_for_reuse_to_keep(fp32_onnx, tmp_path):
    out = tmp_path / "int8.onnx"
    with pytest.raises(Exception):          # images of the wrong shape: calibration fails inside ONNX Runtime
        q.quantize_onnxruntime(fp32_onnx, out, np.zeros((2, 3, SIZE + 5, SIZE), np.float32))
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def openvino_int8_ir(fp32_onnx, calib_images):
    pytest.importorskip("nncf")
    return q.quantize_openvino(fp32_onnx, fp32_onnx.with_name("int8.xml"), calib_images, calibration=str(CALIB))


@int8_here
def test_openvino_nncf_int8_ir_passes_the_gate(openvino_int8_ir):
    from rmt_deploy.runners.openvino import OpenVINORunner
    path = openvino_int8_ir
    assert path.with_suffix(".bin").is_file()
    candidate = OpenVINORunner(path, int8_float_layers="f32").load()
    meta = candidate.metadata().extra
    assert candidate.precision == "int8" and meta["inference_precision"] == "f32"
    assert meta["rmt.graph_rewrites"] == "applied by the runner at load" and meta["attention_nan_guards_removed"] == "9"
    import openvino as ov
    ops = ov.Core().read_model(str(path)).get_ops()
    ir_ops = [op.get_type_name() for op in ops]
    assert ir_ops.count("FakeQuantize") >= 30 and "ScaledDotProductAttention" in ir_ops
    # depthwise convolutions stay float (the CPU plugin runs them in float anyway): no FakeQuantize feeds one
    assert "GroupConvolution" in ir_ops and not any(
        op.get_type_name() == "GroupConvolution" and op.input_value(0).get_node().get_type_name() == "FakeQuantize"
        for op in ops)
    for report in _gate(candidate):
        assert report.passed, report.text()


@int8_here
@pytest.mark.skipif(bool(get_backend("openvino").unavailable_reason("cpu", "bf16")),
                    reason=str(get_backend("openvino").unavailable_reason("cpu", "bf16")))
def test_openvino_int8_ir_with_bf16_float_layers_passes_the_int8_gate(openvino_int8_ir):
    """On a CPU with native bf16 an INT8 IR computes its float layers in bf16 unless told otherwise."""
    from rmt_deploy.runners.openvino import OpenVINORunner
    candidate = OpenVINORunner(openvino_int8_ir).load()
    meta = candidate.metadata().extra
    assert candidate.precision == "int8" and meta["inference_precision"] == "bf16"
    assert meta["small_head_attention"] == "9 (bfloat16 variant)"
    assert OpenVINORunner(openvino_int8_ir, precision="bf16", int8_float_layers="f32").int8_float_layers == "bf16"
    for report in _gate(candidate):
        assert report.passed, report.text()


def test_openvino_int8_float_layers_stay_float32_where_the_cpu_lacks_bf16(fp32_onnx, monkeypatch):
    """Decided when the runner is made (before any file is read), through the registry as directly."""
    pytest.importorskip("openvino")
    from rmt_deploy.runners import RunnerUnavailable, registry
    from rmt_deploy.runners.openvino import OpenVINORunner
    monkeypatch.setattr(registry, "cpu_flags", lambda: {"avx2", "avx512_vnni"})     # VNNI, no bf16
    assert OpenVINORunner(fp32_onnx).int8_float_layers == "f32"
    opened = get_backend("openvino").open(artifact=fp32_onnx, int8_float_layers="f32")
    assert opened.int8_float_layers == "f32"
    with pytest.raises(RunnerUnavailable, match="AVX512_BF16/AMX"):
        OpenVINORunner(fp32_onnx, int8_float_layers="bf16")
    with pytest.raises(ValueError, match="int8_float_layers must be"):
        OpenVINORunner(fp32_onnx, int8_float_layers="fp16")


@int8_here
def test_openvino_accuracy_controlled_int8_stays_within_the_drop(fp32_onnx, calib_images, tmp_path):
    pytest.importorskip("nncf")
    from rmt_deploy.runners.openvino import OpenVINORunner
    path = q.quantize_openvino(fp32_onnx, tmp_path / "int8_ac.xml", calib_images,
                               validation=shapes10.labelled()["degraded"], max_drop=0.01)
    candidate = OpenVINORunner(path).load()
    assert "quantize_with_accuracy_control" in candidate.metadata().extra["rmt.quantizer"]
    report = low_precision_gate(shapes10.reference(), candidate, "int8", shapes10.parity_images(), BATCH,
                                labelled=shapes10.labelled()["degraded"])
    assert report.passed and report.drop <= 1.0, report.text()


@int8_here
def test_calibrating_on_one_constant_image_fails_the_gate_with_a_clear_message(fp32_onnx, tmp_path):
    _write_png(tmp_path / "calib" / "grey.png", 128)
    constant = q.calibration_images(tmp_path / "calib", SIZE, min_images=1)
    path = q.quantize_onnxruntime(fp32_onnx, tmp_path / "broken.onnx", constant)
    report = _gate(OnnxRuntimeRunner(path).load())[0]
    assert not report.passed
    with pytest.raises((ParityError, AccuracyDropError)) as failure:
        report.raise_for_failure()
    message = str(failure.value)
    assert "FAILED" in message and ("below" in message or "drop" in message)


def test_unsupported_combinations_are_refused_with_the_reason_before_any_export(monkeypatch):
    assert registry.cpu_precision_reason("bf16", {"avx2"}) == \
        "this CPU has no AVX512_BF16/AMX (bf16 would be emulated, slower than fp32)"
    assert "VNNI" in registry.cpu_precision_reason("int8", {"avx2"})
    assert registry.cpu_precision_reason("bf16", {"avx512_bf16"}) is None
    assert get_backend("eager").unavailable_reason("cpu", "int8").startswith("eager does not run int8 on cpu")
    assert "CUDA devices only" in get_backend("tensorrt").unavailable_reason("cpu", "int8")
    with pytest.raises(ValueError, match="unknown precision"):
        get_backend("openvino").unavailable_reason("cpu", "int4")
    monkeypatch.setattr(registry, "cpu_flags", lambda: {"avx2"})
    assert "no VNNI" in get_backend("onnxruntime").unavailable_reason("cpu", "int8")
    assert "no AVX512_BF16" in get_backend("openvino").unavailable_reason("cpu", "bf16")
    with pytest.raises(RunnerUnavailable, match="no INT8 quantizer"):
        get_backend("eager").quantize(CALIB, CALIB, SIZE)
    with pytest.raises(RunnerUnavailable, match="needs --calib"):
        get_backend("onnxruntime").quantize(CALIB, None, SIZE)
