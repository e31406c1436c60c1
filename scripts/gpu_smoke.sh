#!/usr/bin/env bash
# GPU smoke check for rmt-deploy's TensorRT path. Safe on machines without network or packages:
# every step is labelled and allowed to fail; the TensorRT tests run only when `import tensorrt` works.
# Usage: bash scripts/gpu_smoke.sh   (from the repository root; PYTHON=... to pick an interpreter)
set -u
export PYTHONSAFEPATH=1   # the installed package, not the source folders in the current directory (Python 3.11+)
cd "$(dirname "$0")/.." || exit 0
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

section() { printf '\n===== %s =====\n' "$1"; }

section "python"
echo "interpreter: $PY"; "$PY" --version 2>&1 || true

section "nvidia-smi"
nvidia-smi 2>&1 || echo "nvidia-smi: not available"

section "import tensorrt"
TRT_OK=0
if "$PY" -c "import tensorrt as t; print('tensorrt', t.__version__, '| BuilderFlag.FP16:', hasattr(t.BuilderFlag, 'FP16'))" 2>&1; then
  TRT_OK=1
else
  echo "tensorrt: import failed"
fi

section "libnvinfer (ldconfig)"
ldconfig -p 2>/dev/null | grep -i nvinfer || echo "libnvinfer: not in the linker cache"

section "trtexec"
which trtexec 2>&1 || echo "trtexec: not on PATH"

section "torch / CUDA"
"$PY" -c "import torch; print(torch.__version__, torch.cuda.is_available(), torch.version.cuda); print(torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0)) if torch.cuda.is_available() else None" 2>&1 || true

section "onnxruntime providers"
"$PY" -c "import onnxruntime as o; print(o.__version__, o.get_available_providers())" 2>&1 || true

section "rmt_deploy tensorrt_available()"
"$PY" -c "from rmt_deploy.exporters.tensorrt_build import tensorrt_available as f; print(f())" 2>&1 || true

section "pytest tests/test_tensorrt.py"
if [ "$TRT_OK" = 1 ]; then
  "$PY" -m pytest tests/test_tensorrt.py -q -rs 2>&1 || true
else
  echo "skipped: tensorrt does not import here"
fi
exit 0
