"""The backend registry (mmdeploy's backend managers): one `Backend` entry per backend, declared next
to its runner, saying what artifact it runs, which precisions on which device kind, why it cannot
run here, how to prepare its artifact and how to open a runner. Tools ask the registry; none of them
lists backend names. Adding a backend is one runner file with its entry, plus its module name in
`_RUNNER_MODULES`.
"""
from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..artifact import check_precision
from .base import Runner, RunnerUnavailable

ARTIFACT_KINDS = ("model", "onnx", "engine")
# how rmt-export's manifest (and its old --format) names the file of each artifact kind
ARTIFACT_FORMATS = {"onnx": "onnx", "engine": "tensorrt"}
# runner modules that declare entries, in the order tools list backends
_RUNNER_MODULES = ("eager", "onnxruntime", "openvino", "tensorrt")


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where unreadable."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_precision_reason(precision: str, flags: set[str] | None = None) -> str | None:
    """Why this CPU should not run ``precision`` (its instructions are missing), or None."""
    flags = cpu_flags() if flags is None else flags
    if precision == "bf16" and not flags & {"avx512_bf16", "amx_bf16"}:
        return "this CPU has no AVX512_BF16/AMX (bf16 would be emulated, slower than fp32)"
    if precision == "int8" and not flags & {"avx512_vnni", "avx_vnni", "amx_int8"}:
        return "this CPU has no VNNI/AMX int8 instructions (int8 would not be faster than fp32)"
    return None


def device_kind(device: str) -> str:
    """"cpu" or "cuda" (``cuda:1`` is a cuda device)."""
    kind = str(device).partition(":")[0]
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N")
    return kind


@dataclass(frozen=True)
class Backend:
    """One backend. ``precisions`` is data: device kind -> precisions it runs there (for file
    backends: the precisions of the files it runs, plus "bf16" where it computes an fp32 file in
    bfloat16). ``opener`` builds (does not load) a runner; ``reason`` says why the backend cannot run
    on a device here; ``preparer`` makes its float artifact; ``quantizer`` writes its INT8 file from
    the fp32 ONNX file: ``quantizer(fp32_onnx, out_path, images, calibration=) -> Path`` (``out_path``
    ends with ``int8_suffix``: a QDQ ``.onnx``, or ``.xml`` for an OpenVINO IR)."""

    name: str
    artifact: str                                   # "model" | "onnx" | "engine"
    precisions: Mapping[str, tuple[str, ...]]
    opener: Callable[..., Runner]
    reason: Callable[[str], str | None] = lambda device: None
    preparer: Callable | None = None
    platform: str = "custom"                        # KServe v2 / Triton platform name
    title: str = ""                                 # the library's own name, for messages
    packages: tuple[str, ...] = ()                  # pip distributions it runs on (versions in reports)
    options: tuple[str, ...] = ()                   # extra keyword options `open` passes on
    # options of a runner timed in turn with others in one process (rmt-bench --interleave), so that
    # it takes no CPU from them between its own calls
    shared_process_options: Mapping[str, object] = field(default_factory=dict)
    quantizer: Callable[..., Path] | None = None
    int8_suffix: str = ".onnx"                      # the INT8 file's suffix (an OpenVINO IR: ".xml")

    def __post_init__(self):
        if self.artifact not in ARTIFACT_KINDS:
            raise ValueError(f"{self.name}: artifact kind must be one of {ARTIFACT_KINDS}")
        if undeclared := set(self.shared_process_options) - set(self.options):
            raise ValueError(f"{self.name}: shared_process_options {sorted(undeclared)} are not among its options")

    def supports(self, device: str, precision: str = "fp32") -> bool:
        return precision in self.precisions.get(device_kind(device), ())

    def unavailable_reason(self, device: str = "cpu", precision: str = "fp32") -> str | None:
        """Why this backend cannot run ``precision`` on ``device`` here, or None (asked before any
        export or build)."""
        check_precision(precision)
        kind = device_kind(device)
        if kind not in self.precisions:     # the backend's own words first (what is missing, how to get it)
            return self.reason(device) or f"{self.name} does not run on {kind} devices"
        if not self.supports(device, precision):
            offered = ", ".join(f"{k}: {'/'.join(v)}" for k, v in self.precisions.items())
            return f"{self.name} does not run {precision} on {kind} (it runs {offered})"
        if kind == "cpu" and (why := cpu_precision_reason(precision)):
            return f"{self.name} {precision}: {why}"
        return self.reason(device)

    def prepare(self, model, plan, cache) -> Path | None:
        """The artifact ``open`` needs for ``model`` under ``plan`` (an `ExportPlan`-like object with
        ``device``, ``precision``, sizes, ``calib``), exported or built through ``cache`` (which provides
        ``onnx(model, plan)`` and ``engine(model, plan)``); None for backends that run the model.
        bf16 of a file backend is a runtime precision: the fp32 file. int8: the entry's quantizer over
        the fp32 ONNX file, calibrated on ``plan.calib`` (real images; refused without them)."""
        if self.preparer is None:
            return None
        if plan.precision == "int8" and getattr(plan, "calib", None) is None:     # before exporting anything
            raise RunnerUnavailable(f"{self.name} int8 needs --calib DIR (real images; never calibrated on noise)")
        if plan.precision == "bf16":
            return self.preparer(model, plan.for_one("fp32"), cache)
        if plan.precision != "int8" or self.artifact == "engine":   # engines: built from the QDQ file
            return self.preparer(model, plan, cache)
        return self.quantize(cache.onnx(model, plan.for_one("fp32")), plan.calib, plan.height)

    def quantize(self, fp32_onnx: Path, calib, image_size: int, *, reuse: bool = True) -> Path:
        """This backend's INT8 file of ``fp32_onnx`` next to it, calibrated on the images of ``calib``.
        Its name carries the calibration folder's name and a digest of its files; ``reuse`` keeps a file
        of that name already there (a cache whose fp32 file name changes with the model)."""
        if self.quantizer is None:
            raise RunnerUnavailable(f"{self.name} has no INT8 quantizer")
        if calib is None:
            raise RunnerUnavailable(f"{self.name} int8 needs --calib DIR (real images; never calibrated on noise)")
        from ..quantize import calibration_images, calibration_tag
        stem = fp32_onnx.stem.removesuffix("_fp32")
        tag = calibration_tag(calib)       # recorded in the file instead of the path (model metadata is public)
        out = fp32_onnx.with_name(f"{stem}_int8_{tag}{self.int8_suffix}")
        if reuse and out.is_file():     # the quantizers rename a finished file into place: never a partial one
            return out
        return self.quantizer(fp32_onnx, out, calibration_images(calib, image_size), calibration=tag)

    def open(self, *, model=None, artifact: str | os.PathLike | None = None, device: str | None = None,
             precision: str | None = None, threads: int | None = None, **options) -> Runner:
        """Build (not yet load) a runner on ``model`` or ``artifact``. ``device`` None: the CPU, or the first
        CUDA device for a backend without CPU support. ``precision`` None: fp32 for a model, the file's own
        for an artifact (given, a file of another precision is refused where it is known)."""
        if device is None:
            device = "cpu" if "cpu" in self.precisions else "cuda:0"
        if precision is None:
            precision = "fp32" if self.artifact == "model" else None
        else:
            check_precision(precision)
        if self.artifact == "model" and model is None:
            raise ValueError(f"backend {self.name!r} needs a model")
        if self.artifact != "model" and artifact is None:
            raise ValueError(f"backend {self.name!r} needs an {self.artifact.upper()} file")
        unknown = set(options) - set(self.options)
        if unknown:
            raise TypeError(f"backend {self.name!r} takes no option(s) {sorted(unknown)}")
        return self.opener(model=model, artifact=artifact, device=device, precision=precision, threads=threads,
                           **options)


_REGISTRY: dict[str, Backend] = {}
_LOADED: list[bool] = []


def register(backend: Backend) -> Backend:
    if backend.name in _REGISTRY and _REGISTRY[backend.name] is not backend:
        raise ValueError(f"backend {backend.name!r} is registered twice")
    _REGISTRY[backend.name] = backend
    return backend


def _load_entries() -> dict[str, Backend]:
    if not _LOADED:
        for module in _RUNNER_MODULES:      # each declares its entries on import (heavy libraries stay lazy)
            importlib.import_module(f"{__package__}.{module}")
        _LOADED.append(True)
    return {name: _REGISTRY[name] for name in sorted(_REGISTRY, key=_order)}


def _order(name: str) -> int:
    module = _REGISTRY[name].opener.__module__.rpartition(".")[2]
    return _RUNNER_MODULES.index(module) if module in _RUNNER_MODULES else len(_RUNNER_MODULES)


def backend_names() -> tuple[str, ...]:
    return tuple(_load_entries())


def get_backend(name: str) -> Backend:
    backends = _load_entries()
    if name not in backends:
        raise ValueError(f"unknown backend {name!r}; choose from {', '.join(backends)}")
    return backends[name]


class BackendRefused(RunnerUnavailable):
    """The registry's refusal of a backend / device / precision combination, before anything is built."""


def open_backend_runner(name: str, *, device: str, precision: str | None = None, threads: int | None = None,
                        make_model: Callable[[], object] | None = None, artifact: str | os.PathLike | None = None,
                        prepare: Callable[[Backend], Path] | None = None, given_in_own_precision: bool = True,
                        shared_process: bool = False, **model_options) -> tuple[Runner, Path | None]:
    """The one way the tools open a runner (built, not loaded), with the file it runs (None for a model).
    A backend that cannot run ``precision`` (None: fp32) on ``device`` is refused with the registry's
    reason (`BackendRefused`) before any model is built or file exported. A model backend runs
    ``make_model()`` with ``model_options``; a file backend runs ``artifact``, or, when none is given,
    the file ``prepare(entry)`` exports or builds, opened at ``precision``. A given file opens in its own
    precision (the caller compares it with ``precision`` in its own words), or at ``precision`` when not
    ``given_in_own_precision`` (OpenVINO computes an fp32 file in bf16). ``shared_process``: the runner
    will be timed in turn with others in this process (the entry's ``shared_process_options``)."""
    entry = get_backend(name)
    if reason := entry.unavailable_reason(device, precision or "fp32"):
        raise BackendRefused(reason)
    neighbourly = dict(entry.shared_process_options) if shared_process else {}
    if entry.artifact == "model":
        model = make_model() if make_model is not None else None
        return entry.open(model=model, device=device, precision=precision, threads=threads, **model_options,
                          **neighbourly), None
    if artifact is not None:
        path, at = Path(artifact), None if given_in_own_precision else precision
    else:
        path, at = prepare(entry) if prepare is not None else None, precision
    return entry.open(artifact=path, device=device, precision=at, threads=threads, **neighbourly), path


def backends_for(artifact: str) -> tuple[str, ...]:
    """Names of the backends that run this artifact kind (e.g. every ONNX backend)."""
    return tuple(name for name, entry in _load_entries().items() if entry.artifact == artifact)


def reference_backend() -> str:
    """The backend the others are checked and compared against: the first that runs the model itself."""
    return backends_for("model")[0]


def backend_packages() -> tuple[str, ...]:
    """The pip distributions of every backend, once each (for the version lists of reports and manifests)."""
    return tuple(dict.fromkeys(p for entry in _load_entries().values() for p in entry.packages))


def precision_names() -> tuple[str, ...]:
    """Every precision some backend runs on some device, in `PRECISIONS` order."""
    from ..artifact import PRECISIONS
    offered = {p for entry in _load_entries().values() for ps in entry.precisions.values() for p in ps}
    return tuple(p for p in PRECISIONS if p in offered)


def precision_table() -> str:
    """The entries' precision data as a Markdown table, backend x device kind (README and
    docs/precision.md carry it verbatim; a test checks they still do). On the CPU, bf16 and int8 also
    need the instructions `cpu_precision_reason` names."""
    entries = _load_entries()
    kinds = ("cpu", "cuda")
    lines = ["| backend | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for name, entry in entries.items():
        cells = [", ".join(entry.precisions.get(kind, ())) or "-" for kind in kinds]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = ["ARTIFACT_FORMATS", "ARTIFACT_KINDS", "Backend", "BackendRefused", "backend_packages", "cpu_flags", "cpu_precision_reason", "RunnerUnavailable", "backend_names", "backends_for", "device_kind",
           "get_backend", "open_backend_runner", "precision_names", "precision_table", "reference_backend", "register"]
