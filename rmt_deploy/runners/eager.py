"""PyTorch eager (optionally ``torch.compile``) runner over the fused RMT model."""
from __future__ import annotations

import ctypes
import os
import sys
import time
from collections.abc import Mapping

import numpy as np
import torch

from ..artifact import ArtifactDescription
from ..model import RMT
from .base import INPUT_NAME, Runner, RunnerMetadata, RunnerUnavailable, TensorSpec, Timing
from .pinned import PinnedBuffers
from .registry import Backend, register

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4     # glibc mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the OS (process-wide).

    At batch 8, RMT's stage-1 activations are 6-20 MB each; glibc serves such blocks with mmap and
    unmaps them on free, so every forward page-faults tens of MB of fresh zeroed pages (time spent
    in the OS, not the model). With mmap off and trimming only above 1 GiB they are reused, at the cost
    of the process keeping its peak heap. Returns False where glibc is not the allocator.
    Opt out with ``RMT_KEEP_FREED_MEMORY=0``.
    """
    if os.environ.get("RMT_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):     # musl and other libcs have no mallopt
        return False


class EagerRunner(Runner):
    backend = "eager"

    def __init__(self, model: RMT, device: str = "cpu", precision: str = "fp32", compile: bool = False,
                 cuda_graphs: bool = False, dynamic_batch: bool = False, threads: int | None = None):
        """``cuda_graphs`` (compile on CUDA only): run the compiled model as CUDA graphs. Every call must
        then come from the thread that made the first one: CUDA graph trees keep thread-local state
        (pytorch#123177), so the server, which warms up and infers on different threads, leaves it off.

        ``dynamic_batch`` (compile only): the second batch size seen recompiles once into one graph for
        every batch size (PyTorch's automatic dynamic shapes). Without it each batch size is its own
        compile (the fastest code for a fixed batch, what rmt-bench measures), and past the recompile
        limit (8) further sizes silently run uncompiled, which a server's varying batches would hit."""
        super().__init__()
        if precision not in _DTYPES:
            raise ValueError(f"precision must be one of {sorted(_DTYPES)}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RunnerUnavailable("CUDA is not available to PyTorch on this machine")
        if precision == "fp16" and not device.startswith("cuda"):
            raise RunnerUnavailable("fp16 eager needs a CUDA device (CPU half kernels are slow or missing)")
        self.model, self.device, self.precision, self.compile = model, device, precision, compile
        self._pinned = PinnedBuffers()      # GPU: the input's host side, page-locked once per shape
        self.cuda_graphs = compile and cuda_graphs and device.startswith("cuda")
        self.dynamic_batch, self.threads = dynamic_batch, threads
        self.warmup_calls = 3 if self.cuda_graphs else 0     # graphs are recorded during the first calls
        if compile:
            self.backend = "compile"
        # bf16 on the CPU runs under autocast: weights stay float32, matmuls and convolutions compute in
        # bfloat16, LayerNorm and softmax in float32 (autocast's own op lists)
        self.autocast = precision == "bf16" and not device.startswith("cuda")
        self._dtype = torch.float32 if self.autocast else _DTYPES[precision]
        self._fn = model
        self._stream = None

    def _load(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)     # process-wide: torch has one intra-op pool
        self.model.fuse().to(self.device, self._dtype).eval()
        if not self.device.startswith("cuda"):
            keep_freed_memory()
        elif not self.cuda_graphs:
            # its own stream: runners fed by one batcher (server instances) copy and compute on separate
            # streams, so one batch's copies overlap another's kernels (CUDA graphs keep the stream they
            # were recorded on)
            self._stream = torch.cuda.Stream(self.device)
        if self.compile:
            # CUDA graphs ("reduce-overhead"): the compiled RMT launches many small kernels per forward
            # and is launch-bound without them, even at batch 64 (figures: docs/benchmarks.md). Outputs
            # are copied to the host before the next call, so the graph's reused output buffers are safe.
            self._fn = torch.compile(self.model, dynamic=None if self.dynamic_batch else False,
                                     mode="reduce-overhead" if self.cuda_graphs else None)
        else:
            self._fn = self.model

    def metadata(self) -> RunnerMetadata:
        artifact = ArtifactDescription.from_model(self.model, precision=self.precision)
        # outputs come back as float32 whatever the compute precision (`_outputs`)
        outs = [TensorSpec(n, ("batch", c) if n in ("logits", "embedding") else ("batch", c, "height", "width"),
                           "float32") for n, c in zip(self.model.output_names, self.model.output_channels)]
        return RunnerMetadata([TensorSpec(INPUT_NAME, ("batch", 3, "height", "width"), "float32")], outs,
                              {"model": self.model.config.name, "checkpoint": getattr(self.model, "checkpoint", None)},
                              artifact)

    @torch.inference_mode()
    def _infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = torch.as_tensor(feed[INPUT_NAME])      # float32, contiguous (Runner.infer)
        if self.device.startswith("cuda"):
            # the events must record on the runner's GPU and stream (None: the current stream)
            with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
                return self._infer_cuda(images)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            out = self._fn(images.to(self.device, self._dtype))
        self.last_timing = Timing(compute_ms=(time.perf_counter() - start) * 1e3)
        return self._outputs(out)

    def _infer_cuda(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        """The host-to-device copy (cast on the host into a reused pinned buffer, then copied
        asynchronously on the runner's stream), the forward and the copy back, timed with CUDA events."""
        host = self._pinned.stage(INPUT_NAME, images, self._dtype)
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        marks[0].record()
        x = host.to(self.device, non_blocking=True)
        marks[1].record()
        out = self._fn(x)
        marks[2].record()
        result = self._outputs(out)
        marks[3].record()
        marks[3].synchronize()
        self.last_timing = Timing(*(a.elapsed_time(b) for a, b in zip(marks, marks[1:])))
        return result

    def _outputs(self, out) -> dict[str, np.ndarray]:
        outs = [out] if isinstance(out, torch.Tensor) else list(out)
        return {n: t.float().cpu().numpy() for n, t in zip(self.model.output_names, outs)}


def _open(*, model, artifact, device, precision, threads, compile: bool = False, **options) -> EagerRunner:
    return EagerRunner(model, device=device, precision=precision, compile=compile, threads=threads, **options)


def _open_compiled(**kwargs) -> EagerRunner:
    return _open(**kwargs, compile=True)


def _cuda_reason(device: str) -> str | None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        return "CUDA is not available to PyTorch on this machine"
    return None


# fp16 on the CPU: half kernels are slow or missing there
_PRECISIONS = {"cpu": ("fp32", "bf16"), "cuda": ("fp32", "fp16", "bf16")}
_OPTIONS = ("cuda_graphs", "dynamic_batch")
EAGER = register(Backend("eager", "model", _PRECISIONS, _open, _cuda_reason, platform="pytorch_libtorch",
                         title="PyTorch", packages=("torch",), options=_OPTIONS))
COMPILE = register(Backend("compile", "model", _PRECISIONS, _open_compiled, _cuda_reason,
                           platform="pytorch_libtorch", title="torch.compile", packages=("torch",),
                           options=_OPTIONS))
