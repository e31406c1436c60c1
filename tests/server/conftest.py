"""Fixtures of the server tests that start servers in-process (`test_server.live_server`)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def model_files(tmp_path_factory, tiny_config, tiny_checkpoint) -> dict:
    """``--model`` (the tiny config as a file) and ``--checkpoint`` settings."""
    config = tmp_path_factory.mktemp("serve") / "tiny_config.json"
    config.write_text(json.dumps(tiny_config))
    return {"model": str(config), "checkpoint": str(tiny_checkpoint)}


@pytest.fixture(scope="module")
def eager(tiny_model):
    """The reference: the tiny model's logits of a batch."""
    def run(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return tiny_model(torch.from_numpy(images)).numpy()
    return run
