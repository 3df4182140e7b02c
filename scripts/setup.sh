#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv from the pinned constraints.
# Idempotent: a stamp of constraints.txt + pyproject.toml skips the install when nothing changed.
# CPU-only machines get the CPU torch build through pip's configured find-links; GPU machines get CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.mchar-stamp
want=$(cat constraints.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints.txt -e '.[dev,ruler]'
echo "$want" > "$stamp"
