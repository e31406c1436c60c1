"""The server serves low-precision files of the trained Shapes10 fixture (real uvicorn, real HTTP):
a QDQ int8 ONNX through ONNX Runtime, NNCF's int8 IR through OpenVINO, the fp32 file in bf16 through
OpenVINO; /v2/models/{name} reports the precision and the answers are the fixture's classes."""
from __future__ import annotations

import httpx
import pytest
from test_hostile import rmt_serve

from rmt_deploy.runners import get_backend
from shapes10 import BATCH, CALIB, SIZE, VAL, export_fixture, needs_fixture

pytestmark = needs_fixture


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory):
    return export_fixture(tmp_path_factory.mktemp("serve_lowp"))


def _artifact(name: str, precision: str, fp32_onnx):
    entry = get_backend(name)
    if reason := entry.unavailable_reason("cpu", precision):
        pytest.skip(reason)
    return fp32_onnx if precision == "bf16" else entry.quantize(fp32_onnx, CALIB, SIZE)


@pytest.mark.parametrize("name, precision", [("onnxruntime", "int8"), ("openvino", "int8"), ("openvino", "bf16")])
def test_serves_a_low_precision_file_and_reports_its_precision(tmp_path, fp32_onnx, name, precision):
    path = _artifact(name, precision, fp32_onnx)
    flags = ["--backend", name, "--onnx", str(path), "--model-name", "shapes10", "--threads", "1",
             "--max-batch-size", str(BATCH), "--image-size", str(SIZE)]
    flags += ["--precision", precision] if precision == "bf16" else []
    with rmt_serve(flags, tmp_path / "serve.log") as server:
        meta = httpx.get(f"{server.url}/v2/models/shapes10", timeout=30).json()
        assert meta["parameters"]["precision"] == precision and meta["parameters"]["backend"] == name
        if precision == "int8":
            assert meta["parameters"]["quantizer"] and "100 images" in meta["parameters"]["calibration"]
        classes = sorted(p.name for p in VAL.iterdir() if p.is_dir())
        for expected, folder in enumerate(classes[:3]):
            image = sorted((VAL / folder).glob("*.png"))[0]
            reply = httpx.post(f"{server.url}/classify", files={"file": (image.name, image.read_bytes(), "image/png")},
                               timeout=60)
            assert reply.status_code == 200, reply.text
            assert reply.json()["precision"] == precision and reply.json()["predictions"][0]["index"] == expected
