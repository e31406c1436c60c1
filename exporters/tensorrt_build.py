"""ONNX -> TensorRT engine (TensorRT 10.x and 11.x), plus the JSON sidecar the runner checks.

TensorRT is imported lazily: nothing here needs it until a build starts, and every entry point
fails with a clear `TensorRTUnavailable` (a `RunnerUnavailable`) when TensorRT or CUDA is missing.

FP16 differs between the two majors and is decided by capability, not by version string:

* TensorRT 10 ("weakly typed"): ``BuilderFlag.FP16`` lets the builder pick FP16 kernels. We then pin
  the numerically sensitive layers (normalisation, softmax, the decay-bias add) to FP32 with layer
  precision constraints and ``BuilderFlag.OBEY_PRECISION_CONSTRAINTS``.
* TensorRT 11: ``BuilderFlag.FP16`` and the precision-constraint flags are gone; every network is
  strongly typed and takes its precision from the graph. An FP16 engine therefore needs the FP16
  ONNX graph (``<name>_fp16.onnx`` from the exporter, LayerNorm/Softmax/decay bias kept FP32).

An ONNX graph that already carries FP16 weights is built strongly typed on either major.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from rmt_deploy.runners.base import INPUT_NAME, RunnerUnavailable

SIDECAR_SUFFIX = ".json"

INSTALL_HINT = ("pip install tensorrt --extra-index-url https://pypi.nvidia.com "
                "(needs an NVIDIA GPU, its driver and a CUDA build of PyTorch)")

# Layer names (ONNX node names carried over by the parser) kept in FP32 on the TensorRT 10 FP16 path.
# Layer *types* NORMALIZATION and SOFTMAX are always kept; these catch decomposed LayerNorms
# (ReduceMean/Sub/Pow/Sqrt/Div under ".../norm..."), the Add that applies the retention decay, and
# opset-23 Attention nodes ("node_heads_attention_N", "node_scaled_dot_product_attention_N").
DEFAULT_FP32_LAYER_PATTERNS: tuple[str, ...] = (r"norm", r"softmax", r"decay", r"relpos", r"mask", r"attention")

ProgressCallback = Callable[[str], None]


class TensorRTUnavailable(RunnerUnavailable):
    """TensorRT or CUDA is missing here; the message says which and how to get it."""


class EngineIncompatible(RunnerUnavailable):
    """The engine was built by another TensorRT version or for another GPU: rebuild it here."""


# ----------------------------------------------------------------------------------------------
# Environment probing
# ----------------------------------------------------------------------------------------------

def _import_tensorrt():
    try:
        import tensorrt as trt  # noqa: PLC0415 - lazy on purpose
    except ImportError as exc:
        raise TensorRTUnavailable(f"TensorRT is not installed ({exc}); {INSTALL_HINT}") from exc
    except OSError as exc:  # the wheel is there but libnvinfer / CUDA libraries fail to load
        raise TensorRTUnavailable(f"TensorRT is installed but its libraries failed to load: {exc}") from exc
    return trt


def _cuda_problem() -> str | None:
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed (it provides the CUDA device buffers)"
    if not torch.cuda.is_available():
        cuda = getattr(torch.version, "cuda", None)
        build = f"CUDA {cuda} build" if cuda else "CPU-only build"
        return f"CUDA is not available to PyTorch (torch {torch.__version__}, {build}; no usable NVIDIA GPU/driver)"
    return None


def _device_index(device: int | str | None) -> int:
    if device is None:
        return 0
    if isinstance(device, int):
        return device
    text = str(device)
    if text in ("cuda", "gpu"):
        return 0
    if text.startswith("cuda:"):
        return int(text.partition(":")[2] or 0)
    if text.isdigit():
        return int(text)
    raise ValueError(f"not a CUDA device: {device!r} (use 'cuda:N')")


def current_gpu(device: int | str | None = 0) -> dict:
    """``{"gpu_name": ..., "compute_capability": "9.0"}`` of a CUDA device (via PyTorch)."""
    import torch
    index = _device_index(device)
    major, minor = torch.cuda.get_device_capability(index)
    return {"gpu_name": torch.cuda.get_device_name(index), "compute_capability": f"{major}.{minor}"}


def tensorrt_available(device: int | str | None = 0) -> tuple[bool, str]:
    """(True, "TensorRT 10.x on <GPU> (sm_90)") or (False, why not) - never raises."""
    problems = []
    version = None
    try:
        trt = _import_tensorrt()
        version = trt.__version__
    except TensorRTUnavailable as exc:
        problems.append(str(exc))
    cuda = _cuda_problem()
    if cuda:
        problems.append(cuda)
    if problems:
        return False, "; ".join(problems)
    try:
        gpu = current_gpu(device)
    except Exception as exc:  # noqa: BLE001 - report, do not raise
        return False, f"TensorRT {version} is installed but CUDA device {device!r} is unusable: {exc}"
    return True, f"TensorRT {version} on {gpu['gpu_name']} ({_sm(gpu['compute_capability'])})"


def require_tensorrt(device: int | str | None = 0):
    """Import TensorRT and check CUDA, or raise `TensorRTUnavailable` with the reason."""
    trt = _import_tensorrt()
    cuda = _cuda_problem()
    if cuda:
        raise TensorRTUnavailable(f"TensorRT {trt.__version__} is installed but {cuda}")
    return trt


# ----------------------------------------------------------------------------------------------
# Sidecar and compatibility
# ----------------------------------------------------------------------------------------------

def engine_sidecar_path(engine_path: str | os.PathLike) -> Path:
    """``model.engine`` -> ``model.engine.json``."""
    return Path(os.fspath(engine_path) + SIDECAR_SUFFIX)


def read_sidecar(engine_path: str | os.PathLike) -> dict | None:
    path = engine_sidecar_path(engine_path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"unreadable engine sidecar {path}: {exc}") from exc


def _sm(cc: str | None) -> str:
    return "sm_" + str(cc).replace(".", "") if cc else "sm_?"


def _norm(text) -> str:
    return " ".join(str(text).split()).lower()


def check_engine_compatible(sidecar: Mapping, *, tensorrt_version: str | None = None,
                            gpu_name: str | None = None, compute_capability: str | None = None,
                            device: int | str | None = 0) -> str | None:
    """The reason ``sidecar``'s engine cannot run here, or None when it matches.

    Pass the current values to use it as a pure function; any left as None are detected
    (TensorRT version from ``tensorrt``, GPU from PyTorch) when possible and otherwise not compared.
    Fields missing from the sidecar are not compared either.
    """
    if tensorrt_version is None:
        try:
            tensorrt_version = _import_tensorrt().__version__
        except TensorRTUnavailable:
            pass
    if gpu_name is None or compute_capability is None:
        try:
            if _cuda_problem() is None:
                gpu = current_gpu(device)
                gpu_name = gpu_name or gpu["gpu_name"]
                compute_capability = compute_capability or gpu["compute_capability"]
        except Exception:  # noqa: BLE001 - undetectable: not compared
            pass

    built_trt, built_gpu, built_cc = (sidecar.get("tensorrt_version"), sidecar.get("gpu_name"),
                                      sidecar.get("compute_capability"))
    mismatches = []
    if built_trt and tensorrt_version and str(built_trt).strip() != str(tensorrt_version).strip():
        mismatches.append("TensorRT version")
    if built_cc and compute_capability and str(built_cc).strip() != str(compute_capability).strip():
        mismatches.append("compute capability")
    if built_gpu and gpu_name and _norm(built_gpu) != _norm(gpu_name):
        mismatches.append("GPU")
    if not mismatches:
        return None
    return (f"engine built with TensorRT {built_trt or '?'} for {built_gpu or '?'} ({_sm(built_cc)}); "
            f"this machine has TensorRT {tensorrt_version or '?'} / {gpu_name or '?'} ({_sm(compute_capability)}) "
            f"[{', '.join(mismatches)} differ]: rebuild the engine on this machine with rmt-export "
            "(TensorRT engines only run on the TensorRT version and GPU type that built them)")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Precision planning (pure: unit-tested without TensorRT)
# ----------------------------------------------------------------------------------------------

def onnx_is_fp16(onnx_path: str | os.PathLike) -> bool:
    """True when the ONNX graph stores float16 weights (the exporter's ``*_fp16.onnx``)."""
    import onnx
    model = onnx.load(os.fspath(onnx_path), load_external_data=False)
    fp16 = onnx.TensorProto.FLOAT16
    if any(init.data_type == fp16 for init in model.graph.initializer):
        return True
    return any(v.type.tensor_type.elem_type == fp16 for v in model.graph.input if v.name == INPUT_NAME)


def plan_precision(fp16: bool, *, has_fp16_flag: bool, graph_fp16: bool,
                   tensorrt_version: str = "?") -> dict:
    """How to build: ``{"strongly_typed", "fp16_flag", "precision"}``.

    * FP16 ONNX graph -> strongly typed on any major (precision comes from the graph).
    * FP32 graph, fp16 requested, ``BuilderFlag.FP16`` exists (TensorRT 10) -> weakly typed + flag.
    * FP32 graph, fp16 requested, no such flag (TensorRT 11) -> ValueError: pass the FP16 ONNX.
    * FP32 graph, fp32 -> a plain network (strongly typed by definition on TensorRT 11).
    """
    if graph_fp16:
        return {"strongly_typed": True, "fp16_flag": False, "precision": "fp16"}
    if fp16 and not has_fp16_flag:
        raise ValueError(
            f"TensorRT {tensorrt_version} has no BuilderFlag.FP16 (removed in TensorRT 11, where every network is "
            "strongly typed and takes its precision from the ONNX graph): build the FP16 engine from the FP16 ONNX "
            "(<name>_fp16.onnx written by rmt-export) instead of the FP32 one")
    if fp16:
        return {"strongly_typed": False, "fp16_flag": True, "precision": "fp16"}
    return {"strongly_typed": not has_fp16_flag, "fp16_flag": False, "precision": "fp32"}


def wants_fp32(layer_name: str, layer_type: str, patterns: Sequence[str] = DEFAULT_FP32_LAYER_PATTERNS) -> bool:
    """Whether a layer is kept in FP32 on the TensorRT 10 FP16 path (by type, else by name)."""
    if layer_type.rsplit(".", 1)[-1].upper() in ("NORMALIZATION", "SOFTMAX"):
        return True
    return any(re.search(p, layer_name, re.IGNORECASE) for p in patterns)


def _check_shapes(min_shape, opt_shape, max_shape) -> tuple[tuple, tuple, tuple]:
    shapes = tuple(tuple(int(d) for d in s) for s in (min_shape, opt_shape, max_shape))
    if len({len(s) for s in shapes}) != 1:
        raise ValueError(f"min/opt/max shapes differ in rank: {shapes}")
    for lo, mid, hi in zip(*shapes):
        if not 0 < lo <= mid <= hi:
            raise ValueError(f"need 0 < min <= opt <= max per axis, got min={shapes[0]} opt={shapes[1]} max={shapes[2]}")
    return shapes


def _atomic_write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------------------------
# TensorRT objects (only defined once tensorrt imports)
# ----------------------------------------------------------------------------------------------

def _make_logger(trt, verbose: bool = False):
    """An ILogger that prints warnings and keeps errors for the exception message."""

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
            limit = trt.ILogger.Severity.VERBOSE if verbose else trt.ILogger.Severity.WARNING
            if int(severity) <= int(limit):  # lower value = more severe
                print(f"[TensorRT] {severity.name}: {msg}", flush=True)

    return _Logger()


def _make_progress_monitor(trt, report: ProgressCallback):
    """An IProgressMonitor (TensorRT >= 10) forwarding phase/step events to ``report``."""
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class _Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.steps: dict[str, int] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.steps[phase_name] = num_steps
            report(f"{phase_name} (0/{num_steps})")

        def step_complete(self, phase_name, step):
            report(f"{phase_name} ({step + 1}/{self.steps.get(phase_name, '?')})")
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            self.steps.pop(phase_name, None)

    return _Monitor()


def _parser_errors(parser) -> list[str]:
    messages = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        try:
            text = err.desc()
            where = []
            node_name = getattr(err, "node_name", None)
            if callable(node_name) and node_name():
                where.append(f"node {node_name()!r}")
            elif err.node() >= 0:
                where.append(f"node #{err.node()}")
            node_op = getattr(err, "node_operator", None)
            if callable(node_op) and node_op():
                where.append(f"op {node_op()}")
            messages.append(f"[{err.code()}] {text}" + (f" ({', '.join(where)})" if where else ""))
        except Exception:  # noqa: BLE001 - older bindings: the string form is still useful
            messages.append(str(err))
    return messages


def _constrain_fp32_layers(trt, network, patterns: Sequence[str]) -> list[str]:
    """Pin sensitive layers to FP32 (TensorRT 10 weak typing only); returns their names."""
    floating = {trt.float32, trt.float16}
    pinned = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if not wants_fp32(layer.name, str(layer.type), patterns):
            continue
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if not outputs or any(out.dtype not in floating for out in outputs):
            continue  # shape / index computations: leave them alone
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
        pinned.append(layer.name)
    return pinned


# ----------------------------------------------------------------------------------------------
# Build
# ----------------------------------------------------------------------------------------------

def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, *, fp16: bool = False,
                 min_shape: Sequence[int], opt_shape: Sequence[int], max_shape: Sequence[int],
                 workspace_gb: float = 4.0, timing_cache: str | os.PathLike | None = None,
                 metadata: Mapping | None = None, progress: ProgressCallback | None = None,
                 extra_profiles: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]] = (),
                 fp32_layer_patterns: Sequence[str] = DEFAULT_FP32_LAYER_PATTERNS,
                 precision_constraints: str = "obey", device: int | str | None = 0,
                 verbose: bool = False) -> Path:
    """Build ``engine_path`` from ``onnx_path`` and write ``<engine>.json`` next to it.

    ``min/opt/max_shape`` give the optimisation profile of the ``images`` input (B, 3, H, W);
    ``extra_profiles`` adds more (min, opt, max) triples. ``timing_cache`` is loaded when the file
    exists and written back after the build, so later builds reuse the tactic timings.
    ``progress`` receives human-readable phase messages; without it a rich status line is shown.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {onnx_path}")
    if precision_constraints not in ("obey", "prefer"):
        raise ValueError("precision_constraints must be 'obey' or 'prefer'")
    profiles = [_check_shapes(min_shape, opt_shape, max_shape)]
    profiles += [_check_shapes(*p) for p in extra_profiles]

    trt = require_tensorrt(device)
    import torch
    index = _device_index(device)
    torch.cuda.set_device(index)
    gpu = current_gpu(index)

    has_fp16_flag = hasattr(trt.BuilderFlag, "FP16")
    plan = plan_precision(fp16, has_fp16_flag=has_fp16_flag, graph_fp16=onnx_is_fp16(onnx_path),
                          tensorrt_version=trt.__version__)

    logger = _make_logger(trt, verbose)
    builder = trt.Builder(logger)
    flags = 0
    # STRONGLY_TYPED is opt-in on TensorRT 10; on 11 it is deprecated and ignored (always strongly typed).
    # EXPLICIT_BATCH is never passed: ignored since TensorRT 10, removed in 11.
    if plan["strongly_typed"] and has_fp16_flag and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.fspath(onnx_path)):
        errors = _parser_errors(parser) or logger.errors or ["no error details reported"]
        raise RuntimeError(f"TensorRT's ONNX parser rejected {onnx_path} ({len(errors)} error(s)):\n  - "
                           + "\n  - ".join(errors))

    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    names = [t.name for t in inputs]
    input_name = INPUT_NAME if INPUT_NAME in names else (names[0] if len(names) == 1 else None)
    if input_name is None:
        raise RuntimeError(f"{onnx_path}: expected an input named {INPUT_NAME!r}, found {names}")
    rank = len(inputs[names.index(input_name)].shape)
    if any(len(s) != rank for p in profiles for s in p):
        raise ValueError(f"profile shapes must have rank {rank} for input {input_name!r}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    for lo, mid, hi in profiles:
        profile = builder.create_optimization_profile()
        profile.set_shape(input_name, lo, mid, hi)
        config.add_optimization_profile(profile)

    pinned: list[str] = []
    if plan["fp16_flag"]:
        config.set_flag(trt.BuilderFlag.FP16)
        pinned = _constrain_fp32_layers(trt, network, fp32_layer_patterns)
        flag_name = "OBEY_PRECISION_CONSTRAINTS" if precision_constraints == "obey" else "PREFER_PRECISION_CONSTRAINTS"
        if pinned and hasattr(trt.BuilderFlag, flag_name):
            config.set_flag(getattr(trt.BuilderFlag, flag_name))

    cache_path = Path(timing_cache) if timing_cache else None
    if cache_path is not None:
        blob = cache_path.read_bytes() if cache_path.is_file() else b""
        cache = config.create_timing_cache(blob)
        if cache is None and blob:  # corrupt or from another TensorRT: start afresh
            cache = config.create_timing_cache(b"")
        if cache is not None:
            config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = _run_build(trt, builder, network, config, progress,
                            f"Building {plan['precision']} TensorRT engine from {onnx_path.name}")
    if serialized is None:
        detail = "\n  - ".join(logger.errors) if logger.errors else "no error details reported"
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (workspace {workspace_gb} GiB):"
                           f"\n  - {detail}")
    _atomic_write(engine_path, serialized)

    if cache_path is not None:
        final = config.get_timing_cache()
        if final is not None:
            _atomic_write(cache_path, final.serialize())

    sidecar = {
        **dict(metadata or {}),
        "tensorrt_version": trt.__version__,
        "gpu_name": gpu["gpu_name"],
        "compute_capability": gpu["compute_capability"],
        "precision": plan["precision"],
        "strongly_typed": plan["strongly_typed"],
        "fp32_layers": pinned,
        "profiles": [{"input": input_name, "min": list(lo), "opt": list(mid), "max": list(hi)}
                     for lo, mid, hi in profiles],
        "workspace_gb": workspace_gb,
        "source_onnx": onnx_path.name,
        "source_onnx_sha256": sha256_file(onnx_path),
        "built_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    engine_sidecar_path(engine_path).write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
    return engine_path


def _run_build(trt, builder, network, config, progress: ProgressCallback | None, title: str):
    """``build_serialized_network`` with progress reported to ``progress`` or a rich status line."""
    if progress is not None:
        progress(title)
        monitor = _make_progress_monitor(trt, progress)
        if monitor is not None and hasattr(config, "progress_monitor"):
            config.progress_monitor = monitor
        result = builder.build_serialized_network(network, config)
        progress("done" if result is not None else "failed")
        return result
    try:
        from rich.console import Console
    except ImportError:
        return builder.build_serialized_network(network, config)
    with Console(stderr=True).status(title + " ...") as status:
        monitor = _make_progress_monitor(trt, lambda msg: status.update(f"{title}: {msg}"))
        if monitor is not None and hasattr(config, "progress_monitor"):
            config.progress_monitor = monitor
        return builder.build_serialized_network(network, config)


__all__ = ["DEFAULT_FP32_LAYER_PATTERNS", "EngineIncompatible", "TensorRTUnavailable", "build_engine",
           "check_engine_compatible", "current_gpu", "engine_sidecar_path", "onnx_is_fp16", "plan_precision",
           "read_sidecar", "require_tensorrt", "sha256_file", "tensorrt_available", "wants_fp32"]
