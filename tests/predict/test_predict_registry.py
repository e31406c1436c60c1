"""rmt-predict on the backend registry: every registered backend offered, refused with the registry's
reason before anything is exported, given files checked against --precision by their artifact description."""
from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from rmt_deploy import create_model
from rmt_deploy.artifact import ExportPlan
from rmt_deploy.exporters.export import export_artifacts
from rmt_deploy.predict.cli import build_parser, main
from rmt_deploy.predict.predictor import PredictOptions
from rmt_deploy.runners import backend_names, get_backend, reference_backend

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures"
CONFIG, CHECKPOINT = FIXTURES / "shapes10_config.json", FIXTURES / "shapes10_rmt_tiny.pth"
pytestmark = pytest.mark.skipif(not CHECKPOINT.is_file(), reason=f"trained fixture missing: {CHECKPOINT}")
MODEL_ARGS = ["--model", str(CONFIG), "--checkpoint", str(CHECKPOINT), "--image-size", "96", "--workers", "0"]
IMAGES = sorted((FIXTURES / "shapes10_val").rglob("*.png"))[:4]


@pytest.fixture
def data(tmp_path) -> Path:
    listing = tmp_path / "images.txt"
    listing.write_text("\n".join(map(str, IMAGES)) + "\n")
    return listing


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory) -> Path:
    model = create_model(str(CONFIG), checkpoint=str(CHECKPOINT))
    plan = ExportPlan(height=96, width=96, output_dir=tmp_path_factory.mktemp("onnx"))
    return export_artifacts(model, plan).path("onnx", "fp32")


def test_every_registered_backend_is_offered_and_the_reference_is_the_default():
    parser = build_parser()
    assert parser.get_default("backend") == reference_backend() == PredictOptions().backend
    for name in backend_names():
        assert parser.parse_args(["--backend", name, "--data", "d", "--output", "o"]).backend == name


@pytest.mark.parametrize("backend, precision", [("onnxruntime", "bf16"), ("tensorrt", None), ("openvino", "fp32")])
def test_refused_with_the_registry_reason_before_any_export(backend, precision, data, tmp_path, capsys):
    device = "cuda:0" if backend == "openvino" else "cpu"       # OpenVINO: CPU only, whatever this machine has
    reason = get_backend(backend).unavailable_reason(device, precision or "fp32")
    assert reason
    output, cache = tmp_path / "out.parquet", tmp_path / "cache"
    args = [*MODEL_ARGS, "--data", str(data), "--output", str(output), "--backend", backend, "--device", device,
            "--cache-dir", str(cache)] + (["--precision", precision] if precision else [])
    assert main(args) == 2
    assert reason in capsys.readouterr().err
    assert not cache.exists()                     # nothing exported or built
    assert not list(output.glob("*.parquet"))


def test_a_given_file_of_another_precision_is_a_clear_error(fp32_onnx, data, tmp_path, capsys):
    output = tmp_path / "out.parquet"
    args = [*MODEL_ARGS, "--data", str(data), "--output", str(output), "--backend", "onnxruntime",
            "--onnx", str(fp32_onnx)]
    assert main([*args, "--precision", "fp16"]) == 2
    err = capsys.readouterr().err
    assert f"--precision fp16: {fp32_onnx} is a fp32 file" in err and "artifact description" in err
    assert not list(output.glob("*.parquet"))
    assert main([*args, "--precision", "fp32"]) == 0       # the file's own (static batch 1 < --batch-size 8)
    eager = tmp_path / "eager.parquet"
    assert main([*MODEL_ARGS, "--data", str(data), "--output", str(eager), "--backend", reference_backend()]) == 0
    rows, expected = (sorted(pq.read_table(o).to_pylist(), key=lambda r: r["path"]) for o in (output, eager))
    assert len(rows) == len(IMAGES) and all(r["error"] is None for r in rows)
    assert [r["top1"] for r in rows] == [r["top1"] for r in expected]


def test_a_file_for_another_kind_of_backend_is_refused(fp32_onnx, data, tmp_path, capsys):
    args = [*MODEL_ARGS, "--data", str(data), "--output", str(tmp_path / "out.parquet"), "--onnx", str(fp32_onnx)]
    assert main([*args, "--backend", reference_backend()]) == 2
    assert f"--onnx is for onnxruntime, openvino; --backend {reference_backend()} runs the model itself" in \
        capsys.readouterr().err
