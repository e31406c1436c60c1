"""The TensorRT runner and its runtime environment (probing, sidecar, compatibility).

The pure parts (sidecar compatibility, missing-TensorRT errors, opening on a device and precision)
run everywhere; building and running engines needs TensorRT and a CUDA GPU and is skipped otherwise,
with the reason.
"""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from rmt_deploy.exporters import tensorrt_build as tb
from rmt_deploy.runners import RunnerUnavailable, open_runner
from rmt_deploy.runners import tensorrt_env as te
from rmt_deploy.runners.tensorrt import TensorRTRunner

TRT_OK, TRT_REASON = te.tensorrt_available()

needs_trt = pytest.mark.skipif(not TRT_OK, reason=f"TensorRT engine tests need TensorRT + CUDA: {TRT_REASON}")


SIDECAR = {"tensorrt_version": "10.3.0", "gpu_name": "NVIDIA GeForce RTX 3090", "compute_capability": "8.6",
           "precision": "fp16", "rmt.model": "rmt_t", "rmt.task": "classify"}


def _fake_engine(tmp_path, sidecar: dict | None = SIDECAR):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not a real engine")
    if sidecar is not None:
        te.engine_sidecar_path(engine).write_text(json.dumps(sidecar))
    return engine


# ---------------------------------------------------------------------------- runs everywhere
# ---------------------------------------------------------------------------- runs everywhere
def test_tensorrt_available_reports_a_reason():
    ok, reason = te.tensorrt_available()
    assert isinstance(ok, bool) and reason
    if ok:
        assert reason.startswith("TensorRT ") and " on " in reason
    else:
        assert "TensorRT" in reason or "CUDA" in reason
        if "not installed" in reason:
            assert "pip install tensorrt" in reason

def test_sidecar_path():
    assert str(te.engine_sidecar_path("/x/rmt_t_fp16.engine")) == "/x/rmt_t_fp16.engine.json"

def test_compatible_sidecar_is_accepted():
    assert te.check_engine_compatible(SIDECAR, tensorrt_version="10.3.0", gpu_name="NVIDIA GeForce RTX 3090",
                                      compute_capability="8.6") is None
    # GPU names compare case/whitespace-insensitively; missing sidecar fields are not compared.
    assert te.check_engine_compatible(SIDECAR, tensorrt_version="10.3.0", gpu_name="nvidia geforce  rtx 3090",
                                      compute_capability="8.6") is None
    assert te.check_engine_compatible({"precision": "fp32"}, tensorrt_version="11.0.0", gpu_name="H100",
                                      compute_capability="9.0") is None

def test_tensorrt_version_mismatch_message():
    msg = te.check_engine_compatible(SIDECAR, tensorrt_version="10.8.0", gpu_name="NVIDIA GeForce RTX 3090",
                                     compute_capability="8.6")
    assert msg is not None
    assert "TensorRT 10.3.0" in msg and "TensorRT 10.8.0" in msg and "rebuild" in msg and "rmt-export" in msg
    assert "TensorRT version" in msg

def test_gpu_mismatch_message():
    msg = te.check_engine_compatible(SIDECAR, tensorrt_version="10.3.0", gpu_name="NVIDIA H100 80GB HBM3",
                                     compute_capability="9.0")
    assert msg is not None
    assert "sm_86" in msg and "sm_90" in msg and "NVIDIA H100 80GB HBM3" in msg and "RTX 3090" in msg
    same_cc_other_card = te.check_engine_compatible(SIDECAR, tensorrt_version="10.3.0", gpu_name="NVIDIA A10",
                                                    compute_capability="8.6")
    assert same_cc_other_card is not None and "GPU" in same_cc_other_card

def test_runner_without_tensorrt_raises_clearly(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail, GPU machine or not
    runner = open_runner("tensorrt", engine=_fake_engine(tmp_path))
    assert isinstance(runner, TensorRTRunner)
    with pytest.raises(RunnerUnavailable, match="TensorRT is not installed"):
        runner.load()

def test_runner_missing_engine_and_cpu_device(tmp_path):
    with pytest.raises(FileNotFoundError):
        TensorRTRunner(tmp_path / "absent.engine")
    with pytest.raises(RunnerUnavailable, match="CUDA"):
        TensorRTRunner(_fake_engine(tmp_path), device="cpu")


# ---------------------------------------------------------------------------- GPU + TensorRT only
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
    sidecar = json.loads(te.engine_sidecar_path(engine).read_text())
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
    sidecar_path = te.engine_sidecar_path(engine)
    sidecar = json.loads(sidecar_path.read_text())
    sidecar["tensorrt_version"] = "9.9.9"
    sidecar_path.write_text(json.dumps(sidecar))
    with pytest.raises(te.EngineIncompatible, match=r"TensorRT 9\.9\.9.*rebuild"):
        TensorRTRunner(engine).load()


def test_opened_on_a_device_and_precision_it_says_so(tmp_path):
    """The registry passes device and precision through: a runner for cuda:1 fp16 is named and described
    for cuda:1 fp16 before anything loads (no TensorRT needed to construct it)."""
    from rmt_deploy.runners import get_backend
    engine = _fake_engine(tmp_path, {**SIDECAR, "profiles": [{"input": "images", "min": [1, 3, 224, 224],
                                                              "opt": [4, 3, 224, 224], "max": [8, 3, 224, 224]}]})
    runner = get_backend("tensorrt").open(artifact=engine, device="cuda:1", precision="fp16")
    assert runner.name == "tensorrt-fp16-cuda:1" and (runner.device, runner.precision) == ("cuda:1", "fp16")
    meta = runner.metadata()
    assert meta.extra["device"] == "cuda:1" and meta.artifact.precision == "fp16"
    assert meta.artifact.model == "rmt_t" and meta.fixed_input_dims() == (None, 224, 224)
    assert open_runner("tensorrt", engine=engine, device="cuda:1", precision="fp16").name == "tensorrt-fp16-cuda:1"
    (tmp_path / "bare").mkdir()
    without_sidecar = _fake_engine(tmp_path / "bare", None)
    assert get_backend("tensorrt").open(artifact=without_sidecar, device="cuda:1", precision="fp16").name == \
        "tensorrt-fp16-cuda:1"


def test_an_engine_of_another_precision_is_refused(tmp_path):
    with pytest.raises(ValueError, match="is a fp16 engine, not fp32"):
        open_runner("tensorrt", engine=_fake_engine(tmp_path), device="cuda:0", precision="fp32")
