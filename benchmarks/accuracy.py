"""Top-1/top-5 of every backend and precision on a labelled image folder, with the shared
preprocessing, so a checkpoint and an FP16 engine can be checked against ImageNet-val."""
from __future__ import annotations

import numpy as np

from rmt_deploy.accuracy import labelled_images
from rmt_deploy.preprocess import load_images
from rmt_deploy.runners import RunnerUnavailable, infer_padded

from rmt_deploy.exporters.cache import ArtifactCache
from .bench import Settings, load_model, open_backend


def run_accuracy(data, model_spec, backends, precisions=("fp32",), *, batch_size: int = 32,
                 settings: Settings | None = None, checkpoint: str | None = None, weights: str = "auto", labels_file=None,
                 limit: int | None = None, cache: ArtifactCache | None = None, progress=None) -> dict:
    """All runners see each decoded batch once; the last batch is zero-padded to ``batch_size``
    (padded rows dropped) so static-shape ONNX files and engines serve every batch."""
    settings = settings or Settings()
    cache = cache or ArtifactCache()
    paths, labels = labelled_images(data, labels_file)
    if limit:
        paths, labels = paths[:limit], labels[:limit]
    model = load_model(model_spec, checkpoint, weights)
    classes = model.config.num_classes
    if labels.max() >= classes:
        raise ValueError(f"labels go up to {labels.max()} but {model.config.name} has {classes} classes")
    k = min(5, classes)
    runners, results = {}, []
    for precision in precisions:
        for backend in backends:
            entry = {"backend": backend, "precision": precision}
            results.append(entry)
            try:
                runner, _ = open_backend(backend, model, precision, batch_size, settings, cache, None, None)
                runner.load()
                runners[(backend, precision)] = runner
            except RunnerUnavailable as exc:
                entry["skipped"] = str(exc)
            except Exception as exc:  # noqa: BLE001 -- as in the benchmark: report the backend, go on
                entry["skipped"] = f"failed: {type(exc).__name__}: {exc}"
    preds = {key: [] for key in runners}
    topk_hits = {key: 0 for key in runners}
    task = progress.add_task("accuracy", total=len(paths)) if progress else None
    try:
        for start in range(0, len(paths), batch_size):
            images = load_images(paths[start:start + batch_size], settings.img_size)
            n = len(images)
            truth = labels[start:start + n]
            for key, runner in runners.items():
                logits = infer_padded(runner, images, batch_size)["logits"]
                top = np.argsort(-logits, axis=1)[:, :k]
                preds[key].append(top[:, 0])
                topk_hits[key] += int((top == truth[:, None]).any(axis=1).sum())
            if progress:
                progress.advance(task, n)
    finally:
        for runner in runners.values():
            runner.close()
    reference = next(iter(runners), None)
    for entry in results:
        key = (entry["backend"], entry["precision"])
        if key in runners:
            top1 = np.concatenate(preds[key])
            entry.update({"images": len(top1), "top1": float((top1 == labels).mean()),
                          f"top{k}": topk_hits[key] / len(top1),
                          "top1_agreement": float((top1 == np.concatenate(preds[reference])).mean()),
                          "agreement_reference": f"{reference[0]} {reference[1]}"})
    return {"data": str(data), "model": model.config.name, "checkpoint": model.checkpoint, "img_size": settings.img_size,
            "batch_size": batch_size, "topk": k, "results": results}
