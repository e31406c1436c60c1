"""Output-preserving rewrites the OpenVINO runner applies to its copy of an exported graph.

Each takes the ``openvino.Model`` read from an ONNX file, rewrites it in place and returns how many
places it changed; a pattern it does not recognise is left as it was (correct, only slower).
"""
from __future__ import annotations

import functools

import numpy as np

from . import small_attention


def _ops(model, type_name: str) -> list:
    """The model's nodes of one type, listed before any is rewritten."""
    return [op for op in model.get_ordered_ops() if op.get_type_name() == type_name]


def _constant_data(output) -> np.ndarray | None:
    """The value of a graph constant (through dtype conversions), or None if it is computed."""
    node = output.get_node()
    while node.get_type_name() in ("Convert", "ConvertLike"):
        node = node.input_value(0).get_node()
    return node.get_data() if node.get_type_name() == "Constant" else None


def drop_attention_nan_guards(model) -> int:
    """Remove the ``Select(IsNaN(out), 0, out)`` OpenVINO's ONNX reader puts after each
    ``Attention`` node, wherever the node's mask is a constant with only finite values.

    The guard exists for rows whose every score is masked to -inf (softmax of them is NaN); a
    finite mask cannot produce one, so for finite inputs the guard is the identity. It is not free:
    two extra passes over every attention output, and it keeps the plugin from folding the output
    transpose into its attention kernel. Returns how many it removed.
    """
    removed = 0
    for select in _ops(model, "Select"):
        condition, then, value = (select.input_value(i) for i in range(3))
        attention = value.get_node()
        if (condition.get_node().get_type_name() != "IsNaN" or condition.get_node().input_value(0) != value
                or attention.get_type_name() != "ScaledDotProductAttention" or attention.get_input_size() < 4):
            continue
        zero, mask = _constant_data(then), _constant_data(attention.input_value(3))
        if zero is None or mask is None or np.any(zero) or not np.isfinite(mask).all():
            continue
        for target in select.output(0).get_target_inputs():
            target.replace_source_output(value)
        removed += 1
    return removed


def _sole_consumer(node, type_name: str):
    consumers = [target.get_node() for target in node.output(0).get_target_inputs()]
    return consumers[0] if len(consumers) == 1 and consumers[0].get_type_name() == type_name else None


def _other_operand(node, operand):
    """The input of a two-input node that is not ``operand`` (an output), or None."""
    first, second = node.input_value(0), node.input_value(1)
    return second if first == operand else first if second == operand else None


def rotary_as_rope(model) -> int:
    """Rewrite the exporter's rotary shift into the rotate-half pattern OpenVINO fuses into one RoPE
    kernel; returns how many it rewrote.

    The exported form is ``x * cos + Gather(x, [1, 0], axis=-2) * sin`` on (B, H, W, heads, 2, d/2)
    with the sign in the sin table: one Gather, which ONNX Runtime runs faster than slices and a
    concat (so the file keeps it for ONNX Runtime). OpenVINO runs it as a Gather
    plus an eltwise kernel per tensor; as ``x * cos + concat(-x2, x1) * sin`` over (B, HW, heads, d)
    with (1, HW, 1, d) tables it fuses each into one kernel. Only static
    shapes with tables shared by every head are rewritten; the outputs are unchanged.
    """
    import openvino.opset13 as ops
    rewritten = 0
    for gather in _ops(model, "Gather"):
        shape = gather.get_output_partial_shape(0)
        indices, axis = _constant_data(gather.input_value(1)), _constant_data(gather.input_value(2))
        if (indices is None or axis is None or indices.reshape(-1).tolist() != [1, 0] or not shape.is_static
                or len(shape) != 6 or int(axis) % 6 != 4 or shape[4].get_length() != 2):
            continue
        x = gather.input_value(0)
        mul_sin = _sole_consumer(gather, "Multiply")
        add = None if mul_sin is None else _sole_consumer(mul_sin, "Add")
        mul_cos = None if add is None else _other_operand(add, mul_sin.output(0))
        if mul_cos is None or mul_cos.get_node().get_type_name() != "Multiply":
            continue
        cos, sin = _other_operand(mul_cos.get_node(), x), _other_operand(mul_sin, gather.output(0))
        cos, sin = (None if t is None else _constant_data(t) for t in (cos, sin))
        batch, h, w, heads, _, half = (dim.get_length() for dim in shape)
        if (cos is None or sin is None or cos.shape != (h, w, heads, 2, half) or sin.shape != cos.shape
                or not (cos == cos[:, :, :1]).all() or not (sin == sin[:, :, :1]).all()):
            continue
        cos = cos[:, :, :1].reshape(1, h * w, 1, 2 * half)
        sin = np.concatenate([-sin[:, :, :1, 0], sin[:, :, :1, 1]], axis=-1).reshape(1, h * w, 1, 2 * half)
        tokens = ops.reshape(x, ops.constant(np.array([batch, h * w, heads, 2 * half])), special_zero=False)
        first = ops.slice(tokens, np.array([0]), np.array([half]), np.array([1]), np.array([3]))
        second = ops.slice(tokens, np.array([half]), np.array([2 * half]), np.array([1]), np.array([3]))
        dtype = x.get_element_type()
        rotated = ops.concat([ops.multiply(second, ops.constant(-1.0, dtype)), first], axis=-1)
        shifted = ops.add(ops.multiply(tokens, ops.constant(cos.astype(np.float32), dtype)),
                          ops.multiply(rotated, ops.constant(sin.astype(np.float32), dtype)))
        result = ops.reshape(shifted, ops.constant(np.array(list(shape.to_shape()))), special_zero=False)
        for target in add.output(0).get_target_inputs():
            target.replace_source_output(result.output(0))
        rewritten += 1
    return rewritten


@functools.lru_cache(maxsize=1)
def _small_head_attention_factory():
    """A node factory that knows the kernel's OpenVINO operation, ``SmallHeadAttention`` (C++, in the
    kernel's library); kept for the process, so the library stays loaded while its nodes may run."""
    from openvino.utils.node_factory import NodeFactory
    factory = NodeFactory()
    factory.add_extension(small_attention.library_path())
    return factory


def _split_heads_source(value):
    """The 3-D (batch, seq, heads * dim) tensor behind ``Transpose(Reshape(x), [0, 2, 1, 3])``, or None."""
    transpose = value.get_node()
    if transpose.get_type_name() != "Transpose" or _order(transpose) != [0, 2, 1, 3]:
        return None
    reshape = transpose.input_value(0).get_node()
    if reshape.get_type_name() != "Reshape" or len(reshape.input_value(0).get_partial_shape()) != 3:
        return None
    return reshape.input_value(0)


def _order(transpose) -> list[int] | None:
    order = _constant_data(transpose.input_value(1))
    return None if order is None else order.reshape(-1).tolist()


def use_small_head_attention(model, compute: str = "f32") -> int:
    """Replace each attention within the small-head kernel's limits (`small_attention.fits`) with the
    kernel's operation, wired straight to the 3-D tensors on either side (the split-heads transposes
    around it go too); returns how many it replaced. Runs after `drop_attention_nan_guards`: only
    attention with a finite mask and no guard left is replaced. ``compute`` "bf16" runs the kernel's
    bfloat16 variant between conversions the bf16 plugin finds already done (its tensors are bfloat16)."""
    if compute not in ("f32", "bf16"):
        raise ValueError(f"the small-head attention kernel computes in 'f32' or 'bf16', not {compute!r}")
    factory = _small_head_attention_factory()
    import openvino.opset13 as ops
    replaced = 0
    for node in _ops(model, "ScaledDotProductAttention"):
        shape = node.get_output_partial_shape(0)
        if (node.get_input_size() < 4 or node.get_attributes().get("causal") or not shape.is_static
                or node.get_output_element_type(0).get_type_name() != "f32"):
            continue
        batch, heads, seq, dim = (d.get_length() for d in shape)
        sources = [_split_heads_source(node.input_value(i)) for i in range(3)]
        mask = _constant_data(node.input_value(3))
        scale = _constant_data(node.input_value(4)) if node.get_input_size() > 4 else np.float32(dim ** -0.5)
        merge = _sole_consumer(node, "Transpose")
        merged = None if merge is None or _order(merge) != [0, 2, 1, 3] else _sole_consumer(merge, "Reshape")
        if (None in sources or mask is None or scale is None or merged is None
                or not small_attention.fits(seq, dim)
                or not np.isfinite(mask).all() or mask.size not in (seq * seq, heads * seq * seq)
                or list(merged.get_output_partial_shape(0).to_shape()) != [batch, seq, heads * dim]):
            continue
        masks = small_attention.mask_period(mask.astype(np.float32).reshape(-1, seq, seq))
        if compute == "bf16":
            sources = [ops.convert(source, "bf16").output(0) for source in sources]
        kernel = factory.create("SmallHeadAttention", [*sources, ops.constant(masks).output(0)],
                                {"heads": heads, "scale": float(scale)})
        result = ops.convert(kernel, "f32") if compute == "bf16" else kernel
        for target in merged.output(0).get_target_inputs():
            target.replace_source_output(result.output(0))
        replaced += 1
    return replaced
