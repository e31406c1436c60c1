"""Export as a library (timm's onnx_export script over timm.utils.onnx): `export_artifacts` writes the
ONNX files and TensorRT engines a plan asks for and returns their `Manifest`; `parity_gate` proves each
against the eager model. `rmt-export` is a thin CLI over both, and the artifact cache (`cache.py`, behind
rmt-bench and rmt-predict) calls the same function, so there is one FP16 route and one metadata writer.
"""
from __future__ import annotations

import json
import platform
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rmt_deploy.artifact import ArtifactDescription, ExportPlan
from rmt_deploy.checkpoint import sha256_file
from rmt_deploy.parity import Tolerance, check_parity, parity_inputs
from rmt_deploy.runners import (ARTIFACT_FORMATS, RunnerUnavailable, backend_packages, backends_for, get_backend,
                                reference_backend)

from .onnx_export import ATTENTION_OPSET, PORTABLE_OPSET, export_onnx, tensor_specs, write_fp16

MANIFEST_NAME = "export.json"
EXPORTED_PRECISIONS = ("fp32", "fp16", "bf16", "int8")    # FP16 converted from FP32; bf16 and int8 per backend
LOW_PRECISIONS = ("bf16", "int8")          # held to the accuracy gate; each backend's own artifact


def _no_step(text: str):
    return nullcontext()


@dataclass
class Manifest:
    """What an export wrote: the model, the plan's sizes, versions and one entry per artifact
    (format, kind, precision, path relative to ``output_dir``, sha256, tensors, parity)."""

    model: str
    task: str
    checkpoint: dict | None
    config: dict
    input_size: dict
    batch: dict
    opset: int
    versions: dict
    description: ArtifactDescription
    output_dir: Path
    artifacts: list[dict] = field(default_factory=list)
    skipped: str | None = None

    @property
    def random_weights(self) -> bool:
        return self.checkpoint is None

    def path(self, kind: str, precision: str) -> Path:
        for art in self.artifacts:
            if art["kind"] == kind and art["precision"] == precision:
                return self.output_dir / art["path"]
        raise KeyError(f"no {precision} {kind} artifact in this export")

    def to_dict(self) -> dict:
        return {"model": self.model, "task": self.task, "checkpoint": self.checkpoint,
                "random_weights": self.random_weights, "config": self.config, "input_size": self.input_size,
                "batch": self.batch, "opset": self.opset, "versions": self.versions,
                "artifact": self.description.to_dict(), "artifacts": self.artifacts, "skipped": self.skipped}

    def write(self) -> Path:
        path = self.output_dir / MANIFEST_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, default=str))
        return path


def default_opset(plan: ExportPlan) -> int:
    """The fused-Attention graph (fastest in ONNX Runtime) unless engines or `portable` ask for the
    graph every TensorRT 10.x and Triton release runs."""
    if plan.opset is not None:
        return plan.opset
    return PORTABLE_OPSET if plan.portable or "engine" in plan.kinds else ATTENTION_OPSET


def default_stem(model) -> str:
    task = ArtifactDescription.from_model(model).task
    return model.config.name if task == "classify" else f"{model.config.name}_{task}"


def export_artifacts(model, plan: ExportPlan, *, step=_no_step, reuse: bool = False) -> Manifest:
    """Write ``plan``'s artifacts of ``model`` into ``plan.output_dir``: the float32 ONNX file, FP16
    files converted from it, engines built from the ONNX file of their precision. ``step(text)`` is a
    context manager shown around each long step; ``reuse`` keeps files already there (a cache)."""
    unknown = set(plan.precisions) - set(EXPORTED_PRECISIONS)
    if unknown:
        raise ValueError(f"no export route for {', '.join(sorted(unknown))} yet (exported: {', '.join(EXPORTED_PRECISIONS)})")
    out_dir, stem, opset = Path(plan.output_dir), plan.stem or default_stem(model), default_opset(plan)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = _onnx_files(model, plan, out_dir / f"{stem}_fp32.onnx", opset, step, reuse)
    entries = [("onnx", p, files[p], None) for p in plan.precisions if p not in LOW_PRECISIONS]
    entries += _low_precision_entries(plan, files["fp32"], step, reuse)
    if "int8" in plan.precisions and "engine" in plan.kinds:      # TensorRT's explicit quantization: the QDQ file
        qdq = [path for _, p, path, name in entries if p == "int8" and name == gate_backend("onnx")]
        files["int8"] = qdq[0] if qdq else get_backend(gate_backend("onnx")).quantize(
            files["fp32"], plan.calib, plan.height, reuse=reuse)
    if "engine" in plan.kinds:
        entries += [("engine", p, _engine(plan, p, files[p], out_dir / f"{stem}_{p}.engine", step, reuse), None)
                    for p in plan.precisions if p in files]
    hw = plan.dynamic_hw
    description = ArtifactDescription.from_model(model, height=None if hw else plan.height,
                                                 width=None if hw else plan.width, batch=plan.batch)
    manifest = Manifest(model.config.name, description.task, model.checkpoint, asdict(model.config),
                        {"height": "dynamic" if hw else plan.height, "width": "dynamic" if hw else plan.width},
                        {**asdict(plan.batch), "dynamic": plan.batch.dynamic}, opset, versions(), description, out_dir)
    manifest.artifacts = [_entry(kind, precision, path, files.get(precision, files["fp32"]), plan, backend)
                          for kind, precision, path, backend in entries]
    return manifest


def _low_precision_entries(plan: ExportPlan, fp32_path: Path, step, reuse: bool) -> list[tuple[str, str, Path, str]]:
    """(kind, precision, path, backend) of each ONNX backend's bf16 / int8 artifact: bf16 is a runtime
    precision of the fp32 file (the backend computes it in bfloat16), int8 the backend's quantizer's file
    calibrated on ``plan.calib``. Backends that cannot run the precision on the CPU are left out."""
    entries = []
    for precision in (p for p in LOW_PRECISIONS if p in plan.precisions):
        for name in plan.backends or backends_for("onnx"):
            entry = get_backend(name)
            if entry.artifact != "onnx" or entry.unavailable_reason("cpu", precision):
                continue
            if precision == "bf16":
                entries.append(("onnx", precision, fp32_path, name))
                continue
            with step(f"Quantizing for {entry.title} int8 (calibration: {plan.calib})"):
                entries.append(("onnx", precision, entry.quantize(fp32_path, plan.calib, plan.height, reuse=reuse),
                                name))
    return entries


def _onnx_files(model, plan: ExportPlan, fp32_path: Path, opset: int, step, reuse: bool) -> dict[str, Path]:
    """fp32 ONNX (always: the other precisions are converted from it), then the FP16 copy."""
    hw = plan.dynamic_hw
    opt_h, opt_w = (hw.opt, hw.opt) if hw else (plan.height, plan.width)
    if not (reuse and fp32_path.is_file()):
        with step(f"Exporting {fp32_path.stem} to ONNX (fp32, opset {opset})"):
            tmp = fp32_path.with_suffix(".partial.onnx")
            export_onnx(model, tmp, batch_size=plan.batch.opt, dynamic_batch=plan.batch.dynamic, height=opt_h,
                        width=opt_w, dynamic_hw=bool(hw), opset=opset, max_batch=plan.batch.max,
                        hw_range=(hw.min, hw.max) if hw else (32, 2048))
            tmp.replace(fp32_path)
    files = {"fp32": fp32_path}
    if "fp16" in plan.precisions:
        files["fp16"] = fp32_path.with_name(fp32_path.name.replace("_fp32.onnx", "_fp16.onnx"))
        if not (reuse and files["fp16"].is_file()):
            with step("Converting to FP16 (LayerNorm, attention softmax, decay bias kept in FP32)"):
                tmp = files["fp16"].with_suffix(".partial.onnx")
                write_fp16(fp32_path, tmp)
                tmp.replace(files["fp16"])
    return files


def _engine(plan: ExportPlan, precision: str, onnx_path: Path, engine_path: Path, step, reuse: bool) -> Path:
    """A TensorRT engine for the plan's batch and size range, its sidecar holding the ONNX file's description."""
    if reuse and engine_path.is_file():
        return engine_path
    import onnx

    from .onnx_export import describe
    from .tensorrt_build import build_engine

    hw = plan.dynamic_hw

    def shape(batch: int, side: int) -> tuple[int, int, int, int]:
        return (batch, 3, side, side) if hw else (batch, 3, plan.height, plan.width)

    description = describe(onnx.load(str(onnx_path), load_external_data=False))
    with step(f"Building the TensorRT {precision} engine (minutes)"):
        build_engine(onnx_path, engine_path, fp16=precision == "fp16", int8=precision == "int8", min_shape=shape(plan.batch.min, hw.min if hw else 0),
                     opt_shape=shape(plan.batch.opt, hw.opt if hw else 0), max_shape=shape(plan.batch.max, hw.max if hw else 0),
                     workspace_gb=plan.workspace_gb, timing_cache=engine_path.with_name("timing.cache"),
                     metadata=description.to_metadata() if description else None, device=plan.device)
    return engine_path


def _entry(kind: str, precision: str, path: Path, onnx_path: Path, plan: ExportPlan, backend: str | None) -> dict:
    """One manifest entry. ``backend``: the one backend the artifact is for (bf16 and int8 files);
    None: every backend of its kind. An OpenVINO IR (.xml): its backend's platform is the format."""
    inputs, outputs = tensor_specs(onnx_path if path.suffix != ".onnx" else path)
    entry = {"format": ARTIFACT_FORMATS[kind] if path.suffix != ".xml" else get_backend(backend).platform,
             "kind": kind, "precision": precision, "path": path.name,
             "sha256": sha256_file(path), "inputs": inputs, "outputs": outputs}     # the file's own tensor types
    if backend is not None:
        entry["backend"] = backend
    if precision == "bf16" and path == onnx_path:       # honest about what the file is and what runs
        entry["computes"] = f"bfloat16: {backend} runs this fp32 file with bf16 inference precision"
    if plan.batch.dynamic:
        entry["max_batch"] = plan.batch.max
    entry["parity"] = None
    return entry


def gate_backend(kind: str) -> str:
    """The backend the parity gate runs an artifact kind on: the first registered one for it."""
    return backends_for(kind)[0]


def gate_inputs(plan: ExportPlan, images=None) -> list:
    """Seeded batches at the plan's optimal shape (plus real images), one at the smallest batch of a
    dynamic batch range and one at an odd size of a dynamic size range."""
    hw = plan.dynamic_hw
    opt_h, opt_w = (hw.opt, hw.opt) if hw else (plan.height, plan.width)
    batches = parity_inputs(plan.batch.opt, opt_h, opt_w, images=images)
    if plan.batch.dynamic and plan.batch.min != plan.batch.opt:
        batches.append(parity_inputs(plan.batch.min, opt_h, opt_w, seed=1, count=1)[0])
    if hw:
        batches.append(parity_inputs(plan.batch.opt, min(hw.max, opt_h + 13), min(hw.max, opt_w + 7), seed=2,
                                     count=1)[0])
    return batches


def parity_gate(model, manifest: Manifest, batches: list, *, rtol: float | None = None, atol: float | None = None,
                device: str | None = None, threads: int | None = None, step=_no_step,
                report=lambda text: None) -> bool:
    """Run every artifact of ``manifest`` against the eager fp32 model (on the CPU) on ``batches``; each
    entry's ``parity`` gets the summary (or the reason it could not run). True when all passed.
    ``device``: where artifacts that do not run on the CPU (engines) run; None: their backend's default."""
    passed, label = True, f"{reference_backend()}-fp32"
    reference = get_backend(reference_backend()).open(model=model, threads=threads).load()
    try:
        for art in manifest.artifacts:
            passed = _parity_of(reference, label, art, manifest, batches, rtol, atol, device, threads, step,
                                report) and passed
    finally:
        reference.close()
    return passed


def _open_artifact(art: dict, manifest: Manifest, device: str | None, threads: int | None):
    """The loaded runner of a manifest entry on its backend (engines on ``device``)."""
    backend = get_backend(art.get("backend") or gate_backend(art["kind"]))
    return backend.open(artifact=manifest.output_dir / art["path"], threads=threads, precision=art["precision"],
                        device=None if backend.supports("cpu") else device).load()


def _parity_of(reference, label: str, art: dict, manifest: Manifest, batches: list, rtol, atol, device, threads,
               step, report) -> bool:
    path = manifest.output_dir / art["path"]
    try:
        runner = _open_artifact(art, manifest, device, threads)
    except RunnerUnavailable as exc:
        report(f"[red]parity of {path.name} cannot run: {exc}")
        art["parity"] = {"reference": label, "passed": False, "error": str(exc)}
        return False
    try:
        with step(f"Parity of {runner.name} {path.name} against eager fp32"):
            result = check_parity(reference, runner, batches,
                                  Tolerance.for_precision(art["precision"], rtol=rtol, atol=atol))
    finally:
        runner.close()
    art["parity"] = {**result.summary(), "reference": label}
    if not result.passed:
        report(f"[red]{result.text()}")
    return result.passed


def accuracy_gate(model, manifest: Manifest, labelled_folder: Path, image_size: int, *, max_drop: float,
                  device: str | None = None, threads: int | None = None, batch: int = 8, step=_no_step,
                  report=lambda text: None) -> bool:
    """Top-1 of every bf16 / int8 artifact and of the eager fp32 model on ``labelled_folder`` (an
    ImageFolder); an artifact that loses more than ``max_drop`` points (or cannot run) fails. Each
    entry's ``accuracy`` gets the figures. ``device``: where engines run, as in `parity_gate`."""
    from rmt_deploy.accuracy import evaluate_top1, labelled_arrays
    low = [art for art in manifest.artifacts if art["precision"] in LOW_PRECISIONS]
    if not low:
        return True
    labelled = labelled_arrays(labelled_folder, image_size)
    reference = get_backend(reference_backend()).open(model=model, threads=threads).load()
    try:
        with step(f"Top-1 of eager fp32 on {labelled_folder}"):
            expected = evaluate_top1(reference, labelled, image_size, batch)
    finally:
        reference.close()
    passed = True
    for art in low:
        name = f"{art.get('backend') or gate_backend(art['kind'])} {art['precision']} {art['path']}"
        try:
            runner = _open_artifact(art, manifest, device, threads)
        except RunnerUnavailable as exc:
            report(f"[red]accuracy of {name} cannot run: {exc}")
            art["accuracy"] = {"passed": False, "error": str(exc)}
            passed = False
            continue
        try:
            with step(f"Top-1 of {runner.name} on {labelled_folder}"):
                got = evaluate_top1(runner, labelled, image_size, batch)
        finally:
            runner.close()
        drop = expected.points - got.points
        art["accuracy"] = {"top1": got.top1, "reference_top1": expected.top1, "images": got.images,
                           "drop_points": drop, "max_drop_points": max_drop, "passed": drop <= max_drop}
        if drop > max_drop:
            passed = False
            report(f"[red]accuracy gate FAILED: {name} top-1 {got.points:.2f} % vs {expected.points:.2f} % for "
                   f"eager fp32 on {got.images} images of {labelled_folder}: drop {drop:.2f} points > "
                   f"{max_drop:.2f} allowed (--max-accuracy-drop)")
    return passed


def versions() -> dict:
    """rmt_deploy, onnx, Python and every installed backend package."""
    from importlib import metadata

    import onnx

    import rmt_deploy
    found = {"rmt_deploy": rmt_deploy.__version__, "onnx": onnx.__version__, "python": platform.python_version()}
    for package in backend_packages():
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


__all__ = ["MANIFEST_NAME", "Manifest", "accuracy_gate", "default_opset", "export_artifacts", "gate_backend",
           "gate_inputs", "parity_gate", "versions"]
