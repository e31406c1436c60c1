"""Loading released RMT checkpoints: weights-only, every wild format, strict with readable errors."""
from __future__ import annotations

import argparse
import hashlib
import logging
import pickle
import re
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .model import RELEASED_NAMES, VARIANTS, RMTConfig, checkpoint_filter_fn

log = logging.getLogger(__name__)

WEIGHT_CHOICES = ("auto", "ema", "model")
# Harmless classes found inside released checkpoints besides tensors and containers.
_SAFE_GLOBALS = [argparse.Namespace]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message says what to change."""


@dataclass(frozen=True)
class Checkpoint:
    path: str
    sha256: str
    format: str                       # "deit", "timm", "mmdet", "state_dict"
    weights: str                      # "ema" or "model"
    state_dict: dict[str, torch.Tensor]
    arch: str | None                  # variant named inside the file (args.model / arch), if any

    def manifest(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, "weights": self.weights, "format": self.format}


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_checkpoint(path: str | Path, weights: str = "auto") -> Checkpoint:
    """Unpickle weights-only and unwrap the state dict; ``weights`` picks EMA or raw weights."""
    if weights not in WEIGHT_CHOICES:
        raise CheckpointError(f"weights must be one of {WEIGHT_CHOICES}, got {weights!r}")
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        what = f"the class {found.group(1)}" if found else "objects"
        raise CheckpointError(
            f"refusing to load {path}: it contains {what} that weights-only loading does not allow "
            "(unpickling it could execute code). Re-save the state dict alone: "
            "torch.save(model.state_dict(), 'weights.pth')") from exc
    except Exception as exc:  # truncated or foreign files fail deep inside the unpickler in many ways
        raise CheckpointError(f"cannot read {path} as a PyTorch checkpoint: {type(exc).__name__}: {exc}") from exc
    fmt, state_dict, used, arch = _unwrap(obj, weights, path)
    return Checkpoint(str(path), sha256_file(path), fmt, used, state_dict, arch)


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _arch_hint(obj: dict) -> str | None:
    names = [obj.get("arch"), getattr(obj.get("args"), "model", None), getattr(obj.get("args"), "arch", None)]
    for name in names:
        if isinstance(name, str):
            if name in RELEASED_NAMES:
                return RELEASED_NAMES[name]
            if name.lower() in VARIANTS:
                return name.lower()
    return None


def _unwrap(obj, weights: str, path: Path):
    if _is_state_dict(obj):
        if weights == "ema":
            raise CheckpointError(f"{path} is a plain state dict: it holds no separate EMA weights")
        return "state_dict", obj, "model", None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict or checkpoint dict")
    arch = _arch_hint(obj)
    for fmt, raw_key, ema_key in (("deit", "model", "model_ema"), ("timm", "state_dict", "state_dict_ema")):
        if raw_key in obj or ema_key in obj:
            if fmt == "timm" and "meta" in obj and any(k.startswith("backbone.") for k in obj.get(raw_key, {})):
                fmt = "mmdet"
            has_ema = _is_state_dict(obj.get(ema_key))
            if weights == "ema" and not has_ema:
                raise CheckpointError(f"{path} has no EMA weights ('{ema_key}'); use weights='model'")
            if weights == "auto":
                # The published RMT-S/B/L accuracies are EMA weights, RMT-T's the raw ones.
                use_ema = has_ema and arch != "rmt_t"
            else:
                use_ema = weights == "ema"
            key = ema_key if use_ema else raw_key
            if not _is_state_dict(obj.get(key)):
                raise CheckpointError(f"{path}: '{key}' is not a state dict")
            return fmt, obj[key], "ema" if use_ema else "model", arch
    raise CheckpointError(
        f"{path} is not a known checkpoint format: top-level keys {sorted(map(str, obj))[:12]}; expected "
        "'model'/'model_ema' (released classification), 'state_dict' (token-label, mmdet/mmseg) "
        "or a plain state dict")


# ---- architecture inference -----------------------------------------------------------------

def _stage_count(sd) -> int:
    return len({int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k))})


def infer_config(state_dict: dict[str, torch.Tensor], arch: str | None = None) -> RMTConfig:
    """The architecture a (filtered) state dict describes, matched to a named variant when one fits.

    Which stages use decomposed attention leaves no trace in tensor shapes, so a checkpoint that
    matches no released variant needs the configuration given explicitly.
    """
    sd = state_dict
    n = _stage_count(sd)
    if n == 0 or "layers.0.blocks.0.pos.conv.weight" not in sd:
        raise CheckpointError("the checkpoint has no RMT backbone keys (layers.N.blocks.M...)")
    try:
        return _infer_config(sd, n, arch)
    except KeyError as exc:
        raise CheckpointError(f"cannot infer the architecture: the checkpoint lacks {exc}") from None


def _infer_config(sd: dict[str, torch.Tensor], n: int, arch: str | None) -> RMTConfig:
    dims, depths, heads, inits, ranges, mlps, scales = [], [], [], [], [], [], []
    for i in range(n):
        dim = sd[f"layers.{i}.blocks.0.pos.conv.weight"].shape[0]
        decay = sd[f"layers.{i}.Relpos.decay"].double()
        nh = decay.numel()
        a = -torch.log2(1 - decay.exp())      # a_h = init + range * h / n
        dims.append(dim)
        depths.append(len({int(m.group(1)) for k in sd if (m := re.match(rf"layers\.{i}\.blocks\.(\d+)\.", k))}))
        heads.append(nh)
        inits.append(round(float(a[0]), 4))
        ranges.append(round(float(a[1] - a[0]) * nh, 4) if nh > 1 else 0.0)
        mlps.append(sd[f"layers.{i}.blocks.0.ffn.fc1.weight"].shape[0] / dim)
        scales.append(f"layers.{i}.blocks.0.gamma_1" in sd)
    shape_key = (tuple(dims), tuple(depths), tuple(heads), tuple(mlps), tuple(scales))
    candidates = [v for v in VARIANTS.values()
                  if (v.embed_dims, v.depths, v.num_heads, v.mlp_ratios, v.layerscales) == shape_key]
    if arch in VARIANTS and VARIANTS[arch] in candidates:
        base = VARIANTS[arch]
    elif candidates:
        base = candidates[0]
    else:
        raise CheckpointError(
            f"the checkpoint matches no released variant (embed dims {dims}, depths {depths}, heads {heads}, "
            f"mlp ratios {mlps}, layer scale {scales}); pass the configuration as a dict "
            "(which stages are decomposed cannot be read from tensor shapes)")
    extra = {}
    if "head.weight" in sd:
        extra["num_classes"] = sd["head.weight"].shape[0]
    if "proj.weight" in sd:
        extra["projection"] = sd["proj.weight"].shape[0]
    return replace(base, **extra, extra_norms=any(k.startswith("extra_norms.") for k in sd),
                        token_label="aux_head.weight" in sd)


def looks_like(state_dict: dict[str, torch.Tensor]) -> str:
    try:
        cfg = infer_config(state_dict)
    except CheckpointError as exc:
        return str(exc).split(";")[0].replace("the checkpoint matches ", "")
    return cfg.name


# ---- strict loading -------------------------------------------------------------------------

def _span(idx: list[int]) -> str:
    if len(idx) == 1:
        return str(idx[0])
    return f"{idx[0]}..{idx[-1]}" if idx == list(range(idx[0], idx[-1] + 1)) else ",".join(map(str, idx))


def group_keys(keys, limit: int = 12) -> str:
    """``layers.2.blocks.2..7.* (19 keys each)``-style summary of many keys."""
    by_suffix: dict[tuple[str, str], list[int]] = defaultdict(list)
    plain = []
    for key in keys:
        m = re.match(r"(.*\.blocks\.)(\d+)\.(.*)", key)
        if m:
            by_suffix[(m.group(1), m.group(3))].append(int(m.group(2)))
        else:
            plain.append(key)
    by_blocks: dict[tuple[str, tuple[int, ...]], list[str]] = defaultdict(list)
    for (prefix, suffix), idx in by_suffix.items():
        by_blocks[(prefix, tuple(sorted(idx)))].append(suffix)
    lines = sorted(plain)
    for (prefix, idx), suffixes in sorted(by_blocks.items()):
        span = _span(list(idx))
        if len(suffixes) > 3:
            lines.append(f"{prefix}{span}.* ({len(suffixes)} keys each)")
        else:
            lines += [f"{prefix}{span}.{suffix}" for suffix in sorted(suffixes)]
    more = f"\n    ... and {len(lines) - limit} more groups" if len(lines) > limit else ""
    return "\n".join(f"    {line}" for line in lines[:limit]) + more


def _relpos_check(model_sd, sd) -> list[str]:
    """Stored angle/decay must match the configuration; a uniformly rescaled decay is accepted
    (fine-tuning at another resolution uses gamma' = gamma ** (res_orig / res_new))."""
    problems = []
    for key in sorted(k for k in sd if ".Relpos." in k and k in model_sd):
        want, got = model_sd[key].double(), sd[key].double()
        if want.shape != got.shape or torch.allclose(want, got, rtol=1e-5, atol=1e-7):
            continue
        if key.endswith("decay"):
            ratio = got / want
            if torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-4):
                log.info("%s: decay rescaled by %.4f (fine-tuned at another resolution); using the stored values",
                         key, float(ratio[0]))
                continue
        problems.append(f"    {key}: stored {got.float().tolist()[:6]} vs configured {want.float().tolist()[:6]}")
    return problems


def load_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load or raise one error listing missing, unexpected and wrongly-shaped keys, grouped."""
    model_sd = model.state_dict()
    sd = checkpoint_filter_fn(state_dict, features_only=getattr(model, "features_only", False))
    # A BatchNorm step counter: unused at inference, stored as () or (1,) depending on the saver.
    sd = {k: v.reshape(model_sd[k].shape) if k.endswith("num_batches_tracked") and k in model_sd else v
          for k, v in sd.items() if not k.endswith("num_batches_tracked") or k in model_sd}
    missing = [k for k in model_sd if k not in sd]
    unexpected = [k for k in sd if k not in model_sd]
    wrong = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(model_sd[k].shape)}"
             for k in sd if k in model_sd and sd[k].shape != model_sd[k].shape]
    relpos = _relpos_check(model_sd, sd)
    if missing or unexpected or wrong or relpos:
        name = getattr(getattr(model, "config", None), "name", type(model).__name__)
        parts = [f"{source} does not fit the {name} model (the checkpoint looks like: {looks_like(sd)})"]
        if missing:
            parts.append(f"  missing keys ({len(missing)}):\n{group_keys(missing)}")
        if unexpected:
            parts.append(f"  unexpected keys ({len(unexpected)}):\n{group_keys(unexpected)}")
        if wrong:
            parts.append(f"  wrong shapes ({len(wrong)}):\n" + "\n".join(f"    {w}" for w in wrong[:12]))
        if relpos:
            parts.append("  Relpos buffers differ from the configuration (wrong variant?):\n" + "\n".join(relpos))
        if any(k.startswith("head.") for k in missing) and not any(k.startswith("head.") for k in sd):
            parts.append("  hint: this is a backbone-only checkpoint; use features_only=True (--task features)")
        raise CheckpointError("\n".join(parts))
    model.load_state_dict(sd, strict=True)


__all__ = ["Checkpoint", "CheckpointError", "read_checkpoint", "infer_config", "load_strict",
           "group_keys", "sha256_file", "WEIGHT_CHOICES"]
