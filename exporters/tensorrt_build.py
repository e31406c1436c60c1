"""ONNX -> TensorRT engine (TensorRT 10.x and 11.x), plus the JSON sidecar the runner checks.

Only the build lives here; probing, the sidecar format, the compatibility check and the logger are
the runtime's (`rmt_deploy.runners.tensorrt_env`). TensorRT is imported lazily: nothing here needs it
until a build starts, which fails with a clear `TensorRTUnavailable` when TensorRT or CUDA is missing.

FP16 differs between the two majors and is decided by capability, not by version string:

* TensorRT 10 ("weakly typed"): ``BuilderFlag.FP16`` lets the builder pick FP16 kernels. We then pin
  the numerically sensitive layers (normalisation, softmax, the decay-bias add) to FP32 with layer
  precision constraints and ``BuilderFlag.OBEY_PRECISION_CONSTRAINTS``.
* TensorRT 11: ``BuilderFlag.FP16`` and the precision-constraint flags are gone; every network is
  strongly typed and takes its precision from the graph. An FP16 engine therefore needs the FP16
  ONNX graph (``<name>_fp16.onnx`` from the exporter, LayerNorm/Softmax/decay bias kept FP32).

An ONNX graph that already carries FP16 weights is built strongly typed on either major.

INT8 is TensorRT's explicit quantization of the QDQ ONNX file (`rmt_deploy.quantize.quantize_onnxruntime`,
the file ONNX Runtime runs too): the parser turns QuantizeLinear/DequantizeLinear pairs into Q/DQ
layers, which fix where the network computes in int8. TensorRT 10 builds it weakly typed with
``BuilderFlag.INT8`` (the flag enables the int8 kernels the Q/DQ layers ask for; no calibrator);
TensorRT 11 has no such flag and builds every network strongly typed, the Q/DQ layers giving the types.
This path follows TensorRT's documented Python API and is UNTESTED here (no TensorRT on the machines this
project is developed on); the planning below is unit-tested.
"""
from __future__ import annotations

import datetime as _dt
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from rmt_deploy.checkpoint import sha256_file
from rmt_deploy.runners.base import INPUT_NAME
from rmt_deploy.runners.tensorrt_env import current_gpu, device_index, make_logger, require_tensorrt, write_sidecar

# Layer names (ONNX node names carried over by the parser) kept in FP32 on the TensorRT 10 FP16 path.
# Layer *types* NORMALIZATION and SOFTMAX are always kept; these catch decomposed LayerNorms
# (ReduceMean/Sub/Pow/Sqrt/Div under ".../norm..."), the Add that applies the retention decay, and
# opset-23 Attention nodes ("node_heads_attention_N", "node_scaled_dot_product_attention_N").
DEFAULT_FP32_LAYER_PATTERNS: tuple[str, ...] = (r"norm", r"softmax", r"decay", r"relpos", r"mask", r"attention")

ProgressCallback = Callable[[str], None]


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


def onnx_is_qdq(onnx_path: str | os.PathLike) -> bool:
    """True when the ONNX graph is explicitly quantized (QuantizeLinear / DequantizeLinear nodes)."""
    import onnx
    model = onnx.load(os.fspath(onnx_path), load_external_data=False)
    return any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in model.graph.node)


def plan_int8(*, graph_int8: bool, has_int8_flag: bool) -> dict:
    """How to build an INT8 engine from a QDQ graph (see the module docstring): weakly typed with
    ``BuilderFlag.INT8`` where TensorRT has it (10), strongly typed where it does not (11)."""
    if not graph_int8:
        raise ValueError("an INT8 engine is built from a QDQ ONNX file (rmt-export --precision int8 --calib DIR "
                         "writes one); this graph has no QuantizeLinear/DequantizeLinear nodes")
    return {"strongly_typed": not has_int8_flag, "fp16_flag": False, "int8_flag": has_int8_flag, "precision": "int8"}


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

def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, *, fp16: bool = False, int8: bool = False,
                 min_shape: Sequence[int], opt_shape: Sequence[int], max_shape: Sequence[int],
                 workspace_gb: float = 4.0, timing_cache: str | os.PathLike | None = None,
                 metadata: Mapping | None = None, device: int | str | None = 0) -> Path:
    """Build ``engine_path`` from ``onnx_path`` and write ``<engine>.json`` next to it.

    ``min/opt/max_shape`` give the optimisation profile of the ``images`` input (B, 3, H, W).
    ``timing_cache`` is loaded when the file exists and written back after the build, so later builds
    reuse the tactic timings. ``metadata``: the artifact description's keys, copied into the sidecar.
    ``int8``: ``onnx_path`` is a QDQ file, built with explicit quantization (untested without TensorRT).
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {onnx_path}")
    profile = _check_shapes(min_shape, opt_shape, max_shape)
    trt = require_tensorrt(device)
    import torch
    index = device_index(device)
    torch.cuda.set_device(index)
    if int8:
        plan = plan_int8(graph_int8=onnx_is_qdq(onnx_path), has_int8_flag=hasattr(trt.BuilderFlag, "INT8"))
    else:
        plan = plan_precision(fp16, has_fp16_flag=hasattr(trt.BuilderFlag, "FP16"),
                              graph_fp16=onnx_is_fp16(onnx_path), tensorrt_version=trt.__version__)
    logger = make_logger(trt)
    builder = trt.Builder(logger)
    network, input_name = _parse_network(trt, builder, logger, onnx_path, plan, len(profile[0]))
    config, pinned = _builder_config(trt, builder, network, plan, input_name, profile, workspace_gb)
    cache_path = Path(timing_cache) if timing_cache else None
    if cache_path is not None:
        _load_timing_cache(config, cache_path)
    serialized = _run_build(trt, builder, network, config,
                            f"Building {plan['precision']} TensorRT engine from {onnx_path.name}")
    if serialized is None:
        detail = "\n  - ".join(logger.errors) if logger.errors else "no error details reported"
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (workspace {workspace_gb} GiB):"
                           f"\n  - {detail}")
    _atomic_write(engine_path, serialized)
    if cache_path is not None and (final := config.get_timing_cache()) is not None:
        _atomic_write(cache_path, final.serialize())
    write_sidecar(engine_path, _sidecar(trt, current_gpu(index), plan, pinned, input_name, profile, workspace_gb,
                                        onnx_path, metadata))
    return engine_path


def _parse_network(trt, builder, logger, onnx_path: Path, plan: dict, rank: int):
    """The parsed network and the name of its image input."""
    flags = 0
    # STRONGLY_TYPED is opt-in on TensorRT 10; on 11 it is deprecated and ignored (always strongly typed).
    # EXPLICIT_BATCH is never passed: ignored since TensorRT 10, removed in 11.
    if plan["strongly_typed"] and (hasattr(trt.BuilderFlag, "FP16") or hasattr(trt.BuilderFlag, "INT8")) \
            and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
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
    if len(inputs[names.index(input_name)].shape) != rank:
        raise ValueError(f"profile shapes must have rank {len(inputs[names.index(input_name)].shape)} "
                         f"for input {input_name!r}")
    return network, input_name


def _builder_config(trt, builder, network, plan: dict, input_name: str, profile, workspace_gb: float):
    """The builder config (workspace, optimisation profile, FP16 flag with the sensitive layers pinned
    to FP32 on TensorRT 10) and the names of the pinned layers."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    optimization_profile = builder.create_optimization_profile()
    optimization_profile.set_shape(input_name, *profile)
    config.add_optimization_profile(optimization_profile)
    pinned: list[str] = []
    if plan.get("int8_flag"):       # explicit quantization: the Q/DQ layers decide, no calibrator is set
        config.set_flag(trt.BuilderFlag.INT8)
    if plan["fp16_flag"]:
        config.set_flag(trt.BuilderFlag.FP16)
        pinned = _constrain_fp32_layers(trt, network, DEFAULT_FP32_LAYER_PATTERNS)
        if pinned and hasattr(trt.BuilderFlag, "OBEY_PRECISION_CONSTRAINTS"):
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    return config, pinned


def _load_timing_cache(config, cache_path: Path) -> None:
    blob = cache_path.read_bytes() if cache_path.is_file() else b""
    cache = config.create_timing_cache(blob)
    if cache is None and blob:  # corrupt or from another TensorRT: start afresh
        cache = config.create_timing_cache(b"")
    if cache is not None:
        config.set_timing_cache(cache, ignore_mismatch=False)


def _sidecar(trt, gpu: dict, plan: dict, pinned: list[str], input_name: str, profile, workspace_gb: float,
             onnx_path: Path, metadata: Mapping | None) -> dict:
    """What the runner checks before deserializing (TensorRT version, GPU) and the artifact's description."""
    lo, mid, hi = profile
    return {
        **dict(metadata or {}),
        "tensorrt_version": trt.__version__,
        "gpu_name": gpu["gpu_name"],
        "compute_capability": gpu["compute_capability"],
        "precision": plan["precision"],
        "strongly_typed": plan["strongly_typed"],
        "fp32_layers": pinned,
        "profiles": [{"input": input_name, "min": list(lo), "opt": list(mid), "max": list(hi)}],
        "workspace_gb": workspace_gb,
        "source_onnx": onnx_path.name,
        "source_onnx_sha256": sha256_file(onnx_path),
        "built_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _run_build(trt, builder, network, config, title: str):
    """``build_serialized_network`` with its progress on a rich status line."""
    from rich.console import Console
    with Console(stderr=True).status(title + " ...") as status:
        monitor = _make_progress_monitor(trt, lambda msg: status.update(f"{title}: {msg}"))
        if monitor is not None and hasattr(config, "progress_monitor"):
            config.progress_monitor = monitor
        return builder.build_serialized_network(network, config)


__all__ = ["DEFAULT_FP32_LAYER_PATTERNS", "build_engine", "onnx_is_fp16", "onnx_is_qdq", "plan_int8", "plan_precision",
           "wants_fp32"]
