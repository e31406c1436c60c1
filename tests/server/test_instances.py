"""``--instances N``: N runners fed by the one dynamic batcher, against a real server on 127.0.0.1.
Tiny model at 64 px, one thread per instance."""
from __future__ import annotations

import asyncio
import threading
import time

import httpx
import numpy as np
import pytest
from test_server import jpeg, live_server, make_settings, scrape

from rmt_deploy.preprocess import decode_image, preprocess

SIZE = 64
REQUESTS, CONCURRENCY, TIME_LIMIT_S = 400, 16, 240


async def load(url: str, images: list[bytes]) -> list[tuple[int, int]]:
    """(image index, top class or -status) of every request; bounded in count and time."""
    answers, issued, deadline = [], 0, time.monotonic() + TIME_LIMIT_S
    async with httpx.AsyncClient(base_url=url, timeout=60,
                                 limits=httpx.Limits(max_connections=CONCURRENCY)) as client:
        async def worker() -> None:
            nonlocal issued
            while issued < REQUESTS and time.monotonic() < deadline:
                index, issued = issued % len(images), issued + 1
                r = await client.post("/classify", content=images[index], headers={"content-type": "image/jpeg"})
                answers.append((index, r.json()["predictions"][0]["index"] if r.status_code == 200 else -r.status_code))
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return answers


def busy_seconds(url: str, instance: int) -> float:
    return scrape(url, f'rmt_instance_busy_seconds_total{{instance="{instance}"}}')


def test_two_instances_answer_400_requests_at_concurrency_16(model_files, eager):
    images = [jpeg(seed) for seed in range(8)]
    expected = [int(np.argmax(eager(preprocess(decode_image(d), SIZE)[None])[0])) for d in images]
    settings = make_settings(model_files, image_size=SIZE, instances=2, max_queue_size=64)
    with live_server(settings) as (_, url):
        before = [busy_seconds(url, i) for i in (0, 1)]
        answers = asyncio.run(load(url, images))
        after = [busy_seconds(url, i) for i in (0, 1)]
        text = httpx.get(f"{url}/metrics").text
    assert len(answers) == REQUESTS
    assert [top for _, top in answers] == [expected[index] for index, _ in answers]     # no errors, right answers
    assert all(a > b for a, b in zip(after, before)), (before, after)                   # both instances ran batches
    assert 'instance="2"' not in text


def test_onnxruntime_instances_are_separate_sessions(tmp_path, tiny_model, eager):
    export = pytest.importorskip("rmt_deploy.exporters.onnx_export")
    onnx = export.export_onnx(tiny_model, tmp_path / "tiny.onnx", dynamic_batch=True, height=SIZE, width=SIZE)
    settings = make_settings({}, backend="onnxruntime", onnx=str(onnx), instances=2)
    x = np.stack([preprocess(decode_image(jpeg(seed)), SIZE) for seed in range(2)])
    with live_server(settings) as (server, url):
        served = server.config.app.state.server.model
        assert len(served.runners) == 2 and served.runners[0].session is not served.runners[1].session
        for instance in (0, 1):
            np.testing.assert_allclose(served.infer(x, instance)["logits"], eager(x), atol=1e-4)


def test_a_free_instance_takes_the_next_batch_while_another_runs():
    """Instance 0 held inside its batch: the next request is answered by instance 1 meanwhile, and
    drain waits for the held batch."""
    from rmt_deploy.server.batcher import DynamicBatcher
    from rmt_deploy.server.metrics import ServerMetrics
    gate, entered = threading.Event(), threading.Event()

    def instance(number: int):
        def infer(images: np.ndarray) -> dict[str, np.ndarray]:
            entered.set()
            if number == 0:
                gate.wait(10)
            return {"instance": np.full((len(images), 1), number, np.float32)}
        return infer

    async def request(batcher: DynamicBatcher) -> float:
        with batcher.reserve(1) as reservation:
            [result] = await reservation.submit([np.zeros((1, 3, 4, 4), np.float32)])
        return float(result.outputs["instance"][0, 0])

    async def main():
        batcher = DynamicBatcher([instance(0), instance(1)], ServerMetrics(), max_batch_size=4, max_delay_ms=0,
                                 max_queue_size=8)
        batcher.start()
        held = asyncio.create_task(request(batcher))
        await asyncio.to_thread(entered.wait, 10)
        assert await asyncio.wait_for(request(batcher), 10) == 1.0
        assert not held.done()
        gate.set()
        assert await asyncio.wait_for(held, 10) == 0.0
        await batcher.drain(5)
    asyncio.run(main())
