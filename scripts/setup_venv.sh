#!/usr/bin/env bash
# Create or refresh .venv in the checkout. Sourced by main.sh and test.sh.
# TORCH_SPEC overrides the CPU default (GPU users: TORCH_SPEC="torch==2.13.0" from a CUDA index,
# or an already-installed CUDA build is kept when it satisfies pyproject's range).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
stamp=".venv/.rmt-deploy-installed"
want="$(cat pyproject.toml scripts/setup_venv.sh | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "== installing rmt-deploy into .venv"
  # -q -q: pip prints errors only (and a failing build's full output), so the set-up does not bury
  # the real output of main.sh; RMT_PIP_VERBOSE=1 shows pip's progress and warnings again.
  quiet=(-q -q)
  if [ -n "${RMT_PIP_VERBOSE:-}" ]; then quiet=(); fi
  pip=(.venv/bin/python -m pip install "${quiet[@]}")
  "${pip[@]}" --upgrade pip
  # Pinned CPU torch first: a plain 'torch' requirement would pull gigabytes of CUDA wheels.
  "${pip[@]}" "${TORCH_SPEC:-torch==2.13.0}"
  "${pip[@]}" -e ".[test]"
  echo "$want" > "$stamp"
fi
