"""`rmt-export`: ONNX / FP16 / TensorRT artifacts, each proven against the eager model.

Every artifact goes through the parity gate; the manifest records its figures, and a failing
artifact makes the command exit non-zero after writing the manifest and a per-output report.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from rmt_deploy.artifact import ExportPlan, Range
from rmt_deploy.cli_args import (add_backend_arg, add_batch_size_arg, add_calib_arg, add_device_args,
                                 add_image_size_arg, add_model_args, add_precision_arg)
from rmt_deploy.runners import ARTIFACT_FORMATS

from .onnx_export import ATTENTION_OPSET, PORTABLE_OPSET

console = Console(stderr=True)
AUTO = "auto"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="rmt-export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap, ema_alias=True)
    ap.add_argument("--task", choices=["classify", "features", "all"], default="classify",
                    help="all: logits, embedding and the four stage maps in one graph (rmt-serve answers /classify "
                         "and /features from it)")
    add_backend_arg(ap, sweep=True, default=[AUTO], extra_choices=(AUTO,))
    ap.add_argument("--format", choices=[*dict.fromkeys(ARTIFACT_FORMATS.values()), "all", AUTO],
                    help=argparse.SUPPRESS)     # the old spelling of --backends
    add_precision_arg(ap, sweep=True, fp16_alias=True)
    add_device_args(ap, device_default=None, device_help="CUDA device engines are built on (default cuda:0)")
    batch = ap.add_mutually_exclusive_group()
    add_batch_size_arg(batch)
    batch.add_argument("--dynamic-batch", type=Range.parse, metavar="MIN:OPT:MAX")
    add_image_size_arg(ap, pair=True)
    ap.add_argument("--dynamic-hw", type=Range.parse, metavar="MIN:OPT:MAX",
                    help="dynamic height and width (e.g. for detection features)")
    ap.add_argument("--opset", type=int, help=f"ONNX opset (17+); default {ATTENTION_OPSET} (fused Attention "
                    f"nodes, fastest in ONNX Runtime), {PORTABLE_OPSET} with a TensorRT engine or "
                    f"--triton-repo (every TensorRT 10.x and Triton release runs it)")
    ap.add_argument("--output", type=Path, help="output folder (default exports/<model>/)")
    ap.add_argument("--images", type=Path, help="folder of real images added to the parity inputs")
    ap.add_argument("--skip-parity", action="store_true")
    ap.add_argument("--rtol", type=float, help="override the max relative error allowed")
    ap.add_argument("--atol", type=float, help="also bound the max absolute error")
    add_calib_arg(ap)
    ap.add_argument("--accuracy-data", type=Path, metavar="DIR",
                    help="labelled folder (<class>/*.png): bf16/int8 artifacts fail when their top-1 drops more "
                         "than --max-accuracy-drop points below eager fp32 on it")
    ap.add_argument("--max-accuracy-drop", type=float, default=1.0, metavar="PTS",
                    help="largest top-1 drop allowed, in points (default 1.0)")
    ap.add_argument("--triton-repo", type=Path, help="also write a Triton model repository here")
    ap.add_argument("--workspace-gb", type=float, default=4.0, help="TensorRT builder workspace")
    return ap


def _format_backends(fmt: str) -> list[str]:
    """The old ``--format`` as backends: onnx, tensorrt / all (ONNX and engines), auto."""
    from rmt_deploy.runners import backends_for
    return {"onnx": list(backends_for("onnx")), AUTO: [AUTO]}.get(fmt, [*backends_for("onnx"), *backends_for("engine")])


def resolve_kinds(backends: list[str], device: str) -> tuple[tuple[str, ...], str | None]:
    """Artifact kinds to write for ``--backends`` (ONNX always: engines are built from it), and why
    auto left engines out. A named backend that cannot run here is an error."""
    from rmt_deploy.runners import backends_for, get_backend
    if AUTO in backends:
        reasons = [get_backend(b).unavailable_reason(device) for b in backends_for("engine")]
        skipped = next((r for r in reasons if r), None)
        return (("onnx",) if skipped else ("onnx", "engine")), (skipped and f"TensorRT engines skipped: {skipped}")
    kinds = {"onnx"}
    for name in backends:
        entry = get_backend(name)
        if entry.artifact == "engine" and (reason := entry.unavailable_reason(device)):
            raise SystemExit(f"rmt-export: --backends {name} needs {entry.title}: {reason}")
        kinds.add(entry.artifact)
    return tuple(k for k in ("onnx", "engine") if k in kinds), None


def plan_from_args(args, out_dir: Path) -> tuple[ExportPlan, str | None]:
    if len(args.image_size) not in (1, 2):
        raise SystemExit("rmt-export: --image-size takes S or H W")
    height, width = (args.image_size * 2)[:2]
    device = args.device or "cuda:0"
    kinds, skipped = resolve_kinds(_format_backends(args.format) if args.format else args.backends, device)
    named = tuple(b for b in (args.backends or []) if b != AUTO) if not args.format else ()
    precisions = tuple(dict.fromkeys(args.precision))
    check_low_precisions(precisions, named, args.calib, device)
    plan = ExportPlan(batch=args.dynamic_batch or Range.fixed(args.batch_size), height=height, width=width,
                      dynamic_hw=args.dynamic_hw, precisions=precisions, kinds=kinds,
                      opset=args.opset, portable=bool(args.triton_repo), device=device,
                      workspace_gb=args.workspace_gb, output_dir=out_dir, calib=args.calib, backends=named)
    return plan, skipped


def check_low_precisions(precisions: tuple[str, ...], backends: tuple[str, ...], calib: Path | None,
                         device: str) -> None:
    """Refuse, before anything is exported, int8 without calibration images, and a bf16/int8 that none
    of the backends asked for (every ONNX backend when none is named) runs here, with the registry's
    reasons. A named backend that does not run it while another does is left out of that precision."""
    from rmt_deploy.runners import backends_for, get_backend

    from .export import LOW_PRECISIONS
    if "int8" in precisions and calib is None:
        raise SystemExit("rmt-export: --precision int8 needs --calib DIR, a folder of real images (INT8 is "
                         "never calibrated on noise)")
    if "int8" in precisions and not calib.is_dir():
        raise SystemExit(f"rmt-export: --calib {calib} is not a folder of images")
    files = [get_backend(b) for b in backends or backends_for("onnx") if get_backend(b).artifact != "model"]
    for precision in (p for p in precisions if p in LOW_PRECISIONS):
        reasons = [entry.unavailable_reason("cpu" if entry.artifact == "onnx" else device, precision)
                   for entry in files]
        if not files or all(reasons):
            raise SystemExit(f"rmt-export: --precision {precision} refused: " +
                             ("; ".join(reasons) or f"no backend with artifacts among {', '.join(backends)}"))


def _step(progress_text: str):
    return console.status(f"[bold cyan]{progress_text}...", spinner="dots")


def _real_images(args, plan: ExportPlan):
    from rmt_deploy.preprocess import image_files, load_images
    files = image_files(args.images)
    if not files:
        raise ValueError(f"no images found in {args.images}")
    h, w = (plan.dynamic_hw.opt,) * 2 if plan.dynamic_hw else (plan.height, plan.width)
    real = load_images(files, min(h, w))
    if real.shape[-2:] != (h, w):
        console.print("[yellow]--images: skipped (non-square export size; images are centre-cropped square)")
        return None
    return real


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from rmt_deploy import create_model
    from rmt_deploy.checkpoint import CheckpointError

    from .export import export_artifacts, gate_inputs, parity_gate
    from .onnx_export import ExportError

    started = time.perf_counter()
    try:
        with _step("Loading the model"):
            model = create_model(args.model, checkpoint=args.checkpoint, features_only=args.task == "features",
                                 weights=args.weights)
            if args.task == "all":
                model.with_stage_outputs()
    except (CheckpointError, ValueError) as exc:
        console.print(f"[red]rmt-export: {exc}")
        return 2
    plan, skipped = plan_from_args(args, args.output or Path("exports") / model.config.name)
    _warn(args, plan, skipped)
    try:
        manifest = export_artifacts(model, plan, step=_step)
        real = _real_images(args, plan) if args.images else None
    except ExportError as exc:
        console.print(f"[red]rmt-export: {exc}")
        return 1
    except ValueError as exc:
        console.print(f"[red]rmt-export: {exc}")
        return 2
    for art in manifest.artifacts:
        console.print(f"[green]✓[/] {art['format']} {art['precision']} → {plan.output_dir / art['path']}")
    manifest.skipped = skipped
    passed = args.skip_parity or parity_gate(model, manifest, gate_inputs(plan, real), rtol=args.rtol, atol=args.atol,
                                             device=plan.device, threads=args.threads, step=_step,
                                             report=console.print)
    if args.accuracy_data:      # also after a parity failure: both verdicts are reported
        from .export import accuracy_gate
        passed = accuracy_gate(model, manifest, args.accuracy_data, plan.height, max_drop=args.max_accuracy_drop,
                               device=plan.device, threads=args.threads, batch=plan.batch.opt, step=_step,
                               report=console.print) and passed
    manifest.write()
    if args.triton_repo:
        from .triton import write_triton_repo
        for model_dir in write_triton_repo(args.triton_repo, plan.output_dir, manifest.to_dict(),
                                           report=console.print):
            console.print(f"[green]✓[/] Triton model → {model_dir}")
    _print_table(manifest.to_dict(), plan.output_dir, time.perf_counter() - started)
    return 0 if passed else 1


def _warn(args, plan: ExportPlan, skipped: str | None) -> None:
    from .export import default_opset
    opset = default_opset(plan)
    if args.opset is not None and opset >= ATTENTION_OPSET and (plan.portable or "engine" in plan.kinds):
        console.print(f"[yellow]--opset {opset}: attention exports as 3-D ONNX Attention nodes, which onnxruntime "
                      f"before 1.23 cannot run and TensorRT (Attention importer since 10.14) is untested with "
                      f"(--opset {PORTABLE_OPSET} is the portable graph)")
    if skipped:
        console.print(f"[yellow]{skipped}; exporting ONNX only")
    if args.checkpoint is None:
        console.print(Panel("No --checkpoint: the model has RANDOM WEIGHTS. Its artifacts are fit for "
                            "benchmarking only; the manifest records this.", title="WARNING", style="bold red"))


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _print_table(manifest: dict, out_dir: Path, seconds: float) -> None:
    table = Table(title=f"rmt-export {manifest['model']} ({manifest['task']}) → {out_dir}  [{seconds:.0f} s]")
    for col in ("format", "backend", "precision", "file", "MB", "max_abs", "max_rel", "cosine", "top-1", "top-5",
                "parity", "Δtop-1 pts"):
        table.add_column(col, justify="right" if col not in ("format", "backend", "precision", "file") else "left")
    for art in manifest["artifacts"]:
        p = art["parity"] or {}
        verdict = "skipped" if art["parity"] is None else ("[green]passed" if p.get("passed") else "[red]FAILED")
        drop = (art.get("accuracy") or {}).get("drop_points")
        table.add_row(art["format"], art.get("backend", "all"), art["precision"], art["path"],
                      f"{(out_dir / art['path']).stat().st_size / 2**20:.1f}",
                      _fmt(p.get("max_abs"), ".2e"), _fmt(p.get("max_rel"), ".2e"), _fmt(p.get("cosine"), ".6f"),
                      _fmt(p.get("top1_agreement"), ".3f"), _fmt(p.get("top5_agreement"), ".3f"), verdict, _fmt(drop, "+.2f"))
    Console(width=max(Console().width, 140)).print(table)


if __name__ == "__main__":
    sys.exit(main())
