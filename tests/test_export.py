"""ONNX export, FP16, the parity gate, the manifest and the Triton repository."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import pytest
from conftest import TINY_CONFIG
from export_helpers import eager_vs_onnx, trt_supported_ops
from PIL import Image

from rmt_deploy import create_model
from rmt_deploy.exporters import cli
from rmt_deploy.exporters.onnx_export import (ATTENTION_OPSET, PORTABLE_OPSET, TABLE_REBUILD_OPS, export_onnx, graph_ops,
                                              write_fp16)
from rmt_deploy.parity import Tolerance
from rmt_deploy.runners import open_runner, small_attention


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


