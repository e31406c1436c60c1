"""The small-head attention kernel through its test seam (`small_attention.attention`, arrays in, array
out) against numpy, and its OpenVINO operation's input checks."""
from __future__ import annotations

import numpy as np
import pytest

from rmt_deploy.runners import small_attention


# every tail: rows past a block of 4, keys past a 16-vector and past a block of 4 vectors (1-3 left), odd
# sequences (the bf16 variant pairs keys)
SHAPES = [(3, 7, 2, 16, 2), (2, 17, 3, 32, 1), (5, 56, 4, 16, 4), (1, 64, 2, 64, 2), (2, 33, 6, 48, 3),
          (2, 100, 2, 32, 1), (1, 150, 3, 16, 3), (1, 196, 4, 32, 4), (1, 256, 1, 16, 1), (2, 1, 2, 16, 1)]


def _expected(q, k, v, mask, heads, scale):
    """softmax(q k^T * scale + mask) v per head, in float64."""
    batch, seq, channels = q.shape
    qh, kh, vh = (t.reshape(batch, seq, heads, channels // heads).transpose(0, 2, 1, 3).astype(np.float64)
                  for t in (q, k, v))
    scores = scale * qh @ kh.transpose(0, 1, 3, 2) + mask
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    return (weights / weights.sum(-1, keepdims=True) @ vh).transpose(0, 2, 1, 3).reshape(q.shape)


def _cases(rng):
    for batch, seq, heads, dim, mask_heads in SHAPES:
        q, k, v = (rng.standard_normal((batch, seq, heads * dim), dtype=np.float32) for _ in range(3))
        mask = np.tile(rng.standard_normal((mask_heads, seq, seq)).astype(np.float32), (heads // mask_heads, 1, 1))
        assert small_attention.mask_period(mask).shape[0] == mask_heads
        yield q, k, v, mask, heads


def test_small_head_attention_kernel_matches_numpy():
    reason = small_attention.kernel_unavailable_reason()
    if reason:
        pytest.skip(reason)
    rng = np.random.default_rng(0)
    for q, k, v, mask, heads in _cases(rng):
        out = small_attention.attention(q, k, v, small_attention.mask_period(mask), heads, scale=0.3)
        np.testing.assert_allclose(out, _expected(q, k, v, mask, heads, 0.3), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="head dim 8"):
        small_attention.attention(q[..., :8 * heads], k[..., :8 * heads], v[..., :8 * heads], mask, heads)
    with pytest.raises(ValueError, match="must be one"):
        small_attention.attention(q, k[:, :-1], v[:, :-1], mask, heads)
    assert small_attention.fits(256, 64) and not small_attention.fits(257, 16) and not small_attention.fits(56, 8)
    long = rng.standard_normal((1, 257, 16), dtype=np.float32)
    with pytest.raises(ValueError, match="seq 257"):
        small_attention.attention(long, long, long, np.zeros((1, long.shape[1], long.shape[1]), np.float32), 1)


def test_small_head_attention_bf16_variant_matches_numpy_on_its_rounded_inputs():
    """The bfloat16 variant against float64 attention of the same bfloat16-rounded q, k, v: what is left
    is its own rounding (probabilities and outputs to bfloat16), a few parts in a thousand."""
    reason = small_attention.kernel_unavailable_reason("bf16")
    if reason:
        pytest.skip(reason)
    rng = np.random.default_rng(1)
    for q, k, v, mask, heads in _cases(rng):
        out = small_attention.attention(q, k, v, small_attention.mask_period(mask), heads, scale=0.3, precision="bf16")
        rounded = [(small_attention._bf16_bits(t).astype(np.uint32) << 16).view(np.float32) for t in (q, k, v)]
        expected = _expected(*rounded, mask, heads, 0.3)
        np.testing.assert_allclose(out, expected, rtol=2e-2, atol=1e-2)
        cosine = (out * expected).sum() / np.linalg.norm(out) / np.linalg.norm(expected)
        assert cosine > 0.9999, (q.shape, heads, cosine)
        if q.shape[1] > 1:     # one key: the output is v itself, exact
            assert not np.array_equal(out, expected.astype(np.float32))    # it really rounded to bfloat16


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
    if small_attention.kernel_unavailable_reason("bf16") is None:
        half = ov_ops.convert(q, "bf16")
        node = factory.create("SmallHeadAttention", [half, half, half, mask], {"heads": 2, "scale": 0.5})
        assert node.get_output_element_type(0).get_type_name() == "bf16"
        for inputs, match in [([half, q, half, mask], "not bf16 like q"),
                              ([half, half, half, ov_ops.convert(mask, "bf16")], "mask is not f32")]:
            with pytest.raises(RuntimeError, match=match):
                factory.create("SmallHeadAttention", inputs, {"heads": 2, "scale": 0.5})
