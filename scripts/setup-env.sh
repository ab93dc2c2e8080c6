#!/usr/bin/env bash
# Create or update .venv/ with every pinned dependency and crfr itself (editable). Idempotent: a second
# run with an unchanged requirements.lock only re-checks the install (seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.crfr-lock.sha256
want=$(cat requirements.lock requirements-nodeps.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade "pip==25.3"
  # torch==2.13.0 resolves to the local CPU wheel where one is cached; elsewhere use the CPU index:
  #   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
  .venv/bin/python -m pip install -q -r requirements.lock
  .venv/bin/python -m pip install -q --no-deps -r requirements-nodeps.txt
  .venv/bin/python -m pip install -q --no-deps -e .
  echo "$want" > "$stamp"
fi
# --with-dlib: the optional dlib teacher too (the tests use it; the main job does not).
if [ "${1:-}" = "--with-dlib" ] && ! .venv/bin/python -c "import dlib, face_recognition_models" 2>/dev/null; then
  .venv/bin/python -m pip install -q --no-deps -r requirements-dlib.txt
fi
echo "environment ready: .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
