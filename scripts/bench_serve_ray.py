"""rmt-serve against rmt-serve --ray --replicas 1 on one machine: `rmt-bench serve` on both, in
interleaved rounds (the order alternates between rounds), then a table of the per-round figures,
their medians and the per-round ratio. Extra arguments go to both `rmt-bench serve` runs.

    .venv/bin/python scripts/bench_serve_ray.py --rounds 6 --out bench-ray/ -- \\
        --model rmt_t --threads 2 --concurrency 8 --requests 64 --offline-seconds 3 --max-batch-size 8
    .venv/bin/python scripts/bench_serve_ray.py --out bench-ray/ --summarize      # the table again
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

RAY_FLAGS = ["--ray", "--replicas", "1"]


def run_round(number: int, out: Path, bench_args: list[str]) -> None:
    kinds = ["plain", "ray"] if number % 2 else ["ray", "plain"]
    for kind in kinds:
        flags = bench_args + (RAY_FLAGS if kind == "ray" else [])
        with open(out / f"{kind}-{number}.log", "w") as log:
            subprocess.run([sys.executable, "-m", "rmt_deploy.benchmarks.cli", "serve", *flags,
                            "--json", str(out / f"{kind}-{number}.json")], stdout=log, stderr=subprocess.STDOUT)


def summarize(out: Path) -> str:
    rounds = sorted(int(p.stem.split("-")[1]) for p in out.glob("plain-*.json") if (out / f"ray-{p.stem[6:]}.json").exists())
    rows, ratios = [], []
    figures = {kind: [json.loads((out / f"{kind}-{n}.json").read_text())["levels"][-1] for n in rounds]
               for kind in ("plain", "ray")}
    for kind in ("plain", "ray"):
        throughputs = [level["throughput"] for level in figures[kind]]
        p50s = [level["p50_ms"] for level in figures[kind]]
        rows.append(f"| {kind} | {', '.join(f'{t:.1f}' for t in throughputs)} | **{statistics.median(throughputs):.1f}** "
                    f"| {', '.join(f'{p:.0f}' for p in p50s)} | **{statistics.median(p50s):.0f}** |")
    ratios = [r["throughput"] / p["throughput"] for p, r in zip(figures["plain"], figures["ray"])]
    return "\n".join([f"rounds: {rounds}",
                      "| server | req/s per round | median | p50 ms per round | median |", "| --- | --- | --- | --- | --- |",
                      *rows, "", f"--ray / plain req/s per round: {', '.join(f'{x:.2f}' for x in ratios)} "
                      f"(median {statistics.median(ratios):.2f})"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True, help="folder for each run's JSON and log")
    parser.add_argument("--summarize", action="store_true", help="only print the table of the runs in --out")
    args, bench_args = parser.parse_known_args()
    bench_args = [a for a in bench_args if a != "--"]
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.summarize:
        for number in range(1, args.rounds + 1):
            run_round(number, args.out, bench_args)
    print(summarize(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
