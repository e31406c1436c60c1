"""The low-precision gate on the trained Shapes10 fixture, printed (until rmt-export takes --precision
int8 --calib DIR --accuracy-data DIR): ONNX Runtime QDQ int8, OpenVINO NNCF int8, OpenVINO bf16 and
eager bf16 against float32 eager, on shapes10_val and on a degraded copy.

    .venv/bin/python scripts/lowp_gate.py --out /tmp/lowp-gate
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import shapes10  # noqa: E402  (the fixture's paths and its degraded copy)
from rmt_deploy import quantize as q  # noqa: E402
from rmt_deploy.accuracy import low_precision_gate  # noqa: E402
from rmt_deploy.runners.eager import EagerRunner  # noqa: E402
from rmt_deploy.runners.onnxruntime import OnnxRuntimeRunner  # noqa: E402
from rmt_deploy.runners.openvino import OpenVINORunner  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    fp32 = shapes10.export_fixture(args.out)
    calib = q.calibration_images(shapes10.CALIB, shapes10.SIZE)
    candidates = {
        "int8": [OnnxRuntimeRunner(q.quantize_onnxruntime(fp32, args.out / "int8.onnx", calib)),
                 OpenVINORunner(q.quantize_openvino(fp32, args.out / "int8.xml", calib))],
        "bf16": [OpenVINORunner(fp32, precision="bf16"), EagerRunner(shapes10.fixture_model(), precision="bf16")],
    }
    for precision, runners in candidates.items():
        for runner in runners:
            runner.load()
            for name in ("val", "degraded"):
                report = low_precision_gate(shapes10.reference(), runner, precision, shapes10.parity_images(),
                                            shapes10.BATCH, labelled=shapes10.labelled()[name])
                print(f"== {runner.name} on {name}\n{report.text()}", flush=True)


if __name__ == "__main__":
    main()
