"""The backend registry: one entry per backend, its precisions as data, reasons before any export,
and no module outside the registry and the runners' entries that spells a backend's name."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from rmt_deploy.runners import (Backend, BackendRefused, RunnerUnavailable, backend_names, backends_for, get_backend,
                                open_backend_runner, open_runner, precision_names, reference_backend)

ROOT = Path(__file__).resolve().parents[1]


def test_every_backend_is_one_entry():
    names = backend_names()
    assert names == ("eager", "compile", "onnxruntime", "openvino", "tensorrt")
    assert all(isinstance(get_backend(n), Backend) and get_backend(n).name == n for n in names)
    assert {n: get_backend(n).artifact for n in names} == {
        "eager": "model", "compile": "model", "onnxruntime": "onnx", "openvino": "onnx", "tensorrt": "engine"}
    assert backends_for("onnx") == ("onnxruntime", "openvino") and reference_backend() == "eager"
    assert precision_names() == ("fp32", "fp16", "bf16", "int8")
    with pytest.raises(ValueError, match="unknown backend 'tensorrtt'; choose from eager, compile"):
        get_backend("tensorrtt")


def test_precisions_are_data_and_reasons_come_first():
    assert get_backend("eager").unavailable_reason("cpu", "bf16") is None
    assert "does not run fp16 on cpu" in get_backend("eager").unavailable_reason("cpu", "fp16")
    assert "does not run bf16 on cpu" in get_backend("onnxruntime").unavailable_reason("cpu", "bf16")
    assert "CPU only" in get_backend("openvino").unavailable_reason("cuda:1")
    assert "CUDA" in get_backend("tensorrt").unavailable_reason("cpu")
    with pytest.raises(ValueError, match="unknown precision"):
        get_backend("eager").unavailable_reason("cpu", "fp8")
    with pytest.raises(ValueError, match="unknown device"):
        get_backend("eager").unavailable_reason("tpu")


def test_open_takes_what_the_backend_needs(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="needs a model"):
        get_backend("compile").open()
    with pytest.raises(ValueError, match="needs an ONNX file"):
        get_backend("openvino").open(model=tiny_model)
    with pytest.raises(TypeError, match="no option"):
        get_backend("onnxruntime").open(artifact=tmp_path / "x.onnx", cuda_graphs=True)
    runner = get_backend("compile").open(model=tiny_model, threads=1, dynamic_batch=True)
    assert runner.name == "compile-fp32-cpu" and runner.dynamic_batch and runner.threads == 1
    assert open_runner("eager", model=tiny_model, precision="bf16").name == "eager-bf16-cpu"


def test_open_backend_runner_refuses_before_building_anything(tiny_model, tmp_path):
    built = []

    def make_model():
        built.append(True)
        return tiny_model

    def prepare(entry):
        built.append(entry.name)
        return tmp_path / "prepared.onnx"

    for name, device, precision in [("onnxruntime", "cpu", "bf16"), ("openvino", "cuda:0", None),
                                    ("eager", "cpu", "fp16"), ("tensorrt", "cpu", None)]:
        with pytest.raises(BackendRefused) as refused:
            open_backend_runner(name, device=device, precision=precision, make_model=make_model, prepare=prepare)
        assert str(refused.value) == get_backend(name).unavailable_reason(device, precision or "fp32")
        assert isinstance(refused.value, RunnerUnavailable)
    assert not built


def test_open_backend_runner_model_given_or_prepared_file(tiny_model, tmp_path):
    runner, path = open_backend_runner("compile", device="cpu", precision="fp32", threads=1,
                                       make_model=lambda: tiny_model, dynamic_batch=True)
    assert (runner.name, runner.dynamic_batch, runner.threads, path) == ("compile-fp32-cpu", True, 1, None)
    given, prepared = tmp_path / "given.onnx", tmp_path / "prepared.onnx"
    for file in (given, prepared):
        file.write_bytes(b"")               # built, not loaded: runners read their file in load()
    if reason := get_backend("openvino").unavailable_reason("cpu", "fp16"):
        pytest.skip(reason)
    runner, path = open_backend_runner("openvino", device="cpu", precision="fp16", artifact=given,
                                       prepare=lambda entry: pytest.fail("a given file is not prepared"),
                                       dynamic_batch=True)         # model options: not for file backends
    assert (path, runner.requested_precision) == (given, None)     # its own precision; the caller compares
    runner, _ = open_backend_runner("openvino", device="cpu", precision="fp16", artifact=str(given),
                                    given_in_own_precision=False)
    assert runner.requested_precision == "fp16"
    runner, path = open_backend_runner("openvino", device="cpu", precision="fp16", threads=2,
                                       prepare=lambda entry: prepared)
    assert (path, runner.requested_precision, runner.threads) == (prepared, "fp16", 2)


_QUOTED_NAME = re.compile(r"""["'](%s)["']""" % "|".join(map(re.escape, backend_names())))
# the registry, the runners declaring entries, and the OpenVINO runner's kernel (it builds against openvino's headers)
_ENTRIES = {Path("rmt_deploy/runners") / f for f in ("registry.py", "eager.py", "onnxruntime.py", "openvino.py",
                                                     "tensorrt.py", "small_attention.py")}


def test_backend_names_are_spelled_only_in_the_registry_entries():
    """Like `git grep`: outside the registry, the runners' entries, tests and docs, no source spells a
    backend's name as a string literal (tools ask the registry)."""
    spelled = []
    for folder in ("rmt_deploy", "exporters", "server", "benchmarks", "predict", "scripts"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.relative_to(ROOT)
            if relative in _ENTRIES:
                continue
            spelled += [f"{relative}:{n}: {line.strip()}" for n, line in enumerate(path.read_text().splitlines(), 1)
                        if _QUOTED_NAME.search(line)]
    assert not spelled, "\n".join(spelled)


def test_the_library_never_imports_the_tools():
    tools = re.compile(r"(rmt_deploy\.(exporters|server|benchmarks))|(from \.\.+(exporters|server|benchmarks))")
    importing = [f"{p.relative_to(ROOT)}:{n}" for p in sorted((ROOT / "rmt_deploy").rglob("*.py"))
                 for n, line in enumerate(p.read_text().splitlines(), 1)
                 if line.lstrip().startswith(("import ", "from ")) and tools.search(line)]
    assert not importing, importing


def test_no_tool_imports_the_benchmark_tool():
    """rmt-predict, rmt-serve and rmt-export share code through the library and the export library
    (its artifact cache included), never through rmt-bench."""
    bench = re.compile(r"rmt_deploy\.benchmarks|from \.\.+benchmarks")
    importing = [f"{p.relative_to(ROOT)}:{n}" for folder in ("exporters", "server", "predict")
                 for p in sorted((ROOT / folder).rglob("*.py"))
                 for n, line in enumerate(p.read_text().splitlines(), 1)
                 if line.lstrip().startswith(("import ", "from ")) and bench.search(line)]
    assert not importing, importing
