"""Pinned host buffers for the GPU runners' host-to-device copy (needs CUDA: page-locking is a CUDA
driver call): one buffer per name, shape and dtype, reused; the eager runner on a GPU still matches
the CPU through them."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from rmt_deploy.runners import get_backend
from rmt_deploy.runners.pinned import PinnedBuffers

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned host buffers need a CUDA GPU")


@needs_cuda
def test_buffers_are_pinned_and_reused_per_shape_and_dtype():
    buffers = PinnedBuffers()
    a = np.random.default_rng(0).standard_normal((2, 3, 8, 8), dtype=np.float32)
    first = buffers.stage("images", a)
    assert first.is_pinned() and torch.equal(first, torch.from_numpy(a))
    again = buffers.stage("images", a * 2)
    assert again.data_ptr() == first.data_ptr() and torch.equal(again, torch.from_numpy(a * 2))
    half = buffers.stage("images", a, torch.float16)
    assert half.dtype == torch.float16 and half.is_pinned() and half.data_ptr() != first.data_ptr()
    assert buffers.stage("images", a[:1]).shape == (1, 3, 8, 8)


@needs_cuda
def test_eager_on_the_gpu_copies_through_one_pinned_buffer(tiny_model):
    images = np.random.default_rng(1).standard_normal((2, 3, 64, 64), dtype=np.float32)
    cpu = get_backend("eager").open(model=tiny_model).load().infer({"images": images})["logits"]
    runner = get_backend("eager").open(model=copy.deepcopy(tiny_model), device="cuda:0").load()
    gpu = [runner.infer({"images": images})["logits"] for _ in range(2)]
    staged = runner._pinned._buffers["images"]
    assert staged.is_pinned() and staged.shape == images.shape
    np.testing.assert_allclose(gpu[1], cpu, rtol=1e-3, atol=1e-3)
