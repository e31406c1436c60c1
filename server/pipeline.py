"""The steps every inference endpoint shares: decode in the worker pool, reserve queue room, batch,
deadline, and the end of a request's work when its client hangs up."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import numpy as np
from fastapi import Request
from starlette.requests import ClientDisconnect

from rmt_deploy.preprocess import ImageDecodeError, ImageTooLargeError, decode_image, preprocess

from .batcher import BatchResult, QueueFull, Reservation
from .errors import ApiError
from .state import ServerState

T = TypeVar("T")


def _decode_and_preprocess(data: bytes, max_pixels: int, size: int) -> np.ndarray:
    return preprocess(decode_image(data, max_pixels=max_pixels), size)[None]


async def off_loop(state: ServerState, work: Callable[..., T], *args) -> T:
    """Run CPU-heavy work (decode, large JSON) in the worker pool so the event loop keeps serving."""
    return await asyncio.get_running_loop().run_in_executor(state.decode_pool, work, *args)


async def decode(state: ServerState, data: bytes) -> tuple[np.ndarray, float]:
    """(1, 3, S, S) input and the milliseconds it took; 400/413 for bad, oversized or too thin images."""
    start = time.perf_counter()
    try:
        images = await off_loop(state, _decode_and_preprocess, data, state.settings.max_pixels,
                                state.model.image_size)
    except ImageTooLargeError as exc:
        raise ApiError(413, str(exc)) from exc
    except ImageDecodeError as exc:         # includes ImageShapeError (extreme aspect ratio)
        raise ApiError(400, str(exc)) from exc
    seconds = time.perf_counter() - start
    state.metrics.decode_seconds.observe(seconds)
    return images, seconds * 1e3


async def decode_all(state: ServerState, files: list[bytes]) -> list[tuple[np.ndarray, float]]:
    """Every file decoded before any is queued; the first failure stops the others not yet started."""
    tasks = [asyncio.ensure_future(decode(state, data)) for data in files]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


def reserve(state: ServerState, images: int) -> Reservation:
    """Queue room for a request's images: 503 when the queue is full, 400 when they can never fit."""
    try:
        return state.batcher.reserve(images)
    except QueueFull as exc:
        raise ApiError(503, f"server busy: {exc}", {"Retry-After": "1"}) from exc
    except ValueError as exc:
        raise ApiError(400, str(exc)) from exc


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: the next ASGI message says so)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def infer(request: Request, reservation: Reservation, arrays: list[np.ndarray]) -> list[BatchResult]:
    """Outputs of each array, batched with other requests'. A client that hangs up meanwhile ends the
    request (ClientDisconnect), and the reservation withdraws its images still waiting."""
    work = asyncio.ensure_future(reservation.submit(arrays))
    hangup = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({work, hangup}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            raise ClientDisconnect()
        return work.result()
    except ValueError as exc:
        raise ApiError(400, str(exc)) from exc
    finally:
        work.cancel()
        hangup.cancel()


@asynccontextmanager
async def deadline(state: ServerState) -> AsyncIterator[None]:
    """504 when the request is not done within --request-timeout-s (its queued work is withdrawn)."""
    try:
        async with asyncio.timeout(state.settings.request_timeout_s):
            yield
    except TimeoutError as exc:
        raise ApiError(504, f"request not finished within {state.settings.request_timeout_s} s") from exc
