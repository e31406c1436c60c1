"""The OpenVINO runner: the exported files run like eager (fp32 in float32, fp16 within its gate), its
graph rewrites keep outputs, it says why its own attention runs, and it refuses other devices."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import TINY_CONFIG
from export_helpers import eager_vs_onnx

from rmt_deploy.exporters.onnx_export import ATTENTION_OPSET, export_onnx, write_fp16
from rmt_deploy.parity import Tolerance
from rmt_deploy.runners import open_runner, small_attention


def test_openvino_runs_the_exports_like_eager(tiny_static, tmp_path):
    """The OpenVINO runner on the same files: static and dynamic-batch fp32 within the fp32 gate
    (so it really computes in float32, not bfloat16), and the fp16 file within the fp16 gate. The
    static file's q/k rotations (two per block) all run as RoPE kernels."""
    pytest.importorskip("openvino", reason="OpenVINO is not installed (the test extra installs it)")
    model, path = tiny_static
    report = eager_vs_onnx(model, path, [(1, 3, 64, 96)] * 2, Tolerance(), backend="openvino")
    report.raise_for_failure()
    with open_runner("openvino", onnx=path) as runner:
        kernels = [op.get_rt_info()["layerType"].astype(str) for op in runner.compiled.get_runtime_model().get_ordered_ops()]
        assert runner.metadata().extra["rotaries_as_rope"] == str(kernels.count("RoPE")) == str(2 * sum(TINY_CONFIG["depths"]))
    dynamic = export_onnx(model, tmp_path / "dyn.onnx", dynamic_batch=True, height=64, width=64)
    report = eager_vs_onnx(model, dynamic, [(1, 3, 64, 64), (5, 3, 64, 64)], Tolerance(), backend="openvino")
    report.raise_for_failure()
    assert report.outputs[0].shape == (6, 10)
    runner = open_runner("openvino", onnx=write_fp16(path, tmp_path / "h.onnx")).load()
    assert runner.precision == "fp16" and runner.metadata().inputs[0].dtype == "float16"
    assert runner.metadata().extra["rmt.task"] == "classify"
    report = eager_vs_onnx(model, runner.path, [(1, 3, 64, 96)] * 2, Tolerance.for_precision("fp16"), backend="openvino")
    report.raise_for_failure()

def _attention_file(path: Path, mask: np.ndarray) -> Path:
    """One 3-D ONNX Attention node (2 heads of 4) with a constant additive mask."""
    from onnx import TensorProto, helper, numpy_helper
    tokens = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 3, 8]) for n in ("q", "k", "v")]
    node = helper.make_node("Attention", ["q", "k", "v", "mask"], ["out"], q_num_heads=2, kv_num_heads=2)
    graph = helper.make_graph([node], "attention", tokens, [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 8])],
                              [numpy_helper.from_array(mask.astype(np.float32), "mask")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", ATTENTION_OPSET)]), path)
    return path

def test_openvino_runs_its_own_attention_where_the_kernel_is_off(tiny_static, monkeypatch):
    """RMT_SMALL_ATTENTION=0, as on a machine where the kernel does not build: OpenVINO's own attention
    runs, the runner's metadata says why, and the outputs still match eager."""
    pytest.importorskip("openvino", reason="OpenVINO is not installed (the test extra installs it)")
    model, path = tiny_static
    monkeypatch.setenv("RMT_SMALL_ATTENTION", "0")
    small_attention._build.cache_clear()
    try:
        eager_vs_onnx(model, path, [(1, 3, 64, 96)], Tolerance(), backend="openvino").raise_for_failure()
        with open_runner("openvino", onnx=path) as runner:
            assert runner.metadata().extra["small_head_attention"] == "turned off by RMT_SMALL_ATTENTION=0"
    finally:
        monkeypatch.undo()
        small_attention._build.cache_clear()

def test_openvino_drops_nan_guards_only_behind_finite_masks(tmp_path):
    """The guard OpenVINO's ONNX reader adds after Attention goes only where no row can be fully
    masked: a finite mask loses it with identical outputs; a -inf row keeps it (zeros, not NaN)."""
    ov = pytest.importorskip("openvino", reason="OpenVINO is not installed (the test extra installs it)")
    from rmt_deploy.runners.openvino_graph import drop_attention_nan_guards
    rng = np.random.default_rng(0)
    feed = {n: rng.standard_normal((1, 3, 8), dtype=np.float32) for n in ("q", "k", "v")}
    finite = rng.standard_normal((1, 2, 3, 3))
    masked = finite.copy()
    masked[0, 1, 2] = -np.inf
    core = ov.Core()
    for mask, removed in ((finite, 1), (masked, 0)):
        path = _attention_file(tmp_path / f"attention{removed}.onnx", mask)
        model = core.read_model(path)
        guarded = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        assert drop_attention_nan_guards(model) == removed
        left = [op.get_type_name() for op in model.get_ordered_ops() if op.get_type_name() in ("IsNaN", "Select")]
        out = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(feed)[0]
        np.testing.assert_array_equal(out, guarded(feed)[0])
        assert np.isfinite(out).all()
        if removed:
            import onnxruntime
            reference = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feed)[0]
            np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-6)
        else:
            assert np.all(out[0, :, 4:][2] == 0) and left, "the fully masked row stays zero behind its guard"

def test_openvino_runner_refuses_other_devices(tiny_static):
    pytest.importorskip("openvino", reason="OpenVINO is not installed (the test extra installs it)")
    from rmt_deploy.runners import RunnerUnavailable
    with pytest.raises(RunnerUnavailable, match="CPU only"):
        open_runner("openvino", onnx=tiny_static[1], device="cuda")
