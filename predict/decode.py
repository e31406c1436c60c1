"""Decoding and preprocessing in worker processes, a bounded number of batches ahead of the runner,
with the transform the server applies (`rmt_deploy.preprocess`), so results match it pixel for pixel."""
from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from rmt_deploy.preprocess import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image, preprocess

from .sources import Source, read_source


DECODER_NICENESS = 10


@dataclass
class DecodedBatch:
    paths: list[str]
    errors: list[str | None]        # per path: None, or why it has no image
    images: np.ndarray              # (number of paths without error, 3, S, S) float32, in path order

    @property
    def ok(self) -> list[bool]:
        return [e is None for e in self.errors]


def decode_one(source: Source, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray | str:
    """The (3, S, S) input of one image, or the reason it has none (never raises for bad data)."""
    if source.error:
        return source.error
    try:
        return preprocess(decode_image(read_source(source), max_pixels=max_pixels), size)
    except ImageDecodeError as exc:
        return str(exc)
    except OSError as exc:
        return f"cannot read {source.file}: {exc.strerror or exc}"


def _below_the_runner() -> None:
    """Worker processes yield the CPU to the runner's threads: on a busy machine a decoder preempting one
    of them stalls the runner's whole parallel section, and batches are decoded ahead anyway."""
    os.nice(DECODER_NICENESS)


def decode_batch(sources: Sequence[Source], size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedBatch:
    decoded = [decode_one(s, size, max_pixels) for s in sources]
    images = [d for d in decoded if isinstance(d, np.ndarray)]
    return DecodedBatch([s.path for s in sources], [None if isinstance(d, np.ndarray) else d for d in decoded],
                        np.stack(images) if images else np.zeros((0, 3, size, size), np.float32))


def chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def decoded_batches(sources: Sequence[Source], batch_size: int, size: int, workers: int,
                    ahead: int | None = None) -> Iterator[DecodedBatch]:
    """Batches in input order, decoded by ``workers`` processes (0: in this process) with at most
    ``ahead`` batches in flight (default 2 per worker: enough to hide decoding, bounded memory)."""
    if workers <= 0:
        yield from (decode_batch(c, size) for c in chunks(sources, batch_size))
        return
    # spawn: the parent has torch's thread pools running; a forked child must not inherit them
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_below_the_runner) as pool:
        pending: deque = deque()
        for chunk in chunks(sources, batch_size):
            if len(pending) >= (ahead or 2 * workers):
                yield pending.popleft().result()
            pending.append(pool.submit(decode_batch, chunk, size))
        while pending:
            yield pending.popleft().result()
