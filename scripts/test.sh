#!/usr/bin/env bash
# Set up .venv (idempotent) and run the whole test suite: unit tests and end-to-end tests on real LFW faces.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh --with-dlib
export CRFR_LFW_ROOT="${CRFR_LFW_ROOT:-$(cd .. && pwd)/shared/data/lfw}"
export MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1 DO_NOT_TRACK=1 PYTHONUNBUFFERED=1
exec .venv/bin/python -m pytest -q --timeout=900 --durations=15 "$@" tests
