#!/usr/bin/env bash
# The test suite: refreshes .venv, then runs pytest (extra arguments go to pytest).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_venv.sh"
exec .venv/bin/python -m pytest -q tests "$@"
