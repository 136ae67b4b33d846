#!/usr/bin/env bash
# Sourced by dev.sh and test.sh: create .venv if needed, activate it, install the project
# (with the extras given as $1, e.g. "[dev]") from the repo's own pinned files.
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
python -m pip install -q -e ".${1:-}"
