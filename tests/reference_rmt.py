"""A plain, obviously-correct RMT forward written straight from RMT_SPEC.md.

It reads a released-layout state dict and follows the spec line by line (unfused projections,
explicit rotate-every-two, explicit Manhattan distances, BatchNorm as BatchNorm), so the fast
fused model can be proven equal to it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _bn(x, sd, p):
    return F.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"],
                        False, 0.0, 1e-5)


def _conv(x, sd, p, stride=1, groups=1):
    w = sd[p + ".weight"]
    return F.conv2d(x, w, sd[p + ".bias"], stride, w.shape[-1] // 2, 1, groups)


def _dw(x_nhwc, sd, p):
    return _conv(x_nhwc.permute(0, 3, 1, 2), sd, p, groups=x_nhwc.shape[-1]).permute(0, 2, 3, 1)


def _lin(x, sd, p):
    return F.linear(x, sd[p + ".weight"], sd[p + ".bias"])


def _rot(x):
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack([-x2, x1], dim=-1).flatten(-2)


def _masa(x, sd, p, heads, decay, angle, decomposed):
    b, h, w, c = x.shape
    d = c // heads
    q, k, v = _lin(x, sd, p + ".q_proj"), _lin(x, sd, p + ".k_proj") * d ** -0.5, _lin(x, sd, p + ".v_proj")
    lepe = _dw(v, sd, p + ".lepe.conv")
    pos = torch.arange(h * w, dtype=torch.float32)
    sin = torch.sin(pos[:, None] * angle[None, :]).reshape(h, w, d)
    cos = torch.cos(pos[:, None] * angle[None, :]).reshape(h, w, d)
    q = q.reshape(b, h, w, heads, d).permute(0, 3, 1, 2, 4)
    k = k.reshape(b, h, w, heads, d).permute(0, 3, 1, 2, 4)
    v = v.reshape(b, h, w, heads, d).permute(0, 3, 1, 2, 4)
    q, k = q * cos + _rot(q) * sin, k * cos + _rot(k) * sin
    ih, iw = torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32)
    if decomposed:
        bias_w = (iw[:, None] - iw[None, :]).abs() * decay[:, None, None, None]        # (n, 1, W, W)
        attn = torch.softmax(q @ k.transpose(-1, -2) + bias_w, -1)
        v = attn @ v                                                                   # along W
        qt, kt, vt = q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3)
        bias_h = (ih[:, None] - ih[None, :]).abs() * decay[:, None, None, None]
        out = (torch.softmax(qt @ kt.transpose(-1, -2) + bias_h, -1) @ vt).transpose(2, 3)  # along H
    else:
        gh, gw = torch.meshgrid(ih, iw, indexing="ij")
        grid = torch.stack([gh.flatten(), gw.flatten()], -1)
        dist = (grid[:, None, :] - grid[None, :, :]).abs().sum(-1)
        bias = dist * decay[:, None, None]
        qf, kf, vf = q.flatten(2, 3), k.flatten(2, 3), v.flatten(2, 3)
        out = (torch.softmax(qf @ kf.transpose(-1, -2) + bias, -1) @ vf).reshape(b, heads, h, w, d)
    out = out.permute(0, 2, 3, 1, 4).reshape(b, h, w, c) + lepe
    return _lin(out, sd, p + ".out_proj")


def reference_forward(sd: dict, cfg: dict, x: torch.Tensor, features: bool = False):
    """Logits (classification state dicts) or the four stage outputs (features=True)."""
    x = F.gelu(_bn(_conv(x, sd, "patch_embed.proj.0", 2), sd, "patch_embed.proj.1"))
    x = F.gelu(_bn(_conv(x, sd, "patch_embed.proj.3"), sd, "patch_embed.proj.4"))
    x = F.gelu(_bn(_conv(x, sd, "patch_embed.proj.6", 2), sd, "patch_embed.proj.7"))
    x = _bn(_conv(x, sd, "patch_embed.proj.9"), sd, "patch_embed.proj.10").permute(0, 2, 3, 1)
    outs = []
    for i, depth in enumerate(cfg["depths"]):
        decay, angle = sd[f"layers.{i}.Relpos.decay"], sd[f"layers.{i}.Relpos.angle"]
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}"
            c = x.shape[-1]
            x = x + _dw(x, sd, p + ".pos.conv")
            g1 = sd.get(p + ".gamma_1", 1.0)
            g2 = sd.get(p + ".gamma_2", 1.0)
            y = F.layer_norm(x, (c,), sd[p + ".retention_layer_norm.weight"], sd[p + ".retention_layer_norm.bias"], 1e-6)
            x = x + g1 * _masa(y, sd, p + ".retention", cfg["num_heads"][i], decay, angle, cfg["chunkwise_recurrents"][i])
            y = F.layer_norm(x, (c,), sd[p + ".final_layer_norm.weight"], sd[p + ".final_layer_norm.bias"], 1e-6)
            y = F.gelu(_lin(y, sd, p + ".ffn.fc1"))
            y = y + _dw(y, sd, p + ".ffn.dwconv.conv")
            x = x + g2 * _lin(y, sd, p + ".ffn.fc2")
        if features:
            o = x
            if f"extra_norms.{i}.weight" in sd:
                o = F.layer_norm(o, (o.shape[-1],), sd[f"extra_norms.{i}.weight"], sd[f"extra_norms.{i}.bias"], 1e-5)
            outs.append(o.permute(0, 3, 1, 2))
        if f"layers.{i}.downsample.reduction.weight" in sd:
            x = _conv(x.permute(0, 3, 1, 2), sd, f"layers.{i}.downsample.reduction", 2)
            x = _bn(x, sd, f"layers.{i}.downsample.norm").permute(0, 2, 3, 1)
    if features:
        return outs
    z = _lin(x, sd, "proj")
    z = _bn(z.permute(0, 3, 1, 2), sd, "norm").flatten(2)
    z = z * torch.sigmoid(z)
    logits = _lin(z.mean(-1), sd, "head")
    if "aux_head.weight" in sd:
        logits = logits + 0.5 * _lin(x, sd, "aux_head").flatten(1, 2).max(1).values
    return logits
