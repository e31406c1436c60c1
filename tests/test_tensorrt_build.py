"""The TensorRT engine builder's pure parts: precision planning, the FP32-pinned layers, FP16 graph
detection, and its errors before TensorRT is touched (building engines: tests/runners/test_tensorrt.py)."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from rmt_deploy.exporters import tensorrt_build as tb
from rmt_deploy.runners import tensorrt_env as te


def test_plan_precision_branches():
    # TensorRT 10 (BuilderFlag.FP16 exists): weak typing + the flag for an FP32 graph.
    assert tb.plan_precision(True, has_fp16_flag=True, graph_fp16=False) == \
        {"strongly_typed": False, "fp16_flag": True, "precision": "fp16"}
    assert tb.plan_precision(False, has_fp16_flag=True, graph_fp16=False)["precision"] == "fp32"
    # An FP16 graph is always built strongly typed, whatever the major.
    for has_flag in (True, False):
        assert tb.plan_precision(True, has_fp16_flag=has_flag, graph_fp16=True) == \
            {"strongly_typed": True, "fp16_flag": False, "precision": "fp16"}
    # TensorRT 11 (no FP16 flag): FP32 engines are plain strongly-typed networks ...
    assert tb.plan_precision(False, has_fp16_flag=False, graph_fp16=False) == \
        {"strongly_typed": True, "fp16_flag": False, "precision": "fp32"}
    # ... and FP16 from an FP32 graph is refused with the way out.
    with pytest.raises(ValueError, match="_fp16.onnx"):
        tb.plan_precision(True, has_fp16_flag=False, graph_fp16=False, tensorrt_version="11.0.0")

def test_fp32_layer_selection():
    assert tb.wants_fp32("anything", "LayerType.NORMALIZATION")
    assert tb.wants_fp32("anything", "LayerType.SOFTMAX")
    assert tb.wants_fp32("/layers.0/blocks.1/norm1/ReduceMean", "LayerType.REDUCE")
    assert tb.wants_fp32("/retention/decay_mask/Add", "LayerType.ELEMENTWISE")
    assert tb.wants_fp32("node_heads_attention_3", "LayerType.ATTENTION")     # opset-23 files
    assert not tb.wants_fp32("/layers.0/blocks.1/ffn/fc1/MatMul", "LayerType.MATRIX_MULTIPLY")

def test_onnx_fp16_detection(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    def save(dtype, name):
        w = numpy_helper.from_array(np.ones((3, 3), dtype=dtype), "w")
        node = helper.make_node("MatMul", ["images", "w"], ["logits"])
        elem = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("images", elem, [1, 3])],
                                  [helper.make_tensor_value_info("logits", elem, [1, 3])], [w])
        path = tmp_path / name
        onnx.save(helper.make_model(graph), path)
        return path

    assert not tb.onnx_is_fp16(save(np.float32, "m.onnx"))
    assert tb.onnx_is_fp16(save(np.float16, "m_fp16.onnx"))

def test_build_without_tensorrt_raises_clearly(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"")
    with pytest.raises(te.TensorRTUnavailable, match="pip install tensorrt"):
        tb.build_engine(onnx_file, tmp_path / "m.engine", min_shape=(1, 3, 64, 64), opt_shape=(1, 3, 64, 64),
                        max_shape=(2, 3, 64, 64))
    assert not te.tensorrt_available()[0]

def test_bad_profile_rejected_before_tensorrt(tmp_path):
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"")
    with pytest.raises(ValueError, match="min <= opt <= max"):
        tb.build_engine(onnx_file, tmp_path / "m.engine", min_shape=(4, 3, 64, 64), opt_shape=(1, 3, 64, 64),
                        max_shape=(8, 3, 64, 64))
