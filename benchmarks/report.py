"""Rendering a benchmark: rich tables, the paper-format table, JSON, CSV and the throughput plot."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from . import paper


def _f(value, fmt: str = ".1f") -> str:
    return "-" if value is None else format(value, fmt)


def skip_notes(report: dict) -> dict[str, int]:
    """Each distinct skip reason once, numbered, so the table cells stay short."""
    reasons = dict.fromkeys(r["skipped"] for r in report["results"] if "skipped" in r)
    return {reason: i + 1 for i, reason in enumerate(reasons)}


def results_table(report: dict) -> Table:
    rows = report["results"]
    notes = skip_notes(report)
    cuda = any("split_ms" in r for r in rows)
    table = Table(title=f"rmt-bench on {report['machine']['gpu'] or report['machine']['cpu']} "
                        f"({report['settings']['device']}, {report['settings']['img_size']}px)")
    for col in ("model", "backend", "prec", "batch", "images/s", "mean ms", "p50", "p90", "p99"):
        table.add_column(col, justify="left" if col in ("model", "backend", "prec") else "right")
    if cuda:
        for col in ("h2d ms", "compute ms", "d2h ms", "device img/s"):
            table.add_column(col, justify="right")
    low_precision = any(r["precision"] != "fp32" for r in rows)
    for col in ("peak MB", "vs eager", *(("vs fp32",) if low_precision else ()), "GFLOP/s", "of peak"):
        table.add_column(col, justify="right")
    for r in rows:
        head = [r["model"], r["backend"], r["precision"], str(r["batch_size"])]
        if "skipped" in r:
            table.add_row(*head, f"[yellow]skipped [{notes[r['skipped']]}][/yellow]")
            continue
        lat = r["latency_ms"]
        cells = head + [_f(r["images_per_s"]), _f(lat["mean"], ".2f"), _f(lat["p50"], ".2f"), _f(lat["p90"], ".2f"),
                        _f(lat["p99"], ".2f")]
        if cuda:
            split = r.get("split_ms", {})
            cells += [_f(split.get(k), ".2f") for k in ("h2d_ms", "compute_ms", "d2h_ms")]
            cells.append(_f(r.get("device_images_per_s")))
        cells += [_f(r["peak_memory_mb"], ".0f"), _ratio(r["speedup_vs_eager_fp32"])]
        if low_precision:
            cells.append(_ratio(r.get("speedup_vs_fp32")))
        cells += [_f(r["gflops"]), ("-" if r["peak_fraction"] is None else f"{100 * r['peak_fraction']:.0f}%")]
        table.add_row(*cells)
    peaks = ", ".join(f"{p}: {v['gflops']:.1f} {'GOP/s' if p == 'int8' else 'GFLOP/s'} ({v['size']}^3 "
                      f"{v.get('library', 'torch')} GEMM, best over the libraries and sizes, {len(v.get('samples_gflops', [1]))} "
                      f"measurement(s) in this run)"
                      if "gflops" in v else f"{p}: {v['error']}" for p, v in report["machine"]["matmul_peak"].items())
    load = report["machine"].get("loadavg_start")
    interleaved = ("the precisions of each backend and batch interleaved repeat by repeat (vs fp32 = their ratio); "
                   if report["settings"].get("interleave") else "")
    table.caption = (f"Warm-up excluded; images/s = median over {report['settings']['repeats']} repeats; " + interleaved
                     + (f"1-min load average {load[0]:.1f} at start on {report['machine']['logical_cpus']} CPUs; " if load else "")
                     + f"GFLOP/s = 2 x counted multiply-adds x images/s; measured matmul peak {peaks}"
                     + ("; CUDA splits are medians timed with CUDA events, device img/s = batch / compute ms "
                        "(inputs already on the GPU)" if cuda else ""))
    return table


def _ratio(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def paper_table(report: dict) -> list[dict]:
    """One row per model: counted params and multiply-adds, quoted paper figures, best measured
    images/s per backend (over the batch sizes and precisions run) and best / paper."""
    size = report["settings"]["img_size"]
    rows = []
    for name, described in report["models"].items():
        quoted = paper.TABLE9.get(name, {})
        measured = {}
        for r in report["results"]:
            if r["model"] == name and "skipped" not in r:
                best = measured.get(r["backend"])
                if best is None or r["images_per_s"] > best["images_per_s"]:
                    keys = ("images_per_s", "batch_size", "precision", "device_images_per_s")
                    measured[r["backend"]] = {k: r[k] for k in keys if k in r}
        best = max((m["images_per_s"] for m in measured.values()), default=None)
        best_device = max((r.get("device_images_per_s", 0) for r in report["results"]
                           if r["model"] == name and "skipped" not in r), default=0) or None
        rows.append({"model": name, "params_m": described["params"] / 1e6,
                     "gmacs": described["macs_per_image"] / 1e9, "img_size": size,
                     "paper_gflops": quoted.get("gflops"), "paper_top1": quoted.get("top1"),
                     "paper_images_per_s": quoted.get("images_per_s"), "measured": measured,
                     "best_over_paper": best / quoted["images_per_s"] if best and quoted else None,
                     "best_device_over_paper": best_device / quoted["images_per_s"] if best_device and quoted else None})
    return rows


def paper_rich_table(rows: list[dict], backends: list[str]) -> Table:
    table = Table(title="RMT paper Table 9 format")
    for col in ("Model", "Params (M)", "FLOPs (G)", "paper FLOPs (G)", "Top-1 (paper)", "paper images/s"):
        table.add_column(col, justify="left" if col == "Model" else "right")
    for b in backends:
        table.add_column(f"{b} images/s", justify="right")
    table.add_column("best / paper", justify="right")
    device = any(r["best_device_over_paper"] for r in rows)
    if device:
        table.add_column("best device / paper", justify="right")
    for r in rows:
        cells = [r["model"], f"{r['params_m']:.2f}", f"{r['gmacs']:.2f}", _f(r["paper_gflops"]), _f(r["paper_top1"]),
                 _f(r["paper_images_per_s"], ".0f")]
        for b in backends:
            m = r["measured"].get(b)
            device_ips = f"; device {m['device_images_per_s']:.0f}" if m and "device_images_per_s" in m else ""
            cells.append(f"{m['images_per_s']:.1f} (b{m['batch_size']} {m['precision']}{device_ips})" if m else "skipped")
        cells.append(_f(r["best_over_paper"], ".3f"))
        if device:
            cells.append(_f(r["best_device_over_paper"], ".3f"))
        table.add_row(*cells)
    table.caption = (f"Params and FLOPs (multiply-adds at {rows[0]['img_size'] if rows else 224}px, rmt_deploy.flops) "
                     f"counted by this tool; 'paper' columns quoted from {paper.SOURCE}. Measured: best images/s over "
                     "the batch sizes and precisions run, on this machine; skipped backends are listed above."
                     + (" 'device': images/s with the inputs already on the GPU (copies excluded), as the paper's "
                        "throughput is usually measured." if device else ""))
    return table


def print_report(report: dict, console: Console) -> None:
    console.print(results_table(report))
    for reason, number in skip_notes(report).items():
        console.print(f"[yellow]\\[{number}][/yellow] skipped: {reason.strip()}", highlight=False)
    if "paper_table" in report:
        console.print(paper_rich_table(report["paper_table"], report["settings"]["backends"]))


def write_json(report: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report, indent=2, default=str))


CSV_FIELDS = ["model", "backend", "precision", "batch_size", "device", "img_size", "images_per_s", "latency_mean_ms",
              "latency_p50_ms", "latency_p90_ms", "latency_p99_ms", "h2d_ms", "compute_ms", "d2h_ms",
              "device_images_per_s", "peak_memory_mb",
              "speedup_vs_eager_fp32", "speedup_vs_fp32", "gflops", "peak_fraction", "skipped"]


def write_csv(report: dict, path: str | Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in report["results"]:
            flat = {**r, **{f"latency_{k}_ms": v for k, v in r.get("latency_ms", {}).items()}, **r.get("split_ms", {})}
            writer.writerow(flat)


def write_plot(report: dict, path: str | Path) -> None:
    """Images/s against batch size, one line per backend and precision, one panel per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] if "skipped" not in r]
    models = list(dict.fromkeys(r["model"] for r in report["results"]))
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        lines = dict.fromkeys((r["backend"], r["precision"]) for r in rows if r["model"] == model)
        for backend, precision in lines:
            pts = sorted((r["batch_size"], r["images_per_s"]) for r in rows
                         if (r["model"], r["backend"], r["precision"]) == (model, backend, precision))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{backend} {precision}")
        skipped = sorted({r["backend"] for r in report["results"] if r["model"] == model and "skipped" in r}
                         - {b for b, _ in lines})
        ax.set_xscale("log", base=2)
        sizes = sorted({r["batch_size"] for r in report["results"] if r["model"] == model})
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("batch size")
        ax.set_ylabel("images/s")
        ax.set_title(f"{model} ({report['settings']['device']}, {report['settings']['img_size']}px)"
                     + (f"\nskipped: {', '.join(skipped)}" if skipped else ""))
        ax.grid(True, alpha=0.3)
        if lines:
            ax.legend()
    fig.suptitle(f"rmt-bench: {report['machine']['gpu'] or report['machine']['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
