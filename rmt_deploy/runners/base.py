"""The one small interface every backend implements (Polygraphy's runner idea).

The parity gate, the server and the benchmarks only ever talk to a `Runner`: ``load()`` does the
heavy work once, ``infer(feed)`` maps input names to arrays and returns output names to arrays,
``metadata()`` describes the tensors. Nothing outside a runner knows which backend it is.
"""
from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from ..artifact import ArtifactDescription

INPUT_NAME = "images"


class RunnerUnavailable(RuntimeError):
    """The backend cannot run here (library or device missing); the message says why."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple            # ints, or strings naming dynamic axes ("batch", "height", ...)
    dtype: str              # numpy dtype name: "float32", "float16"


@dataclass(frozen=True)
class RunnerMetadata:
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    extra: dict = field(default_factory=dict)
    # what the artifact is (model, task, sizes, classes, outputs, precision); None for a file with no rmt.* keys
    artifact: ArtifactDescription | None = None

    def fixed_input_dims(self) -> tuple[int | None, int | None, int | None]:
        """(batch, height, width) of the image input; None where the artifact takes any size."""
        batch, _, height, width = (d if isinstance(d, int) else None for d in self.inputs[0].shape)
        return batch, height, width


@dataclass
class Timing:
    """Split of the last ``infer`` call, in milliseconds (device runners fill all three)."""

    h2d_ms: float = 0.0
    compute_ms: float = 0.0
    d2h_ms: float = 0.0


class Runner(abc.ABC):
    backend: str = "?"
    precision: str = "fp32"
    device: str = "cpu"
    # untimed calls a runner needs before its timings are steady (e.g. CUDA graph recording)
    warmup_calls: int = 0

    def __init__(self) -> None:
        self.loaded = False
        self.last_timing: Timing | None = None

    @property
    def name(self) -> str:
        return f"{self.backend}-{self.precision}-{self.device}"

    def load(self) -> "Runner":
        if not self.loaded:
            self._load()
            self.loaded = True
        return self

    @abc.abstractmethod
    def _load(self) -> None: ...

    @abc.abstractmethod
    def metadata(self) -> RunnerMetadata: ...

    @abc.abstractmethod
    def _infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once. Inputs are cast to the runner's input dtype; outputs come back as numpy."""
        if not self.loaded:
            raise RuntimeError(f"{self.name}: call load() before infer()")
        specs = {t.name: t for t in self.metadata().inputs}
        missing = set(specs) - set(feed)
        if missing:
            raise KeyError(f"{self.name}: missing inputs {sorted(missing)}; expects {sorted(specs)}")
        feed = {k: np.ascontiguousarray(v, dtype=specs[k].dtype) for k, v in feed.items() if k in specs}
        return self._infer(feed)

    def close(self) -> None:
        self.loaded = False

    def __enter__(self) -> "Runner":
        return self.load()

    def __exit__(self, *exc) -> None:
        self.close()


def infer_padded(runner: Runner, images: np.ndarray, batch: int) -> dict[str, np.ndarray]:
    """Outputs for ``images`` from a runner fed exactly ``batch`` rows (what a static-batch artifact
    takes): zero rows are appended and their outputs dropped."""
    n = len(images)
    if n == batch:
        return runner.infer({INPUT_NAME: images})
    padding = np.zeros((batch - n, *images.shape[1:]), images.dtype)
    outputs = runner.infer({INPUT_NAME: np.concatenate([images, padding])})
    return {name: value[:n] for name, value in outputs.items()}

