"""Page-locked host buffers for the host-to-device copy of GPU runners. A copy from pageable memory
is staged by the driver through its own pinned buffer and blocks; from pinned memory it is one DMA
that can run asynchronously on the runner's stream. Pinning is expensive (cudaHostAlloc), so one
buffer per input name, shape and dtype is kept and reused across calls."""
from __future__ import annotations

import numpy as np
import torch


class PinnedBuffers:
    """``stage(name, array, dtype)``: ``array`` copied (and cast) into this runner's pinned buffer for
    that name, shape and dtype. Callers synchronise with the copy's stream before the next ``stage``
    of the same name (every runner here does: it waits for its outputs)."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def stage(self, name: str, array: np.ndarray | torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        source = torch.as_tensor(array)
        dtype = dtype or source.dtype
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape != source.shape or buffer.dtype != dtype:
            buffer = self._buffers[name] = torch.empty(source.shape, dtype=dtype, pin_memory=True)
        buffer.copy_(source)
        return buffer

    def clear(self) -> None:
        self._buffers.clear()
