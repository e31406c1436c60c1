"""TensorRT runner (TensorRT 10.x / 11.x name-based tensor API, PyTorch CUDA buffers).

Before deserializing, the engine's JSON sidecar (``<engine>.json``, written by rmt-export's engine
builder, read by `tensorrt_env`) is compared with this machine: an engine built
by another TensorRT version or for another GPU raises `EngineIncompatible` (a `RunnerUnavailable`)
that says what differs, instead of failing inside TensorRT.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..artifact import ArtifactDescription
from .base import Runner, RunnerMetadata, RunnerUnavailable, TensorSpec, Timing
from .registry import Backend, register
from .tensorrt_env import (EngineIncompatible, check_engine_compatible, device_index, make_logger, read_sidecar,
                           require_tensorrt, tensorrt_available)

_INPUT_AXES = ("batch", None, "height", "width")


def unavailable_reason(device: str) -> str | None:
    """Why TensorRT cannot run on ``device`` here, or None (checked before any engine is built)."""
    if not device.startswith("cuda"):
        ok, reason = tensorrt_available()
        return f"TensorRT runs on CUDA devices only (--device {device}){'' if ok else '; also ' + reason}"
    ok, reason = tensorrt_available(device)
    return None if ok else reason


class TensorRTRunner(Runner):
    backend = "tensorrt"

    def __init__(self, engine_path: str | os.PathLike, device: str = "cuda:0", precision: str | None = None):
        """``precision``: what the engine must compute in; the sidecar's own precision, when it has
        one, must agree (an fp32 engine cannot serve an fp16 request)."""
        super().__init__()
        self.path = Path(engine_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"TensorRT engine not found: {self.path}")
        if not str(device).startswith("cuda"):
            raise RunnerUnavailable(f"TensorRT runs on CUDA devices only, not {device!r}")
        self.device = str(device) if ":" in str(device) else "cuda:0"
        self.sidecar: dict = read_sidecar(self.path) or {}
        built = self.sidecar.get("precision")
        if built and precision and built != precision:
            raise ValueError(f"{self.path.name} is a {built} engine, not {precision} (its sidecar says so)")
        self.precision = built or precision or "fp32"
        self.artifact = ArtifactDescription.from_metadata(self.sidecar)
        if self.artifact is not None:
            self.artifact = self.artifact.with_precision(self.precision)
        self._trt = self._runtime = self._engine = self._context = self._stream = None
        self._inputs: list[str] = []
        self._outputs: list[str] = []
        self._specs: dict[str, TensorSpec] = {}
        self._torch_dtypes: dict = {}
        self._events = None

    # -- loading ------------------------------------------------------------------------------
    def _load(self) -> None:
        trt = require_tensorrt(self.device)  # RunnerUnavailable (TensorRTUnavailable) when missing
        import torch

        index = device_index(self.device)
        if index >= torch.cuda.device_count():
            raise RunnerUnavailable(f"{self.device} does not exist here ({torch.cuda.device_count()} CUDA device(s))")
        if self.sidecar:
            problem = check_engine_compatible(self.sidecar, tensorrt_version=trt.__version__, device=index)
            if problem:
                raise EngineIncompatible(f"{self.path.name}: {problem}")

        torch.cuda.set_device(index)
        self._logger = make_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if engine is None:
            detail = "; ".join(self._logger.errors) or "no details reported"
            hint = "" if self.sidecar else " (no sidecar to check: was it built with another TensorRT version or GPU?)"
            raise EngineIncompatible(f"TensorRT {trt.__version__} could not deserialize {self.path}: {detail}{hint}; "
                                     "rebuild the engine on this machine with rmt-export")
        context = engine.create_execution_context()
        if context is None:
            raise RuntimeError(f"TensorRT could not create an execution context for {self.path} "
                               f"(out of GPU memory?): {'; '.join(self._logger.errors)}")
        self._trt, self._engine, self._context = trt, engine, context
        self._stream = torch.cuda.Stream(device=index)
        from .pinned import PinnedBuffers
        self._pinned = PinnedBuffers()      # the inputs' host side, page-locked once per shape and reused
        self._events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]

        self._inputs, self._outputs, self._specs, self._torch_dtypes = [], [], {}, {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self._inputs if is_input else self._outputs).append(name)
            trt_dtype = engine.get_tensor_dtype(name)
            torch_dtype = _torch_dtype(trt, trt_dtype)
            self._torch_dtypes[name] = torch_dtype
            dims = tuple(int(d) for d in engine.get_tensor_shape(name))
            shape = tuple((_INPUT_AXES[a] if is_input and a < 4 and _INPUT_AXES[a] else
                           ("batch" if a == 0 else f"dim{a}")) if d < 0 else d for a, d in enumerate(dims))
            # outputs are returned as float32 whatever the engine computes in (`_infer`)
            dtype = str(torch_dtype).removeprefix("torch.") if is_input else "float32"
            self._specs[name] = TensorSpec(name, shape, dtype)
        if self._inputs and not self.sidecar.get("precision"):
            self.precision = "fp16" if self._specs[self._inputs[0]].dtype == "float16" else "fp32"

    def metadata(self) -> RunnerMetadata:
        """Before ``load``: what the sidecar says (tensors from its profile and description); after: the engine's."""
        extra = {"path": os.fspath(self.path), "device": self.device, **self.sidecar}
        if self._engine is None:
            return self._sidecar_metadata(extra)
        profiles = []
        for p in range(self._engine.num_optimization_profiles):
            for name in self._inputs:
                lo, mid, hi = self._engine.get_tensor_profile_shape(name, p)
                profiles.append({"profile": p, "input": name, "min": list(lo), "opt": list(mid), "max": list(hi)})
        extra.setdefault("profiles", profiles)
        return RunnerMetadata([self._specs[n] for n in self._inputs], [self._specs[n] for n in self._outputs], extra,
                              self.artifact)

    def _sidecar_metadata(self, extra: dict) -> RunnerMetadata:
        profile = (self.sidecar.get("profiles") or [{}])[0]
        lo, hi = profile.get("min"), profile.get("max")
        dims = tuple(a if a == b else _INPUT_AXES[i] or f"dim{i}" for i, (a, b) in enumerate(zip(lo, hi))) \
            if lo and hi else ("batch", 3, "height", "width")
        # a strongly typed fp16 engine takes float16 images; weakly typed ones (TensorRT 10's FP16 flag) float32
        half = self.precision == "fp16" and self.sidecar.get("strongly_typed")
        inputs = [TensorSpec(profile.get("input", "images"), dims, "float16" if half else "float32")]
        names = self.artifact.output_names if self.artifact else ()
        outputs = [TensorSpec(n, ("batch",), "float32") for n in names]
        return RunnerMetadata(inputs, outputs, extra, self.artifact)

    # -- inference ----------------------------------------------------------------------------
    def _set_shape(self, name: str, shape: tuple) -> None:
        if not self._context.set_input_shape(name, shape):
            ranges = [tuple(tuple(s) for s in self._engine.get_tensor_profile_shape(name, p))
                      for p in range(self._engine.num_optimization_profiles)]
            raise ValueError(f"{self.name}: input {name!r} shape {tuple(shape)} is outside the engine's optimisation "
                             f"profile(s) (min, opt, max) {ranges}; rebuild the engine with a wider profile")

    def _infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        context, stream = self._context, self._stream
        start, copied, computed, done = self._events
        for name in self._inputs:
            self._set_shape(name, feed[name].shape)
        with torch.cuda.device(stream.device), torch.cuda.stream(stream):
            # Outputs first, so the h2d interval below only covers the input copies.
            outputs = {}
            for name in self._outputs:
                shape = tuple(int(d) for d in context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise RuntimeError(f"{self.name}: output {name!r} shape {shape} unresolved after setting inputs")
                outputs[name] = torch.empty(shape, dtype=self._torch_dtypes[name], device=stream.device)
                context.set_tensor_address(name, outputs[name].data_ptr())
            host_inputs = {n: self._pinned.stage(n, np.ascontiguousarray(feed[n])) for n in self._inputs}

            start.record(stream)
            device_inputs = {n: t.to(stream.device, non_blocking=True) for n, t in host_inputs.items()}
            copied.record(stream)
            for name, tensor in device_inputs.items():
                context.set_tensor_address(name, tensor.data_ptr())
            if not context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError(f"{self.name}: execute_async_v3 failed: {'; '.join(self._logger.errors)}")
            computed.record(stream)
            host = {n: torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for n, t in outputs.items()}
            for name, tensor in outputs.items():
                host[name].copy_(tensor, non_blocking=True)
            done.record(stream)
        stream.synchronize()
        self.last_timing = Timing(start.elapsed_time(copied), copied.elapsed_time(computed),
                                  computed.elapsed_time(done))
        del device_inputs  # kept alive until the stream finished with them
        return {n: t.numpy().astype(np.float32, copy=False) for n, t in host.items()}

    def close(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()
        self._context = self._engine = self._runtime = self._stream = self._events = self._pinned = None
        super().close()


def _torch_dtype(trt, trt_dtype):
    import torch
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int32": torch.int32,
             "int64": torch.int64, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool}
    for trt_name, torch_dtype in table.items():
        if hasattr(trt, trt_name) and trt_dtype == getattr(trt, trt_name):
            return torch_dtype
    raise RunnerUnavailable(f"engine tensor type {trt_dtype} has no PyTorch equivalent in this runner")


def _open(*, model, artifact, device, precision, threads) -> TensorRTRunner:
    return TensorRTRunner(artifact, device=device, precision=precision)


def _prepare(model, plan, cache) -> Path:
    """An engine of the ONNX of the same precision in the portable opset (TensorRT 11 takes FP16 from the graph)."""
    return cache.engine(model, plan.for_one(plan.precision, portable=True))


TENSORRT = register(Backend("tensorrt", "engine", {"cuda": ("fp32", "fp16", "int8")}, _open, unavailable_reason, _prepare,
                            platform="tensorrt_plan", title="TensorRT",
                            packages=("tensorrt",)))
