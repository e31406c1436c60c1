"""The steps every inference endpoint shares: decode in the worker pool, batch, deadline."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np

from rmt_deploy.preprocess import ImageDecodeError, ImageTooLargeError, decode_image, preprocess

from .batcher import BatchResult, QueueFull
from .errors import ApiError
from .state import ServerState


def _decode_and_preprocess(data: bytes, max_pixels: int, size: int) -> np.ndarray:
    return preprocess(decode_image(data, max_pixels=max_pixels), size)[None]


async def decode(state: ServerState, data: bytes) -> tuple[np.ndarray, float]:
    """(1, 3, S, S) input and the milliseconds it took; 400/413 for bad or oversized images."""
    start = time.perf_counter()
    loop = asyncio.get_running_loop()
    try:
        images = await loop.run_in_executor(state.decode_pool, _decode_and_preprocess, data,
                                            state.settings.max_pixels, state.model.image_size)
    except ImageTooLargeError as exc:
        raise ApiError(413, str(exc)) from exc
    except ImageDecodeError as exc:
        raise ApiError(400, str(exc)) from exc
    seconds = time.perf_counter() - start
    state.metrics.decode_seconds.observe(seconds)
    return images, seconds * 1e3


async def infer(state: ServerState, images: np.ndarray) -> BatchResult:
    try:
        return await state.batcher.submit(images)
    except QueueFull as exc:
        raise ApiError(503, f"server busy: {exc}", {"Retry-After": "1"}) from exc
    except ValueError as exc:
        raise ApiError(400, str(exc)) from exc


@asynccontextmanager
async def deadline(state: ServerState) -> AsyncIterator[None]:
    """504 when the request is not done within --request-timeout-s (queued work is dropped)."""
    try:
        async with asyncio.timeout(state.settings.request_timeout_s):
            yield
    except TimeoutError as exc:
        raise ApiError(504, f"request not finished within {state.settings.request_timeout_s} s") from exc
