"""rmt-export with bf16 / int8 on the trained Shapes10 fixture: the artifacts pass the parity and
accuracy gates (top-1 within a point of float32 eager), a broken calibration fails the accuracy gate
with the reason and a non-zero exit, and combinations that cannot run are refused before any export."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from rmt_deploy.exporters.cli import main
from rmt_deploy.exporters.export import MANIFEST_NAME
from rmt_deploy.runners import get_backend, registry
from shapes10 import CALIB, CHECKPOINT, CONFIG, SIZE, VAL, needs_fixture

pytestmark = needs_fixture


def _runs_here(backend: str, precision: str):
    """Skip unless this CPU runs ``precision`` on ``backend``, with the registry's reason."""
    reason = get_backend(backend).unavailable_reason("cpu", precision)
    return pytest.mark.skipif(reason is not None, reason=str(reason))


_LOW_HERE = [(name, p) for name in ("onnxruntime", "openvino") for p in ("bf16", "int8")
             if not get_backend(name).unavailable_reason("cpu", p)]


def _export(out, *extra) -> int:
    return main(["--model", str(CONFIG), "--checkpoint", str(CHECKPOINT), "--image-size", str(SIZE),
                 "--batch-size", "8", "--output", str(out), "--images", str(CALIB), *extra])


@pytest.fixture(scope="module")
def lowp_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("lowp")
    code = _export(out, "--precision", "fp32,bf16,int8", "--calib", str(CALIB), "--accuracy-data", str(VAL))
    return code, json.loads((out / MANIFEST_NAME).read_text()), out


@pytest.mark.skipif(not _LOW_HERE, reason="; ".join(
    str(get_backend(name).unavailable_reason("cpu", p)) for name in ("onnxruntime", "openvino") for p in ("bf16", "int8")))
def test_bf16_and_int8_artifacts_pass_the_gates(lowp_export):
    code, manifest, _ = lowp_export
    low = [a for a in manifest["artifacts"] if a["precision"] in ("bf16", "int8")]
    runs = {(a["backend"], a["precision"]) for a in low}
    assert code == 0 and runs == set(_LOW_HERE)
    for art in low:
        assert art["parity"]["passed"], art
        assert art["accuracy"]["passed"] and art["accuracy"]["drop_points"] <= 1.0, art
        assert art["accuracy"]["images"] == 500
    # the OpenVINO INT8 artifact is NNCF's IR; bf16 is the fp32 file computed in bfloat16
    assert {a["path"].rsplit(".", 1)[1] for a in low if a["precision"] == "int8"} <= {"onnx", "xml"}
    assert all(a["path"].endswith("_fp32.onnx") and "bf16 inference precision" in a["computes"]
               for a in low if a["precision"] == "bf16")


@_runs_here("onnxruntime", "int8")
def test_the_triton_repository_takes_the_int8_files(lowp_export, tmp_path):
    from rmt_deploy.exporters.triton import write_triton_repo
    _, manifest, out = lowp_export
    notes = []
    written = {d.name: d for d in write_triton_repo(tmp_path / "repo", out, manifest, report=notes.append)}
    qdq = next(d for n, d in written.items() if n.endswith("_onnx_int8"))
    assert (qdq / "1" / "model.onnx").is_file() and 'platform: "onnxruntime_onnx"' in (qdq / "config.pbtxt").read_text()
    if get_backend("openvino").unavailable_reason("cpu", "int8") is None:
        ir = written[next(n for n in written if n.endswith("_openvino_int8"))]
        assert {p.name for p in (ir / "1").iterdir()} == {"model.xml", "model.bin"}
        config = (ir / "config.pbtxt").read_text()
        assert 'backend: "openvino"' in config and "platform" not in config
    assert not [n for n in written if n.endswith("_bf16")]
    assert all("runtime precision" in note for note in notes) and len(notes) == sum(
        a["precision"] == "bf16" for a in manifest["artifacts"])


@_runs_here("onnxruntime", "int8")
def test_a_constant_calibration_fails_the_accuracy_gate(tmp_path, capsys):
    calib = tmp_path / "constant"
    calib.mkdir()
    image = Image.new("RGB", (SIZE, SIZE), (127, 127, 127))
    for i in range(40):
        image.save(calib / f"grey_{i:03d}.png")
    code = _export(tmp_path / "out", "--backends", "onnxruntime", "--precision", "int8", "--calib", str(calib),
                   "--accuracy-data", str(VAL), "--max-accuracy-drop", "1.0")
    err = " ".join(capsys.readouterr().err.split())
    assert code != 0
    assert "accuracy gate FAILED" in err and "drop" in err and "--max-accuracy-drop" in err
    art = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())["artifacts"][0]
    assert art["precision"] == "int8" and art["accuracy"]["drop_points"] > 1.0


@pytest.mark.parametrize("extra, reason", [
    (["--precision", "int8"], "needs --calib DIR"),
    (["--backends", "onnxruntime", "--precision", "bf16"], "does not run bf16 on cpu"),
    (["--backends", "openvino", "--precision", "bf16", "--calib", str(CALIB)], "this CPU has no AVX512_BF16/AMX"),
    (["--backends", "openvino", "--precision", "int8", "--calib", str(CALIB)], "this CPU has no VNNI/AMX"),
])
def test_unsupported_combinations_are_refused_before_export(tmp_path, monkeypatch, extra, reason):
    # a CPU without bf16 / int8 instructions (this one has them): the flags the registry reads
    monkeypatch.setattr(registry, "cpu_flags", lambda: {"avx2"})
    with pytest.raises(SystemExit, match=reason.replace("/", ".")):
        _export(tmp_path / "out", *extra)
    assert not (tmp_path / "out").exists()


def test_the_accuracy_gate_reports_an_int8_engine_it_cannot_run(tmp_path):
    """Engine entries carry no backend (every engine backend runs them): the gate opens them on the
    engine backend and, where that cannot run, fails with its reason instead of raising."""
    from rmt_deploy.artifact import ArtifactDescription
    from rmt_deploy.exporters.export import Manifest, accuracy_gate, gate_backend
    from shapes10 import fixture_model
    engine = get_backend(gate_backend("engine"))
    if engine.unavailable_reason("cuda:0", "int8") is None:
        pytest.skip("TensorRT runs here: tests/test_tensorrt_int8.py gates a real INT8 engine")
    val = tmp_path / "val"
    for folder in sorted(VAL.iterdir())[:2]:
        (val / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:2]:
            (val / folder.name / image.name).write_bytes(image.read_bytes())
    (tmp_path / "m_int8.engine").write_bytes(b"")      # never read: TensorRT is refused before it loads one
    model = fixture_model()
    manifest = Manifest(model.config.name, "classify", None, {}, {}, {}, 17, {}, ArtifactDescription.from_model(model),
                        tmp_path, [{"kind": "engine", "precision": "int8", "path": "m_int8.engine"}])
    notes = []
    assert not accuracy_gate(model, manifest, val, SIZE, max_drop=1.0, report=notes.append)
    art = manifest.artifacts[0]
    assert art["accuracy"]["passed"] is False and art["accuracy"]["error"] in notes[0]
    assert f"{gate_backend('engine')} int8 m_int8.engine" in notes[0]
