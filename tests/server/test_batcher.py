"""The dynamic batcher on its own: a real DynamicBatcher on a real event loop, fed by a small numpy
runner that can be held closed (so what queues up while a batch runs is under the test's control)."""
from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from rmt_deploy.server.batcher import DynamicBatcher, QueueFull
from rmt_deploy.server.metrics import ServerMetrics


class GatedRunner:
    """Returns each image's pixel sum (so every request can check it got its own rows); records the
    shape of every call; blocks while the gate is closed; fails on a chosen call."""

    def __init__(self, fail_on_call: int | None = None):
        self.calls: list[tuple[int, ...]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail_on_call = fail_on_call

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        self.calls.append(images.shape)
        self.entered.set()
        self.gate.wait(10)
        if len(self.calls) == self.fail_on_call:
            raise RuntimeError("runner failed")
        return {"sum": images.reshape(len(images), -1).sum(axis=1, keepdims=True)}


def image(value: float, size: int = 4, n: int = 1) -> np.ndarray:
    return np.full((n, 3, size, size), value, np.float32)


def expected_sum(value: float, size: int = 4) -> float:
    return value * 3 * size * size


def run(test, runner: GatedRunner, **options):
    """Run ``test(batcher)`` on a fresh event loop with a started batcher; drained afterwards."""
    settings = dict(max_batch_size=8, max_delay_ms=0, max_queue_size=64) | options

    async def main():
        batcher = DynamicBatcher(runner, ServerMetrics(), **settings)
        batcher.start()
        try:
            return await asyncio.wait_for(test(batcher), 30)
        finally:
            runner.gate.set()
            await batcher.drain(5)
    return asyncio.run(main())


async def request(batcher: DynamicBatcher, *arrays: np.ndarray):
    with batcher.reserve(sum(len(a) for a in arrays)) as reservation:
        return await reservation.submit(list(arrays))


async def hold_runner(batcher: DynamicBatcher, runner: GatedRunner) -> asyncio.Task:
    """Start one batch and keep the runner busy with it until the gate opens."""
    runner.gate.clear()
    runner.entered.clear()
    task = asyncio.create_task(request(batcher, image(-1.0)))
    await asyncio.to_thread(runner.entered.wait, 10)
    return task


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0.01)


def test_concurrent_requests_coalesce_and_get_their_own_rows():
    runner = GatedRunner()

    async def test(batcher):
        blocker = await hold_runner(batcher, runner)
        tasks = [asyncio.create_task(request(batcher, image(v))) for v in (1.0, 2.0, 3.0, 4.0)]
        await settle()
        runner.gate.set()
        await blocker
        return await asyncio.gather(*tasks)

    results = run(test, runner, max_delay_ms=50)
    assert runner.calls[1] == (4, 3, 4, 4)
    for value, [result] in zip((1.0, 2.0, 3.0, 4.0), results):
        assert result.outputs["sum"].ravel().tolist() == [expected_sum(value)]
        assert result.batch_size == 4


def test_requests_already_queued_are_drained_without_waiting_for_the_delay():
    """With no delay at all, everything that queued up during the previous batch goes into the next one."""
    runner = GatedRunner()

    async def test(batcher):
        blocker = await hold_runner(batcher, runner)
        tasks = [asyncio.create_task(request(batcher, image(v))) for v in range(6)]
        await settle()
        runner.gate.set()
        await blocker
        await asyncio.gather(*tasks)

    run(test, runner, max_delay_ms=0)
    assert [shape[0] for shape in runner.calls] == [1, 6]


def test_a_full_batch_leaves_the_rest_queued_for_the_next():
    runner = GatedRunner()

    async def test(batcher):
        blocker = await hold_runner(batcher, runner)
        tasks = [asyncio.create_task(request(batcher, image(v, n=3))) for v in range(3)]
        await settle()
        runner.gate.set()
        await blocker
        await asyncio.gather(*tasks)

    run(test, runner, max_batch_size=8)
    assert [shape[0] for shape in runner.calls] == [1, 6, 3]      # 3 + 3 fit, a third 3 would make 9


def test_a_different_input_shape_starts_the_next_batch():
    runner = GatedRunner()

    async def test(batcher):
        blocker = await hold_runner(batcher, runner)
        tasks = [asyncio.create_task(request(batcher, image(v, size))) for v, size in ((1.0, 4), (2.0, 8), (3.0, 8))]
        await settle()
        runner.gate.set()
        await blocker
        return await asyncio.gather(*tasks)

    results = run(test, runner)
    assert runner.calls[1:] == [(1, 3, 4, 4), (2, 3, 8, 8)]
    sums = [r[0].outputs["sum"].item() for r in results]
    assert sums == [expected_sum(1.0, 4), expected_sum(2.0, 8), expected_sum(3.0, 8)]


def test_abandoned_requests_are_withdrawn_and_never_inferred():
    """A request that ends while its images wait (timeout, disconnect, a failed sibling) takes them
    out of the queue and gives its room back."""
    runner = GatedRunner()

    async def test(batcher):
        blocker = await hold_runner(batcher, runner)
        abandoned = asyncio.create_task(request(batcher, image(7.0), image(7.0), image(7.0)))
        await settle()
        assert batcher.queued_images == 3
        with pytest.raises(QueueFull):
            batcher.reserve(62)
        abandoned.cancel()
        await settle()
        assert batcher.queued_images == 0
        with batcher.reserve(64):          # all the room is back; unused room is returned on exit
            pass
        kept = asyncio.create_task(request(batcher, image(1.0)))
        runner.gate.set()
        await blocker
        return await kept

    [result] = run(test, runner, max_queue_size=64)
    assert result.outputs["sum"].item() == expected_sum(1.0)
    assert [shape[0] for shape in runner.calls] == [1, 1]       # the three abandoned images never ran


def test_queue_room_is_reserved_per_request():
    runner = GatedRunner()

    async def test(batcher):
        first = batcher.reserve(3)
        with pytest.raises(QueueFull, match="queue full"):
            batcher.reserve(2)
        with first, batcher.reserve(1):
            with pytest.raises(QueueFull):
                batcher.check_room()
        batcher.check_room()
        with pytest.raises(ValueError, match="queue size 4"):
            batcher.reserve(5)
        with batcher.reserve(3) as reservation:
            with pytest.raises(ValueError, match="max batch size 2"):
                await reservation.submit([image(1.0, n=3)])
            with pytest.raises(ValueError, match="reservation of 3"):
                await reservation.submit([image(1.0)] * 4)

    run(test, runner, max_queue_size=4, max_batch_size=2)
    assert runner.calls == []


def test_a_failing_runner_fails_its_batch_and_the_batcher_goes_on():
    runner = GatedRunner(fail_on_call=2)

    async def test(batcher):
        blocker = await hold_runner(batcher, runner)
        failing = [asyncio.create_task(request(batcher, image(v))) for v in (1.0, 2.0)]
        await settle()
        runner.gate.set()
        await blocker
        outcomes = await asyncio.gather(*failing, return_exceptions=True)
        after = await request(batcher, image(5.0))
        return outcomes, after

    outcomes, [after] = run(test, runner)
    assert [str(o) for o in outcomes] == ["runner failed", "runner failed"]
    assert after.outputs["sum"].item() == expected_sum(5.0)
