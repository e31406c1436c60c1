"""`create_model`: a variant name, a config dict or JSON file or "auto", plus an optional released checkpoint."""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import torch

from .checkpoint import Checkpoint, CheckpointError, infer_config, load_strict, read_checkpoint
from .model import RMT, VARIANTS, RMTConfig, build_model, checkpoint_filter_fn

log = logging.getLogger(__name__)


def resolve_config(name_or_config, checkpoint: Checkpoint | None = None) -> RMTConfig:
    """Turn a variant name / dict / JSON config file / RMTConfig / "auto" into a config, adding what
    the checkpoint implies (class count, extra norms, token-label head). A file's config is named
    after the file (``my_rmt.json``: ``my_rmt``) unless it names itself, so every tool labels it alike."""
    if isinstance(name_or_config, (str, Path)) and name_or_config not in VARIANTS and name_or_config != "auto":
        path = Path(name_or_config)
        if path.is_file():
            try:
                loaded = json.loads(path.read_text())
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ValueError(f"config file {path} is not JSON: {exc}") from exc
            if not isinstance(loaded, dict):
                raise ValueError(f"config file {path} must hold a JSON object of RMTConfig fields")
            name_or_config = {"name": path.stem, **loaded}
        elif path.suffix == ".json":
            raise ValueError(f"config file {path} not found")
    if isinstance(name_or_config, RMTConfig):
        config = name_or_config
    elif isinstance(name_or_config, dict):
        config = RMTConfig.from_dict(dict(name_or_config))
    elif name_or_config == "auto":
        if checkpoint is None:
            raise ValueError("model 'auto' infers the variant from a checkpoint: give one")
        return infer_config(_backbone_keys(checkpoint), checkpoint.arch)
    elif name_or_config in VARIANTS:
        config = VARIANTS[name_or_config]
    else:
        raise ValueError(f"unknown RMT variant {name_or_config!r}; choose from {sorted(VARIANTS)}, 'auto', "
                         "a config dict or a JSON config file")
    if checkpoint is not None:
        sd = _backbone_keys(checkpoint)
        changes = {"extra_norms": any(k.startswith("extra_norms.") for k in sd),
                   "token_label": "aux_head.weight" in sd}
        if "head.weight" in sd:
            changes["num_classes"] = sd["head.weight"].shape[0]
        config = replace(config, **changes)
    return config


def _backbone_keys(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    return checkpoint_filter_fn(checkpoint.state_dict)


def create_model(name_or_config="rmt_t", *, checkpoint: str | None = None, features_only: bool = False,
                 num_classes: int | None = None, weights: str = "auto", fuse: bool = True,
                 device: str | torch.device | None = None) -> RMT:
    """Build an RMT model in eval mode, optionally loading a released checkpoint (any format).

    ``weights`` chooses EMA or raw weights ("auto": EMA when present, except RMT-T whose
    published accuracy is its raw weights). ``fuse=False`` keeps the released layout (loadable,
    not runnable); the default returns the fused inference model.
    """
    ckpt = read_checkpoint(checkpoint, weights) if checkpoint else None
    config = resolve_config(name_or_config, ckpt)
    if num_classes is not None:
        config = replace(config, num_classes=num_classes)
    if features_only:
        config = replace(config, token_label=False)
    model = build_model(config, features_only=features_only)
    if ckpt is not None:
        load_strict(model, ckpt.state_dict, source=f"checkpoint {ckpt.path} ({ckpt.format}, {ckpt.weights} weights)")
        model.checkpoint = ckpt.manifest()
    else:
        model.checkpoint = None
    if fuse:
        model.fuse()
    if device is not None:
        model.to(device)
    return model.eval()


__all__ = ["create_model", "resolve_config", "CheckpointError"]
