"""The runner behind rmt-predict and the rows it produces: one place opens the runner (any backend of
the registry), one place turns its outputs into the Parquet columns, for the local run and every Ray
actor alike."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa

from rmt_deploy.artifact import ExportPlan, Range
from rmt_deploy.labels import class_labels, top_k_scores
from rmt_deploy.runners import Backend, Runner, backends_for, get_backend, infer_padded, open_backend_runner, \
    reference_backend

FILE_KINDS = ("onnx", "engine")     # the artifact kinds a file is given for (--onnx, --engine)


@dataclass(frozen=True)
class PredictOptions:
    """What to run; picklable, so Ray actors open the same runner from it. ``precision`` None: fp32, or
    a given file's own."""

    model: str = "rmt_t"
    checkpoint: str | None = None
    weights: str = "auto"
    backend: str = field(default_factory=reference_backend)
    onnx: str | None = None
    engine: str | None = None
    precision: str | None = None
    device: str = "cpu"
    threads: int | None = None
    image_size: int = 224
    batch_size: int = 8
    top_k: int = 5
    embeddings: bool = False
    features_pooled: bool = False
    cache_dir: str = ".rmt_cache"

    @property
    def task(self) -> str:
        return "features" if self.features_pooled else "classify"

    def given_file(self, backend: Backend) -> str | None:
        """The file given for ``backend``'s artifact kind (None: prepare one). A file of another kind is refused."""
        for kind in FILE_KINDS:
            if getattr(self, kind) and kind != backend.artifact:
                runs = "the model itself" if backend.artifact == "model" else f"{backend.artifact} files"
                raise ValueError(f"--{kind} is for {', '.join(backends_for(kind))}; --backend {backend.name} "
                                 f"runs {runs}")
        return getattr(self, backend.artifact) if backend.artifact in FILE_KINDS else None

    def with_file(self, backend: Backend, path: str) -> "PredictOptions":
        return replace(self, **{backend.artifact: path})


@dataclass
class Predictor:
    runner: Runner
    options: PredictOptions
    image_size: int
    labels: list[str]
    static_batch: int | None = None
    output_names: list[str] = field(default_factory=list)

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs for ``images``; a static-batch file (a given one may hold fewer rows than --batch-size)
        is fed in slices of its batch, the last one padded."""
        if not len(images):
            return {}
        step = self.static_batch or len(images)
        parts = [infer_padded(self.runner, images[i:i + step], step) for i in range(0, len(images), step)]
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}

    def close(self) -> None:
        self.runner.close()


def _model(options: PredictOptions):
    from rmt_deploy import create_model
    from rmt_deploy.exporters.cache import SEED  # random weights: seeded as the cache's exports
    import torch
    torch.manual_seed(SEED)
    model = create_model(options.model, checkpoint=options.checkpoint, weights=options.weights,
                         features_only=options.features_pooled)
    return model.with_embedding() if options.embeddings else model


def _prepare(backend: Backend, options: PredictOptions) -> Path:
    """The backend's artifact, prepared (exported, built) through the export library's cache (its one
    route), for a static batch of --batch-size. A model with the embedding output is cached apart: the
    cache key knows config and weights only."""
    from rmt_deploy.exporters.cache import ArtifactCache
    cache = ArtifactCache(Path(options.cache_dir) / ("embedding" if options.embeddings else ""))
    plan = ExportPlan(batch=Range.fixed(options.batch_size), height=options.image_size, width=options.image_size,
                      precisions=(options.precision or "fp32",), device=options.device)
    return backend.prepare(_model(options), plan, cache)


def _check_file_precision(options: PredictOptions, runner: Runner) -> None:
    """A file computes in its own precision: a given one that is not the --precision asked is refused."""
    described = runner.metadata().artifact
    precision = described.precision if described else runner.precision
    if options.precision and precision != options.precision:
        raise ValueError(f"--precision {options.precision}: {runner.path} is a {precision} file (its artifact "
                         f"description says so); give a {options.precision} file, or leave out the file to export one")


def _open_runner(options: PredictOptions) -> tuple[Runner, list[str]]:
    """Build and load the runner of ``options`` and name its outputs (the one place rmt-predict opens a
    backend). A backend that cannot run the precision on the device is refused with the registry's reason
    before any model is built or file exported; a given file opens in its own precision (checked later)."""
    runner, _ = open_backend_runner(options.backend, device=options.device, precision=options.precision,
                                    threads=options.threads, make_model=lambda: _model(options),
                                    artifact=options.given_file(get_backend(options.backend)),
                                    prepare=lambda backend: _prepare(backend, options), dynamic_batch=True)
    runner.load()
    return runner, [t.name for t in runner.metadata().outputs]


def open_predictor(options: PredictOptions) -> Predictor:
    """Open the runner of ``options`` and read what it takes and returns. Raises ValueError / RunnerUnavailable."""
    runner, names = _open_runner(options)
    try:
        if get_backend(options.backend).artifact != "model":
            _check_file_precision(options, runner)
        _check_outputs(options, names, runner)
    except ValueError:
        runner.close()
        raise
    meta = runner.metadata()
    static_batch, height, width = meta.fixed_input_dims()
    size = height if height is not None and height == width else options.image_size
    classes = 0 if options.features_pooled else int(meta.outputs[0].shape[-1])
    return Predictor(runner, options, size, class_labels(classes) if classes else [], static_batch, names)


def _check_outputs(options: PredictOptions, names: list[str], runner: Runner) -> None:
    where = getattr(runner, "path", None) or runner.name
    if options.features_pooled and not all(n.startswith("stage") for n in names):
        raise ValueError(f"--features-pooled needs a features model; {where} outputs {names}")
    if not options.features_pooled and "logits" not in names:
        raise ValueError(f"{where} outputs {names}, no logits: add --features-pooled for a features model")
    if options.embeddings and "embedding" not in names:
        raise ValueError(f"--embeddings: {where} has no 'embedding' output; use --backend "
                         f"{'/'.join(backends_for('model'))}, or let rmt-predict export the file (leave out the "
                         "file), which adds it")


def output_schema(options: PredictOptions, stage_names: list[str] | None = None) -> pa.Schema:
    """The columns of every output file, local or Ray: path, the predictions, error (null when none)."""
    floats = pa.list_(pa.float32())
    fields = [pa.field("path", pa.string(), nullable=False)]
    if options.features_pooled:
        fields += [pa.field(name, floats) for name in (stage_names or [])]
    else:
        fields += [pa.field("top1", pa.int32()), pa.field("top1_label", pa.string()),
                   pa.field("topk_indices", pa.list_(pa.int32())), pa.field("topk_scores", floats)]
        if options.embeddings:
            fields.append(pa.field("embedding", floats))
    return pa.schema(fields + [pa.field("error", pa.string())])



def prediction_columns(predictor: Predictor, outputs: dict[str, np.ndarray]) -> dict[str, list]:
    """Column values for the images that ran (one list entry per image)."""
    if predictor.options.features_pooled:
        return {name: list(outputs[name].mean(axis=(2, 3), dtype=np.float32)) for name in predictor.output_names}
    logits = outputs["logits"]
    indices, scores = top_k_scores(logits, min(predictor.options.top_k, logits.shape[1]))
    columns = {"top1": indices[:, 0].tolist(), "top1_label": [predictor.labels[i] for i in indices[:, 0]],
               "topk_indices": list(indices), "topk_scores": list(scores.astype(np.float32))}
    if predictor.options.embeddings:
        columns["embedding"] = list(outputs["embedding"].astype(np.float32))
    return columns


def rows_table(predictor: Predictor, paths: list[str], errors: list[str | None], images: np.ndarray) -> pa.Table:
    """Infer ``images`` (the paths whose error is None, in order) and return one row per path."""
    schema = output_schema(predictor.options, predictor.output_names)
    ran = iter(range(len(images)))
    columns = prediction_columns(predictor, predictor.infer(images)) if len(images) else {}
    rows = {name: [None] * len(paths) for name in schema.names}
    rows["path"], rows["error"] = list(paths), list(errors)
    for i, error in enumerate(errors):
        if error is None:
            j = next(ran)
            for name, values in columns.items():
                rows[name][i] = values[j]
    return pa.table({name: pa.array(rows[name], schema.field(name).type) for name in schema.names}, schema=schema)
