"""The Parquet output: a folder of part files (what pyarrow, pandas, Spark and DuckDB read as one
table), written by `PartWriter` for the local run and ``--ray`` alike. Each part is written to a
hidden temporary name and renamed into place, so a killed run leaves only complete parts; ``--resume``
reads their paths and skips them."""
from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def part_files(folder: str | Path) -> list[Path]:
    """The complete part files (hidden and ``_`` names are temporaries and markers: readers skip them)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.parquet") if not p.name.startswith((".", "_")))


def written_paths(folder: str | Path) -> set[str]:
    """Paths that already have a row in ``folder``. A part that cannot be read (cut short by something
    other than rmt-predict: a copy, a full disk) is named, never skipped silently."""
    done: set[str] = set()
    for part in part_files(folder):
        try:
            done.update(pq.read_table(part, columns=["path"]).column("path").to_pylist())
        except (pa.ArrowInvalid, OSError) as exc:
            raise ValueError(f"{part} is not a complete Parquet file ({exc}); delete it and run again with --resume")
    return done


def prepare_output(folder: str | Path, resume: bool) -> set[str]:
    """Make the output folder; the paths to skip. Refuses to mix a new run into existing results."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--output {folder} is a file; rmt-predict writes a folder of Parquet parts there")
    existing = part_files(folder)
    if existing and not resume:
        raise ValueError(f"--output {folder} already holds {len(existing)} part files: add --resume to continue "
                         "that run, or choose another --output")
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".tmp-*"):      # a temporary left by a killed run: never complete
        stale.unlink()
    return written_paths(folder) if resume else set()


class PartWriter:
    """Collects rows and writes them as one part file every ``rows_per_file`` rows or ``seconds``."""

    def __init__(self, folder: str | Path, schema: pa.Schema, rows_per_file: int = 1000, seconds: float = 30.0):
        self.folder, self.schema = Path(folder), schema
        self.rows_per_file, self.seconds = rows_per_file, seconds
        self.run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.pending: list[pa.Table] = []
        self.parts = 0
        self.rows_written = 0
        self.last_flush = time.monotonic()

    def add(self, table: pa.Table) -> None:
        self.pending.append(table)
        if (sum(t.num_rows for t in self.pending) >= self.rows_per_file
                or time.monotonic() - self.last_flush >= self.seconds):
            self.flush()

    def flush(self) -> None:
        table = pa.concat_tables(self.pending) if self.pending else None
        self.pending, self.last_flush = [], time.monotonic()
        if table is None or not table.num_rows:
            return
        name = f"part-{self.run_id}-{self.parts:05d}.parquet"
        tmp = self.folder / f".tmp-{name}"
        pq.write_table(table.cast(self.schema), tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())            # the rename must never expose a file whose bytes are not on disk
        os.replace(tmp, self.folder / name)
        self.parts += 1
        self.rows_written += table.num_rows
