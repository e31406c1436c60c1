"""Dynamic batching: concurrent requests are coalesced into one runner call, the way Triton's
dynamic batcher does, because a batch of 8 costs far less than 8 batches of 1.

A request first reserves queue room for all its images (none left: `QueueFull`, the caller answers
503), decodes them, then queues them at once. One task on the event loop forms batches up to
``max_batch_size`` images: it takes every compatible request already waiting and waits at most
``max_delay_ms`` after the first one for more, and runs inference in a worker thread so the loop
keeps serving. With several model instances (Triton's instance_group) each instance has its own
loop and thread: a free instance forms the next batch while the others run theirs, one forming at a
time, so batches stay as full as with one instance. Every request gets back exactly its own rows of every output. When a request
ends early (timeout, disconnect, a sibling file that failed) its reservation is released and its
images still waiting are withdrawn, so nobody pays for abandoned work.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
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


@dataclass(eq=False)
class _Pending:
    images: np.ndarray                    # (n, 3, H, W)
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)
    taken: bool = False                   # in a batch: past the point of withdrawal


class Reservation:
    """Queue room held by one request; a context manager that gives back whatever is unused and
    withdraws the request's images still waiting when the request ends, however it ends."""

    def __init__(self, batcher: DynamicBatcher, images: int):
        self._batcher, self._unused, self._pending = batcher, images, []

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc_info) -> None:
        self._batcher._withdraw([p for p in self._pending if not p.taken], self._unused)
        self._unused, self._pending = 0, []

    async def submit(self, arrays: list[np.ndarray]) -> list[BatchResult]:
        """Queue each (n, 3, H, W) array (a runner call may take several, never split one) and wait
        for all their outputs."""
        total = sum(len(a) for a in arrays)
        if total > self._unused:
            raise ValueError(f"{total} images submitted on a reservation of {self._unused}")
        too_big = [len(a) for a in arrays if len(a) > self._batcher.max_batch_size]
        if too_big:
            raise ValueError(f"batch of {too_big[0]} is above the server's max batch size "
                             f"{self._batcher.max_batch_size}")
        loop = asyncio.get_running_loop()
        pending = [_Pending(a, loop.create_future()) for a in arrays]
        self._unused -= total
        self._pending += pending
        self._batcher._enqueue(pending)
        return list(await asyncio.gather(*(p.future for p in pending)))


Infer = Callable[[np.ndarray], dict[str, np.ndarray]]


class DynamicBatcher:
    def __init__(self, instances: Infer | Sequence[Infer], metrics: ServerMetrics, *,
                 max_batch_size: int, max_delay_ms: float, max_queue_size: int):
        """``instances``: one inference function per model instance (a single function: one instance)."""
        self.instances = [instances] if callable(instances) else list(instances)
        self.metrics = metrics
        self.max_batch_size, self.max_delay_s = max_batch_size, max_delay_ms / 1e3
        self.max_queue_size = max_queue_size
        self._queue: deque[_Pending] = deque()
        self._arrived = asyncio.Event()
        self._held = 0                    # images reserved or queued, not yet taken into a batch
        self._executors = [ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"rmt-infer-{i}")
                           for i in range(len(self.instances))]
        self._forming = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []
        self._busy = 0                    # batches taken and not yet answered, for drain()
        self.failures_in_a_row = 0        # runner calls that raised since the last one that worked
        for i in range(len(self.instances)):
            metrics.instance_busy_seconds.labels(str(i))      # every instance listed from the start, at 0

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run(i), name=f"rmt-batcher-{i}") for i in range(len(self.instances))]

    @property
    def running(self) -> bool:
        """Every instance's batching task is alive: only drain() (or a bug) ends them."""
        return bool(self._tasks) and not any(task.done() for task in self._tasks)

    @property
    def queued_images(self) -> int:
        return sum(len(p.images) for p in self._queue)

    def check_room(self) -> None:
        """QueueFull when not even one more image fits: lets a busy server refuse a request before
        reading its body."""
        if self._held >= self.max_queue_size:
            raise QueueFull(f"queue full ({self._held} images waiting)")

    def reserve(self, images: int) -> Reservation:
        """Room for ``images`` images of one request, or QueueFull; ValueError if it can never fit."""
        if images > self.max_queue_size:
            raise ValueError(f"batch of {images} is above the server's queue size {self.max_queue_size}")
        if self._held + images > self.max_queue_size:
            raise QueueFull(f"queue full ({self._held} images waiting)")
        self._held += images
        return Reservation(self, images)

    def _enqueue(self, pending: list[_Pending]) -> None:
        self._queue.extend(pending)
        self.metrics.queue_depth.set(self.queued_images)
        self._arrived.set()

    def _withdraw(self, pending: list[_Pending], unused: int) -> None:
        for p in pending:
            self._queue.remove(p)
            p.future.cancel()
        self._held -= unused + sum(len(p.images) for p in pending)
        self.metrics.queue_depth.set(self.queued_images)

    def _take(self) -> _Pending:
        pending = self._queue.popleft()
        pending.taken = True
        self._held -= len(pending.images)
        self.metrics.queue_depth.set(self.queued_images)
        return pending

    async def _wait_for_arrival(self, timeout: float | None) -> bool:
        self._arrived.clear()
        try:
            async with asyncio.timeout(timeout):
                await self._arrived.wait()
        except TimeoutError:
            return False
        return True

    async def _collect(self) -> list[_Pending]:
        """One batch: the first waiting request, then every compatible one already queued (a request of
        another input shape, or one that would overflow the batch, starts the next batch), then
        whatever arrives before the delay runs out."""
        while not self._queue:
            await self._wait_for_arrival(None)
        first = self._take()
        self._busy += 1                   # from here until the batch has run
        batch, rows = [first], len(first.images)
        deadline = time.perf_counter() + self.max_delay_s
        while rows < self.max_batch_size:
            if not self._queue:
                if not await self._wait_for_arrival(max(0.0, deadline - time.perf_counter())):
                    break
                continue
            head = self._queue[0]
            if head.images.shape[1:] != first.images.shape[1:] or rows + len(head.images) > self.max_batch_size:
                break
            batch.append(self._take())
            rows += len(head.images)
        return [p for p in batch if not p.future.done()]

    async def _run(self, instance: int) -> None:
        while True:
            async with self._forming:     # one instance forms a batch at a time; the others run theirs
                batch = await self._collect()
            try:
                if batch:
                    await self._run_batch(batch, instance)
            finally:
                self._busy -= 1

    async def _run_batch(self, batch: list[_Pending], instance: int) -> None:
        images = np.concatenate([p.images for p in batch]) if len(batch) > 1 else batch[0].images
        started = time.perf_counter()
        try:
            outputs = await asyncio.get_running_loop().run_in_executor(
                self._executors[instance], self.instances[instance], images)
        except Exception as exc:  # the runner failed: every request of this batch gets the error
            self.failures_in_a_row += 1
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        finally:
            self.metrics.instance_busy_seconds.labels(str(instance)).inc(time.perf_counter() - started)
        self.failures_in_a_row = 0
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
        while (self._queue or self._busy) and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for executor in self._executors:
            executor.shutdown(wait=True)
