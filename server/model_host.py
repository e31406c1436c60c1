"""Turn settings into a loaded runner plus what the endpoints need to know about it (task, labels,
strides, input size), whichever backend serves it: the routers never look at the backend."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rmt_deploy import create_model
from rmt_deploy.artifact import ArtifactDescription
from rmt_deploy.labels import class_labels
from rmt_deploy.runners import Runner, get_backend, infer_padded

from .settings import ServeSettings


@dataclass
class ServedModel:
    runner: Runner
    name: str
    task: str                       # "classify" | "features"
    image_size: int
    labels: list[str]
    output_names: list[str]
    output_channels: list[int]
    static_batch: int | None = None     # an ONNX file / engine exported for exactly this batch size
    artifact: ArtifactDescription | None = None

    @property
    def strides(self) -> dict[str, int]:
        strides = self.artifact.output_strides if self.artifact else ()
        return dict(zip(self.output_names, strides)) if self.task == "features" else {}

    def max_batch_size(self, requested: int) -> int:
        """The largest batch the server may form: a static-batch file fixes it."""
        return self.static_batch or requested

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs for ``images``; a batch smaller than a static-batch file's is zero-padded (static
        shapes are what runtimes optimise best)."""
        return infer_padded(self.runner, images, self.static_batch or len(images))

    def warmup(self, max_batch_size: int) -> None:
        """Run every batch size the batcher can form once, so no request pays for first-time allocation
        (or compilation) and the allocator's pools have grown before memory is watched."""
        sizes = [self.static_batch] if self.static_batch else range(1, max_batch_size + 1)
        for batch_size in sizes:
            self.infer(np.zeros((batch_size, 3, self.image_size, self.image_size), np.float32))


def _served_size(height, width, requested: int) -> int:
    """Images are resized and centre-cropped to S x S: a file's fixed size decides S, a dynamic one
    takes --image-size."""
    if height is not None and width is not None:
        if height != width:
            raise ValueError(f"the server feeds square S x S crops; this file takes {height}x{width} inputs "
                             "(export it with one --img-size, or with --dynamic-hw)")
        return height
    return requested


def load_served_model(settings: ServeSettings) -> ServedModel:
    """Build and load the runner. Raises CheckpointError / RunnerUnavailable / ValueError for the CLI."""
    backend = get_backend(settings.backend)
    if backend.artifact == "model":
        model = create_model(settings.model, checkpoint=settings.checkpoint and str(settings.checkpoint),
                             features_only=settings.task == "features", weights=settings.weights)
        # the batcher forms every size up to --max-batch-size: compile them as one dynamic-batch graph
        runner = backend.open(model=model, device=settings.device, precision=settings.precision,
                              threads=settings.threads, dynamic_batch=True).load()
        described = runner.metadata().artifact
        size, static_batch = settings.image_size, None
        channels = [described.num_classes] if described.task == "classify" else list(model.stage_channels)
    else:
        asked = settings.precision if "precision" in settings.model_fields_set else None
        if asked and (reason := backend.unavailable_reason(settings.device, asked)):
            raise ValueError(f"--precision {asked}: {reason}")
        runner = backend.open(artifact=getattr(settings, backend.artifact), device=settings.device,
                              threads=settings.threads, precision=asked).load()
        if asked and asked != runner.precision:
            raise ValueError(f"{runner.path} computes in {runner.precision}, not --precision {asked} (export a "
                             "file of that precision)")
        meta = runner.metadata()
        static_batch, height, width = meta.fixed_input_dims()
        size = _served_size(height, width, settings.image_size)
        channels = [int(t.shape[1]) for t in meta.outputs]
        described = meta.artifact or ArtifactDescription("rmt", num_classes=channels[0])
    labels = class_labels(described.num_classes or channels[0]) if described.task == "classify" else []
    return ServedModel(runner, settings.model_name or described.model, described.task, size, labels,
                       [t.name for t in runner.metadata().outputs], channels, static_batch, described)
