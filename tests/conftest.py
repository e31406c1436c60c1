"""Shared fixtures: a tiny RMT configuration (the conformance one) and checkpoints made from it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rmt_deploy.exporters.onnx_export import ATTENTION_OPSET, PORTABLE_OPSET, export_onnx

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CONFORMANCE = SHARED / "conformance"

# Same architecture as ../shared/conformance/tiny_config.json (kept here so tests run without it).
TINY_CONFIG = {
    "embed_dims": [32, 64, 128, 256], "depths": [1, 2, 2, 1], "num_heads": [2, 2, 4, 8],
    "init_values": [2, 2, 2, 2], "heads_ranges": [4, 4, 6, 6], "mlp_ratios": [3, 3, 3, 3],
    "chunkwise_recurrents": [True, True, False, False], "layerscales": [False, False, True, True],
    "layer_init_values": 1e-6, "projection": 256, "num_classes": 10,
}


@pytest.fixture(scope="session")
def tiny_config() -> dict:
    return json.loads(json.dumps(TINY_CONFIG))


def random_released_state_dict(config: dict, seed: int = 0, **overrides) -> dict[str, torch.Tensor]:
    """Well-scaled random weights in the released key layout (BatchNorm stats non-trivial)."""
    from rmt_deploy.model import RMTConfig, build_model
    torch.manual_seed(seed)
    model = build_model(RMTConfig.from_dict({**config, **overrides}))
    sd = model.state_dict()
    g = torch.Generator().manual_seed(seed)
    for key, value in sd.items():
        if key.endswith("running_mean"):
            sd[key] = torch.randn(value.shape, generator=g) * 0.1
        elif key.endswith("running_var"):
            sd[key] = torch.rand(value.shape, generator=g) + 0.5
        elif key.endswith(("gamma_1", "gamma_2")):
            sd[key] = torch.rand(value.shape, generator=g) * 0.5 + 0.1
        elif value.is_floating_point() and ".Relpos." not in key and not key.endswith("num_batches_tracked"):
            sd[key] = value + torch.randn(value.shape, generator=g) * 0.02
    return sd


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_config) -> Path:
    """A deit-style classification checkpoint of the tiny config (10 classes)."""
    import argparse
    path = tmp_path_factory.mktemp("ckpt") / "tiny_cls.pth"
    sd = random_released_state_dict(tiny_config)
    torch.save({"model": sd, "model_ema": sd, "epoch": 3, "args": argparse.Namespace(model="custom")}, path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint, tiny_config):
    from rmt_deploy import create_model
    return create_model(tiny_config, checkpoint=str(tiny_checkpoint))


@pytest.fixture(scope="module", params=[ATTENTION_OPSET, PORTABLE_OPSET], ids=["attention-op", "portable"])
def tiny_static(request, tmp_path_factory, tiny_model):
    """Both graph forms: ONNX Attention nodes (the default) and explicit MatMul/Softmax (TensorRT)."""
    path = export_onnx(tiny_model, tmp_path_factory.mktemp("onnx") / "tiny.onnx", height=64, width=96,
                       opset=request.param)
    return tiny_model, path


@pytest.fixture(scope="module")
def model_files(tmp_path_factory, tiny_config, tiny_checkpoint) -> dict:
    """rmt-serve's ``--model`` (the tiny config as a file) and ``--checkpoint`` settings."""
    config = tmp_path_factory.mktemp("serve") / "tiny_config.json"
    config.write_text(json.dumps(tiny_config))
    return {"model": str(config), "checkpoint": str(tiny_checkpoint)}


@pytest.fixture(scope="module")
def eager(tiny_model):
    """The reference for served answers: the tiny model's logits of a batch."""
    def run(images):
        with torch.inference_mode():
            return tiny_model(torch.from_numpy(images)).numpy()
    return run
