"""The throughput/latency benchmark: every (model, backend, precision, batch) through the same
runner objects the server and the parity gate use, warm-up excluded, medians over repeats."""
from __future__ import annotations

import copy
import functools
import gc
import json
import os
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from rmt_deploy import VARIANTS, create_model
from rmt_deploy.flops import count_macs, count_params
from rmt_deploy.model import RMTConfig
from rmt_deploy.artifact import ExportPlan, Range
from rmt_deploy.runners import INPUT_NAME, RunnerUnavailable, get_backend, open_backend_runner, reference_backend

from rmt_deploy.exporters.cache import SEED, ArtifactCache
from .machine import machine_info, matmul_peak


@dataclass
class Settings:
    device: str = "cpu"
    img_size: int = 224
    warmup: int = 5
    iters: int | None = 20            # timed calls per repeat, or
    duration: float | None = None     # seconds per repeat
    repeats: int = 3
    threads: int | None = None
    calib: Path | None = None         # INT8 calibration images (int8 rows are skipped without them)
    interleave: bool = False          # rows differing only in precision timed in turn, repeat by repeat


def parse_models(spec) -> list:
    """``--model``: variant names and/or config JSON paths, comma-separated; inline JSON; a dict."""
    if isinstance(spec, (dict, RMTConfig)):
        return [spec]
    if isinstance(spec, (list, tuple)):
        return [m for s in spec for m in parse_models(s)]
    spec = spec.strip()
    if spec.startswith("{"):
        return [json.loads(spec)]
    return [s.strip() for s in spec.split(",") if s.strip()]


def load_model(spec, checkpoint: str | None = None, weights: str = "auto"):
    """Fused eval model of a variant, config dict or JSON config file; random weights are seeded."""
    torch.manual_seed(SEED)
    return create_model(spec, checkpoint=checkpoint, weights=weights)


def _reset_peak_rss() -> bool:
    """Linux resets the process's peak RSS (VmHWM) when 5 is written to clear_refs."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Memory:
    """Peak memory of a run: process RSS on CPU; on CUDA torch's peak reservation for the backends
    that run the model in torch, device memory in use (cudaMemGetInfo) above the pre-load baseline for the others."""

    def __init__(self, device: str, backend: str):
        self.cuda = device.startswith("cuda") and torch.cuda.is_available()
        self.torch = get_backend(backend).artifact == "model"
        if self.cuda:
            torch.cuda.synchronize()
            gc.collect()
            torch.cuda.empty_cache()        # blocks cached from earlier rows must not set a floor
            torch.cuda.reset_peak_memory_stats()
            free, total = torch.cuda.mem_get_info()
            self.baseline = total - free
            self.kind = "cuda max_memory_reserved" if self.torch else "cuda memory in use after the run above the pre-load baseline"
        else:
            exact = _reset_peak_rss()
            self.kind = "process peak RSS (VmHWM) since load" if exact else "process peak RSS over its lifetime"

    def peak_mb(self) -> float:
        if not self.cuda:
            return _peak_rss_mb()
        torch.cuda.synchronize()
        if self.torch:
            return torch.cuda.max_memory_reserved() / 2**20
        free, total = torch.cuda.mem_get_info()
        return (total - free - self.baseline) / 2**20


def open_backend(backend: str, model, precision: str, batch: int, settings: Settings, cache: ArtifactCache,
                 onnx: str | None, engine: str | None, shared_process: bool = False):
    """The runner of one row and the artifact it runs (None for the model backends): a given file (in
    its own precision: `_check_artifact` compares), else the one the backend prepares through the cache.
    Refused before any export where it cannot run."""
    plan = ExportPlan(batch=Range.fixed(batch), height=settings.img_size, width=settings.img_size,
                      precisions=(precision,), device=settings.device, calib=settings.calib)
    given = {"onnx": onnx, "engine": engine}.get(get_backend(backend).artifact)
    # compiled models run as CUDA graphs on GPUs (every call comes from this thread)
    return open_backend_runner(backend, device=settings.device, precision=precision, threads=settings.threads,
                               make_model=lambda: _fresh_copy(model), artifact=given,
                               prepare=lambda entry: entry.prepare(model, plan, cache), cuda_graphs=True,
                               shared_process=shared_process)


def _fresh_copy(model):
    """The model a model-backend row runs: its own copy (each runner casts/moves its copy, leaving the
    shared model fp32 on CPU for exporting), with a fresh compile cache (no recompile limit carried over)."""
    torch._dynamo.reset()
    return copy.deepcopy(model)


def _check_artifact(runner, artifact, model, precision: str, batch: int, size: int) -> None:
    """A given --onnx / --engine file must be the model, precision, batch and size of the row it is
    measured for (its figures are labelled and counted as that model's); otherwise the row is skipped."""
    problems = []
    if runner.precision != precision:
        problems.append(f"it computes in {runner.precision}, not {precision}")
    meta = runner.metadata()
    file_batch, height, width = meta.fixed_input_dims()
    if file_batch is not None and file_batch != batch:
        problems.append(f"it has a static batch of {file_batch}, not {batch}")
    if height is not None and width is not None and (height, width) != (size, size):
        problems.append(f"it takes {height}x{width} inputs, not --image-size {size}")
    described = meta.artifact
    named = described.model if described else None
    if named and named != model.config.name and (named in VARIANTS or model.config.name in VARIANTS):
        problems.append(f"it is an export of {named}, not of --model {model.config.name}")
    classes = meta.outputs[0].shape[-1] if meta.outputs[0].name == "logits" else None
    if isinstance(classes, int) and not model.features_only and classes != model.config.num_classes:
        problems.append(f"it has {classes} classes, {model.config.name} has {model.config.num_classes}")
    if problems:
        raise RunnerUnavailable(f"{artifact} does not fit this row: {'; '.join(problems)}")


class _Timing:
    """One row's timed calls on one fixed random batch: warm-up, then repeats (all at once, or one at a
    time in turn with other rows when interleaved), then per-call latencies and per-repeat throughput."""

    def __init__(self, runner, batch: int, settings: Settings, advance=lambda n=1: None):
        self.runner, self.batch, self.settings, self.advance = runner, batch, settings, advance
        self.feed = {INPUT_NAME: np.random.default_rng(SEED).standard_normal(
            (batch, 3, settings.img_size, settings.img_size), dtype=np.float32)}
        self.finite, self.latencies, self.splits, self.throughputs = True, [], [], []

    def warm_up(self) -> None:
        for _ in range(max(self.settings.warmup, self.runner.warmup_calls)):
            outputs = self.runner.infer(self.feed)
            self.finite = self.finite and all(np.isfinite(o).all() for o in outputs.values())
            self.advance()

    def repeat(self) -> None:
        settings, calls, start = self.settings, 0, time.perf_counter()
        while (calls < settings.iters) if settings.iters else (time.perf_counter() - start < settings.duration):
            t0 = time.perf_counter()
            self.runner.infer(self.feed)
            self.latencies.append((time.perf_counter() - t0) * 1e3)
            self.splits.append(self.runner.last_timing)
            calls += 1
            self.advance()
        self.throughputs.append(self.batch * calls / (time.perf_counter() - start))

    def result(self) -> dict:
        lat = np.asarray(self.latencies)
        result = {
            "images_per_s": statistics.median(self.throughputs),
            "images_per_s_repeats": self.throughputs,
            "latency_ms": {"mean": float(lat.mean()), "p50": float(np.percentile(lat, 50)),
                           "p90": float(np.percentile(lat, 90)), "p99": float(np.percentile(lat, 99)),
                           "min": float(lat.min()), "max": float(lat.max())},
            "timed_calls": len(self.latencies),
            "outputs_finite": bool(self.finite),
        }
        if self.settings.device.startswith("cuda") and all(s is not None for s in self.splits):
            split = result["split_ms"] = {k: statistics.median(getattr(s, k) for s in self.splits)
                                          for k in ("h2d_ms", "compute_ms", "d2h_ms")}
            if split["h2d_ms"] > 0:     # runners that time their copies apart (not ONNX Runtime's one run call)
                # inputs already on the device, as timm and trtexec's GPU compute time count throughput
                # (images/s above includes each call's host copies)
                result["device_images_per_s"] = self.batch * 1e3 / split["compute_ms"]
        return result


def measure(runner, batch: int, settings: Settings, advance=lambda n=1: None) -> dict:
    """Time ``runner.infer`` on one fixed random batch: per-call latencies and per-repeat throughput."""
    timing = _Timing(runner, batch, settings, advance)
    timing.warm_up()
    for _ in range(settings.repeats):
        timing.repeat()
    return timing.result()


def _peaks(settings: Settings, precisions, earlier: dict | None = None) -> dict:
    """The matmul peak per precision. Measured at the start and again at the end of the run; the
    reference is the better of the two (a busy machine at one moment must not inflate fractions)."""
    peaks = {}
    for precision in precisions:
        try:
            peak = matmul_peak(settings.device, precision)
        except (RuntimeError, AssertionError) as exc:    # no CUDA, or no kernel for this dtype
            peaks[precision] = {"device": settings.device, "precision": precision, "error": str(exc)}
            continue
        before = (earlier or {}).get(precision, {})
        samples = before.get("samples_gflops", []) + [peak["gflops"]]
        peaks[precision] = {**peak, "gflops": max(samples), "samples_gflops": samples}
    return peaks


def run_benchmark(models, backends, precisions=("fp32",), batch_sizes=(1, 8), settings: Settings | None = None, *,
                  checkpoint: str | None = None, weights: str = "auto", cache: ArtifactCache | None = None,
                  onnx: str | None = None, engine: str | None = None, progress=None) -> dict:
    """Measure every combination; returns ``{"machine", "models", "settings", "results"}`` (JSON-ready).

    ``progress`` is a rich Progress (or None). Backends that cannot run here stay in the results
    with ``"skipped": reason``; a backend that fails while running is recorded the same way.
    """
    settings = settings or Settings()
    cache = cache or ArtifactCache()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    models = parse_models(models)
    if checkpoint and len(models) > 1:
        raise ValueError("--checkpoint applies to one model; give a single --model")
    machine = machine_info(settings.device)
    machine["matmul_peak"] = _peaks(settings, precisions)
    results, described = [], {}
    for spec in models:
        model = load_model(spec, checkpoint, weights)
        macs = count_macs(model.config, settings.img_size, settings.img_size)["total"]
        described[model.config.name] = {"config": asdict(model.config), "checkpoint": model.checkpoint,
                                        "params": count_params(model.config), "macs_per_image": macs}
        row = functools.partial(_Row, model, settings=settings, cache=cache, onnx=onnx, engine=engine, macs=macs)
        if settings.interleave:
            for batch in batch_sizes:
                for backend in backends:
                    results += _run_interleaved([row(backend, precision, batch) for precision in precisions], progress)
                    gc.collect()
        else:
            for precision in precisions:
                for batch in batch_sizes:
                    for backend in backends:
                        results.append(_run_one(row(backend, precision, batch), progress))
                        gc.collect()
        del model
    machine["matmul_peak"] = _peaks(settings, precisions, machine["matmul_peak"])
    for r in results:
        peak = machine["matmul_peak"].get(r["precision"], {})
        if "gflops" in r and "gflops" in peak:
            r["peak_fraction"] = r["gflops"] / peak["gflops"]
    _speedups(results)
    machine["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"machine": machine, "models": described, "settings": {**settings.__dict__, "backends": list(backends),
                                             "precisions": list(precisions), "batch_sizes": list(batch_sizes),
                                             "checkpoint": checkpoint, "cache": str(cache.root)},
            "results": results}


@dataclass
class _Row:
    """One (model, backend, precision, batch) row: what it needs to open its runner, and its result."""
    model: object
    backend: str
    precision: str
    batch: int
    settings: Settings
    cache: ArtifactCache
    onnx: str | None
    engine: str | None
    macs: int
    result: dict = field(default_factory=dict)

    def __post_init__(self):
        self.result.update(model=self.model.config.name, backend=self.backend, precision=self.precision,
                           batch_size=self.batch, device=self.settings.device, img_size=self.settings.img_size)

    @property
    def label(self) -> str:
        return f"{self.model.config.name} {self.backend} {self.precision} b{self.batch}"

    def open(self, interleaved: bool = False):
        """The loaded runner (checked against the row when it runs a given file), its artifact, and the
        peak memory of its loading and running (from after the export; None when interleaved)."""
        runner, artifact = open_backend(self.backend, self.model, self.precision, self.batch, self.settings,
                                        self.cache, self.onnx, self.engine, shared_process=interleaved)
        memory = None if interleaved else _Memory(self.settings.device, self.backend)
        try:
            runner.load()
            if artifact is not None:
                _check_artifact(runner, artifact, self.model, self.precision, self.batch, self.settings.img_size)
        except BaseException:
            runner.close()
            raise
        return runner, artifact, memory

    def skip(self, exc: Exception) -> None:
        failed = not isinstance(exc, RunnerUnavailable)     # a failing backend is a result to report, not a crash
        self.result.update(skipped=f"failed: {type(exc).__name__}: {exc}" if failed else str(exc))

    def record(self, timed: dict, runner, artifact, memory: "_Memory | None") -> None:
        timed["peak_memory_mb"] = memory.peak_mb() if memory else None
        timed["peak_memory_kind"] = memory.kind if memory else "not measured: interleaved rows share the process"
        timed.update(runner=runner.name, artifact=str(artifact) if artifact else None, macs_per_image=self.macs,
                     gflops=2 * self.macs * timed["images_per_s"] / 1e9,
                     peak_fraction=None)      # set against the run's matmul peak once it is complete
        self.result.update(timed)


def _calls_per_row(settings: Settings) -> int | None:
    return settings.warmup + (settings.repeats * settings.iters if settings.iters else 0) or None


def _run_one(row: _Row, progress) -> dict:
    task = progress.add_task(row.label + " (preparing)", total=_calls_per_row(row.settings)) if progress else None
    advance = (lambda n=1: progress.advance(task, n)) if progress else (lambda n=1: None)
    try:
        runner, artifact, memory = row.open()
    except Exception as exc:  # noqa: BLE001 -- recorded as the row's result
        row.skip(exc)
    else:
        try:
            if progress:
                progress.update(task, description=row.label)
            row.record(measure(runner, row.batch, row.settings, advance), runner, artifact, memory)
        except Exception as exc:  # noqa: BLE001
            row.skip(exc)
        finally:
            runner.close()
    finally:
        if progress:
            progress.remove_task(task)
    return row.result


def _run_interleaved(rows: list[_Row], progress) -> list[dict]:
    """Rows that differ only in precision, measured together: all open and warm, then each repeat runs
    every row's timed calls in turn, so a change of load on a shared machine hits them alike and their
    ratios hold. The runners are opened as good neighbours (`Backend.shared_process_options`: ONNX
    Runtime's idle threads would otherwise spin into the next row's time). Peak memory is not measured
    (the runners share the process)."""
    settings = rows[0].settings
    calls = _calls_per_row(settings)
    task = progress.add_task(f"{rows[0].label} ... interleaved", total=calls and calls * len(rows)) if progress else None
    advance = (lambda n=1: progress.advance(task, n)) if progress else (lambda n=1: None)
    running = {}
    try:
        for row in rows:
            try:
                runner, artifact, _ = row.open(interleaved=True)
            except Exception as exc:  # noqa: BLE001 -- recorded as the row's result
                row.skip(exc)
                continue
            running[id(row)] = (row, runner, artifact, _Timing(runner, row.batch, settings, advance))
        for step in ["warm_up"] + ["repeat"] * settings.repeats:
            for key, (row, runner, _, timing) in list(running.items()):
                try:
                    getattr(timing, step)()
                except Exception as exc:  # noqa: BLE001 -- this row fails, the others go on
                    row.skip(exc)
                    runner.close()
                    del running[key]
        for row, runner, artifact, timing in running.values():
            try:
                row.record(timing.result(), runner, artifact, None)
            except Exception as exc:  # noqa: BLE001 -- this row fails, the others are recorded
                row.skip(exc)
    finally:
        for _, runner, _, _ in running.values():
            runner.close()
        if progress:
            progress.remove_task(task)
    return [row.result for row in rows]


def _speedups(results: list[dict]) -> None:
    """Each row against the reference backend's fp32 row and against its own backend's fp32 row (the
    gain of a precision) of the same model and batch."""
    reference = reference_backend()
    fp32 = {(r["model"], r["backend"], r["batch_size"]): r["images_per_s"] for r in results
            if r["precision"] == "fp32" and "skipped" not in r}
    for r in results:
        if "skipped" not in r:
            eager = fp32.get((r["model"], reference, r["batch_size"]))
            own = fp32.get((r["model"], r["backend"], r["batch_size"]))
            r["speedup_vs_eager_fp32"] = r["images_per_s"] / eager if eager else None
            r["speedup_vs_fp32"] = r["images_per_s"] / own if own else None
