"""``rmt-bench serve``: load-test rmt-serve over real HTTP and compare with the offline runner.

Starts a server on loopback (or targets ``--url``), sweeps client concurrency with an async httpx
client posting JPEGs to /classify, and reports throughput, latency percentiles, errors and the
server's resident-memory growth. The offline runner throughput at the server's max batch size is
measured in the same run, before the server starts and again after it stops (so the two never
share the CPU, and a drifting background load shows up as a before/after gap), to give the
server/offline ratio. Every request loop is bounded by a request count and a time limit.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import httpx
import numpy as np
import psutil
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from rmt_deploy.preprocess import decode_image, preprocess


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    errors: int
    seconds: float
    throughput: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_batch: float | None = None     # images per runner call, from the server's metrics


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rmt-bench serve", description=__doc__.splitlines()[0], add_help=False,
                                epilog="Every other option is the server's own (rmt-serve's settings), listed below.")
    p.add_argument("-h", "--help", action="store_true", help="show this help and the server's options")
    p.add_argument("--url", help="target a running server instead of starting one")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated sweep")
    p.add_argument("--instances", default=None, help="comma-separated sweep of the server's --instances (model "
                                                     "instances); each setting is its own server run")
    p.add_argument("--requests", type=int, default=2000, help="requests at the highest concurrency; lower levels "
                                                              "send proportionally fewer (at least 50)")
    p.add_argument("--level-time-limit-s", type=float, default=600.0, help="stop a level after this long")
    p.add_argument("--offline-seconds", type=float, default=20.0)
    # the token is RMT_API_KEY, as for the server this starts; the old flag stays as a hidden alias
    p.add_argument("--api-key", help=argparse.SUPPRESS)
    p.add_argument("--json", help="write the results here")
    return p


def parse_args(argv: list[str]):
    """(options, settings): the load test's own options, and the rest as the server's settings (`ServeSettings`, the class
    rmt-serve parses its flags into), so both take the same flags with the same checks."""
    from rmt_deploy.server.settings import parse_cli
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if args.help:
        parser.print_help()
        print("\nserver options:")
        parse_cli(["--help"])       # prints the server's options, exits 0
    return args, parse_cli(rest)


def sample_jpegs(count: int = 16) -> list[bytes]:
    """Photo-sized JPEGs with different content (decoded and resized by the server, as in production)."""
    rng = np.random.default_rng(0)
    images = []
    for _ in range(count):
        small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        buffer = io.BytesIO()
        small.resize((320, 240), Image.BICUBIC).save(buffer, "JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def offline_throughput(args, settings, images: list[bytes]) -> tuple[float, int, str]:
    """Images/s of the model the server would load (same settings, loading, batch limit, input size and
    padding), called directly on full batches of preprocessed images; also that batch size and the model's name."""
    from rmt_deploy.server.model_host import load_served_model
    served = load_served_model(settings)
    size = served.max_batch_size(settings.max_batch_size)
    batch = np.stack([preprocess(decode_image(images[i % len(images)]), served.image_size) for i in range(size)])
    try:
        served.infer(batch)
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < args.offline_seconds or runs < 3:
            served.infer(batch)
            runs += 1
        return runs * len(batch) / (time.perf_counter() - start), size, served.name
    finally:
        served.close()


def server_command(settings, port: int) -> list[str]:
    """rmt-serve with the settings given on this command line (as flags), on loopback, quiet."""
    cmd = [sys.executable, "-m", "rmt_deploy.server.cli"]
    overrides = {"host": "127.0.0.1", "port": port, "max_queue_size": 1024, "log_level": "warning"}
    for name in sorted(settings.model_fields_set - set(overrides) - {"api_key"}):   # the key travels in RMT_API_KEY
        value = getattr(settings, name)
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            cmd.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            cmd += [flag, json.dumps(value) if isinstance(value, list) else str(value)]
    for name, value in overrides.items():
        cmd += ["--" + name.replace("_", "-"), str(value)]
    return cmd


def wait_ready(url: str, process: subprocess.Popen | None, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with code {process.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server at {url} not ready within {timeout} s")


def batch_totals(url: str, headers: dict[str, str]) -> tuple[float, float]:
    """(images inferred, runner calls) so far, from the server's rmt_batch_size histogram."""
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=10).text
    samples = {s.name: s.value for family in text_string_to_metric_families(text) if family.name == "rmt_batch_size"
               for s in family.samples}
    return samples.get("rmt_batch_size_sum", 0.0), samples.get("rmt_batch_size_count", 0.0)


async def run_level(url: str, images: list[bytes], concurrency: int, total: int, time_limit: float,
                    headers: dict[str, str]) -> LevelResult:
    latencies, errors = [], 0
    issued = 0
    deadline = time.monotonic() + time_limit
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60, headers=headers) as client:
        async def worker() -> None:
            nonlocal issued, errors
            while issued < total and time.monotonic() < deadline:
                data = images[issued % len(images)]
                issued += 1
                start = time.perf_counter()
                try:
                    response = await client.post("/classify", content=data, headers={"content-type": "image/jpeg"})
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                latencies.append((time.perf_counter() - start) * 1e3)
                errors += not ok

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    p50, p90, p99 = np.percentile(latencies, [50, 90, 99])
    return LevelResult(concurrency, len(latencies), errors, seconds, len(latencies) / seconds, p50, p90, p99)


def main(argv: list[str]) -> int:
    args, settings = parse_args(argv)
    images = sample_jpegs()
    levels = [int(c) for c in args.concurrency.split(",")]
    counts = [int(n) for n in args.instances.split(",")] if args.instances else [settings.instances]
    summaries = []
    for count in counts:
        if args.instances:
            print(f"--- {count} model instance(s)")
            settings = settings.model_copy(update={"instances": count})
            settings.model_fields_set.add("instances")      # passed on to the server's command line
        summaries.append(measure(args, settings, images, levels))
    if len(summaries) > 1:
        print("\n".join(f"instances {s['instances']}: saturation {s['server_saturation_req_per_s']:.1f} req/s, "
                        f"p99 at concurrency {s['levels'][-1]['concurrency']} {s['levels'][-1]['p99_ms']:.0f} ms, "
                        f"errors {s['errors']}" for s in summaries))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summaries[0] if len(summaries) == 1 else {"settings": summaries}, f, indent=2)
    return 0 if all(s["errors"] == 0 for s in summaries) else 1


def measure(args, settings, images: list[bytes], levels: list[int]) -> dict:
    """One server setting: offline runner before, the load levels, offline runner after."""
    offline_before, batch_size, name = offline_throughput(args, settings, images)
    print(f"offline {settings.backend} runner, batch {batch_size}: {offline_before:.1f} images/s")

    process = None
    url = args.url
    if url is None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        process = subprocess.Popen(server_command(settings, port))
    api_key = args.api_key or (settings.api_key and settings.api_key.get_secret_value())
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        wait_ready(url, process)
        asyncio.run(run_level(url, images, max(levels), 4 * max(levels), 120, headers))   # warm-up, not counted
        server = psutil.Process(process.pid) if process else None
        rss_start = server.memory_info().rss if server else None
        results = []
        for concurrency in levels:
            total = max(50, args.requests * concurrency // max(levels))
            images_before, calls_before = batch_totals(url, headers)
            result = asyncio.run(run_level(url, images, concurrency, total, args.level_time_limit_s, headers))
            images_after, calls_after = batch_totals(url, headers)
            result.mean_batch = (images_after - images_before) / max(calls_after - calls_before, 1)
            results.append(result)
            print(f"concurrency {concurrency:>3}: {result.requests} requests, {result.errors} errors, "
                  f"{result.throughput:.1f} req/s, p50 {result.p50_ms:.0f} ms, p90 {result.p90_ms:.0f} ms, "
                  f"p99 {result.p99_ms:.0f} ms, mean batch {result.mean_batch:.2f} of {batch_size}")
        rss_growth_mb = (server.memory_info().rss - rss_start) / 2**20 if server else None
    finally:
        if process is not None:
            process.terminate()
            process.wait(60)
    offline_after = offline_throughput(args, settings, images)[0]
    offline = (offline_before + offline_after) / 2
    print(f"offline {settings.backend} runner after the server run: {offline_after:.1f} images/s")

    saturated = max(r.throughput for r in results)
    ratio = saturated / offline
    errors = sum(r.errors for r in results)
    summary = {"levels": [asdict(r) for r in results], "offline_images_per_s": offline,
               "offline_before_after": [offline_before, offline_after],
               "server_saturation_req_per_s": saturated, "server_over_offline": ratio,
               "errors": errors, "server_rss_growth_mb": rss_growth_mb,
               "max_batch_size": batch_size, "model": name, "backend": settings.backend,
               "instances": settings.instances, "threads": settings.threads}
    print(f"saturation: {saturated:.1f} req/s = {ratio:.0%} of offline; errors {errors}; "
          + (f"server RSS growth {rss_growth_mb:.1f} MB" if rss_growth_mb is not None else "RSS not measured (--url)"))
    return summary


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
