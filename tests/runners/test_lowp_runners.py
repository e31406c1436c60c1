"""bfloat16 on the CPU: OpenVINO's bf16 inference precision and eager autocast on the trained Shapes10
fixture, held to the low-precision gate; the GEMM roofline."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rmt_deploy.accuracy import low_precision_gate
from rmt_deploy.runners import get_backend, small_attention
from rmt_deploy.runners.eager import EagerRunner
import shapes10
from shapes10 import BATCH, export_fixture, fixture_model, needs_fixture

bf16_reason = get_backend("openvino").unavailable_reason("cpu", "bf16")


def _assert_gate_passes(candidate, sets=("val", "degraded")):
    for name in sets:
        report = low_precision_gate(shapes10.reference(), candidate, "bf16", shapes10.parity_images(), BATCH,
                                    labelled=shapes10.labelled()[name])
        assert report.passed, report.text()
        assert report.parity.outputs[0].max_abs > 0       # it really computed in bf16


@needs_fixture
@pytest.mark.skipif(bool(bf16_reason), reason=str(bf16_reason))
def test_openvino_bf16_passes_the_gate(tmp_path):
    pytest.importorskip("openvino")
    from rmt_deploy.runners.openvino import OpenVINORunner
    candidate = OpenVINORunner(export_fixture(tmp_path), precision="bf16").load()
    meta = candidate.metadata().extra
    assert candidate.precision == "bf16" and meta["inference_precision"] == "bf16"
    if small_attention.kernel_unavailable_reason("bf16") is None:
        assert meta["small_head_attention"] == "9 (bfloat16 variant)"
    _assert_gate_passes(candidate)


@needs_fixture
@pytest.mark.skipif(bool(bf16_reason), reason=str(bf16_reason))
def test_openvino_bf16_falls_back_to_the_float32_kernel_without_the_bf16_variant(tmp_path, monkeypatch):
    """A build without the bf16 variant (a compiler that does not target AVX512_BF16): attention stays on
    the float32 kernel inside the bf16 graph, the metadata says why, and the gate still passes."""
    pytest.importorskip("openvino")
    if small_attention.kernel_unavailable_reason():
        pytest.skip(small_attention.kernel_unavailable_reason())
    from rmt_deploy.runners.openvino import OpenVINORunner
    real = small_attention.kernel_unavailable_reason
    monkeypatch.setattr(small_attention, "kernel_unavailable_reason",
                        lambda precision="f32": "no bf16 variant in this build" if precision == "bf16" else real(precision))
    candidate = OpenVINORunner(export_fixture(tmp_path), precision="bf16").load()
    assert candidate.metadata().extra["small_head_attention"] == \
        "9 (float32 variant inside bf16: no bf16 variant in this build)"
    _assert_gate_passes(candidate, sets=("degraded",))


@needs_fixture
def test_eager_bf16_runs_under_autocast_and_passes_the_gate():
    candidate = EagerRunner(fixture_model(), precision="bf16").load()
    assert candidate.autocast and all(p.dtype == torch.float32 for p in candidate.model.parameters())
    _assert_gate_passes(candidate, sets=("degraded",))   # eager is slow here: the harder set only


def test_openvino_refuses_int8_for_a_float_file_and_bf16_where_the_cpu_lacks_it(tmp_path, tiny_model, monkeypatch):
    pytest.importorskip("openvino")
    from rmt_deploy.exporters.onnx_export import export_onnx
    from rmt_deploy.runners.openvino import OpenVINORunner
    path = export_onnx(tiny_model, tmp_path / "tiny.onnx", height=64, width=64)
    with pytest.raises(ValueError, match="is not an INT8 artifact"):
        OpenVINORunner(path, precision="int8").load()
    from rmt_deploy.runners import RunnerUnavailable, registry
    monkeypatch.setattr(registry, "cpu_flags", lambda: {"avx2"})      # a CPU without bf16 instructions
    with pytest.raises(RunnerUnavailable, match="AVX512_BF16/AMX"):
        OpenVINORunner(path, precision="bf16")


def test_roofline_is_the_best_gemm_over_libraries_and_sizes(monkeypatch):
    from rmt_deploy.benchmarks import machine
    monkeypatch.setitem(machine.CPU_PEAK_SIZES, "fp32", (128, 256))
    monkeypatch.setitem(machine.CPU_PEAK_SIZES, "int8", (128, 256))
    for precision in ("fp32", "int8"):
        peak = machine.matmul_peak("cpu", precision, repeats=2)
        measured = [c for c in peak["candidates"] if "gflops" in c]
        assert {c["library"] for c in measured} >= {"PyTorch"} and len(measured) >= 2
        best = max(measured, key=lambda c: c["gflops"])
        assert (peak["library"], peak["size"], peak["gflops"]) == (best["library"], best["size"], best["gflops"])
        assert np.isfinite(peak["gflops"]) and peak["gflops"] > 0
