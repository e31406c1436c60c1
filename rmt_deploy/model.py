"""RMT (Retentive Networks Meet Vision Transformers) for deployment.

One file in timm order: helpers, blocks, stage, model, checkpoint filter, builders, registry.

Modules are built in the released checkpoint layout so released weights load unchanged. `RMT.fuse()`
then rewrites them in place into the inference form that `forward` runs:

* q/k/v projections become one GEMM producing ``[q, k, v]`` (no wider than the released three),
  with k's ``d**-0.5`` scale folded in. The rotary shift of q and k runs as one complex multiply
  by ``exp(i * p * theta)`` in eager mode. `RMT.to_export_layout()` (which the ONNX exporter
  applies to a copy) also folds the pair layout into the q/k weights: each head's channels are
  de-interleaved (even ones, then odd ones), which leaves q·k unchanged and turns the pair
  rotation into swapping a head's two halves, the sign folded into the sin table:
  ``q * cos + swap_halves(q) * sin`` (and the same for k), one Gather and no strided slicing in
  the graph;
* layer-scale ``gamma_1``/``gamma_2`` are folded into ``out_proj``/``fc2``;
* every BatchNorm is folded into the convolution or linear layer in front of it.

Traced graphs (export, ``torch.compile``) run `Block.forward_graph`: the residual stream stays NCHW so
every conv and residual add works in the runtime's conv layout, q/k/v are three GEMMs over slices of
the fused weight, and the FFN and ``out_proj`` are 1x1 convolutions. Attention is explicit
matmul/softmax (opset 20, TensorRT), or `heads_attention_op` calls that export as ONNX ``Attention``
nodes on 3-D tensors, heads split inside the node (opset 23+; an H pass whose per-column mask would be
too large keeps 4-D heads).

Rotary sin/cos tables and decay biases depend only on the stage resolution: `RelPos` computes them
once per (H, W) and caches them, so eager inference never rebuilds them and a fixed-size export
bakes them in as constants; under a dynamic-shape trace they are built from the traced shape.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "RMT", "RMTConfig", "VARIANTS", "RELEASED_NAMES", "build_model", "checkpoint_filter_fn",
]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

# Largest decay mask (elements) the decomposed H pass materialises per stage and resolution, in
# eager mode or as a constant of a static opset-23 export (8 MiB of fp32: every decomposed stage of
# rmt_t/s/b/l at 224 px, rmt_l's first being 4.9 MiB); larger grids run that pass one head at a time
# (eager) or as 4-D heads behind permutes (export form) instead.
_MAX_MASK_ELEMENTS = 1 << 21


def _is_tracing() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def deinterleave_heads(num_heads: int, head_dim: int) -> torch.Tensor:
    """Channel order that puts each head's even channels first, then its odd ones: a rotary pair
    (x_2m, x_2m+1) lands at (m, d/2 + m), so rot() becomes a swap of the head's two halves."""
    within = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    return (torch.arange(num_heads)[:, None] * head_dim + within).reshape(-1)


def fold_batchnorm(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d):
    """Weights and bias of a conv/linear (output channels first) followed by ``bn`` at inference."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = torch.zeros_like(bn.running_mean) if bias is None else bias
    shape = (-1,) + (1,) * (weight.dim() - 1)
    return weight * scale.reshape(shape), (bias - bn.running_mean) * scale + bn.bias


def _fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    weight, bias = fold_batchnorm(conv.weight, conv.bias, bn)
    conv.weight = nn.Parameter(weight.detach())
    conv.bias = nn.Parameter(bias.detach())


def _tokens_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Linear over channels-last tokens as one 2-D GEMM (on a 4-D input PyTorch adds a full copy)."""
    return F.linear(x.reshape(-1, x.shape[-1]), layer.weight, layer.bias).reshape(*x.shape[:-1], -1)


def _fold_identity(conv: nn.Conv2d) -> None:
    """Make a depth-wise conv compute ``x + conv(x)``: add 1 to the centre tap of every filter."""
    k = conv.kernel_size[0] // 2
    conv.weight[:, 0, k, k] += 1.0


def _norm_channels(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the channels of an NCHW tensor, returned as (B, H, W, C) tokens.

    It normalises (B, HW, C), reached by one 3-D transpose: OpenVINO runs that norm as one MVN
    kernel (a 4-D one it decomposes) and reads the transpose straight from a convolution's
    channels-last output, where a 4-D permute costs it a transpose plus a reorder (figures:
    docs/benchmarks.md)."""
    b, c, h, w = x.shape
    return norm(x.reshape(b, c, h * w).transpose(1, 2)).reshape(b, h, w, c)


def _conv1x1(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A linear layer over the channels of an NCHW tensor, as a 1x1 convolution."""
    return F.conv2d(x, layer.weight[:, :, None, None], layer.bias)


def heads_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                    num_heads: int) -> torch.Tensor:
    """SDPA over (batch, sequence, heads * d) tensors: heads split as strided views (no copies in),
    merged on the way out; ``mask`` broadcasts to (batch, heads, sequence, sequence)."""
    qh, kh, vh = (t.unflatten(-1, (num_heads, -1)).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=1.0)
    return out.transpose(1, 2).flatten(-2)


@torch.library.custom_op("rmt_deploy::heads_attention", mutates_args=())
def heads_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                       num_heads: int) -> torch.Tensor:
    """`heads_attention` as one opaque op for tracing: the ONNX exporter writes it as one opset-23
    ``Attention`` node on the 3-D tensors (heads split inside the node), so no layout transposes
    surround attention in the graph."""
    return heads_attention(q, k, v, mask, num_heads)


@heads_attention_op.register_fake
def _heads_attention_shape(q, k, v, mask, num_heads):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _nhwc_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Apply a conv to channels-last tokens (B, H, W, C) without copying layouts: the permuted view
    is an NCHW tensor in channels_last memory format, which oneDNN/cuDNN consume directly."""
    return conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


# --------------------------------------------------------------------------------------------
# blocks
# --------------------------------------------------------------------------------------------

class DWConv2d(nn.Module):
    """Depth-wise conv on channels-last tokens (released key: ``<name>.conv``)."""

    def __init__(self, dim: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size, 1, kernel_size // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _nhwc_conv(self.conv, x)


class ManhattanSelfAttention(nn.Module):
    """MaSA (released key: ``retention``); full or decomposed (axial) over the stage grid."""

    def __init__(self, dim: int, num_heads: int, decomposed: bool):
        super().__init__()
        self.dim, self.num_heads, self.decomposed = dim, num_heads, decomposed
        self.head_dim = dim // num_heads
        self.export_layout = False
        self.attention_op = False       # attention through rmt_deploy::heads_attention (ONNX Attention, opset 23+)
        # pair-member swap for the graph rotary; a buffer, so it follows the module's device
        self.register_buffer("swap_index", torch.tensor([1, 0]), persistent=False)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.lepe = DWConv2d(dim, 5)
        self.out_proj = nn.Linear(dim, dim)

    @torch.no_grad()
    def fuse(self, layer_scale: torch.Tensor | None) -> None:
        scale = self.head_dim ** -0.5
        weight = torch.cat([self.q_proj.weight, self.k_proj.weight * scale, self.v_proj.weight])
        bias = torch.cat([self.q_proj.bias, self.k_proj.bias * scale, self.v_proj.bias])
        self.qkv = nn.Linear(self.dim, 3 * self.dim).to(weight)
        self.qkv.weight.copy_(weight)
        self.qkv.bias.copy_(bias)
        del self.q_proj, self.k_proj, self.v_proj
        if layer_scale is not None:
            gamma = layer_scale.reshape(-1)
            self.out_proj.weight.mul_(gamma[:, None])
            self.out_proj.bias.mul_(gamma)

    @torch.no_grad()
    def to_export_layout(self) -> None:
        """De-interleave each head's q and k channels in the fused weights (see the module notes)."""
        if self.export_layout:
            return
        order = deinterleave_heads(self.num_heads, self.head_dim)
        order = torch.cat([order, order + self.dim, torch.arange(2 * self.dim, 3 * self.dim)])
        self.qkv.weight.copy_(self.qkv.weight[order])
        self.qkv.bias.copy_(self.qkv.bias[order])
        self.export_layout = True

    def forward(self, x: torch.Tensor, tables: tuple[torch.Tensor | None, ...]) -> torch.Tensor:
        c = x.shape[-1]
        cos, sin = tables[0], tables[1]
        qkv = _tokens_linear(self.qkv, x)
        if sin is None:         # complex tables: q and k rotate together in one kernel
            qk, v = qkv.split((2 * c, c), dim=-1)
            q, k = self._rotary(qk, cos, None).split(c, dim=-1)
        else:                   # half precision: pair tables
            q, k, v = qkv.split(c, dim=-1)
            q, k = self._rotary(q, cos, sin), self._rotary(k, cos, sin)
        lepe = self.lepe(v)
        return _tokens_linear(self.out_proj, self._attend_sdpa(q, k, v, tables) + lepe)

    def forward_graph(self, x: torch.Tensor, tables: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Traced form: normalised tokens (B, H, W, C) in, the NCHW block update out.

        q, k and v are three GEMMs (no Split copy); the local enhancement and the attention output
        meet in NCHW, where ``out_proj`` runs as a 1x1 conv, so runtimes fuse the sum into that conv
        and the residual add after it."""
        b, h, w, c = x.shape
        cos, sin = tables[0], tables[1]
        flat = x.reshape(-1, c)
        weight, bias = self.qkv.weight, self.qkv.bias     # slices fold into three constants
        q, k, v = (F.linear(flat, weight[i * c:(i + 1) * c], bias[i * c:(i + 1) * c]).reshape(b, h, w, c)
                   for i in range(3))
        q, k = self._rotary(q, cos, sin), self._rotary(k, cos, sin)
        attend = self._attend_sdpa if self.attention_op else self._attend_explicit
        out = attend(q, k, v, tables).permute(0, 3, 1, 2) + self.lepe.conv(v.permute(0, 3, 1, 2))
        return _conv1x1(self.out_proj, out)

    def _rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor | None) -> torch.Tensor:
        """Rotary shift of q, of k, or of both side by side (B, H, W, m*C); contiguous result.

        ``sin is None``: ``cos`` is ``exp(i * p * theta)`` and each channel pair is one complex
        number (a single fused kernel). Otherwise ``x * cos + swap(x) * sin`` with the pair
        members swapped by one Gather: adjacent channels in the released layout, the two halves of
        a head in the export layout."""
        half = self.head_dim // 2
        if sin is None:
            pairs = torch.view_as_complex(x.unflatten(-1, (-1, half, 2)))
            return torch.view_as_real(pairs * cos).flatten(-3)
        heads = x.unflatten(-1, (-1, 2, half) if self.export_layout else (-1, half, 2))
        swapped = heads.index_select(-2 if self.export_layout else -1, self.swap_index)
        return (heads * cos + swapped * sin).flatten(-3)

    def _attend_sdpa(self, q, k, v, tables):
        """Eager path, and the export form at opset 23+ (``attention_op``): attention runs as
        `heads_attention` calls on (batch, sequence, heads * d) views of the (B, H, W, C) tensors, so
        there are no head-major copies and no materialised logits; outputs are contiguous (B, H, W, C).
        Exported, each call is one ONNX ``Attention`` node that splits the heads itself (no Transpose
        nodes around it to split or merge heads). The H pass needs the
        per-column mask ``tables[4]``; without it (grids over `_MAX_MASK_ELEMENTS`, dynamic sizes) it
        runs one head at a time (eager) or as 4-D heads behind one permute each (export form)."""
        b, h, w, c = v.shape
        n, d = self.num_heads, self.head_dim
        attend = heads_attention_op if self.attention_op else heads_attention
        if not self.decomposed:     # the mask is (1, n, HW, HW)
            out = attend(q.reshape(b, h * w, c), k.reshape(b, h * w, c), v.reshape(b, h * w, c),
                         tables[2].unsqueeze(0), n)
            return out.reshape(b, h, w, c)
        # along W: batch (B, H), sequence W
        v = attend(q.reshape(b * h, w, c), k.reshape(b * h, w, c), v.reshape(b * h, w, c), tables[2].unsqueeze(0), n)
        bias_h, mask_h = tables[3], tables[4]
        if mask_h is not None:      # along H: batch B, sequence H, heads (W, n) with the bias per column
            out = attend(q.reshape(b, h, w * c), k.reshape(b, h, w * c), v.reshape(b, h, w * c), mask_h, w * n)
            return out.reshape(b, h, w, c)
        if self.attention_op:       # large or dynamic grids, export form: batch (B, W), one permute each
            qh, kh, vh = (t.reshape(b, h, w, n, d).permute(0, 2, 3, 1, 4).reshape(b * w, n, h, d) for t in (q, k, v))
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias_h.reshape(1, n, h, h), scale=1.0)
            return out.reshape(b, w, n, h, d).permute(0, 3, 1, 2, 4).reshape(b, h, w, c)
        v = v.reshape(b, h, w, c)
        outs = []                   # large grids, eager: one call per head (heads = W), no big mask
        for i in range(n):
            s = slice(i * d, (i + 1) * d)
            qh, kh, vh = (t[..., s].transpose(1, 2) for t in (q, k, v))
            outs.append(F.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias_h[i], scale=1.0).transpose(1, 2))
        return torch.cat(outs, dim=-1)

    def _attend_explicit(self, q, k, v, tables):
        """Traced path (portable export, torch.compile): explicit matmul -> + decay bias -> softmax -> matmul.

        Every layout change moves a single axis (keys are transposed by moving the sequence axis
        last), which runtimes do as block copies; compound permutations that also move the head
        dimension cost far more in ONNX Runtime."""
        b, h, w, c = v.shape
        n, d = self.num_heads, self.head_dim
        q, k, v = q.reshape(b, h, w, n, d), k.reshape(b, h, w, n, d), v.reshape(b, h, w, n, d)
        if not self.decomposed:
            q, k, v = q.reshape(b, h * w, n, d), k.reshape(b, h * w, n, d), v.reshape(b, h * w, n, d)
            attn = torch.softmax(q.transpose(1, 2) @ k.permute(0, 2, 3, 1) + tables[2], dim=-1)
            return (attn @ v.transpose(1, 2)).transpose(1, 2).reshape(b, h, w, c)
        bias_w, bias_h = tables[2], tables[3]
        # along W, batch (B, H, n): (B, H, n, W, d) x (B, H, n, d, W)
        attn = torch.softmax(q.transpose(2, 3) @ k.permute(0, 1, 3, 4, 2) + bias_w, dim=-1)
        v = attn @ v.transpose(2, 3)                                         # (B, H, n, W, d)
        # along H, batch (B, W, n): (B, W, n, H, d) x (B, W, n, d, H)
        attn = torch.softmax(q.permute(0, 2, 3, 1, 4) @ k.permute(0, 2, 3, 4, 1) + bias_h, dim=-1)
        out = attn @ v.permute(0, 3, 2, 1, 4)                                # (B, W, n, H, d)
        return out.permute(0, 3, 1, 2, 4).reshape(b, h, w, c)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.dwconv = DWConv2d(hidden_dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(_tokens_linear(self.fc1, x))
        x = self.dwconv(x)              # x + dwconv(x): the identity is folded into the kernel
        return _tokens_linear(self.fc2, x)

    def forward_graph(self, x: torch.Tensor) -> torch.Tensor:
        """Traced form on NCHW: fc1 and fc2 as 1x1 convolutions around the depth-wise one, so runtimes
        with blocked conv layouts (ONNX Runtime's NCHWc, OpenVINO's) never change layouts inside the
        FFN (token GEMMs would need a reorder to and from the blocked layout around each)."""
        return _conv1x1(self.fc2, self.dwconv.conv(F.gelu(_conv1x1(self.fc1, x))))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, decomposed: bool,
                 layer_scale: bool, layer_init_value: float):
        super().__init__()
        self.pos = DWConv2d(dim, 3)
        self.retention_layer_norm = nn.LayerNorm(dim, eps=1e-6)
        self.retention = ManhattanSelfAttention(dim, num_heads, decomposed)
        self.final_layer_norm = nn.LayerNorm(dim, eps=1e-6)
        self.ffn = FeedForward(dim, int(mlp_ratio * dim))
        if layer_scale:
            self.gamma_1 = nn.Parameter(torch.full((1, 1, 1, dim), layer_init_value))
            self.gamma_2 = nn.Parameter(torch.full((1, 1, 1, dim), layer_init_value))

    @torch.no_grad()
    def fuse(self) -> None:
        gamma_1 = getattr(self, "gamma_1", None)
        self.retention.fuse(gamma_1)
        _fold_identity(self.pos.conv)
        _fold_identity(self.ffn.dwconv.conv)
        if gamma_1 is not None:
            gamma_2 = self.gamma_2.reshape(-1)
            self.ffn.fc2.weight.mul_(gamma_2[:, None])
            self.ffn.fc2.bias.mul_(gamma_2)
            del self.gamma_1, self.gamma_2

    def forward(self, x: torch.Tensor, tables: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x = self.pos(x)                 # x + pos(x): the identity is folded into the kernel
        x = x + self.retention(self.retention_layer_norm(x), tables)
        return x + self.ffn(self.final_layer_norm(x))

    def forward_graph(self, x: torch.Tensor, tables: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Traced form on an NCHW residual stream (see `Stage.forward`)."""
        x = self.pos.conv(x)
        x = x + self.retention.forward_graph(_norm_channels(self.retention_layer_norm, x), tables)
        return x + self.ffn.forward_graph(_norm_channels(self.final_layer_norm, x).permute(0, 3, 1, 2))


# --------------------------------------------------------------------------------------------
# stage
# --------------------------------------------------------------------------------------------

class RelPos(nn.Module):
    """Per-stage rotary and decay tables (released key: ``Relpos``, buffers ``angle``/``decay``).

    Tables are computed the way the released code computes them (float32 products, then sin/cos),
    so long position indices round identically, and cached per (H, W, dtype, device).
    """

    def __init__(self, dim: int, num_heads: int, init_value: float, heads_range: float,
                 decomposed: bool):
        super().__init__()
        head_dim = dim // num_heads
        angle = 1.0 / (10000 ** torch.linspace(0, 1, head_dim // 2))
        decay = torch.log(1 - 2 ** (-init_value - heads_range * torch.arange(num_heads, dtype=torch.float) / num_heads))
        self.register_buffer("angle", angle.repeat_interleave(2))
        self.register_buffer("decay", decay)
        self.num_heads, self.decomposed = num_heads, decomposed
        self.export_layout = False
        self._cache: dict[tuple, tuple[torch.Tensor | None, ...]] = {}

    def _load_from_state_dict(self, *args, **kwargs):
        self._cache.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        self._cache.clear()
        return super()._apply(fn, recurse)

    def rotary_kind(self, dtype: torch.dtype) -> str:
        """Which rotary tables the attention needs (see `ManhattanSelfAttention._rotary`)."""
        if self.export_layout:
            return "halves"
        if _is_tracing() or dtype not in (torch.float32, torch.float64):
            return "pairs"      # graphs, and half precision (complex32 kernels are sparse)
        return "complex"

    def forward(self, h: int, w: int, dtype: torch.dtype) -> tuple[torch.Tensor | None, ...]:
        """The rotary tables (``exp(i p theta)`` and None, or cos and signed sin laid out like the
        q/k channels, one entry per head so graph runtimes broadcast over the batch only), then the
        decay bias: (n, W, W), (n, H, H) and the H-pass SDPA mask (1, W*n, H, H) for decomposed
        stages (None when large, or built under a trace), (n, HW, HW) for full ones."""
        kind = self.rotary_kind(dtype)
        key = (h, w, dtype, self.decay.device, kind)
        if _is_tracing() and not isinstance(h, torch.SymInt) and not isinstance(w, torch.SymInt):
            if key in self._cache:      # a fixed-size export: bake the cached tables in as constants
                return self._cache[key]
        if _is_tracing():               # dynamic shapes: build the tables from the traced shape
            return self._build(h, w, dtype, kind)
        if key not in self._cache:
            # normal (not inference-mode) tensors, so a later export can trace them as constants
            with torch.inference_mode(False), torch.no_grad():
                self._cache[key] = self._build(h, w, dtype, kind)
        return self._cache[key]

    def _rotary_tables(self, h, w, dtype, kind):
        # float32 products, then sin/cos, as the released code computes them
        angle = self.angle[0::2]        # the stored angle repeats each value twice
        index = torch.arange(h * w, device=angle.device).to(angle.dtype)
        phase = (index[:, None] * angle[None, :]).reshape(h, w, 1, -1)
        cos, sin = torch.cos(phase), torch.sin(phase)
        if kind == "complex":
            return torch.complex(cos, sin).to(torch.complex128 if dtype == torch.float64 else torch.complex64), None
        axis = -2 if kind == "halves" else -1   # where a pair's two members sit: (2, d/2) or (d/2, 2)
        cos, sin = torch.stack([cos, cos], dim=axis), torch.stack([-sin, sin], dim=axis)
        heads = (1, 1, self.num_heads, 1, 1)
        return cos.repeat(heads).to(dtype), sin.repeat(heads).to(dtype)

    def _build(self, h, w, dtype, kind):
        decay = self.decay
        cos, sin = self._rotary_tables(h, w, dtype, kind)
        dist_h = self._distance(h, decay)
        dist_w = self._distance(w, decay)
        if self.decomposed:
            bias_w = (dist_w * decay[:, None, None]).to(dtype)
            bias_h = (dist_h * decay[:, None, None]).to(dtype)
            mask_h = None
            if not _is_tracing() and w * self.num_heads * h * h <= _MAX_MASK_ELEMENTS:
                n = self.num_heads      # H-pass mask of the SDPA path: "heads" are (W, n)
                mask_h = bias_h.reshape(1, n, h, h).expand(w, n, h, h).reshape(1, w * n, h, h)
            return cos, sin, bias_w, bias_h, mask_h
        dist = (dist_h[:, None, :, None] + dist_w[None, :, None, :]).reshape(h * w, h * w)
        return cos, sin, (dist * decay[:, None, None]).to(dtype)

    @staticmethod
    def _distance(n, like: torch.Tensor) -> torch.Tensor:
        index = torch.arange(n, device=like.device).to(like.dtype)
        return (index[:, None] - index[None, :]).abs()


class PatchMerging(nn.Module):
    """Stride-2 3x3 conv + BatchNorm between stages (released key: ``downsample``)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.reduction = nn.Conv2d(dim, out_dim, 3, 2, 1)
        self.norm = nn.BatchNorm2d(out_dim)

    @torch.no_grad()
    def fuse(self) -> None:
        _fold_conv_bn(self.reduction, self.norm)
        self.norm = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)


class Stage(nn.Module):
    def __init__(self, dim: int, out_dim: int | None, depth: int, num_heads: int, init_value: float,
                 heads_range: float, mlp_ratio: float, decomposed: bool, layer_scale: bool,
                 layer_init_value: float):
        super().__init__()
        self.Relpos = RelPos(dim, num_heads, init_value, heads_range, decomposed)
        self.blocks = nn.ModuleList([
            Block(dim, num_heads, mlp_ratio, decomposed, layer_scale, layer_init_value) for _ in range(depth)
        ])
        self.downsample = PatchMerging(dim, out_dim) if out_dim is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Blocks only; the caller applies ``downsample`` (stage outputs are taken before it)."""
        tables = self.Relpos(x.shape[1], x.shape[2], x.dtype)
        if _is_tracing():
            # graphs carry the residual stream in NCHW: every conv and residual add then works in
            # the runtime's conv layout, and only the norms and the attention see tokens (OpenVINO
            # otherwise transposes and reorders around each conv)
            x = x.permute(0, 3, 1, 2)
            for block in self.blocks:
                x = block.forward_graph(x, tables)
            return x.permute(0, 2, 3, 1)
        for block in self.blocks:
            x = block(x, tables)
        return x


class Stem(nn.Module):
    """Four 3x3 convs (strides 2, 1, 2, 1) with BatchNorm, GELU between (released key: ``patch_embed``)."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        half = dim // 2
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, half, 3, 2, 1), nn.BatchNorm2d(half), nn.GELU(),
            nn.Conv2d(half, half, 3, 1, 1), nn.BatchNorm2d(half), nn.GELU(),
            nn.Conv2d(half, dim, 3, 2, 1), nn.BatchNorm2d(dim), nn.GELU(),
            nn.Conv2d(dim, dim, 3, 1, 1), nn.BatchNorm2d(dim),
        )

    @torch.no_grad()
    def fuse(self) -> None:
        for i in (0, 3, 6, 9):
            _fold_conv_bn(self.proj[i], self.proj[i + 1])
            self.proj[i + 1] = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # channels_last memory makes every later NHWC view of a conv output contiguous
        x = x.contiguous(memory_format=torch.channels_last)
        return self.proj(x).permute(0, 2, 3, 1)


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RMTConfig:
    """Architecture, with the released constructor's argument names (see tiny_config.json)."""

    embed_dims: tuple[int, ...]
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    init_values: tuple[float, ...]
    heads_ranges: tuple[float, ...]
    mlp_ratios: tuple[float, ...]
    chunkwise_recurrents: tuple[bool, ...]
    layerscales: tuple[bool, ...]
    layer_init_values: float = 1e-6
    projection: int = 1024
    num_classes: int = 1000
    in_chans: int = 3
    extra_norms: bool = False   # detection/segmentation backbones normalise each stage output
    token_label: bool = False   # token-labelled checkpoints add `aux_head`
    name: str = field(default="custom", compare=False)

    @classmethod
    def from_dict(cls, cfg: dict) -> "RMTConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(cfg) - known
        if unknown:
            raise ValueError(f"unknown RMT config keys: {sorted(unknown)}; known: {sorted(known)}")
        seq = {"embed_dims", "depths", "num_heads", "init_values", "heads_ranges", "mlp_ratios",
               "chunkwise_recurrents", "layerscales"}
        cfg = {k: tuple(v) if k in seq else v for k, v in cfg.items()}
        missing = seq - set(cfg)
        if missing:
            raise ValueError(f"RMT config is missing keys: {sorted(missing)}")
        config = cls(**cfg)
        lengths = {len(getattr(config, k)) for k in seq}
        if len(lengths) != 1:
            raise ValueError(f"RMT config per-stage lists differ in length: {lengths}")
        return config


class RMT(nn.Module):
    """RMT classifier / backbone. ``features_only`` returns the four stage outputs (NCHW)."""

    def __init__(self, config: RMTConfig, features_only: bool = False):
        super().__init__()
        self.config, self.features_only, self.fused = config, features_only, False
        dims = config.embed_dims
        self.num_stages = len(dims)
        self.patch_embed = Stem(config.in_chans, dims[0])
        self.layers = nn.ModuleList([
            Stage(dims[i], dims[i + 1] if i + 1 < self.num_stages else None, config.depths[i],
                  config.num_heads[i], config.init_values[i], config.heads_ranges[i],
                  config.mlp_ratios[i], config.chunkwise_recurrents[i], config.layerscales[i],
                  config.layer_init_values)
            for i in range(self.num_stages)
        ])
        if config.extra_norms:
            self.extra_norms = nn.ModuleList([nn.LayerNorm(d) for d in dims])
        if not features_only:
            self.proj = nn.Linear(dims[-1], config.projection)
            self.norm = nn.BatchNorm2d(config.projection)
            self.head = nn.Linear(config.projection, config.num_classes) if config.num_classes else nn.Identity()
            if config.token_label:
                self.aux_head = nn.Linear(dims[-1], config.num_classes)
        self.stage_channels = list(dims)
        self.stage_strides = [4 * 2 ** i for i in range(self.num_stages)]
        self.output_names = [f"stage{i + 1}" for i in range(self.num_stages)] if features_only else ["logits"]
        self.eval()

    @torch.no_grad()
    def fuse(self) -> "RMT":
        """Rewrite into the inference form in place (after loading weights). Idempotent."""
        if self.fused:
            return self
        self.patch_embed.fuse()
        for stage in self.layers:
            for block in stage.blocks:
                block.fuse()
            if stage.downsample is not None:
                stage.downsample.fuse()
        if not self.features_only:
            weight, bias = fold_batchnorm(self.proj.weight, self.proj.bias, self.norm)
            self.proj.weight = nn.Parameter(weight.detach())
            self.proj.bias = nn.Parameter(bias.detach())
            self.norm = nn.Identity()
        self.fused = True
        return self.eval()

    def to_export_layout(self, attention_op: bool = False) -> "RMT":
        """Fold the rotary pair layout into the q/k weights for graph export (in place; fuses first).

        Same outputs; the graph then rotates with one Gather over half-heads instead of a gather
        of single channels. Eager inference is faster in the released layout (a complex multiply).
        ``attention_op``: attention through the ``rmt_deploy::heads_attention`` op (ONNX ``Attention``
        nodes; opset 23+ only; inference only, the op has no autograd formula)."""
        self.fuse()
        for stage in self.layers:
            stage.Relpos.export_layout = True
            stage.Relpos._cache.clear()
            for block in stage.blocks:
                block.retention.to_export_layout()
                block.retention.attention_op = attention_op
        return self

    def _stage_outputs(self, x: torch.Tensor, keep: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if not self.fused:
            raise RuntimeError("RMT runs in its fused inference form: call model.fuse() after loading weights")
        x = self.patch_embed(x)
        outs = []
        for i, stage in enumerate(self.layers):
            x = stage(x)
            if keep:
                out = self.extra_norms[i](x) if hasattr(self, "extra_norms") else x
                outs.append(out.permute(0, 3, 1, 2))
            if stage.downsample is not None:
                x = stage.downsample(x)
        return x, outs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Final-stage tokens, channels-last (B, H/32, W/32, C4)."""
        return self._stage_outputs(x, keep=False)[0]

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Stage outputs before each downsample (extra-normed when present), NCHW, strides 4..32."""
        return self._stage_outputs(x, keep=True)[1]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Logits of final-stage tokens; ``pre_logits``: the pooled vector the classifier reads (timm's name)."""
        pooled = F.silu(_tokens_linear(self.proj, x)).mean(dim=(1, 2))   # BatchNorm is folded into proj
        return pooled if pre_logits else self._logits(x, pooled)

    def _logits(self, x: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        logits = self.head(pooled)
        if hasattr(self, "aux_head"):
            logits = logits + 0.5 * _tokens_linear(self.aux_head, x).amax(dim=(1, 2))
        return logits

    def with_embedding(self) -> "RMT":
        """Return the pooled pre-head vector as a second output ``embedding`` next to ``logits`` (one
        forward for both; every runner and the ONNX exporter follow ``output_names``). In place."""
        if self.features_only:
            raise ValueError("a features-only model has no head: its embedding is a pooled stage output")
        self.embedding_output = True
        self.output_names = ["logits", "embedding"]
        return self

    def with_stage_outputs(self) -> "RMT":
        """Both tasks from one forward: ``logits``, ``embedding`` and the four stage maps ``stage1..4``
        (NCHW, as ``forward_intermediates``), which a classifier computes anyway. In place."""
        self.with_embedding()
        self.stage_outputs = True
        self.output_names = ["logits", "embedding", *(f"stage{i + 1}" for i in range(self.num_stages))]
        return self

    @property
    def output_channels(self) -> list[int]:
        """Channels of each output, in ``output_names`` order."""
        channels = {"logits": self.config.num_classes, "embedding": self.config.projection,
                    **{f"stage{i + 1}": c for i, c in enumerate(self.stage_channels)}}
        return [channels[name] for name in self.output_names]

    def forward(self, x: torch.Tensor):
        if self.features_only:
            return self.forward_intermediates(x)
        x, maps = self._stage_outputs(x, keep=getattr(self, "stage_outputs", False))
        if getattr(self, "embedding_output", False):
            pooled = self.forward_head(x, pre_logits=True)
            return self._logits(x, pooled), pooled, *maps
        return self.forward_head(x)


# --------------------------------------------------------------------------------------------
# checkpoint filter
# --------------------------------------------------------------------------------------------

_FOREIGN_PREFIXES = ("module.", "backbone.", "model.", "_orig_mod.")
_HEAD_PREFIXES = ("proj.", "norm.", "head.", "aux_head.")


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], features_only: bool = False) -> dict[str, torch.Tensor]:
    """Map a released state dict (any of the wild formats, already unwrapped) onto `RMT` keys.

    Strips ``module.`` / ``backbone.`` / ``_orig_mod.`` prefixes, drops detector/segmentor parts
    (``neck.*``, ``*_head.*`` outside the backbone), and for a features-only model drops the
    classification head, as timm does for ``features_only``.
    """
    has_backbone = any(k.startswith("backbone.") for k in state_dict)
    out = {}
    for key, value in state_dict.items():
        if has_backbone and not key.startswith("backbone."):
            continue            # neck, rpn_head, decode_head, ... of a detector / segmentor
        for prefix in _FOREIGN_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        if features_only and key.startswith(_HEAD_PREFIXES):
            continue
        out[key] = value
    return out


# --------------------------------------------------------------------------------------------
# builders
# --------------------------------------------------------------------------------------------

def build_model(config: RMTConfig, features_only: bool = False) -> RMT:
    """An unfused model in the released layout, randomly initialised like the released code."""
    model = RMT(config, features_only=features_only)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
    return model


def _variant(name, dims, depths, heads, ranges, mlp, decomposed, layerscale) -> RMTConfig:
    n = len(dims)
    return RMTConfig(
        embed_dims=dims, depths=depths, num_heads=heads, init_values=(2,) * n, heads_ranges=ranges,
        mlp_ratios=mlp, chunkwise_recurrents=tuple(i in decomposed for i in range(n)),
        layerscales=tuple(i in layerscale for i in range(n)), name=name,
    )


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------

VARIANTS: dict[str, RMTConfig] = {
    "rmt_t": _variant("rmt_t", (64, 128, 256, 512), (2, 2, 8, 2), (4, 4, 8, 16), (4, 4, 6, 6), (3, 3, 3, 3), {0, 1}, set()),
    "rmt_s": _variant("rmt_s", (64, 128, 256, 512), (3, 4, 18, 4), (4, 4, 8, 16), (4, 4, 6, 6), (4, 4, 3, 3), {0, 1, 2}, set()),
    "rmt_b": _variant("rmt_b", (80, 160, 320, 512), (4, 8, 25, 8), (5, 5, 10, 16), (5, 5, 6, 6), (4, 4, 3, 3), {0, 1, 2}, {2, 3}),
    "rmt_l": _variant("rmt_l", (112, 224, 448, 640), (4, 8, 25, 8), (7, 7, 14, 20), (6, 6, 6, 6), (4, 4, 3, 3), {0, 1, 2}, {2, 3}),
}

# Builder names of the released code (found in checkpoints' `args.model` / `arch`).
RELEASED_NAMES = {"RMT_T3": "rmt_t", "RMT_S": "rmt_s", "RMT_M2": "rmt_b", "RMT_L6": "rmt_l"}
