"""The eager / torch.compile runner: matches the model, reuses freed activation memory on CPU, and
on CUDA splits its timings and matches the CPU."""
from __future__ import annotations

import copy
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rmt_deploy.runners import open_runner

SIZE = 32


def test_eager_runner_matches_the_model(tiny_model):
    runner = open_runner("eager", model=tiny_model).load()
    x = np.random.default_rng(1).standard_normal((2, 3, 64, 64), dtype=np.float32)
    np.testing.assert_allclose(runner.infer({"images": x})["logits"], tiny_model(torch.from_numpy(x)).detach().numpy(), rtol=1e-6)
    meta = runner.metadata()
    assert [t.name for t in meta.inputs] == ["images"] and [t.name for t in meta.outputs] == ["logits"]


# Run in a fresh interpreter: the suite's own heap (OpenVINO/ORT thread pools, torch.compile workers)
# is not the state of an `rmt-bench` or `rmt-serve` process after it loads the eager runner.
_FREED_MEMORY_PROBE = """
import ctypes, json, resource, sys, torch
sys.path.insert(0, sys.argv[1])
from conftest import TINY_CONFIG
from rmt_deploy.model import RMTConfig, build_model
from rmt_deploy.runners import open_runner
open_runner("eager", model=build_model(RMTConfig.from_dict(TINY_CONFIG))).load()
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    activation = torch.zeros(16 << 20).add_(1.0)     # 64 MiB, written: every new page faults once
    chunk_header = ctypes.c_size_t.from_address(activation.data_ptr() - 8).value   # glibc size | flags
    del activation
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"faults": faults, "mmapped": bool(chunk_header & 2), "non_main_arena": bool(chunk_header & 4)}))
"""


def _transparent_hugepages() -> str:
    try:
        return Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return ""

@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt tuning applies to glibc only")
@pytest.mark.parametrize("keep", ["1", "0"])
def test_eager_cpu_runner_reuses_freed_activation_memory(keep):
    """Large activations must come back from the heap, not as freshly page-faulted mmap blocks.

    64 MiB is above glibc's largest dynamic mmap threshold (32 MiB), so without the runner's
    mallopt tuning (RMT_KEEP_FREED_MEMORY=0) every such block is mmapped and faults ~16k pages.
    """
    env = {**os.environ, "RMT_KEEP_FREED_MEMORY": keep}
    done = subprocess.run([sys.executable, "-c", _FREED_MEMORY_PROBE, str(Path(__file__).parents[1])],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    probe = json.loads(done.stdout.splitlines()[-1])
    steady = probe["faults"][-1]
    if keep == "1":
        assert steady < 1000 and not probe["mmapped"], probe
    else:
        assert probe["mmapped"], probe
        if "[always]" not in _transparent_hugepages():      # 'always' maps fresh blocks in 2 MiB pages
            assert steady > 15000, probe


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["eager", "compile"])
def test_cuda_torch_runners_split_and_match_cpu(tiny_model, backend):
    from rmt_deploy.runners import INPUT_NAME, open_runner

    images = np.random.default_rng(1).standard_normal((2, 3, SIZE, SIZE), dtype=np.float32)
    with torch.inference_mode():
        ref = tiny_model(torch.from_numpy(images)).numpy()
    for precision, tol in (("fp32", 1e-3), ("fp16", 2e-2)):
        with open_runner(backend, model=copy.deepcopy(tiny_model), device="cuda", precision=precision,
                         cuda_graphs=True) as runner:
            for _ in range(3):      # the compiled model records its CUDA graph on the first calls
                out = runner.infer({INPUT_NAME: images})["logits"]
            assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < tol, precision
            t = runner.last_timing
            assert t.compute_ms > 0 and t.h2d_ms > 0 and t.d2h_ms > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_eager_runners_run_on_their_own_streams_and_agree(tiny_model):
    """Two runners (two server instances) infer at once from two threads, each on its own stream."""
    from concurrent.futures import ThreadPoolExecutor

    from rmt_deploy.runners import INPUT_NAME

    images = np.random.default_rng(2).standard_normal((4, 3, SIZE, SIZE), dtype=np.float32)
    runners = [open_runner("eager", model=copy.deepcopy(tiny_model), device="cuda").load() for _ in range(2)]
    try:
        assert runners[0]._stream is not None and runners[0]._stream != runners[1]._stream
        with ThreadPoolExecutor(2) as pool:
            outs = list(pool.map(lambda r: [r.infer({INPUT_NAME: images})["logits"] for _ in range(5)], runners))
        for out in outs[0][1:] + outs[1]:
            np.testing.assert_allclose(out, outs[0][0], rtol=1e-4, atol=1e-5)
    finally:
        for runner in runners:
            runner.close()
