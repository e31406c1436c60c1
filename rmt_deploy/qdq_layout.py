"""Output-preserving rewrites of a float32 ONNX graph before ONNX Runtime's static QDQ quantizer.

ONNX Runtime runs QLinearConv channels-last (its NHWC transformer) and cancels the layout
transposes it adds against the graph's own 4-D transposes; it cannot see through a Reshape. The
exported graph reaches tokens from a convolution as ``Reshape(B, C, HW) -> Transpose(0, 2, 1)`` (the
form OpenVINO prefers, see rmt_deploy.model._norm_channels), which in the int8 session costs two
uint8 transposes per LayerNorm. As ``Transpose(0, 2, 3, 1) -> Reshape(B, HW, C)`` both cancel.

A 1x1 convolution becomes ``Transpose -> Gemm -> Transpose`` (with reshapes): its quantized form is
then a QGemm with float output, which feeds GELU and the residual adds directly, where a
QLinearConv writes uint8 that a single-threaded DequantizeLinear must expand again. Its transposes
cancel against the neighbouring channels-last convolutions. Figures: docs/precision.md.

Only the int8 file is rewritten: the float32 file keeps the exporter's graph (float32 ONNX Runtime
runs its convolutions blocked, NCHWc, and the 1x1 convolutions are faster there as convolutions).
"""
from __future__ import annotations

import numpy as np


def consumers(graph) -> dict[str, list]:
    """Tensor name -> the nodes that read it."""
    users: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def _shapes(proto) -> dict[str, list[int]]:
    from onnx import shape_inference
    inferred = shape_inference.infer_shapes(proto).graph
    return {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*inferred.value_info, *inferred.input, *inferred.output]}


def _replace(graph, old: list, new: list) -> None:
    """Put ``new`` where the first of ``old`` was (the graph stays topologically sorted)."""
    at = min(list(graph.node).index(n) for n in old)
    for node in old:
        graph.node.remove(node)
    for offset, node in enumerate(new):
        graph.node.insert(at + offset, node)


def _perm(node) -> list[int] | None:
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), None)


def _fixed_but_batch(shape: list[int] | None) -> bool:
    """A 4-D shape whose channel and spatial sizes are known (the batch may be dynamic, 0 here)."""
    return bool(shape) and len(shape) == 4 and 0 not in shape[1:]


def channels_last_tokens(proto) -> int:
    """``Reshape(B, C, H, W -> B, C, HW) -> Transpose(0, 2, 1)`` as ``Transpose(0, 2, 3, 1) -> Reshape(B, HW, C)``,
    in place; returns how many were rewritten. The batch may be dynamic (the new Reshape copies it)."""
    from onnx import helper, numpy_helper
    graph, shapes, users = proto.graph, _shapes(proto), consumers(proto.graph)
    outputs = {o.name for o in graph.output}
    count = 0
    for reshape in [n for n in graph.node if n.op_type == "Reshape"]:
        source, after = shapes.get(reshape.input[0]), users.get(reshape.output[0], [])
        if not _fixed_but_batch(source) or len(after) != 1 or reshape.output[0] in outputs:
            continue
        transpose = after[0]
        b, c, h, w = source
        if transpose.op_type != "Transpose" or _perm(transpose) != [0, 2, 1] \
                or shapes.get(reshape.output[0]) != [b, c, h * w]:
            continue
        # 0 copies the input's batch (a fixed or a dynamic one)
        target = numpy_helper.from_array(np.array([0, h * w, c], np.int64), f"{reshape.output[0]}_tokens_shape")
        graph.initializer.append(target)
        nhwc = f"{reshape.output[0]}_nhwc"
        _replace(graph, [reshape, transpose], [
            helper.make_node("Transpose", [reshape.input[0]], [nhwc], name=f"{transpose.name}_nhwc", perm=[0, 2, 3, 1]),
            helper.make_node("Reshape", [nhwc, target.name], [transpose.output[0]], name=f"{reshape.name}_tokens")])
        count += 1
    return count


def pointwise_matrix(conv, initializers) -> np.ndarray | None:
    """The (C_out, C_in) matrix of a 1x1, stride-1, unpadded, ungrouped Conv with a constant weight."""
    from onnx import helper, numpy_helper
    if conv.op_type != "Conv" or conv.input[1] not in initializers:
        return None
    weight = numpy_helper.to_array(initializers[conv.input[1]])
    attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    if weight.ndim != 4 or weight.shape[2:] != (1, 1) or attrs.get("group", 1) != 1 \
            or any(s != 1 for s in attrs.get("strides", [])) or any(p != 0 for p in attrs.get("pads", [])) \
            or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return None
    return np.ascontiguousarray(weight[:, :, 0, 0])


def pointwise_convs_as_gemms(proto) -> int:
    """Each 1x1 convolution of known channels and size (the batch may be dynamic) as ``Transpose(0, 2, 3, 1)
    -> Reshape(BHW, C) -> Gemm -> Reshape(B, H, W, C') -> Transpose(0, 3, 1, 2)``, in place; returns how
    many were rewritten.

    A 2-D Gemm, not a 4-D MatMul: ONNX Runtime fuses some MatMul + Add pairs into a float Gemm
    before its QDQ fusions see them, which then stay float."""
    from onnx import helper, numpy_helper
    graph, shapes = proto.graph, _shapes(proto)
    initializers = {i.name: i for i in graph.initializer}
    count = 0
    for conv in list(graph.node):
        matrix, source = pointwise_matrix(conv, initializers), shapes.get(conv.input[0])
        if matrix is None or not _fixed_but_batch(source):
            continue
        _, c, h, w = source
        stem = conv.name or conv.output[0]
        for name, value in ((f"{stem}_matrix", matrix), (f"{stem}_rows", np.array([-1, c], np.int64)),
                            (f"{stem}_nhwc_shape", np.array([-1, h, w, matrix.shape[0]], np.int64))):
            graph.initializer.append(numpy_helper.from_array(value, name))
        gemm_inputs = [f"{stem}_flat", f"{stem}_matrix", *conv.input[2:3]]
        _replace(graph, [conv], [
            helper.make_node("Transpose", [conv.input[0]], [f"{stem}_nhwc"], name=f"{stem}_to_nhwc", perm=[0, 2, 3, 1]),
            helper.make_node("Reshape", [f"{stem}_nhwc", f"{stem}_rows"], [f"{stem}_flat"], name=f"{stem}_flatten"),
            helper.make_node("Gemm", gemm_inputs, [f"{stem}_gemm"], name=f"{stem}_gemm", transB=1),
            helper.make_node("Reshape", [f"{stem}_gemm", f"{stem}_nhwc_shape"], [f"{stem}_out_nhwc"],
                             name=f"{stem}_unflatten"),
            helper.make_node("Transpose", [f"{stem}_out_nhwc"], [conv.output[0]], name=f"{stem}_to_nchw",
                             perm=[0, 3, 1, 2])])
        count += 1
    return count


def rewrite_for_ort_int8(proto) -> dict[str, int]:
    """Both rewrites, in place: what `quantize_onnxruntime` quantizes. Returns the counts."""
    counts = {"channels-last tokens": channels_last_tokens(proto),
              "1x1 convs as Gemm": pointwise_convs_as_gemms(proto)}
    used = {name for node in proto.graph.node for name in node.input}
    for unused in [i for i in proto.graph.initializer if i.name not in used]:   # the replaced 4-D weights
        proto.graph.initializer.remove(unused)
    return counts
