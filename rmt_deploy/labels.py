"""Class names (ImageNet-1k for 1000-class models, indices otherwise) and the top-k ranking every tool reports."""
from __future__ import annotations

from functools import lru_cache
from importlib import resources

import numpy as np


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple[str, ...]:
    text = resources.files("rmt_deploy").joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    return tuple(line for line in text.splitlines() if line)


def class_labels(num_classes: int) -> list[str]:
    if num_classes == 1000:
        return list(imagenet_classes())
    return [str(i) for i in range(num_classes)]


def top_k_scores(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and softmax scores of the k best classes per row (B, C), ties kept in index order: the one
    ranking of the server's /classify and rmt-predict."""
    z = logits.astype(np.float64)
    probs = np.exp(z - z.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(probs, order, axis=1)
