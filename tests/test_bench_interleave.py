"""rmt-bench --interleave: the precisions of one backend and batch timed in turn, repeat by repeat,
and each row's ratio to its own backend's fp32 row."""
from __future__ import annotations

import json

import pytest

from rmt_deploy.benchmarks.cli import main
from rmt_deploy.runners import get_backend

SIZE = 64


def test_interleaved_rows_are_each_timed_and_held_against_their_fp32_row(tmp_path, tiny_config, capsys):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(tiny_config))
    out = tmp_path / "r.json"
    rc = main(["--model", str(config), "--backends", "eager,onnxruntime", "--precision", "fp32,bf16,fp16",
               "--batch-sizes", "2", "--image-size", str(SIZE), "--warmup", "1", "--iters", "2", "--repeats", "3",
               "--interleave", "--cache-dir", str(tmp_path / "cache"), "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["settings"]["interleave"] is True
    rows = {(r["backend"], r["precision"]): r for r in report["results"]}
    # grouped by backend (precisions of one backend together), in the order asked
    assert [(r["backend"], r["precision"]) for r in report["results"]] == [
        (b, p) for b in ("eager", "onnxruntime") for p in ("fp32", "bf16", "fp16")]
    skipped = {key for key, r in rows.items() if "skipped" in r}
    expected_skips = {(b, p) for b in ("eager", "onnxruntime") for p in ("bf16", "fp16")
                      if get_backend(b).unavailable_reason("cpu", p)}
    assert skipped == expected_skips       # onnxruntime bf16 (never on a CPU), and what this CPU lacks
    assert "does not run bf16" in rows["onnxruntime", "bf16"]["skipped"]
    for (backend, precision), r in rows.items():
        if (backend, precision) in skipped:
            continue
        assert r["timed_calls"] == 6 and len(r["images_per_s_repeats"]) == 3
        assert r["peak_memory_mb"] is None and "interleaved" in r["peak_memory_kind"]
        own_fp32 = rows[backend, "fp32"]["images_per_s"]
        assert r["speedup_vs_fp32"] == pytest.approx(r["images_per_s"] / own_fp32)
        assert r["speedup_vs_eager_fp32"] == pytest.approx(r["images_per_s"] / rows["eager", "fp32"]["images_per_s"])
    assert rows["onnxruntime", "fp32"]["speedup_vs_fp32"] == pytest.approx(1.0)
    printed = capsys.readouterr().out
    assert "vs fp32" in printed and "interleaved repeat by repeat" in printed


def test_runners_that_share_a_process_are_opened_as_good_neighbours(tmp_path, tiny_model):
    """ONNX Runtime's idle threads spin after a run: timed in turn with other runners, it is opened
    with spinning off; alone (the server, a plain rmt-bench row) with ONNX Runtime's default."""
    from rmt_deploy.exporters.onnx_export import export_onnx
    from rmt_deploy.runners import open_backend_runner
    path = export_onnx(tiny_model, tmp_path / "tiny.onnx", height=SIZE, width=SIZE)
    for shared, spinning in ((True, False), (False, True)):
        runner, _ = open_backend_runner("onnxruntime", device="cpu", artifact=path, shared_process=shared)
        assert runner.load().metadata().extra["intra_op_spinning"] is spinning
        runner.close()
    eager, _ = open_backend_runner("eager", device="cpu", make_model=lambda: tiny_model, shared_process=True)
    assert eager.precision == "fp32"        # a backend without such options opens as always
