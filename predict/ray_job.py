"""rmt-predict --ray: the same job on Ray Data. The listed images become a dataset; Ray tasks decode
them with the shared preprocessing; a pool of actors, each holding one runner, infers; the rows (the
schema of the local run) stream back to this process, whose `PartWriter` writes them as the local run
does: each part under a temporary name renamed into place once complete, so a killed job leaves only
whole parts and ``--resume`` neither loses nor repeats rows. (Ray Data's ``write_parquet`` writes its
files in place, and on each worker's disk.)"""
from __future__ import annotations

import os
import time
from contextlib import closing
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa

from rmt_deploy import ray_cluster
from rmt_deploy.ray_cluster import device_inside_ray
from rmt_deploy.runners import get_backend

from .decode import decode_one
from .local import RunSummary, pending_sources
from .output import PartWriter
from .predictor import PredictOptions, open_predictor, output_schema, rows_table
from .sources import Source

DECODE_CPUS = 0.5      # decoding one batch is light next to inferring it


def _source_rows(sources: list[Source]) -> list[dict]:
    """Plain columns (no nulls) for the dataset: -1 offset/size for whole files, "" for no error."""
    return [{"path": s.path, "file": os.path.abspath(s.file), "offset": -1 if s.offset is None else s.offset,
             "size": -1 if s.size is None else s.size, "error": s.error or ""} for s in sources]


def decode_rows(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """A Ray task's work: every row's (3, S, S) input (zeros where it failed) and its error ("" if none)."""
    images, errors = [], []
    for path, file, offset, length, error in zip(batch["path"], batch["file"], batch["offset"], batch["size"],
                                                 batch["error"]):
        source = Source(str(path), str(file), None if offset < 0 else int(offset), None if length < 0 else int(length),
                        str(error) or None)
        decoded = decode_one(source, size)
        images.append(decoded if isinstance(decoded, np.ndarray) else np.zeros((3, size, size), np.float32))
        errors.append("" if isinstance(decoded, np.ndarray) else decoded)
    return {"path": batch["path"], "image": np.stack(images), "error": np.asarray(errors, dtype=object)}


def _absolute(path):
    return os.path.abspath(path) if path and os.path.exists(path) else path


def _for_actors(options: PredictOptions) -> tuple[PredictOptions, int, pa.Schema]:
    """Run in a Ray task with an actor's resources, not on the driver (which may lack the device):
    options every actor can open wherever it runs (an ONNX file or engine prepared once here, by
    absolute path), the runner's input size (a file's own), known before decoding starts, and the
    output columns."""
    options = replace(options, device=device_inside_ray(options.device))
    with closing(open_predictor(options)) as probe:
        backend = get_backend(options.backend)
        if backend.artifact != "model":
            options = options.with_file(backend, _absolute(str(probe.runner.path)))
        return options, probe.image_size, output_schema(options, probe.output_names)


class PredictActor:
    """One runner per actor, opened once from the options (the local run's `open_predictor`)."""

    def __init__(self, options: PredictOptions):
        self.predictor = open_predictor(options)

    def __call__(self, batch: dict[str, np.ndarray]):
        errors = [str(e) or None for e in batch["error"]]
        ok = np.array([e is None for e in errors], dtype=bool)
        return rows_table(self.predictor, [str(p) for p in batch["path"]], errors, batch["image"][ok])


def run_ray(options: PredictOptions, data: str, output: str | Path, *, address: str | None = None,
            num_actors: int = 1, gpus_per_actor: float = 0.0, resume: bool = False,
            rows_per_file: int = 1000) -> RunSummary:
    """Run the pending images of ``data`` on the cluster; rows land in ``output`` as they come back."""
    ray = ray_cluster.import_ray("data")
    sources, listed = pending_sources(data, output, resume)
    start = time.perf_counter()
    if not sources:
        return RunSummary(listed, listed, 0, 0, 0.0)
    cpus_per_actor = options.threads or 1
    started = ray_cluster.connect(address, num_actors * cpus_per_actor + 1, component="data")
    try:
        return _run_on_cluster(ray, options, sources, output, listed, start, num_actors=num_actors,
                               cpus_per_actor=cpus_per_actor, gpus_per_actor=gpus_per_actor,
                               rows_per_file=rows_per_file)
    finally:
        if started:             # a local cluster this run started
            ray.shutdown()


def _run_on_cluster(ray, options: PredictOptions, sources: list[Source], output, listed: int, start: float, *,
                    num_actors: int, cpus_per_actor: float, gpus_per_actor: float, rows_per_file: int) -> RunSummary:
    # files by absolute path: a Ray worker's working directory is not the driver's
    options = replace(options, model=_absolute(options.model), checkpoint=_absolute(options.checkpoint),
                      cache_dir=os.path.abspath(options.cache_dir))
    probe = ray.remote(num_cpus=cpus_per_actor, num_gpus=gpus_per_actor or None)(_for_actors)
    options, size, schema = ray.get(probe.remote(options))
    dataset = ray.data.from_items(_source_rows(sources))
    # decoding stays in tasks of its own (different resources keep Ray from fusing it into the actors)
    decoded = dataset.map_batches(decode_rows, fn_kwargs={"size": size}, batch_size=options.batch_size,
                                  batch_format="numpy", num_cpus=DECODE_CPUS)
    rows = decoded.map_batches(PredictActor, fn_constructor_kwargs={"options": options}, batch_size=options.batch_size,
                               batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=num_actors),
                               num_cpus=cpus_per_actor, num_gpus=gpus_per_actor or None)
    writer, errors = PartWriter(output, schema, rows_per_file), 0
    try:
        for table in rows.iter_batches(batch_size=None, batch_format="pyarrow"):
            writer.add(table)
            errors += table.num_rows - table.column("error").null_count
    finally:            # rows that came back before an interruption are written on the way out
        writer.flush()
    return RunSummary(listed, listed - len(sources), writer.rows_written, errors, time.perf_counter() - start)
