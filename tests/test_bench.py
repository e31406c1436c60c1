"""rmt-bench: a short run of the tiny config through every backend, the report formats, the paper
table and the accuracy mode."""
from __future__ import annotations

import csv
import importlib.util
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from rmt_deploy import VARIANTS, create_model
from rmt_deploy.benchmarks import paper
from rmt_deploy.benchmarks.accuracy import labelled_images
from rmt_deploy.benchmarks.cli import main
from rmt_deploy.benchmarks.report import paper_table
from rmt_deploy.flops import count_macs, count_params
from rmt_deploy.preprocess import load_images

SIZE = 64
FAST = ["--img-size", str(SIZE), "--warmup", "1", "--iters", "2", "--repeats", "2"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("rmt_cache"))


@pytest.fixture(scope="module")
def config_path(tmp_path_factory, tiny_config):
    path = tmp_path_factory.mktemp("cfg") / "tiny.json"
    path.write_text(json.dumps(tiny_config))
    return path


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _check_measured(r: dict, macs: int) -> None:
    lat = r["latency_ms"]
    for value in (r["images_per_s"], *lat.values(), r["peak_memory_mb"], r["gflops"], r["peak_fraction"]):
        assert _positive(value), r
    assert lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    # throughput and latency come from the same timed calls: each repeat's wall time (batch x calls / its
    # images/s) holds its calls' latencies (never less) plus only the loop's bookkeeping (not as much
    # again). Totals, not medians: a call slowed by another process counts on both sides, whereas the
    # median of 2 repeats and the p50 of 4 calls part ways when the slow calls fall in one repeat.
    calls_per_repeat = r["timed_calls"] // len(r["images_per_s_repeats"])
    wall_ms = sum(1e3 * r["batch_size"] * calls_per_repeat / ips for ips in r["images_per_s_repeats"])
    in_calls_ms = r["timed_calls"] * lat["mean"]
    assert in_calls_ms <= wall_ms * (1 + 1e-9) and wall_ms < 2 * in_calls_ms, (wall_ms, in_calls_ms, r)
    assert r["gflops"] == pytest.approx(2 * macs * r["images_per_s"] / 1e9)
    assert r["outputs_finite"] is True
    assert r["timed_calls"] == 4


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, config_path, cache, tiny_checkpoint):
    """With the checkpoint the accuracy test uses, so its batch-2 ONNX file comes from the cache."""
    out = tmp_path_factory.mktemp("bench")
    paths = {k: out / f"r.{k}" for k in ("json", "csv", "png")}
    rc = main(["--model", str(config_path), "--checkpoint", str(tiny_checkpoint), "--backends", "eager,onnxruntime,openvino,tensorrt", "--batch-sizes", "1,2",
               *FAST, "--cache-dir", cache, "--json", str(paths["json"]), "--csv", str(paths["csv"]),
               "--plot", str(paths["png"]), "--paper-table"])
    assert rc == 0
    return json.loads(paths["json"].read_text()), paths


def test_bench_json_schema_and_figures(bench_run, tiny_config):
    report, _ = bench_run
    machine = report["machine"]
    for key in ("cpu", "cores", "gpu", "versions", "matmul_peak"):
        assert key in machine
    assert machine["versions"]["torch"] == torch.__version__
    peak = machine["matmul_peak"]["fp32"]
    assert peak["size"] in (1024, 2048, 4096) and peak["library"] and _positive(peak["gflops"])
    macs = count_macs(create_model(tiny_config).config, SIZE, SIZE)["total"]
    assert report["models"]["tiny"]["checkpoint"]["sha256"]
    results = report["results"]
    assert {(r["backend"], r["batch_size"]) for r in results} == {
        (b, n) for b in ("eager", "onnxruntime", "openvino", "tensorrt") for n in (1, 2)}
    runs_here = {"eager", "onnxruntime"} | ({"openvino"} if importlib.util.find_spec("openvino") else set())
    for r in results:
        assert r["model"] == "tiny" and r["precision"] == "fp32"
        if r["backend"] in runs_here:       # CPU backends that are installed must run
            assert "skipped" not in r, r.get("skipped")
            _check_measured(r, macs)
            assert r["peak_fraction"] == pytest.approx(r["gflops"] / peak["gflops"])
        elif "skipped" in r:
            assert len(r["skipped"]) > 10 and "images_per_s" not in r
        else:
            _check_measured(r, macs)
    for r in results:
        if r["backend"] == "eager":
            assert r["speedup_vs_eager_fp32"] == 1.0
        elif "skipped" not in r:
            eager = next(e for e in results if e["backend"] == "eager" and e["batch_size"] == r["batch_size"])
            assert r["speedup_vs_eager_fp32"] == pytest.approx(r["images_per_s"] / eager["images_per_s"])
    from rmt_deploy.runners.tensorrt_env import tensorrt_available
    trt = [r for r in results if r["backend"] == "tensorrt"]
    assert all("skipped" in r for r in trt)     # --device cpu: TensorRT never runs
    if not tensorrt_available()[0]:
        assert all(tensorrt_available()[1] in r["skipped"] for r in trt)
    row, = report["paper_table"]
    assert row["model"] == "tiny" and row["paper_images_per_s"] is None
    assert row["params_m"] == pytest.approx(count_params(create_model(tiny_config).config) / 1e6)


def test_bench_csv_and_plot(bench_run):
    report, paths = bench_run
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [(r["backend"], int(r["batch_size"])) for r in rows] == [
        (r["backend"], r["batch_size"]) for r in report["results"]]
    for row, r in zip(rows, report["results"]):
        assert (row["skipped"] != "") == ("skipped" in r)
        if "skipped" not in r:
            assert float(row["images_per_s"]) == pytest.approx(r["images_per_s"])
            assert float(row["latency_p99_ms"]) == pytest.approx(r["latency_ms"]["p99"])
    data = paths["png"].read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(paths["png"]) as img:
        assert img.format == "PNG" and img.width > 300 and img.height > 200
        assert img.info.get("Software", "").startswith("Matplotlib")


def test_compile_backend_runs_or_says_why(config_path, cache, tmp_path):
    out = tmp_path / "c.json"
    assert main(["--model", str(config_path), "--backends", "compile", "--batch-sizes", "1", *FAST,
                 "--cache-dir", cache, "--json", str(out)]) == 0
    r, = json.loads(out.read_text())["results"]
    if "skipped" in r:
        assert r["skipped"].strip()
    else:
        _check_measured(r, r["macs_per_image"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip reasons of a machine without CUDA")
def test_cuda_without_cuda_is_skipped_with_reasons(config_path, tmp_path):
    out, cache = tmp_path / "cuda.json", tmp_path / "cache"
    backends = ["eager", "compile", "onnxruntime", "openvino", "tensorrt"]
    assert main(["--model", str(config_path), "--backends", ",".join(backends), "--batch-sizes", "1", *FAST,
                 "--device", "cuda", "--cache-dir", str(cache), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    reasons = {r["backend"]: r["skipped"] for r in report["results"]}
    assert list(reasons) == backends
    for backend in ("eager", "compile", "tensorrt"):
        assert "CUDA" in reasons[backend]
    assert "CUDAExecutionProvider" in reasons["onnxruntime"] or "not installed" in reasons["onnxruntime"]
    assert "CPU only" in reasons["openvino"]
    assert not cache.exists() or not any(cache.iterdir())     # nothing exported for backends that cannot run
    assert "error" in report["machine"]["matmul_peak"]["fp32"]




def test_paper_table_quotes_and_counts():
    config = VARIANTS["rmt_t"]
    macs = count_macs(config, 224, 224)["total"]
    report = {"settings": {"img_size": 224}, "models": {"rmt_t": {"params": count_params(config), "macs_per_image": macs}},
              "results": [{"model": "rmt_t", "backend": "onnxruntime", "precision": "fp32", "batch_size": b,
                           "images_per_s": ips} for b, ips in ((1, 100.0), (8, 165.0))]
              + [{"model": "rmt_t", "backend": "tensorrt", "precision": "fp32", "batch_size": 8, "skipped": "no GPU"}]}
    row, = paper_table(report)
    assert row["params_m"] == pytest.approx(14.33, abs=0.01)        # the spec's exact count, 14.33 M
    assert row["gmacs"] == macs / 1e9
    assert (row["paper_top1"], row["paper_gflops"], row["paper_images_per_s"]) == (82.4, 2.5, 1650)
    assert row["measured"] == {"onnxruntime": {"images_per_s": 165.0, "batch_size": 8, "precision": "fp32"}}
    assert row["best_over_paper"] == pytest.approx(0.1)
    assert row["best_device_over_paper"] is None         # CPU rows have no device-only throughput
    gpu = dict(report, results=[{"model": "rmt_t", "backend": "compile", "precision": "fp16", "batch_size": b,
                                 "images_per_s": ips, "device_images_per_s": device} for b, ips, device in
                                ((64, 5000.0, 8000.0), (256, 4900.0, 8250.0))])
    row, = paper_table(gpu)
    assert row["best_over_paper"] == pytest.approx(5000 / 1650)
    assert row["best_device_over_paper"] == pytest.approx(5.0)       # the best device figure, from any row
    assert "CVPR 2024" in paper.SOURCE and "Table 9" in paper.SOURCE


# ---------------------------------------------------------------------------------------------
# accuracy mode
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Three classes of Pillow-made images of assorted sizes and modes."""
    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    for c, name in enumerate(["a_cls", "b_cls", "c_cls"]):
        (root / name).mkdir()
        for i in range(3):
            arr = rng.integers(0, 255, (50 + 13 * i, 70 - 7 * c, 3), dtype=np.uint8)
            img = Image.fromarray(arr)
            img = img.convert("L") if i == 2 else img
            img.save(root / name / f"img{i}.{'png' if i else 'jpg'}")
    return root


def test_accuracy_mode(image_folder, tiny_checkpoint, tiny_config, config_path, cache, tmp_path):
    out = tmp_path / "acc.json"
    assert main(["accuracy", "--data", str(image_folder), "--model", str(config_path), "--checkpoint",
                 str(tiny_checkpoint), "--backends", "eager,onnxruntime,openvino", "--batch-size", "2", "--img-size", str(SIZE),
                 "--cache-dir", cache, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    eager, *runtimes = report["results"]
    assert [r["backend"] for r in report["results"]] == ["eager", "onnxruntime", "openvino"]
    if not importlib.util.find_spec("openvino"):
        assert "OpenVINO is not installed" in runtimes.pop()["skipped"]
    for r in (eager, *runtimes):
        assert r["images"] == 9 and 0.0 <= r["top1"] <= r["top5"] <= 1.0
    for r in runtimes:
        assert r["top1_agreement"] == 1.0 and r["top1"] == eager["top1"] and r["top5"] == eager["top5"]
    # recount top-1/top-5 of the eager model directly: the tool's bookkeeping (padding, labels) is right
    paths, labels = labelled_images(image_folder)
    assert list(labels) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    model = create_model(tiny_config, checkpoint=str(tiny_checkpoint))
    with torch.inference_mode():
        logits = model(torch.from_numpy(load_images(paths, SIZE))).numpy()
    top = np.argsort(-logits, axis=1)
    assert eager["top1"] == pytest.approx(float((top[:, 0] == labels).mean()))
    assert eager["top5"] == pytest.approx(float((top[:, :5] == labels[:, None]).any(axis=1).mean()))


def test_labels_file(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("x.png", "sub/y.jpg"):
        (tmp_path / name).touch()
    (tmp_path / "labels.txt").write_text("# comment\nx.png 3\nsub/y.jpg,7  # trailing note\n\n")
    paths, labels = labelled_images(tmp_path, tmp_path / "labels.txt")
    assert paths == [tmp_path / "x.png", tmp_path / "sub" / "y.jpg"] and list(labels) == [3, 7]


def test_serve_subcommand_dispatches(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--help"])
    assert exc.value.code == 0 and "usage: rmt-bench serve" in capsys.readouterr().out


def test_given_onnx_is_measured_only_for_rows_it_fits(tmp_path, config_path, tiny_model, capsys):
    from rmt_deploy.exporters.onnx_export import export_onnx
    onnx = export_onnx(tiny_model, tmp_path / "b2.onnx", batch_size=2, height=SIZE, width=SIZE)
    out = tmp_path / "r.json"
    assert main(["--model", str(config_path), "--onnx", str(onnx), "--backends", "onnxruntime", "--batch-sizes", "1,2",
                 *FAST, "--json", str(out)]) == 0
    b1, b2 = json.loads(out.read_text())["results"]
    assert "static batch of 2, not 1" in b1["skipped"] and "skipped" not in b2 and b2["images_per_s"] > 0
    assert main(["--model", "rmt_t", "--onnx", str(onnx), "--backends", "onnxruntime", "--batch-sizes", "2",
                 *FAST, "--json", str(out)]) == 0
    row, = json.loads(out.read_text())["results"]
    assert "not of --model rmt_t" in row["skipped"] and "has 10 classes" in row["skipped"]


def test_user_errors_are_messages_not_tracebacks(tmp_path, image_folder, config_path, capsys):
    assert main(["accuracy", "--data", str(tmp_path / "missing"), "--model", str(config_path)]) == 2
    assert "is not a directory" in capsys.readouterr().err
    labels = tmp_path / "labels.txt"
    labels.write_text("# path label\na_cls/img0.jpg 0\nb_cls/img1.png one\n")
    assert main(["accuracy", "--data", str(image_folder), "--labels", str(labels), "--model", str(config_path)]) == 2
    assert "labels.txt:3: expected 'relative/path label'" in capsys.readouterr().err
    assert main(["--model", "no_such_variant", "--backends", "eager"]) == 2
    assert "unknown RMT variant 'no_such_variant'" in capsys.readouterr().err
    for flag in ("--iters", "--repeats"):
        with pytest.raises(SystemExit):
            main([flag, "0"])
        assert "must be at least 1" in capsys.readouterr().err


def test_unknown_backend_is_an_error(capsys):
    with pytest.raises(SystemExit):
        main(["--backends", "eager,tensorrtt"])
    assert "unknown tensorrtt" in capsys.readouterr().err
