"""Class names: ImageNet-1k for 1000-class models, indices otherwise."""
from __future__ import annotations

from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple[str, ...]:
    text = resources.files("rmt_deploy").joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    return tuple(line for line in text.splitlines() if line)


def class_labels(num_classes: int) -> list[str]:
    if num_classes == 1000:
        return list(imagenet_classes())
    return [str(i) for i in range(num_classes)]
