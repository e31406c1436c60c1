"""TensorRT's explicit quantization of the QDQ ONNX file: the planning (pure, runs everywhere) and,
where TensorRT and a CUDA GPU exist, an INT8 engine built from the fixture's QDQ file held to the int8
gate. The build path is written to TensorRT's documented API and untested without TensorRT."""
from __future__ import annotations

import pytest

from rmt_deploy.exporters import tensorrt_build as tb
from rmt_deploy.runners import get_backend
from rmt_deploy.runners.tensorrt_env import tensorrt_available
from shapes10 import CALIB, SIZE, export_fixture, needs_fixture

TRT_OK, TRT_REASON = tensorrt_available()


def test_int8_plans_follow_the_builder_flags():
    assert tb.plan_int8(graph_int8=True, has_int8_flag=True) == {
        "strongly_typed": False, "fp16_flag": False, "int8_flag": True, "precision": "int8"}     # TensorRT 10
    assert tb.plan_int8(graph_int8=True, has_int8_flag=False)["strongly_typed"]                 # TensorRT 11
    with pytest.raises(ValueError, match="QDQ ONNX file"):
        tb.plan_int8(graph_int8=False, has_int8_flag=True)
    assert "int8" in get_backend("tensorrt").precisions["cuda"]


@pytest.fixture(scope="module")
def qdq_and_float(tmp_path_factory):
    fp32 = export_fixture(tmp_path_factory.mktemp("trt_int8"))
    return get_backend("onnxruntime").quantize(fp32, CALIB, SIZE), fp32


@needs_fixture
def test_the_qdq_file_is_recognised(qdq_and_float):
    qdq, fp32 = qdq_and_float
    assert tb.onnx_is_qdq(qdq) and not tb.onnx_is_qdq(fp32)


@needs_fixture
@pytest.mark.skipif(not TRT_OK, reason=f"an INT8 engine needs TensorRT + CUDA: {TRT_REASON}")
def test_int8_engine_from_the_qdq_file_passes_the_gate(qdq_and_float, tmp_path):
    import shapes10
    from rmt_deploy.accuracy import low_precision_gate
    qdq, _ = qdq_and_float
    engine = tb.build_engine(qdq, tmp_path / "int8.engine", int8=True, min_shape=(8, 3, SIZE, SIZE),
                             opt_shape=(8, 3, SIZE, SIZE), max_shape=(8, 3, SIZE, SIZE))
    runner = get_backend("tensorrt").open(artifact=engine, precision="int8").load()
    report = low_precision_gate(shapes10.reference(), runner, "int8", shapes10.parity_images(), 8,
                                labelled=shapes10.labelled()["val"])
    assert report.passed, report.text()
