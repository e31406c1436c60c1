"""Helpers shared by the model, checkpoint and flop-count tests."""
from __future__ import annotations

import numpy as np

from rmt_deploy import VARIANTS


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    return float(np.abs(got - want).max() / np.abs(want).max())


def variant_dict(name: str, **changes) -> dict:
    cfg = VARIANTS[name]
    return {k: list(getattr(cfg, k)) for k in ("embed_dims", "depths", "num_heads", "init_values", "heads_ranges",
                                                "mlp_ratios", "chunkwise_recurrents", "layerscales")} | changes
