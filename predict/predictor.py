"""The runner behind rmt-predict and the rows it produces: one place opens the runner (any backend),
one place turns its outputs into the Parquet columns, for the local run and every Ray actor alike."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from rmt_deploy.labels import class_labels
from rmt_deploy.runners import Runner, infer_padded

FILE_BACKENDS = ("onnxruntime", "openvino")


@dataclass(frozen=True)
class PredictOptions:
    """What to run; picklable, so Ray actors open the same runner from it."""

    model: str = "rmt_t"
    checkpoint: str | None = None
    weights: str = "auto"
    backend: str = "eager"
    onnx: str | None = None
    precision: str = "fp32"
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


@dataclass
class Predictor:
    runner: Runner
    options: PredictOptions
    image_size: int
    labels: list[str]
    static_batch: int | None = None
    output_names: list[str] = field(default_factory=list)

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        if not len(images):
            return {}
        return infer_padded(self.runner, images, self.static_batch or len(images))

    def close(self) -> None:
        self.runner.close()


def _model(options: PredictOptions):
    from rmt_deploy import create_model
    from rmt_deploy.benchmarks.artifacts import SEED  # random weights: seeded as rmt-bench's, so exports match
    import torch
    torch.manual_seed(SEED)
    model = create_model(options.model, checkpoint=options.checkpoint, weights=options.weights,
                         features_only=options.features_pooled)
    return model.with_embedding() if options.embeddings else model


def _onnx_file(options: PredictOptions, model) -> Path:
    """The given --onnx file, or one exported through rmt-bench's cache (static batch = --batch-size).
    A model with the embedding output is cached apart: the cache key knows config and weights only."""
    if options.onnx:
        return Path(options.onnx)
    from rmt_deploy.benchmarks.artifacts import ArtifactCache
    root = Path(options.cache_dir) / ("embedding" if options.embeddings else "")
    return ArtifactCache(root).onnx(model, batch_size=options.batch_size, size=options.image_size,
                                    fp16=options.precision == "fp16", portable=options.device.startswith("cuda"))


def open_predictor(options: PredictOptions) -> Predictor:
    """Build and load the runner of ``options`` (the one place a backend is opened: at the registry's
    merge this becomes ``get_backend(name).open(...)``). Raises ValueError / RunnerUnavailable."""
    from rmt_deploy.runners import open_runner
    model = _model(options) if options.backend not in FILE_BACKENDS or not options.onnx else None
    if options.backend in FILE_BACKENDS:
        runner = open_runner(options.backend, onnx=_onnx_file(options, model), device=options.device,
                             threads=options.threads).load()
    else:
        if options.threads:
            import torch
            torch.set_num_threads(options.threads)
        runner = open_runner(options.backend, model=model, device=options.device, precision=options.precision,
                             dynamic_batch=True).load()
    meta = runner.metadata()
    names = [t.name for t in meta.outputs] if options.backend in FILE_BACKENDS else list(model.output_names)
    _check_outputs(options, names, runner)
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
        raise ValueError(f"--embeddings: {where} has no 'embedding' output; use --backend eager/compile, or let "
                         "rmt-predict export the file (leave out --onnx), which adds it")


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


def top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and softmax scores of the k best classes per row, as the server's /classify ranks them."""
    z = logits.astype(np.float64)
    probs = np.exp(z - z.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(probs, order, axis=1)


def prediction_columns(predictor: Predictor, outputs: dict[str, np.ndarray]) -> dict[str, list]:
    """Column values for the images that ran (one list entry per image)."""
    if predictor.options.features_pooled:
        return {name: list(outputs[name].mean(axis=(2, 3), dtype=np.float32)) for name in predictor.output_names}
    logits = outputs["logits"]
    indices, scores = top_k(logits, min(predictor.options.top_k, logits.shape[1]))
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
