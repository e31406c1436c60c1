"""One description of a deployable artifact (Optimum's OnnxConfig idea): what model it holds, which
task, input size and batch range, which outputs (names, strides, dtypes), which precision and which
weights. The exporter writes it once (ONNX ``metadata_props``, TensorRT engine sidecar, export
manifest); every runner's ``metadata()`` returns it; the server and the benchmarks read it. This
module is the only one that knows the ``rmt.*`` key spellings.
"""
from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
TASKS = ("classify", "features", "all")     # all: logits, embedding and the stage maps of one forward
DYNAMIC = "dynamic"
_PREFIX = "rmt."


@dataclass(frozen=True)
class Range:
    """MIN:OPT:MAX of an axis (a static axis has min == opt == max)."""

    min: int
    opt: int
    max: int

    @classmethod
    def parse(cls, text: str) -> "Range":
        try:
            lo, opt, hi = (int(v) for v in text.split(":"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected MIN:OPT:MAX, got {text!r}") from None
        if not 0 < lo <= opt <= hi:
            raise argparse.ArgumentTypeError(f"need 0 < MIN <= OPT <= MAX, got {text!r}")
        return cls(lo, opt, hi)

    @classmethod
    def fixed(cls, value: int) -> "Range":
        return cls(value, value, value)

    @property
    def dynamic(self) -> bool:
        return self.min != self.max


@dataclass(frozen=True)
class ArtifactDescription:
    """What an artifact is. ``height``/``width`` None: any size (dynamic axes); ``batch`` None: unknown
    (a file written before the batch range was recorded). ``output_dtypes`` are what a runner's
    ``infer`` returns, not the file's internal tensor types."""

    model: str
    task: str = "classify"
    height: int | None = None
    width: int | None = None
    batch: Range | None = None
    num_classes: int = 0
    output_names: tuple[str, ...] = ("logits",)
    output_strides: tuple[int, ...] = ()         # of the stage-map outputs, in order
    output_dtypes: tuple[str, ...] = ("float32",)
    precision: str = "fp32"
    checkpoint_sha256: str | None = None
    extra: Mapping[str, str] = field(default_factory=dict, compare=False)

    @classmethod
    def from_model(cls, model, *, precision: str = "fp32", height: int | None = None, width: int | None = None,
                   batch: Range | None = None) -> "ArtifactDescription":
        """The description of ``model`` (an `RMT`) served or exported at these sizes."""
        features, stages = bool(model.features_only), getattr(model, "stage_outputs", False)
        names = tuple(model.output_names)
        task = "features" if features else "all" if stages else "classify"
        return cls(model=model.config.name, task=task, height=height, width=width,
                   batch=batch, num_classes=0 if features else model.config.num_classes, output_names=names,
                   output_strides=tuple(model.stage_strides) if features or stages else (),
                   output_dtypes=("float32",) * len(names), precision=precision,
                   checkpoint_sha256=(getattr(model, "checkpoint", None) or {}).get("sha256"))

    def with_precision(self, precision: str) -> "ArtifactDescription":
        return replace(self, precision=precision)

    # -- the rmt.* key/value form (ONNX metadata_props, engine sidecar) --------------------------------
    def to_metadata(self) -> dict[str, str]:
        values = {"model": self.model, "task": self.task, "height": _size(self.height), "width": _size(self.width),
                  "num_classes": str(self.num_classes), "precision": self.precision,
                  "outputs": ",".join(self.output_names), "output_dtypes": ",".join(self.output_dtypes)}
        if self.output_strides:
            values["strides"] = ",".join(map(str, self.output_strides))
        if self.batch is not None:
            values["batch"] = f"{self.batch.min}:{self.batch.opt}:{self.batch.max}"
        if self.checkpoint_sha256:
            values["checkpoint_sha256"] = self.checkpoint_sha256
        return {_PREFIX + key: value for key, value in values.items()}

    @classmethod
    def from_metadata(cls, values: Mapping) -> "ArtifactDescription | None":
        """Read the ``rmt.*`` keys (files of every rmt-export version so far); None when there are none.
        Keys missing from older files take what the task implies."""
        own = {k[len(_PREFIX):]: str(v) for k, v in values.items() if str(k).startswith(_PREFIX)}
        if "model" not in own:
            return None
        task = own.get("task", "classify")
        names = tuple(own["outputs"].split(",")) if own.get("outputs") else (
            ("logits",) if task == "classify" else tuple(f"stage{i + 1}" for i in range(4)))
        strides = tuple(int(s) for s in own["strides"].split(",")) if own.get("strides") else (
            tuple(4 * 2 ** i for i in range(len(names))) if task == "features" else ())
        dtypes = tuple(own["output_dtypes"].split(",")) if own.get("output_dtypes") else ("float32",) * len(names)
        batch = Range(*(int(v) for v in own["batch"].split(":"))) if own.get("batch") else None
        rest = {k: v for k, v in values.items() if not str(k).startswith(_PREFIX)}
        return cls(model=own["model"], task=task, height=_parse_size(own.get("height")),
                   width=_parse_size(own.get("width")), batch=batch, num_classes=int(own.get("num_classes", 0)),
                   output_names=names, output_strides=strides, output_dtypes=dtypes,
                   precision=own.get("precision", "fp32"), checkpoint_sha256=own.get("checkpoint_sha256"),
                   extra=rest)

    # -- the manifest's JSON form ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("extra")
        data["batch"] = asdict(self.batch) if self.batch else None
        return data


@dataclass(frozen=True)
class ExportPlan:
    """What to export or build: sizes, batch range, precisions, artifact kinds ("onnx", "engine").
    ``opset`` None: the exporter's default for the kinds asked (portable for engines); ``portable``
    forces the portable opset (GPU runtimes). ``device``: where engines are built."""

    batch: Range = Range(1, 1, 1)
    height: int = 224
    width: int = 224
    dynamic_hw: Range | None = None
    precisions: tuple[str, ...] = ("fp32",)
    kinds: tuple[str, ...] = ("onnx",)
    opset: int | None = None
    portable: bool = False
    device: str = "cpu"
    workspace_gb: float = 4.0
    output_dir: Path = Path("exports")
    stem: str | None = None              # file name stem; default: the model (plus "_features")
    calib: Path | None = None            # INT8 calibration folder (real images; int8 is refused without it)
    backends: tuple[str, ...] = ()       # ONNX backends whose bf16/int8 artifacts to write (empty: all that run them)

    @property
    def precision(self) -> str:
        """The plan's one precision (`Backend.prepare` plans name exactly one)."""
        return self.precisions[0]

    def for_one(self, precision: str, **changes) -> "ExportPlan":
        return replace(self, precisions=(precision,), **changes)


def _size(value: int | None) -> str:
    return DYNAMIC if value is None else str(value)


def _parse_size(text: str | None) -> int | None:
    return None if text in (None, "", DYNAMIC) else int(text)


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    return precision


__all__ = ["ArtifactDescription", "DYNAMIC", "ExportPlan", "PRECISIONS", "Range", "TASKS", "check_precision"]
