"""Dynamic batching: concurrent requests are coalesced into one runner call, the way Triton's
dynamic batcher does, because a batch of 8 costs far less than 8 batches of 1.

Requests wait in a bounded queue (full: `QueueFull`, the caller answers 503). One task on the event
loop forms batches up to ``max_batch_size`` images, waiting at most ``max_delay_ms`` after the
first one, and runs inference in a single worker thread so the loop keeps serving. Every request
gets back exactly its own rows of every output.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .metrics import ServerMetrics


class QueueFull(Exception):
    """No room for the request; retry later."""


@dataclass
class BatchResult:
    outputs: dict[str, np.ndarray]
    queue_ms: float
    infer_ms: float
    batch_size: int


@dataclass
class _Pending:
    images: np.ndarray                    # (n, 3, H, W)
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class DynamicBatcher:
    def __init__(self, infer: Callable[[np.ndarray], dict[str, np.ndarray]], metrics: ServerMetrics, *,
                 max_batch_size: int, max_delay_ms: float, max_queue_size: int):
        self.infer, self.metrics = infer, metrics
        self.max_batch_size, self.max_delay_s = max_batch_size, max_delay_ms / 1e3
        self.max_queue_size = max_queue_size
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._queued_images = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rmt-infer")
        self._task: asyncio.Task | None = None
        self._carry: _Pending | None = None
        self._busy = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="rmt-batcher")

    async def submit(self, images: np.ndarray) -> BatchResult:
        """Queue ``images`` (n, 3, H, W) and wait for their outputs. Cancelling the caller (timeout,
        disconnect) drops the request from any batch not yet started."""
        n = len(images)
        if n > self.max_batch_size:
            raise ValueError(f"batch of {n} is above the server's max batch size {self.max_batch_size}")
        if n > self.max_queue_size:
            raise ValueError(f"batch of {n} is above the server's queue size {self.max_queue_size}")
        if self._queued_images + n > self.max_queue_size:
            raise QueueFull(f"queue full ({self._queued_images} images waiting)")
        pending = _Pending(images, asyncio.get_running_loop().create_future())
        self._queued_images += n
        self.metrics.queue_depth.set(self._queued_images)
        self._queue.put_nowait(pending)
        return await pending.future

    async def _next(self, timeout: float | None) -> _Pending | None:
        if self._carry is not None:
            pending, self._carry = self._carry, None
            return pending
        try:
            pending = await (asyncio.wait_for(self._queue.get(), timeout) if timeout is not None else self._queue.get())
        except asyncio.TimeoutError:
            return None
        self._queued_images -= len(pending.images)
        self.metrics.queue_depth.set(self._queued_images)
        return pending

    async def _collect(self) -> list[_Pending]:
        first = await self._next(None)
        batch, rows = [first], len(first.images)
        deadline = time.perf_counter() + self.max_delay_s
        while rows < self.max_batch_size:
            pending = await self._next(max(0.0, deadline - time.perf_counter()))
            if pending is None:
                break
            same_shape = pending.images.shape[1:] == first.images.shape[1:]
            if not same_shape or rows + len(pending.images) > self.max_batch_size:
                self._carry = pending          # starts the next batch
                break
            batch.append(pending)
            rows += len(pending.images)
        return [p for p in batch if not p.future.done()]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            if not batch:
                continue
            images = np.concatenate([p.images for p in batch]) if len(batch) > 1 else batch[0].images
            started = time.perf_counter()
            self._busy = True
            try:
                outputs = await loop.run_in_executor(self._executor, self.infer, images)
            except Exception as exc:  # the runner failed: every request of this batch gets the error
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            finally:
                self._busy = False
            infer_ms = (time.perf_counter() - started) * 1e3
            self.metrics.infer_seconds.observe(infer_ms / 1e3)
            self.metrics.batch_size.observe(len(images))
            offset = 0
            for p in batch:
                n = len(p.images)
                queue_ms = (started - p.enqueued) * 1e3
                self.metrics.queue_seconds.observe(queue_ms / 1e3)
                if not p.future.done():
                    p.future.set_result(BatchResult({k: v[offset:offset + n] for k, v in outputs.items()},
                                                    queue_ms, infer_ms, len(images)))
                offset += n

    async def drain(self, timeout: float) -> None:
        """Finish what is queued (graceful shutdown), then stop the batching task and worker."""
        deadline = time.perf_counter() + timeout
        while (self._queued_images or self._carry or self._busy) and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)
