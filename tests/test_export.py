"""ONNX export, FP16, the parity gate, the manifest and the Triton repository."""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import TINY_CONFIG
from PIL import Image

from rmt_deploy import create_model
from rmt_deploy.exporters import cli
from rmt_deploy.exporters.onnx_export import (ATTENTION_OPSET, PORTABLE_OPSET, TABLE_REBUILD_OPS, export_onnx, graph_ops,
                                              write_fp16)
from rmt_deploy.parity import Tolerance, ValueMismatchError, check_parity, compare
from rmt_deploy.runners import open_runner, small_attention


def trt_supported_ops() -> set[str]:
    text = resources.files("rmt_deploy.exporters").joinpath("tensorrt_onnx_ops.txt").read_text()
    return {line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")}


def eager_vs_onnx(model, path, shapes, tolerance, backend="onnxruntime"):
    eager = open_runner("eager", model=model).load()
    runtime = open_runner(backend, onnx=path).load()
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    return check_parity(eager, runtime, batches, tolerance)


@pytest.fixture(scope="module", params=[ATTENTION_OPSET, PORTABLE_OPSET], ids=["attention-op", "portable"])
def tiny_static(request, tmp_path_factory, tiny_model):
    """Both graph forms: ONNX Attention nodes (the default) and explicit MatMul/Softmax (TensorRT)."""
    path = export_onnx(tiny_model, tmp_path_factory.mktemp("onnx") / "tiny.onnx", height=64, width=96,
                       opset=request.param)
    return tiny_model, path


def test_static_export_bakes_tables_and_matches_eager(tiny_static):
    model, path = tiny_static
    ops = graph_ops(onnx.load(str(path)))
    assert not TABLE_REBUILD_OPS & set(ops), f"tables rebuilt at run time: {ops}"
    assert ops["LayerNormalization"] == 2 * sum(TINY_CONFIG["depths"]), "LayerNorm must stay one node"
    report = eager_vs_onnx(model, path, [(1, 3, 64, 96)] * 3, Tolerance())
    report.raise_for_failure()
    assert report.summary()["max_rel"] <= 1e-4


def test_attention_form_follows_the_opset(tiny_static):
    """Opset 23+: one Attention node per attention (two per decomposed block), no Softmax left."""
    proto = onnx.load(str(tiny_static[1]))
    ops = graph_ops(proto)
    if proto.opset_import[0].version >= ATTENTION_OPSET:
        decomposed = sum(d for d, axial in zip(TINY_CONFIG["depths"], TINY_CONFIG["chunkwise_recurrents"]) if axial)
        assert ops["Attention"] == sum(TINY_CONFIG["depths"]) + decomposed and not ops["Softmax"]
    else:
        assert ops["Softmax"] and not ops["Attention"]


def test_portable_graph_uses_only_tensorrt_parser_ops(tiny_model, tmp_path, tiny_checkpoint):
    supported = trt_supported_ops()
    static = export_onnx(tiny_model, tmp_path / "s.onnx", height=64, width=96, opset=PORTABLE_OPSET)
    feats = create_model(TINY_CONFIG, checkpoint=str(tiny_checkpoint), features_only=True)
    dyn = export_onnx(feats, tmp_path / "f.onnx", dynamic_batch=True, height=64, width=64, dynamic_hw=True,
                      opset=PORTABLE_OPSET)
    fp16 = write_fp16(static, tmp_path / "h.onnx")
    for path in (static, dyn, fp16):
        unsupported = set(graph_ops(onnx.load(str(path)))) - supported
        assert not unsupported, f"{path.name}: ops TensorRT's parser lacks: {unsupported}"


def _moves_one_axis_or_keeps_last(perm: list[int]) -> bool:
    rest = list(range(len(perm)))
    for axis in rest:
        others = [a for a in rest if a != axis]
        if any(perm == others[:i] + [axis] + others[i:] for i in range(len(perm))):
            return True
    return perm[-1] == len(perm) - 1


def test_attention_layout_changes_stay_cheap(tiny_static, tmp_path):
    """In ONNX Runtime's optimised graph, Attention nodes take (batch, sequence, heads * d) tensors
    that no Transpose made (the node splits the heads; rmt_t batch 8 ~10 % faster than 4-D heads
    behind Transposes); in the portable graph every attention layout change is a block copy (one axis
    moved, or the head dimension left last): the compound permutations an earlier graph produced ran
    ~8x slower and cost 5-7 % of rmt_t's CPU throughput."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tiny_static[1]), options, providers=["CPUExecutionProvider"])
    nodes = onnx.load(options.optimized_model_filepath).graph.node
    attention = [n for n in nodes if n.op_type == "Attention"]
    if attention:
        producer = {out: n for n in nodes for out in n.output}

        def source(name):       # the first producer that is more than a reshape
            node = producer.get(name)
            while node is not None and node.op_type in ("Reshape", "Squeeze", "Unsqueeze", "Flatten"):
                node = producer.get(node.input[0])
            return node

        four_d = [n.name for n in attention if not {a.name for a in n.attribute} >= {"q_num_heads", "kv_num_heads"}]
        assert not four_d, f"Attention nodes on 4-D heads: {four_d}"
        transposed = [(n.name, i) for n in attention for i in n.input[:3]
                      if source(i) is not None and source(i).op_type == "Transpose"]
        assert not transposed, f"Attention inputs made by Transposes: {transposed}"
        return
    perms = [list(attr.ints) for node in nodes
             if node.op_type == "Transpose" for attr in node.attribute if attr.name == "perm"]
    assert any(len(p) == 5 for p in perms), "expected the decomposed attention's 5-D layouts"
    slow = [p for p in perms if not _moves_one_axis_or_keeps_last(p)]
    assert not slow, f"compound transposes in the optimised graph: {slow}"


def test_large_grid_export_mixes_attention_forms(tiny_model, tmp_path):
    """A stage whose per-column H-pass mask would pass the size limit keeps 4-D heads in an opset-23
    export, the other stages 3-D Attention nodes; the mixed graph matches eager."""
    path = export_onnx(tiny_model, tmp_path / "large.onnx", height=512, width=384)   # stage 1: 128x96 grid
    attention = [n for n in onnx.load(str(path)).graph.node if n.op_type == "Attention"]
    three_d = [n for n in attention if any(a.name == "q_num_heads" for a in n.attribute)]
    assert 0 < len(three_d) < len(attention), f"{len(three_d)} of {len(attention)} Attention nodes are 3-D"
    eager_vs_onnx(tiny_model, path, [(1, 3, 512, 384)], Tolerance()).raise_for_failure()


def test_dynamic_hw_features_export(tmp_path, tiny_checkpoint):
    model = create_model(TINY_CONFIG, checkpoint=str(tiny_checkpoint), features_only=True)
    path = export_onnx(model, tmp_path / "feat.onnx", dynamic_batch=True, height=64, width=64, dynamic_hw=True)
    inputs = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in inputs] == ["batch", 3, "height", "width"]
    for shape, stage2 in [((1, 3, 64, 64), (1, 64, 8, 8)), ((2, 3, 97, 131), (2, 64, 13, 17)),
                          ((1, 3, 200, 96), (1, 64, 25, 12))]:
        report = eager_vs_onnx(model, path, [shape], Tolerance())
        report.raise_for_failure()
        assert report.outputs[1].shape == stage2


def test_cli_features_dynamic_hw_export_passes_its_gate(tmp_path, tiny_checkpoint):
    """The gate's extra odd-size batch gives feature maps of another size than the others."""
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_CONFIG))
    assert cli.main(["--model", str(config), "--checkpoint", str(tiny_checkpoint), "--task", "features", "--dynamic-hw",
                     "64:96:160", "--output", str(tmp_path / "art"), "--format", "onnx"]) == 0
    manifest = json.loads((tmp_path / "art" / "export.json").read_text())
    art, = manifest["artifacts"]
    assert art["parity"]["passed"] and art["parity"]["max_rel"] <= 1e-4
    assert [o["name"] for o in art["outputs"]] == ["stage1", "stage2", "stage3", "stage4"]


def test_dynamic_batch_export_serves_several_batch_sizes(tmp_path, tiny_model):
    path = export_onnx(tiny_model, tmp_path / "dyn.onnx", dynamic_batch=True, height=64, width=64)
    assert not tiny_model.layers[0].Relpos.export_layout, "export must work on a copy of the caller's model"
    report = eager_vs_onnx(tiny_model, path, [(1, 3, 64, 64), (3, 3, 64, 64), (8, 3, 64, 64)], Tolerance())
    report.raise_for_failure()
    assert report.outputs[0].shape == (12, 10)


def test_fp16_parity_on_cpu(tiny_static, tmp_path):
    model, path = tiny_static
    fp16 = write_fp16(path, tmp_path / "tiny_fp16.onnx")
    proto = onnx.load(str(fp16))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    # LayerNorm and Softmax / Attention computed in float32: their inputs come from Casts to float32
    produced_by = {o: n for n in proto.graph.node for o in n.output}
    for node in proto.graph.node:
        if node.op_type in ("LayerNormalization", "Softmax", "Attention"):
            src = produced_by.get(node.input[0])
            assert src is not None and src.op_type in ("Cast", "Add"), node.name
    report = eager_vs_onnx(model, fp16, [(1, 3, 64, 96)] * 2, Tolerance.for_precision("fp16"))
    report.raise_for_failure()
    assert report.summary()["cosine"] >= 0.999


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


@pytest.mark.parametrize("opset", [ATTENTION_OPSET, PORTABLE_OPSET])
def test_rmt_t_static_export_matches_eager(tmp_path, opset):
    model = create_model("rmt_t")
    path = export_onnx(model, tmp_path / "rmt_t.onnx", batch_size=1, opset=opset)
    ops = graph_ops(onnx.load(str(path)))
    assert not TABLE_REBUILD_OPS & set(ops)
    if opset == PORTABLE_OPSET:
        assert not set(ops) - trt_supported_ops()
    report = eager_vs_onnx(model, path, [(1, 3, 224, 224)], Tolerance())
    report.raise_for_failure()
    if opset == ATTENTION_OPSET and importlib.util.find_spec("openvino"):
        # OpenVINO with its rewrites: all 18 attention nodes (stages 1-2's row/column passes, stages 3-4's
        # whole-map ones) on the small-head kernel's operation where it builds
        report = eager_vs_onnx(model, path, [(1, 3, 224, 224)], Tolerance(), backend="openvino")
        report.raise_for_failure()
        with open_runner("openvino", onnx=path) as runner:
            used = runner.metadata().extra["small_head_attention"]
        assert used == (small_attention.kernel_unavailable_reason() or "18")


def test_small_head_attention_kernel_matches_numpy():
    reason = small_attention.kernel_unavailable_reason()
    if reason:
        pytest.skip(reason)
    rng = np.random.default_rng(0)
    # every tail: rows past a block of 4, keys past a 16-vector and past a block of 4 vectors (1-3 left)
    for batch, seq, heads, dim, mask_heads in [(3, 7, 2, 16, 2), (2, 17, 3, 32, 1), (5, 56, 4, 16, 4),
                                               (1, 64, 2, 64, 2), (2, 33, 6, 48, 3), (2, 100, 2, 32, 1),
                                               (1, 150, 3, 16, 3), (1, 196, 4, 32, 4), (1, 256, 1, 16, 1)]:
        q, k, v = (rng.standard_normal((batch, seq, heads * dim), dtype=np.float32) for _ in range(3))
        mask = np.tile(rng.standard_normal((mask_heads, seq, seq)).astype(np.float32), (heads // mask_heads, 1, 1))
        assert small_attention.mask_period(mask).shape[0] == mask_heads
        out = small_attention.attention(q, k, v, small_attention.mask_period(mask), heads, scale=0.3)
        qh, kh, vh = (t.reshape(batch, seq, heads, dim).transpose(0, 2, 1, 3).astype(np.float64) for t in (q, k, v))
        scores = 0.3 * qh @ kh.transpose(0, 1, 3, 2) + mask
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        expected = (weights / weights.sum(-1, keepdims=True) @ vh).transpose(0, 2, 1, 3).reshape(q.shape)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="head dim 8"):
        small_attention.attention(q[..., :8 * heads], k[..., :8 * heads], v[..., :8 * heads], mask, heads)
    with pytest.raises(ValueError, match="must be one"):
        small_attention.attention(q, k[:, :-1], v[:, :-1], mask, heads)
    assert small_attention.fits(256, 64) and not small_attention.fits(257, 16) and not small_attention.fits(56, 8)
    long = rng.standard_normal((1, 257, 16), dtype=np.float32)
    with pytest.raises(ValueError, match="seq 257"):
        small_attention.attention(long, long, long, np.zeros((1, long.shape[1], long.shape[1]), np.float32), 1)


def test_small_head_attention_operation_checks_its_inputs():
    """The kernel's OpenVINO operation refuses, at graph-build time, inputs it would read out of bounds."""
    reason = small_attention.kernel_unavailable_reason()
    if reason:
        pytest.skip(reason)
    import openvino.opset13 as ov_ops
    from rmt_deploy.runners.openvino_graph import _small_head_attention_factory
    factory = _small_head_attention_factory()
    q, short = (ov_ops.parameter(shape, np.float32) for shape in ([2, 20, 64], [2, 19, 64]))
    mask = ov_ops.constant(np.zeros((2, 20, 20), np.float32))
    node = factory.create("SmallHeadAttention", [q, q, q, mask], {"heads": 2, "scale": 0.5})
    assert list(node.get_output_partial_shape(0).to_shape()) == [2, 20, 64]
    for inputs, heads, match in [([q, short, q, mask], 2, "share one"),
                                 ([q, q, q, ov_ops.constant(np.zeros((3, 20, 20), np.float32))], 2, "m dividing heads"),
                                 ([q, q, q, mask], 8, "head dim 8"), ([q, q, q, mask], 0, "positive")]:
        with pytest.raises(RuntimeError, match=match):
            factory.create("SmallHeadAttention", inputs, {"heads": heads, "scale": 0.5})


def test_compare_raises_specific_errors():
    ref = {"logits": np.array([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])}
    bad = {"logits": ref["logits"] * 1.01}
    report = compare(ref, bad, Tolerance(topk_identical=0))
    assert not report.passed
    with pytest.raises(ValueMismatchError) as info:
        report.raise_for_failure()
    assert "max_rel" in str(info.value)
    assert compare(ref, {"other": ref["logits"]}, Tolerance()).problems[0][0].__name__ == "OutputNamesMismatchError"


# ---- the CLI: manifest, failing gate, Triton ---------------------------------------------------

@pytest.fixture(scope="module")
def export_run(tmp_path_factory, tiny_checkpoint):
    out = tmp_path_factory.mktemp("export")
    config = out / "tiny.json"
    config.write_text(json.dumps(TINY_CONFIG))
    images = out / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (90 + 7 * i, 120, 3), dtype=np.uint8)).save(images / f"{i}.jpg")
    code = cli.main(["--model", str(config), "--checkpoint", str(tiny_checkpoint), "--fp16", "--img-size", "64",
                     "--dynamic-batch", "1:2:8", "--output", str(out / "art"), "--images", str(images),
                     "--triton-repo", str(out / "triton"), "--format", "onnx"])
    return code, out, config


def test_cli_manifest(export_run, tiny_checkpoint):
    code, out, _ = export_run
    assert code == 0
    manifest = json.loads((out / "art" / "export.json").read_text())
    assert (manifest["model"], manifest["task"]) == ("tiny", "classify")    # named after tiny.json
    assert manifest["opset"] == PORTABLE_OPSET      # --triton-repo: Triton's onnxruntime may predate Attention
    assert manifest["checkpoint"]["sha256"] and manifest["checkpoint"]["weights"] == "ema"
    assert {"torch", "onnx", "onnxruntime"} <= set(manifest["versions"])
    arts = {(a["format"], a["precision"]): a for a in manifest["artifacts"]}
    assert set(arts) == {("onnx", "fp32"), ("onnx", "fp16")}
    fp32, fp16 = arts[("onnx", "fp32")], arts[("onnx", "fp16")]
    assert (out / "art" / fp32["path"]).is_file()
    assert fp32["inputs"] == [{"name": "images", "shape": ["batch", 3, 64, 64], "dtype": "float32"}]
    assert fp16["inputs"][0]["dtype"] == "float16" and fp16["outputs"][0]["name"] == "logits"
    for art in (fp32, fp16):
        parity = art["parity"]
        assert parity["passed"] is True and parity["reference"] == "eager-fp32"
        assert set(parity) >= {"max_abs", "max_rel", "cosine", "top1_agreement", "top5_agreement"}
    assert fp32["parity"]["max_rel"] <= 1e-4 and fp16["parity"]["cosine"] >= 0.999


def test_triton_config_parses_with_tritons_protobuf(export_run):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2
    _, out, _ = export_run
    models = sorted((out / "triton").iterdir())
    assert len(models) == 2
    for model_dir in models:
        config = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert config.platform == "onnxruntime_onnx" and config.max_batch_size == 8
        assert list(config.input[0].dims) == [3, 64, 64] and config.input[0].name == "images"
        assert config.HasField("dynamic_batching")
        assert (model_dir / "1" / "model.onnx").is_file()


def test_failing_parity_exits_non_zero(export_run, tiny_checkpoint, tmp_path):
    _, _, config = export_run
    code = cli.main(["--model", str(config), "--checkpoint", str(tiny_checkpoint), "--img-size", "64",
                     "--output", str(tmp_path), "--rtol", "1e-12"])
    assert code == 1
    manifest = json.loads((tmp_path / "export.json").read_text())
    assert manifest["artifacts"][0]["parity"]["passed"] is False


def test_random_weights_are_announced_and_recorded(export_run, tmp_path, capsys):
    _, _, config = export_run
    assert cli.main(["--model", str(config), "--img-size", "64", "--output", str(tmp_path), "--skip-parity",
                     "--format", "onnx"]) == 0
    manifest = json.loads((tmp_path / "export.json").read_text())
    assert manifest["checkpoint"] is None and manifest["random_weights"] is True
    assert manifest["opset"] == ATTENTION_OPSET     # ONNX only: the fused-attention graph
    assert "RANDOM WEIGHTS" in capsys.readouterr().err


def test_tensorrt_format_without_tensorrt_says_why(export_run, tmp_path):
    from rmt_deploy.runners.tensorrt_env import tensorrt_available
    if tensorrt_available()[0]:
        pytest.skip("TensorRT is present: covered by tests/test_tensorrt.py")
    _, _, config = export_run
    with pytest.raises(SystemExit, match="needs TensorRT"):
        cli.main(["--model", str(config), "--format", "tensorrt", "--output", str(tmp_path)])


def test_bad_checkpoint_is_a_clean_error(tmp_path):
    (tmp_path / "bad.pth").write_bytes(b"junk")
    assert cli.main(["--model", "rmt_t", "--checkpoint", str(tmp_path / "bad.pth"), "--output", str(tmp_path)]) == 2
    assert not list(tmp_path.glob("*.onnx"))


def test_eager_runner_matches_the_model(tiny_model):
    runner = open_runner("eager", model=tiny_model).load()
    x = np.random.default_rng(1).standard_normal((2, 3, 64, 64), dtype=np.float32)
    np.testing.assert_allclose(runner.infer({"images": x})["logits"], tiny_model(torch.from_numpy(x)).detach().numpy(), rtol=1e-6)
    meta = runner.metadata()
    assert [t.name for t in meta.inputs] == ["images"] and [t.name for t in meta.outputs] == ["logits"]


# Run in a fresh interpreter: the suite's own heap (OpenVINO/ORT thread pools, torch.compile workers)
# is not the state of an `rmt-bench` or `rmt-serve` process after it loads the eager runner.
_FREED_MEMORY_PROBE = """
import ctypes, json, resource, sys, torch
sys.path.insert(0, sys.argv[1])
from conftest import TINY_CONFIG
from rmt_deploy.model import RMTConfig, build_model
from rmt_deploy.runners import open_runner
open_runner("eager", model=build_model(RMTConfig.from_dict(TINY_CONFIG))).load()
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    activation = torch.zeros(16 << 20).add_(1.0)     # 64 MiB, written: every new page faults once
    chunk_header = ctypes.c_size_t.from_address(activation.data_ptr() - 8).value   # glibc size | flags
    del activation
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"faults": faults, "mmapped": bool(chunk_header & 2), "non_main_arena": bool(chunk_header & 4)}))
"""


def _transparent_hugepages() -> str:
    try:
        return Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return ""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt tuning applies to glibc only")
@pytest.mark.parametrize("keep", ["1", "0"])
def test_eager_cpu_runner_reuses_freed_activation_memory(keep):
    """Large activations must come back from the heap, not as freshly page-faulted mmap blocks.

    64 MiB is above glibc's largest dynamic mmap threshold (32 MiB), so without the runner's
    mallopt tuning (RMT_KEEP_FREED_MEMORY=0) every such block is mmapped and faults ~16k pages.
    """
    env = {**os.environ, "RMT_KEEP_FREED_MEMORY": keep}
    done = subprocess.run([sys.executable, "-c", _FREED_MEMORY_PROBE, str(Path(__file__).parent)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    probe = json.loads(done.stdout.splitlines()[-1])
    steady = probe["faults"][-1]
    if keep == "1":
        assert steady < 1000 and not probe["mmapped"], probe
    else:
        assert probe["mmapped"], probe
        if "[always]" not in _transparent_hugepages():      # 'always' maps fresh blocks in 2 MiB pages
            assert steady > 15000, probe
