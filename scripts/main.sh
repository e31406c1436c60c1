#!/usr/bin/env bash
# The main job: export RMT-T to ONNX (fp32 + fp16), prove parity, benchmark eager vs ONNX Runtime
# (and OpenVINO, which the set-up installs) on rmt-bench's static-shape exports of the same weights.
# RMT_CHECKPOINT=path/to/rmt_t.pth uses released weights (default: random weights, loudly flagged).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_venv.sh"
model="${RMT_MODEL:-rmt_t}"
.venv/bin/rmt-export --model "$model" ${RMT_CHECKPOINT:+--checkpoint "$RMT_CHECKPOINT"} --precision fp32,fp16 \
  --dynamic-batch 1:8:64 --output "exports/$model"
mkdir -p bench_out
.venv/bin/rmt-bench --model "$model" ${RMT_CHECKPOINT:+--checkpoint "$RMT_CHECKPOINT"} \
  --backends eager,onnxruntime,openvino --batch-sizes 1,8 --paper-table \
  --json "bench_out/$model.json" --csv "bench_out/$model.csv" --plot "bench_out/$model.png"
echo "artifacts: exports/$model/ (manifest export.json); benchmark: bench_out/$model.{json,csv,png}"
