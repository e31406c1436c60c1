"""A CPU attention kernel for RMT's many small heads, used by the OpenVINO runner.

RMT attends along image rows and columns in its first stages (sequences of 28-56 tokens, thousands
of (batch, head) pairs per call) and over whole 7x7 or 14x14 maps in its last two, always with heads
16 or 32 wide. OpenVINO's fused attention spends much of its time on per-pair overhead there and
needs the split-heads transposes around it. `kernels/small_attention.cpp` reads the exported 3-D
(batch, seq, heads * dim) tensors directly, with little work per (batch, head) pair, on oneTBB,
OpenVINO's own thread pool (figures: docs/benchmarks.md). The same
library is an OpenVINO extension: its ``SmallHeadAttention`` operation runs the kernel inside the
CPU plugin's graph, with no Python between nodes. It is compiled on first use with the machine's C++
compiler for its own CPU (``-march=native``, AVX-512F) against the headers and libraries in the
openvino package, and cached; where that fails (no compiler, no AVX-512, no OpenVINO)
`kernel_unavailable_reason` says why and OpenVINO's own kernel runs instead. Where the CPU has
AVX512_BF16 the library also has a bfloat16 variant (bf16 tensors in and out, float32 softmax), which
bf16 graphs run; `kernel_unavailable_reason("bf16")` says whether it is there.
``RMT_SMALL_ATTENTION=0`` turns it off.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

import numpy as np

_SOURCE = "small_attention.cpp"
# -z nodelete: never unmapped once loaded, so the OpenVINO nodes made from it (which do not hold it) stay valid
_FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-std=c++17", "-Wl,-z,nodelete"]


def _cache_dir() -> Path:
    root = os.environ.get("RMT_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "rmt_deploy", "kernels")
    return Path(root)


@functools.lru_cache(maxsize=1)
def _build() -> tuple[Path | None, str | None]:
    """(library, None), or (None, why it is not available); built once per source, flags, OpenVINO and CPU."""
    if os.environ.get("RMT_SMALL_ATTENTION", "1") == "0":
        return None, "turned off by RMT_SMALL_ATTENTION=0"
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        return None, "no C++ compiler found (set CXX) to build the small-head attention kernel"
    try:
        import openvino
    except ImportError:
        return None, "the small-head attention kernel is an OpenVINO operation: OpenVINO is not installed"
    openvino_dir = Path(openvino.__file__).parent
    libs = [next(iter(sorted((openvino_dir / "libs").glob(f"{name}.so*"))), None) for name in ("libopenvino", "libtbb")]
    if not (openvino_dir / "include" / "openvino").is_dir() or not (openvino_dir / "include" / "tbb").is_dir() \
            or None in libs:
        return None, f"this OpenVINO ({openvino_dir}) ships no C++ headers or libraries to build against"
    source = resources.files("rmt_deploy.runners").joinpath("kernels", _SOURCE).read_bytes()
    cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model_name = next((line for line in cpu.splitlines() if line.startswith("model name")), "")
    command = [compiler, *_FLAGS, f"-I{openvino_dir / 'include'}"]
    key = hashlib.sha256(source + " ".join([*command, *map(str, libs), openvino.__version__, model_name]).encode())
    library = _cache_dir() / f"small_attention-{key.hexdigest()[:16]}.so"
    if not library.is_file():
        library.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
            src = Path(tmp) / _SOURCE
            src.write_bytes(source)
            built = Path(tmp) / library.name
            result = subprocess.run([*command, "-o", str(built), str(src), *map(str, libs),
                                     f"-Wl,-rpath,{libs[0].parent}"], capture_output=True, text=True)
            if result.returncode != 0:
                return None, f"the small-head attention kernel did not build: {result.stderr.strip()[:300]}"
            os.replace(built, library)      # atomic: concurrent first uses never load half a file
    return library, None


@functools.lru_cache(maxsize=1)
def _load() -> ctypes.CDLL:
    """The library's C entry point, for `attention`."""
    lib = ctypes.CDLL(str(library_path()))
    lib.rmt_attention.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 5 + [ctypes.c_float]
    lib.rmt_attention.restype = ctypes.c_int
    lib.rmt_attention_bf16.argtypes = lib.rmt_attention.argtypes
    lib.rmt_attention_bf16.restype = ctypes.c_int
    lib.rmt_attention_fits.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.rmt_attention_fits.restype = ctypes.c_int
    lib.rmt_attention_has_bf16.restype = ctypes.c_int
    return lib


def fits(seq: int, head_dim: int) -> bool:
    """Whether the kernel takes this sequence length and head width (up to 256 tokens, heads a multiple
    of 16 up to 64: one (batch, head) pair's keys and scores sit in a per-thread scratch block). Inside
    those limits it beat OpenVINO's own attention on every rmt_t node at batch 1 and 8 (28-196 tokens)."""
    return bool(_load().rmt_attention_fits(seq, head_dim))


def mask_period(mask: np.ndarray) -> np.ndarray:
    """The shortest run of per-head masks that repeats across the heads: the H pass's (W * heads)
    masks are the stage's few per-head ones, one copy per column, and reading those few keeps them
    in cache."""
    heads = mask.shape[0]
    for period in range(1, heads):
        if heads % period == 0 and (mask.reshape(heads // period, period, *mask.shape[1:]) == mask[:period]).all():
            return mask[:period]
    return mask


def kernel_unavailable_reason(precision: str = "f32") -> str | None:
    """Why the kernel cannot compute in ``precision`` ("f32" or "bf16") here, or None."""
    if reason := _build()[1]:
        return reason
    if precision == "bf16" and not _load().rmt_attention_has_bf16():
        return "the small-head attention kernel was built without its bf16 variant (this CPU has no AVX512_BF16)"
    return None


def _bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 rounded to bfloat16 (to nearest, ties to even), as the raw 16-bit patterns."""
    values = np.ascontiguousarray(a, dtype=np.float32)
    bits = values.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(values), np.uint16(0x7FC0), rounded)      # rounding would carry a NaN into +-0


def library_path() -> Path:
    """The built library (an OpenVINO extension, and the C function `attention` calls); RuntimeError
    saying why where it is unavailable."""
    library, reason = _build()
    if library is None:
        raise RuntimeError(reason)
    return library


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray, heads: int, scale: float = 1.0,
              out: np.ndarray | None = None, precision: str = "f32") -> np.ndarray:
    """The kernel's test seam: softmax(q k^T * scale + mask) v per head, on (batch, seq, heads * dim)
    float32 arrays; ``mask`` is (m, seq, seq) with m dividing heads, head h taking mask h % m. The
    runner never calls it: the OpenVINO runner runs the same C++ code as a graph node
    (`openvino_graph.use_small_head_attention`); this entry checks that code against numpy directly.
    ``precision`` "bf16" runs the bfloat16 variant on q, k, v rounded to bfloat16 and returns its
    bfloat16 result widened to float32."""
    if precision not in ("f32", "bf16"):
        raise ValueError(f"precision must be 'f32' or 'bf16', not {precision!r}")
    lib = _load()
    batch, seq, channels = q.shape
    if k.shape != q.shape or v.shape != q.shape or channels % heads or mask.shape[-2:] != (seq, seq):
        raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape} must be one (batch, seq, heads * dim) shape, with "
                         f"{heads} heads dividing its last dim, and mask {mask.shape} (m, seq, seq)")
    if out is not None and (out.shape != q.shape or out.dtype != np.float32 or not out.flags.c_contiguous):
        raise ValueError(f"out must be a C-contiguous float32 array of shape {q.shape}")
    if precision == "bf16" and (reason := kernel_unavailable_reason("bf16")):
        raise RuntimeError(reason)
    dim = channels // heads
    mask = np.ascontiguousarray(mask, dtype=np.float32).reshape(-1, seq, seq)
    if precision == "bf16":     # raw bfloat16 bits in and out
        arrays, call = [_bf16_bits(a) for a in (q, k, v)], lib.rmt_attention_bf16
    else:
        arrays, call = [np.ascontiguousarray(a, dtype=np.float32) for a in (q, k, v)], lib.rmt_attention
    result = np.empty_like(arrays[0]) if precision == "bf16" or out is None else out
    status = call(*(a.ctypes.data for a in arrays), mask.ctypes.data, result.ctypes.data, batch, seq, heads, dim,
                  mask.shape[0], scale)
    if status != 0:
        raise ValueError(f"small-head attention does not take seq {seq}, head dim {dim}, {mask.shape[0]} masks for "
                         f"{heads} heads (see `fits`; the mask count must divide the heads)")
    if precision != "bf16":
        return result
    widened = (result.astype(np.uint32) << 16).view(np.float32)
    if out is None:
        return widened
    out[...] = widened
    return out
