"""TensorRT builder + runner.

The pure parts (sidecar compatibility, precision planning, missing-TensorRT errors) run everywhere;
building and running engines needs TensorRT and a CUDA GPU and is skipped otherwise, with the reason.
"""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from rmt_deploy.exporters import tensorrt_build as tb
from rmt_deploy.runners import RunnerUnavailable, open_runner
from rmt_deploy.runners.tensorrt import TensorRTRunner

TRT_OK, TRT_REASON = tb.tensorrt_available()
needs_trt = pytest.mark.skipif(not TRT_OK, reason=f"TensorRT engine tests need TensorRT + CUDA: {TRT_REASON}")

SIDECAR = {"tensorrt_version": "10.3.0", "gpu_name": "NVIDIA GeForce RTX 3090", "compute_capability": "8.6",
           "precision": "fp16", "rmt.model": "rmt_t", "rmt.task": "classify"}


def _fake_engine(tmp_path, sidecar: dict | None = SIDECAR):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not a real engine")
    if sidecar is not None:
        tb.engine_sidecar_path(engine).write_text(json.dumps(sidecar))
    return engine


# ---------------------------------------------------------------------------- runs everywhere
def test_tensorrt_available_reports_a_reason():
    ok, reason = tb.tensorrt_available()
    assert isinstance(ok, bool) and reason
    if ok:
        assert reason.startswith("TensorRT ") and " on " in reason
    else:
        assert "TensorRT" in reason or "CUDA" in reason
        if "not installed" in reason:
            assert "pip install tensorrt" in reason


def test_sidecar_path():
    assert str(tb.engine_sidecar_path("/x/rmt_t_fp16.engine")) == "/x/rmt_t_fp16.engine.json"


def test_compatible_sidecar_is_accepted():
    assert tb.check_engine_compatible(SIDECAR, tensorrt_version="10.3.0", gpu_name="NVIDIA GeForce RTX 3090",
                                      compute_capability="8.6") is None
    # GPU names compare case/whitespace-insensitively; missing sidecar fields are not compared.
    assert tb.check_engine_compatible(SIDECAR, tensorrt_version="10.3.0", gpu_name="nvidia geforce  rtx 3090",
                                      compute_capability="8.6") is None
    assert tb.check_engine_compatible({"precision": "fp32"}, tensorrt_version="11.0.0", gpu_name="H100",
                                      compute_capability="9.0") is None


def test_tensorrt_version_mismatch_message():
    msg = tb.check_engine_compatible(SIDECAR, tensorrt_version="10.8.0", gpu_name="NVIDIA GeForce RTX 3090",
                                     compute_capability="8.6")
    assert msg is not None
    assert "TensorRT 10.3.0" in msg and "TensorRT 10.8.0" in msg and "rebuild" in msg and "rmt-export" in msg
    assert "TensorRT version" in msg


def test_gpu_mismatch_message():
    msg = tb.check_engine_compatible(SIDECAR, tensorrt_version="10.3.0", gpu_name="NVIDIA H100 80GB HBM3",
                                     compute_capability="9.0")
    assert msg is not None
    assert "sm_86" in msg and "sm_90" in msg and "NVIDIA H100 80GB HBM3" in msg and "RTX 3090" in msg
    same_cc_other_card = tb.check_engine_compatible(SIDECAR, tensorrt_version="10.3.0", gpu_name="NVIDIA A10",
                                                    compute_capability="8.6")
    assert same_cc_other_card is not None and "GPU" in same_cc_other_card


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


def test_runner_without_tensorrt_raises_clearly(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail, GPU machine or not
    runner = open_runner("tensorrt", engine=_fake_engine(tmp_path))
    assert isinstance(runner, TensorRTRunner)
    with pytest.raises(RunnerUnavailable, match="TensorRT is not installed"):
        runner.load()


def test_build_without_tensorrt_raises_clearly(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"")
    with pytest.raises(tb.TensorRTUnavailable, match="pip install tensorrt"):
        tb.build_engine(onnx_file, tmp_path / "m.engine", min_shape=(1, 3, 64, 64), opt_shape=(1, 3, 64, 64),
                        max_shape=(2, 3, 64, 64))
    assert not tb.tensorrt_available()[0]


def test_runner_missing_engine_and_cpu_device(tmp_path):
    with pytest.raises(FileNotFoundError):
        TensorRTRunner(tmp_path / "absent.engine")
    with pytest.raises(RunnerUnavailable, match="CUDA"):
        TensorRTRunner(_fake_engine(tmp_path), device="cpu")


def test_bad_profile_rejected_before_tensorrt(tmp_path):
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"")
    with pytest.raises(ValueError, match="min <= opt <= max"):
        tb.build_engine(onnx_file, tmp_path / "m.engine", min_shape=(4, 3, 64, 64), opt_shape=(1, 3, 64, 64),
                        max_shape=(8, 3, 64, 64))


# ---------------------------------------------------------------------------- GPU + TensorRT only
@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory, tiny_config):
    import torch

    onnx_export = pytest.importorskip("rmt_deploy.exporters.onnx_export")
    from rmt_deploy import create_model

    torch.manual_seed(0)
    model = create_model(tiny_config)
    path = tmp_path_factory.mktemp("trt") / "tiny.onnx"
    onnx_export.export_onnx(model, path, batch_size=1, dynamic_batch=True, height=64, width=64,
                            opset=onnx_export.PORTABLE_OPSET)
    return model, path


def _eager_reference(model, batch):
    import torch
    model = model.eval()
    with torch.inference_mode():
        out = model(torch.from_numpy(batch))
    outs = [out] if isinstance(out, torch.Tensor) else list(out)
    return {n: t.float().numpy() for n, t in zip(model.output_names, outs)}


def _build(onnx_path, engine, fp16, tmp_path):
    return tb.build_engine(onnx_path, engine, fp16=fp16, min_shape=(1, 3, 64, 64), opt_shape=(2, 3, 64, 64),
                           max_shape=(4, 3, 64, 64), workspace_gb=1.0, timing_cache=tmp_path / "timing.cache",
                           metadata={"rmt.model": "tiny", "rmt.task": "classify", "rmt.height": 64,
                                     "rmt.width": 64, "rmt.num_classes": 10})


def _fp16_onnx_for_this_tensorrt(onnx_path):
    """The ONNX to build FP16 from: the FP32 one on TensorRT 10, the exporter's FP16 graph on 11."""
    import tensorrt as trt
    if hasattr(trt.BuilderFlag, "FP16"):
        return onnx_path
    fp16_path = onnx_path.with_name(onnx_path.stem + "_fp16.onnx")
    if not fp16_path.is_file():
        pytest.skip(f"TensorRT {trt.__version__} needs the FP16 ONNX graph ({fp16_path.name}); the exporter "
                    "did not write one next to the FP32 export")
    return fp16_path


@needs_trt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_build_and_run_matches_eager(tiny_onnx, tmp_path, precision):
    from rmt_deploy.parity import Tolerance, compare
    model, onnx_path = tiny_onnx
    source = onnx_path if precision == "fp32" else _fp16_onnx_for_this_tensorrt(onnx_path)
    engine = _build(source, tmp_path / f"tiny_{precision}.engine", precision == "fp16", tmp_path)
    sidecar = json.loads(tb.engine_sidecar_path(engine).read_text())
    assert sidecar["precision"] == precision and sidecar["rmt.num_classes"] == 10
    assert sidecar["profiles"] == [{"input": "images", "min": [1, 3, 64, 64], "opt": [2, 3, 64, 64],
                                    "max": [4, 3, 64, 64]}]
    assert (tmp_path / "timing.cache").stat().st_size > 0

    rng = np.random.default_rng(0)
    with TensorRTRunner(engine) as runner:
        meta = runner.metadata()
        assert [t.name for t in meta.inputs] == ["images"] and meta.extra["rmt.model"] == "tiny"
        for batch_size in (1, 3):  # dynamic batch through set_input_shape
            batch = rng.standard_normal((batch_size, 3, 64, 64), dtype=np.float32)
            out = runner.infer({"images": batch})
            assert all(v.dtype == np.float32 for v in out.values())
            t = runner.last_timing
            assert t.compute_ms > 0 and t.h2d_ms >= 0 and t.d2h_ms >= 0
            report = compare(_eager_reference(model, batch), out, Tolerance.for_precision(precision))
            assert report.passed, report.text()
        with pytest.raises(ValueError, match="profile"):
            runner.infer({"images": np.zeros((8, 3, 64, 64), np.float32)})


@needs_trt
def test_engine_from_other_tensorrt_is_refused(tiny_onnx, tmp_path):
    _, onnx_path = tiny_onnx
    engine = _build(onnx_path, tmp_path / "tiny.engine", False, tmp_path)
    sidecar_path = tb.engine_sidecar_path(engine)
    sidecar = json.loads(sidecar_path.read_text())
    sidecar["tensorrt_version"] = "9.9.9"
    sidecar_path.write_text(json.dumps(sidecar))
    with pytest.raises(tb.EngineIncompatible, match=r"TensorRT 9\.9\.9.*rebuild"):
        TensorRTRunner(engine).load()
