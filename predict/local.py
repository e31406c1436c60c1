"""rmt-predict on one machine: worker processes decode, this process runs the runner and writes parts."""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from .decode import decoded_batches
from .output import PartWriter, prepare_output
from .predictor import PredictOptions, open_predictor, output_schema, rows_table
from .sources import Source, list_sources


@dataclass
class RunSummary:
    images: int             # listed in --data
    skipped: int            # already written (--resume)
    written: int            # rows written by this run
    errors: int             # of which with an error
    seconds: float
    steady: tuple[int, float] | None = None     # rows and seconds from the first batch done to the last

    @property
    def images_per_s(self) -> float:
        return self.written / self.seconds if self.seconds else 0.0

    @property
    def steady_images_per_s(self) -> float | None:
        """Images/s between the first and the last batch: worker start-up and the final write and
        shutdown excluded, as rmt-bench excludes warm-up (None with fewer than two batches)."""
        return self.steady[0] / self.steady[1] if self.steady and self.steady[1] > 0 else None


def pending_sources(data: str, output: str | Path, resume: bool) -> tuple[list[Source], int]:
    """The sources still to run and how many are listed in all."""
    sources = list_sources(data)
    done = prepare_output(output, resume)
    return [s for s in sources if s.path not in done], len(sources)


def default_workers() -> int:
    return max(1, min(4, (os.cpu_count() or 2) - 1))


def run_local(options: PredictOptions, data: str, output: str | Path, *, workers: int | None = None,
              resume: bool = False, rows_per_file: int = 1000, progress: Callable[[int, int], None] | None = None
              ) -> RunSummary:
    """Run every pending image of ``data`` into ``output``; ``progress(done, total)`` after each batch.
    Rows computed before an interruption (SIGTERM arrives as an exception) are written on the way out."""
    sources, listed = pending_sources(data, output, resume)
    with closing(open_predictor(options)) as predictor:
        writer = PartWriter(output, output_schema(options, predictor.output_names), rows_per_file)
        batches = decoded_batches(sources, options.batch_size, predictor.image_size,
                                  default_workers() if workers is None else workers)
        errors, start, first, last = 0, time.perf_counter(), None, None
        try:
            if progress:
                progress(0, len(sources))
            for batch in batches:
                writer.add(rows_table(predictor, batch.paths, batch.errors, batch.images))
                errors += sum(e is not None for e in batch.errors)
                last = time.perf_counter()
                first = first or (len(batch.paths), last)
                if progress:
                    progress(len(batch.paths), len(sources))
        finally:
            writer.flush()
            batches.close()
    steady = (writer.rows_written - first[0], last - first[1]) if first else None
    return RunSummary(listed, listed - len(sources), writer.rows_written, errors, time.perf_counter() - start, steady)
