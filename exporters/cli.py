"""`rmt-export`: ONNX / FP16 / TensorRT artifacts, each proven against the eager model.

Every artifact goes through the parity gate; the manifest records its figures, and a failing
artifact makes the command exit non-zero after writing the manifest and a per-output report.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from .onnx_export import ATTENTION_OPSET, PORTABLE_OPSET

console = Console(stderr=True)


@dataclass(frozen=True)
class Range:
    """MIN:OPT:MAX of a dynamic axis (a static axis has min == opt == max)."""

    min: int
    opt: int
    max: int

    @classmethod
    def parse(cls, text: str) -> "Range":
        try:
            lo, opt, hi = (int(v) for v in text.split(":"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected MIN:OPT:MAX, got {text!r}") from None
        if not 0 < lo <= opt <= hi:
            raise argparse.ArgumentTypeError(f"need 0 < MIN <= OPT <= MAX, got {text!r}")
        return cls(lo, opt, hi)

    @classmethod
    def fixed(cls, value: int) -> "Range":
        return cls(value, value, value)

    @property
    def dynamic(self) -> bool:
        return self.min != self.max


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="rmt-export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="rmt_t",
                    help="rmt_t, rmt_s, rmt_b, rmt_l, auto (inferred from --checkpoint) or a config JSON file")
    ap.add_argument("--checkpoint", help="released checkpoint (any format); without it: random weights")
    ap.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                    help="use the EMA weights (default: EMA when present, raw for RMT-T)")
    ap.add_argument("--task", choices=["classify", "features"], default="classify")
    ap.add_argument("--format", choices=["onnx", "tensorrt", "all", "auto"], default="auto",
                    help="auto: TensorRT too when TensorRT and a CUDA GPU are present")
    ap.add_argument("--fp16", action="store_true", help="also produce FP16 artifacts")
    batch = ap.add_mutually_exclusive_group()
    batch.add_argument("--batch-size", type=int, default=1, help="static batch size (default 1)")
    batch.add_argument("--dynamic-batch", type=Range.parse, metavar="MIN:OPT:MAX")
    ap.add_argument("--img-size", type=int, nargs="+", default=[224], metavar="S", help="S, or H W")
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
    ap.add_argument("--triton-repo", type=Path, help="also write a Triton model repository here")
    ap.add_argument("--workspace-gb", type=float, default=4.0, help="TensorRT builder workspace")
    return ap


def _versions() -> dict:
    import onnx
    import onnxruntime
    import torch

    import rmt_deploy
    versions = {"rmt_deploy": rmt_deploy.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}
    try:
        import tensorrt
        versions["tensorrt"] = tensorrt.__version__
    except ImportError:
        pass
    return versions


def _resolve_format(fmt: str) -> tuple[list[str], str | None]:
    from .tensorrt_build import tensorrt_available
    ok, reason = tensorrt_available()
    if fmt == "auto":
        return (["onnx", "tensorrt"], None) if ok else (["onnx"], f"TensorRT engines skipped: {reason}")
    if fmt in ("tensorrt", "all") and not ok:
        raise SystemExit(f"rmt-export: --format {fmt} needs TensorRT: {reason}")
    return (["onnx", "tensorrt"] if fmt in ("tensorrt", "all") else ["onnx"]), None


def _step(progress_text: str):
    return console.status(f"[bold cyan]{progress_text}...", spinner="dots")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from rmt_deploy import create_model
    from rmt_deploy.checkpoint import CheckpointError, sha256_file
    from rmt_deploy.parity import Tolerance, check_parity, parity_inputs
    from rmt_deploy.preprocess import image_files, load_images
    from rmt_deploy.runners import RunnerUnavailable, open_runner

    from .onnx_export import ExportError, export_onnx, tensor_specs, write_fp16

    if len(args.img_size) not in (1, 2):
        raise SystemExit("rmt-export: --img-size takes S or H W")
    height, width = (args.img_size * 2)[:2]
    batch = args.dynamic_batch or Range.fixed(args.batch_size)
    hw = args.dynamic_hw
    formats, skipped = _resolve_format(args.format)
    portable = "tensorrt" in formats or args.triton_repo    # Triton's onnxruntime may predate Attention (1.23)
    if args.opset is None:
        args.opset = PORTABLE_OPSET if portable else ATTENTION_OPSET
    elif args.opset >= ATTENTION_OPSET and portable:
        console.print(f"[yellow]--opset {args.opset}: attention exports as 3-D ONNX Attention nodes, which onnxruntime "
                      f"before 1.23 cannot run and TensorRT (Attention importer since 10.14) is untested with "
                      f"(--opset {PORTABLE_OPSET} is the portable graph)")
    if skipped:
        console.print(f"[yellow]{skipped}; exporting ONNX only")
    weights = "auto" if args.ema is None else ("ema" if args.ema else "model")
    started = time.perf_counter()
    try:
        with _step("Loading the model"):
            model = create_model(args.model, checkpoint=args.checkpoint,
                                 features_only=args.task == "features", weights=weights)
    except (CheckpointError, ValueError) as exc:
        console.print(f"[red]rmt-export: {exc}")
        return 2
    name = model.config.name
    out_dir = args.output or Path("exports") / name
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.checkpoint is None:
        console.print(Panel("No --checkpoint: the model has RANDOM WEIGHTS. Its artifacts are fit for "
                            "benchmarking only; the manifest records this.", title="WARNING", style="bold red"))
    stem = name if args.task == "classify" else f"{name}_features"
    opt_h, opt_w = (hw.opt, hw.opt) if hw else (height, width)
    precisions = ["fp32", "fp16"] if args.fp16 else ["fp32"]
    artifacts: list[dict] = []
    try:
        with _step(f"Exporting {stem} to ONNX (fp32, opset {args.opset})"):
            fp32_onnx = export_onnx(model, out_dir / f"{stem}_fp32.onnx", batch_size=batch.opt,
                                    dynamic_batch=batch.dynamic, height=opt_h, width=opt_w,
                                    dynamic_hw=bool(hw), opset=args.opset,
                                    max_batch=batch.max, hw_range=(hw.min, hw.max) if hw else (32, 2048))
        console.print(f"[green]✓[/] ONNX fp32 → {fp32_onnx}")
        onnx_files = {"fp32": fp32_onnx}
        if args.fp16:
            with _step("Converting to FP16 (LayerNorm, attention softmax, decay bias kept in FP32)"):
                onnx_files["fp16"] = write_fp16(fp32_onnx, out_dir / f"{stem}_fp16.onnx")
            console.print(f"[green]✓[/] ONNX fp16 → {onnx_files['fp16']}")
    except ExportError as exc:
        console.print(f"[red]rmt-export: {exc}")
        return 1
    for precision in precisions:
        artifacts.append({"format": "onnx", "precision": precision, "file": onnx_files[precision]})
    if "tensorrt" in formats:
        from .tensorrt_build import build_engine
        def shape(b: int, side: int) -> tuple[int, int, int, int]:
            return (b, 3, side, side) if hw else (b, 3, height, width)

        for precision in precisions:
            engine = out_dir / f"{stem}_{precision}.engine"
            with _step(f"Building the TensorRT {precision} engine (minutes)"):
                build_engine(onnx_files[precision], engine, fp16=precision == "fp16",
                             min_shape=shape(batch.min, hw.min if hw else 0), opt_shape=shape(batch.opt, opt_h),
                             max_shape=shape(batch.max, hw.max if hw else 0), workspace_gb=args.workspace_gb,
                             timing_cache=out_dir / "timing.cache",
                             metadata={"rmt.model": name, "rmt.task": args.task, "rmt.height": str(opt_h),
                                       "rmt.width": str(opt_w), "rmt.num_classes": str(model.config.num_classes)})
            console.print(f"[green]✓[/] TensorRT {precision} → {engine}")
            artifacts.append({"format": "tensorrt", "precision": precision, "file": engine})

    real = None
    if args.images:
        files = image_files(args.images)
        if not files:
            console.print(f"[red]rmt-export: no images found in {args.images}")
            return 2
        real = load_images(files, opt_h if opt_h == opt_w else min(opt_h, opt_w))
        if real.shape[-2:] != (opt_h, opt_w):
            console.print("[yellow]--images: skipped (non-square export size; images are centre-cropped square)")
            real = None
    batches = parity_inputs(batch.opt, opt_h, opt_w, images=real)
    if batch.dynamic and batch.min != batch.opt:
        batches.append(parity_inputs(batch.min, opt_h, opt_w, seed=1, count=1)[0])
    if hw:
        odd = min(hw.max, opt_h + 13)
        batches.append(parity_inputs(batch.opt, odd, min(hw.max, opt_w + 7), seed=2, count=1)[0])
    failed = False
    reference = open_runner("eager", model=model).load()
    for art in artifacts:
        path = art.pop("file")
        inputs, outputs = tensor_specs(path) if art["format"] == "onnx" else tensor_specs(onnx_files[art["precision"]])
        art.update({"path": path.name, "sha256": sha256_file(path), "inputs": inputs, "outputs": outputs})
        if batch.dynamic:
            art["max_batch"] = batch.max
        if args.skip_parity:
            art["parity"] = None
            continue
        try:
            backend = "onnxruntime" if art["format"] == "onnx" else "tensorrt"
            runner = open_runner(backend, onnx=path if backend == "onnxruntime" else None,
                                 engine=path if backend == "tensorrt" else None).load()
        except RunnerUnavailable as exc:
            console.print(f"[red]parity of {path.name} cannot run: {exc}")
            art["parity"] = {"reference": "eager-fp32", "passed": False, "error": str(exc)}
            failed = True
            continue
        with _step(f"Parity of {path.name} against eager fp32"):
            report = check_parity(reference, runner, batches,
                                  Tolerance.for_precision(art["precision"], rtol=args.rtol, atol=args.atol))
        runner.close()
        summary = report.summary()
        summary["reference"] = "eager-fp32"
        art["parity"] = summary
        if not report.passed:
            failed = True
            console.print(f"[red]{report.text()}")
    manifest = {
        "model": name, "task": args.task,
        "checkpoint": model.checkpoint,
        "random_weights": model.checkpoint is None,
        "config": asdict(model.config),
        "input_size": {"height": "dynamic" if hw else height, "width": "dynamic" if hw else width},
        "batch": {"min": batch.min, "opt": batch.opt, "max": batch.max, "dynamic": batch.dynamic},
        "opset": args.opset, "versions": _versions(), "artifacts": artifacts,
        "skipped": skipped,
    }
    (out_dir / "export.json").write_text(json.dumps(manifest, indent=2, default=str))
    if args.triton_repo:
        from .triton import write_triton_repo
        for model_dir in write_triton_repo(args.triton_repo, out_dir, manifest):
            console.print(f"[green]✓[/] Triton model → {model_dir}")
    _print_table(manifest, out_dir, time.perf_counter() - started)
    return 1 if failed else 0


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _print_table(manifest: dict, out_dir: Path, seconds: float) -> None:
    table = Table(title=f"rmt-export {manifest['model']} ({manifest['task']}) → {out_dir}  [{seconds:.0f} s]")
    for col in ("format", "precision", "file", "MB", "max_abs", "max_rel", "cosine", "top-1", "top-5", "parity"):
        table.add_column(col, justify="right" if col not in ("format", "precision", "file") else "left")
    for art in manifest["artifacts"]:
        p = art["parity"] or {}
        verdict = "skipped" if art["parity"] is None else ("[green]passed" if p.get("passed") else "[red]FAILED")
        table.add_row(art["format"], art["precision"], art["path"],
                      f"{(out_dir / art['path']).stat().st_size / 2**20:.1f}",
                      _fmt(p.get("max_abs"), ".2e"), _fmt(p.get("max_rel"), ".2e"), _fmt(p.get("cosine"), ".6f"),
                      _fmt(p.get("top1_agreement"), ".3f"), _fmt(p.get("top5_agreement"), ".3f"), verdict)
    Console(width=max(Console().width, 140)).print(table)


if __name__ == "__main__":
    sys.exit(main())
