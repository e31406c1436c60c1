"""ONNX export of the fused RMT model: torch.export-based, checked, simplified, optional FP16.

Static sizes bake the rotary and decay tables in as initializers (the model's per-resolution
cache is filled before tracing); a dynamic height/width builds them from the traced shape.
"""
from __future__ import annotations

import copy
import logging
import warnings
from collections import Counter
from pathlib import Path

import onnx
import torch

from ..artifact import ArtifactDescription, Range
from ..model import RMT

log = logging.getLogger(__name__)

MIN_OPSET = 17          # LayerNormalization is one node from opset 17 on
# 20: a native Gelu node, attention as explicit MatMul/Softmax; every TensorRT 10.x (opsets 9-20)
# and every ONNX Runtime execution provider runs it
PORTABLE_OPSET = 20
# 23+: attention exports as ONNX Attention nodes (ONNX Runtime >= 1.23, OpenVINO >= 2026.0; TensorRT
# has an Attention importer since 10.14, untested with this form), on 3-D (batch, sequence, heads * d) tensors wherever the H pass's
# per-column mask fits (see rmt_deploy.model._MAX_MASK_ELEMENTS): no Transpose splits or merges
# heads, and ONNX Runtime's kernel keeps each head's logits in cache (faster than the explicit chain)
ATTENTION_OPSET = 23
# Ops that rebuild position tables at run time; a static export must not contain them.
TABLE_REBUILD_OPS = {"Range", "Shape", "Expand", "ConstantOfShape", "Sin", "Cos"}
# Kept in float32 inside FP16 graphs: the known FP16 failure points of attention models.
FP16_FP32_OPS = ["LayerNormalization", "Softmax", "ReduceMean", "Attention"]


def _heads_attention_onnx(q, k, v, mask, num_heads: int):
    """`rmt_deploy::heads_attention` as one ONNX Attention node on 3-D inputs (opset 23)."""
    from onnxscript import opset23 as op
    return op.Attention(q, k, v, mask, q_num_heads=num_heads, kv_num_heads=num_heads, scale=1.0)[0]


class ExportError(RuntimeError):
    """The model could not be exported or the exported graph failed a check."""


def export_onnx(model: RMT, path: str | Path, *, batch_size: int = 1, dynamic_batch: bool = False,
                height: int = 224, width: int = 224, dynamic_hw: bool = False, opset: int = ATTENTION_OPSET,
                max_batch: int = 1024, hw_range: tuple[int, int] = (32, 2048)) -> Path:
    """Export ``model`` to a float32 ``path`` (input ``images``; outputs ``logits`` or ``stage1..4``),
    described by its `ArtifactDescription` in the metadata. FP16 files are converted from it (`write_fp16`)."""
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old: LayerNormalization needs opset {MIN_OPSET}+")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a float32 CPU copy in the export layout (q/k pair order folded into the weights); the caller's
    # model stays as it was
    model = copy.deepcopy(model.fuse()).float().cpu()
    model.to_export_layout(attention_op=opset >= ATTENTION_OPSET).eval()
    example_batch = max(batch_size, 2) if dynamic_batch else batch_size  # batch 1 would be specialised
    x = torch.randn(example_batch, 3, height, width)
    if not dynamic_hw:
        with torch.inference_mode():
            model(x[:1])        # fill the table cache: traced as constants
    dims: dict[int, torch.export.Dim] = {}
    if dynamic_batch:
        dims[0] = torch.export.Dim("batch", min=1, max=max_batch)
    if dynamic_hw:
        dims[2] = torch.export.Dim("height", min=hw_range[0], max=hw_range[1])
        dims[3] = torch.export.Dim("width", min=hw_range[0], max=hw_range[1])
    names = list(model.output_names)
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)   # e.g. "torchvision is not installed" registry notes
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", (FutureWarning, UserWarning, DeprecationWarning))
        try:
            program = torch.onnx.export(model, (x,), input_names=["images"], output_names=names, dynamo=True,
                                        opset_version=opset, dynamic_shapes={"x": dims} if dims else None,
                                        verbose=False, optimize=True, custom_translation_table={
                                            torch.ops.rmt_deploy.heads_attention.default: _heads_attention_onnx})
        except Exception as exc:  # torch.export's own errors are long; keep the cause, add what was asked
            raise ExportError(f"torch.onnx.export failed for {model.config.name} "
                              f"({'dynamic' if dims else 'static'} shapes): {exc}") from exc
        finally:
            quiet.setLevel(level)
    proto = _simplify(program.model_proto)
    batch = Range(1, batch_size, max_batch) if dynamic_batch else Range.fixed(batch_size)
    description = ArtifactDescription.from_model(model, height=None if dynamic_hw else height,
                                                 width=None if dynamic_hw else width, batch=batch)
    _set_metadata(proto, description.to_metadata())
    onnx.save(proto, path)
    check_onnx(path, static_tables=not dynamic_hw)
    return path


def write_fp16(fp32_path: str | Path, fp16_path: str | Path) -> Path:
    """FP16 copy of an exported FP32 file (no second trace)."""
    proto = convert_fp16(onnx.load(str(fp32_path)))
    onnx.save(proto, str(fp16_path))
    description = describe(proto)
    check_onnx(fp16_path, static_tables=description is None or description.height is not None)
    return Path(fp16_path)


def _simplify(proto: onnx.ModelProto) -> onnx.ModelProto:
    """onnxslim's constant folding and fusions, kept only when the graph gets smaller."""
    import onnxslim
    try:
        slim = onnxslim.slim(proto)
    except Exception as exc:  # a simplifier failure must not block an otherwise valid export
        log.warning("onnxslim failed, keeping the unsimplified graph: %s", exc)
        return proto
    if slim is not None and len(slim.graph.node) < len(proto.graph.node):
        return slim
    return proto


def _set_metadata(proto: onnx.ModelProto, values: dict[str, str]) -> None:
    existing = {p.key: p for p in proto.metadata_props}
    for key, value in values.items():
        if key in existing:
            existing[key].value = value
        else:
            proto.metadata_props.add(key=key, value=value)


def decay_bias_adds(proto: onnx.ModelProto) -> list[str]:
    """Names of the Add nodes that apply the decay bias (the Adds feeding a Softmax)."""
    softmax_inputs = {n.input[0] for n in proto.graph.node if n.op_type == "Softmax"}
    return [n.name for n in proto.graph.node if n.op_type == "Add" and set(n.output) & softmax_inputs]


def convert_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Weights, activations and I/O in float16; LayerNorm, Softmax (or the Attention node with its
    decay-bias mask) and the decay-bias Add in float32 (onnxruntime's converter inserts the Casts
    around the blocked nodes)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = convert_float_to_float16(proto, keep_io_types=False, op_block_list=FP16_FP32_OPS,
                                       node_block_list=decay_bias_adds(proto))
    _drop_repeated_casts(out)
    del out.graph.value_info[:]     # stale float32 annotations; shape inference recomputes them
    sorted_model = OnnxModel(out)   # the converter appends its Casts out of order
    sorted_model.topological_sort()
    description = describe(sorted_model.model)
    if description is not None:
        _set_metadata(sorted_model.model, description.with_precision("fp16").to_metadata())
    return sorted_model.model


def describe(proto: onnx.ModelProto) -> ArtifactDescription | None:
    """The artifact description an exported file carries in its metadata."""
    return ArtifactDescription.from_metadata({p.key: p.value for p in proto.metadata_props})


def _drop_repeated_casts(proto: onnx.ModelProto) -> None:
    """The converter casts a shared initializer once per consumer under one output name (an SSA
    violation); the casts are identical, so keep the first."""
    seen: set[str] = set()
    keep = []
    for node in proto.graph.node:
        if node.op_type == "Cast" and node.output[0] in seen:
            continue
        seen.update(node.output)
        keep.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(keep)


def check_onnx(path: str | Path, static_tables: bool) -> None:
    """onnx.checker full check, plus: a static export carries its tables as initializers."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{path} fails onnx.checker: {exc}") from exc
    if static_tables:
        ops = graph_ops(onnx.load(str(path), load_external_data=False))
        rebuilt = TABLE_REBUILD_OPS & set(ops)
        if rebuilt:
            raise ExportError(f"{path}: a static export rebuilds tables at run time ({sorted(rebuilt)} nodes)")


def graph_ops(proto: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in proto.graph.node)


def tensor_specs(path: str | Path) -> tuple[list[dict], list[dict]]:
    """Inputs and outputs of an ONNX file as manifest entries {name, shape, dtype}."""
    proto = onnx.load(str(path), load_external_data=False)

    def spec(value):
        t = value.type.tensor_type
        shape = [d.dim_param or d.dim_value for d in t.shape.dim]
        return {"name": value.name, "shape": shape, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name}

    return [spec(v) for v in proto.graph.input], [spec(v) for v in proto.graph.output]
