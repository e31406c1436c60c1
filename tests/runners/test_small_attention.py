"""The small-head attention kernel through its test seam (`small_attention.attention`, arrays in, array
out) against numpy, and its OpenVINO operation's input checks."""
from __future__ import annotations

import numpy as np
import pytest

from rmt_deploy.runners import small_attention


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
