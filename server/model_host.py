"""Turn settings into a loaded runner plus what the endpoints need to know about it (task, labels,
strides, input size), whichever backend serves it: the routers never look at the backend."""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np

from rmt_deploy import create_model
from rmt_deploy.artifact import ArtifactDescription
from rmt_deploy.labels import class_labels
from rmt_deploy.runners import BackendRefused, Runner, get_backend, infer_padded, open_backend_runner

from .settings import ServeSettings


@dataclass
class ServedModel:
    runners: list[Runner]           # one per model instance, all alike
    name: str
    task: str                       # "classify" | "features" | "all" (both, from one forward)
    image_size: int
    labels: list[str]
    output_names: list[str]
    output_channels: list[int]
    static_batch: int | None = None     # an ONNX file / engine exported for exactly this batch size
    artifact: ArtifactDescription | None = None

    @property
    def runner(self) -> Runner:
        """The first instance: what every instance is (backend, precision, metadata)."""
        return self.runners[0]

    @property
    def strides(self) -> dict[str, int]:
        """Stage-map output -> its stride; empty for a classify-only model."""
        if self.task == "classify":
            return {}
        stages = [name for name in self.output_names if name.startswith("stage")]
        return dict(zip(stages, self.artifact.output_strides if self.artifact else ()))

    @property
    def classifies(self) -> bool:
        return "logits" in self.output_names

    def output_shape(self, name: str, channels: int) -> list[int]:
        """KServe v2 shape of an output: stage maps are NCHW of any size, the others (N, C)."""
        return [-1, channels, -1, -1] if name in self.strides else [-1, channels]

    def max_batch_size(self, requested: int) -> int:
        """The largest batch the server may form: a static-batch file fixes it."""
        return self.static_batch or requested

    def infer(self, images: np.ndarray, instance: int = 0) -> dict[str, np.ndarray]:
        """Outputs for ``images`` from one instance; a batch smaller than a static-batch file's is
        zero-padded (static shapes are what runtimes optimise best)."""
        return infer_padded(self.runners[instance], images, self.static_batch or len(images))

    def instances(self) -> list[Callable[[np.ndarray], dict[str, np.ndarray]]]:
        """One inference function per instance, for the batcher."""
        return [partial(self.infer, instance=i) for i in range(len(self.runners))]

    def warmup(self, max_batch_size: int) -> None:
        """Run every batch size the batcher can form once on every instance, so no request pays for
        first-time allocation (or compilation) and the allocator's pools have grown before memory is watched."""
        sizes = [self.static_batch] if self.static_batch else range(1, max_batch_size + 1)
        for instance in range(len(self.runners)):
            for batch_size in sizes:
                self.infer(np.zeros((batch_size, 3, self.image_size, self.image_size), np.float32), instance)

    def close(self) -> None:
        for runner in self.runners:
            runner.close()


def _served_size(height, width, requested: int) -> int:
    """Images are resized and centre-cropped to S x S: a file's fixed size decides S, a dynamic one
    takes --image-size."""
    if height is not None and width is not None:
        if height != width:
            raise ValueError(f"the server feeds square S x S crops; this file takes {height}x{width} inputs "
                             "(export it with one --image-size, or with --dynamic-hw)")
        return height
    return requested


def load_served_model(settings: ServeSettings) -> ServedModel:
    """Build and load the runners. Raises CheckpointError / RunnerUnavailable / ValueError for the CLI;
    runners already loaded when a later one (or a check) fails are closed first."""
    runners: list = []
    try:
        return _load_into(runners, settings)
    except BaseException:
        for runner in runners:
            runner.close()
        raise


def _instance_models(settings: ServeSettings) -> Callable[[], object]:
    """Hands out the model of each instance: built on the first call (after the registry's check),
    copied for the other instances before any runner casts or moves its own."""
    models: list = []

    def next_model():
        if not models:
            model = create_model(settings.model, checkpoint=settings.checkpoint and str(settings.checkpoint),
                                 features_only=settings.task == "features", weights=settings.weights)
            if settings.task == "classify":     # a classifier computes the stage maps anyway: serve both tasks
                model.with_stage_outputs()
            models.extend([model] + [copy.deepcopy(model) for _ in range(settings.instances - 1)])
        return models.pop(0)
    return next_model


def _open_instance(settings: ServeSettings, asked: str | None, make_model: Callable[[], object]) -> Runner:
    """One instance's runner (not loaded): the model at --precision, or the given file at the precision
    asked (None: its own). A precision the backend cannot run here is refused with the registry's reason."""
    kind = get_backend(settings.backend).artifact
    try:
        # the batcher forms every size up to --max-batch-size: compile them as one dynamic-batch graph
        runner, _ = open_backend_runner(settings.backend, device=settings.device, threads=settings.threads,
                                        precision=settings.precision if kind == "model" else asked,
                                        make_model=make_model, given_in_own_precision=False, dynamic_batch=True,
                                        artifact=None if kind == "model" else getattr(settings, kind))
    except BackendRefused as exc:
        if asked:
            raise ValueError(f"--precision {asked}: {exc}") from exc
        raise
    return runner


def _load_into(runners: list, settings: ServeSettings) -> ServedModel:
    """The body of load_served_model; appends each runner to ``runners`` as soon as it is loaded."""
    backend = get_backend(settings.backend)
    asked = settings.precision if "precision" in settings.model_fields_set else None
    # one runner per instance: a model copy each, or one session each (OpenVINO included: see
    # docs/serving.md, "Model instances")
    make_model = _instance_models(settings)
    for _ in range(settings.instances):
        runners.append(_open_instance(settings, asked, make_model).load())
    runner = runners[0]
    if backend.artifact == "model":
        described = runner.metadata().artifact
        size, static_batch = settings.image_size, None
    else:
        if asked and asked != runner.precision:
            raise ValueError(f"{runner.path} computes in {runner.precision}, not --precision {asked} (export a "
                             "file of that precision)")
        meta = runner.metadata()
        static_batch, height, width = meta.fixed_input_dims()
        size = _served_size(height, width, settings.image_size)
        described = meta.artifact or ArtifactDescription("rmt", num_classes=int(meta.outputs[0].shape[1]))
    channels = [int(t.shape[1]) for t in runner.metadata().outputs]
    labels = class_labels(described.num_classes or channels[0]) if described.task != "features" else []
    return ServedModel(runners, settings.model_name or described.model, described.task, size, labels,
                       [t.name for t in runner.metadata().outputs], channels, static_batch, described)
