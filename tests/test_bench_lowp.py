"""rmt-bench with low precisions on the trained Shapes10 fixture: int8 rows are skipped with the
reason without --calib, measured with it, and every row is held against its own precision's peak."""
from __future__ import annotations

import pytest

from rmt_deploy.exporters.cache import ArtifactCache
from rmt_deploy.benchmarks.bench import Settings, run_benchmark
from rmt_deploy.runners import get_backend
from shapes10 import CALIB, CHECKPOINT, CONFIG, SIZE, needs_fixture

_INT8_REASON = get_backend("onnxruntime").unavailable_reason("cpu", "int8")
pytestmark = [needs_fixture, pytest.mark.skipif(_INT8_REASON is not None, reason=str(_INT8_REASON))]


def _bench(tmp_path, calib):
    settings = Settings(img_size=SIZE, warmup=1, iters=2, repeats=1, threads=1, calib=calib)
    return run_benchmark(str(CONFIG), ["onnxruntime"], ["fp32", "int8"], [8], settings, checkpoint=str(CHECKPOINT),
                         cache=ArtifactCache(tmp_path / "cache"))


def test_int8_rows_need_calibration_images_and_stay_under_their_peak(tmp_path):
    skipped = _bench(tmp_path, None)
    int8 = next(r for r in skipped["results"] if r["precision"] == "int8")
    assert "needs --calib DIR" in int8["skipped"]
    assert not list((tmp_path / "cache").glob("*int8*"))          # nothing quantized on noise
    report = _bench(tmp_path, CALIB)
    peaks = report["machine"]["matmul_peak"]
    assert peaks["int8"]["library"] and peaks["int8"]["gflops"] > 0
    for row in report["results"]:
        assert "skipped" not in row, row
        assert 0 < row["peak_fraction"] <= 1.0
        assert row["gflops"] / peaks[row["precision"]]["gflops"] == row["peak_fraction"]
    assert list((tmp_path / "cache").glob("*_int8_calib-*.onnx"))
