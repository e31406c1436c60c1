"""The ONNX Runtime runner: what its metadata says is what infer returns, and the file's artifact
description comes back through it."""
from __future__ import annotations

import numpy as np

from rmt_deploy.exporters.onnx_export import write_fp16
from rmt_deploy.runners import get_backend


def test_fp16_file_reports_the_float32_outputs_it_returns(tiny_static, tmp_path):
    model, path = tiny_static
    with get_backend("onnxruntime").open(artifact=write_fp16(path, tmp_path / "h.onnx")) as runner:
        meta = runner.metadata()
        assert runner.precision == "fp16" and meta.inputs[0].dtype == "float16"
        out = runner.infer({"images": np.zeros((1, 3, 64, 96), np.float32)})
        assert [t.dtype for t in meta.outputs] == [str(v.dtype) for v in out.values()] == ["float32"]
        described = meta.artifact
        assert (described.model, described.task, described.precision) == (model.config.name, "classify", "fp16")
        assert (described.height, described.width, described.num_classes) == (64, 96, 10)
        assert described.output_names == ("logits",) and described.output_dtypes == ("float32",)
        assert described.checkpoint_sha256 == model.checkpoint["sha256"]


def test_fp32_file_is_described_as_exported(tiny_static):
    _, path = tiny_static
    with get_backend("onnxruntime").open(artifact=path, threads=1) as runner:
        described = runner.metadata().artifact
        assert described.precision == "fp32" and described.batch is not None and described.batch.max == 1


def test_spinning_off_reaches_the_session_and_its_metadata_and_changes_no_output(tiny_static):
    from rmt_deploy.runners.onnxruntime import OnnxRuntimeRunner
    _, path = tiny_static
    x = {"images": np.random.default_rng(0).standard_normal((1, 3, 64, 96), dtype=np.float32)}
    with OnnxRuntimeRunner(path, threads=2, spinning=False).load() as quiet, \
            OnnxRuntimeRunner(path, threads=2).load() as default:
        assert quiet.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
        assert quiet.metadata().extra["intra_op_spinning"] is False
        assert default.metadata().extra["intra_op_spinning"] is True
        np.testing.assert_array_equal(quiet.infer(x)["logits"], default.infer(x)["logits"])
