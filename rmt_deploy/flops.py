"""Parameter and multiply-add counts of the released RMT graph.

What is counted: multiply-adds of every convolution, linear layer and attention matmul (q k^T
and attn v) of the released implementation, for one image at the given resolution. Not counted:
normalisation, activations, softmax, rotary and bias element-wise work (as fvcore and the paper's
tables do not count them). The fused inference form does the same GEMM work (q/k/v in one
3C-wide GEMM; the rotary shift stays element-wise). The tests cross-check these counts
against `torch.utils.flop_counter` run on a plain implementation of the spec.
"""
from __future__ import annotations

import torch

from .model import RMT, RMTConfig


def _half(n: int) -> int:
    return (n + 1) // 2          # a 3x3 stride-2 conv with padding 1


def count_macs(config: RMTConfig, height: int = 224, width: int = 224) -> dict[str, int]:
    """Multiply-adds per image, by part: stem, stage1..stageN (with their downsample), head."""
    c0 = config.embed_dims[0]
    h, w = _half(height), _half(width)
    macs = {"stem": h * w * (c0 // 2) * (3 * 9 + (c0 // 2) * 9)}
    h, w = _half(h), _half(w)
    macs["stem"] += h * w * 9 * (c0 * (c0 // 2) + c0 * c0)
    for i, c in enumerate(config.embed_dims):
        tokens, hidden = h * w, int(config.mlp_ratios[i] * c)
        attention = 2 * tokens * c * (h + w) if config.chunkwise_recurrents[i] else 2 * tokens * tokens * c
        block = (tokens * c * 9            # CPE depth-wise 3x3
                 + 4 * tokens * c * c      # q, k, v, out projections
                 + tokens * c * 25         # LePE depth-wise 5x5 on v
                 + attention
                 + 2 * tokens * c * hidden + tokens * hidden * 9)   # FFN fc1, fc2, depth-wise 3x3
        macs[f"stage{i + 1}"] = config.depths[i] * block
        if i + 1 < len(config.embed_dims):
            h, w = _half(h), _half(w)
            macs[f"stage{i + 1}"] += h * w * 9 * c * config.embed_dims[i + 1]
    head = h * w * config.embed_dims[-1] * config.projection + config.projection * config.num_classes
    if config.token_label:
        head += h * w * config.embed_dims[-1] * config.num_classes
    macs["head"] = head
    macs["total"] = sum(macs.values())
    return macs


def count_params(config: RMTConfig) -> int:
    """Parameters of the released layout (buffers excluded), as the paper and the spec's table count them
    (built on the meta device: no memory, no initialisation)."""
    with torch.device("meta"):
        model = RMT(config)
    return sum(p.numel() for p in model.parameters())
