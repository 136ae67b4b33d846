#!/usr/bin/env bash
# Sourced by dev.sh and test.sh: create .venv if needed, activate it, install the project
# (with the extras given as $1, e.g. "[dev]") from the repo's own pinned files. pip's output is
# shown only if it fails.
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
echo "setting up .venv (pinned dependencies)..." >&2
if ! pip_log=$(python -m pip install -q --upgrade pip 2>&1 && python -m pip install -q -e ".${1:-}" 2>&1); then
  echo "$pip_log" >&2
  echo "error: installing the project into .venv failed (see above)" >&2
  exit 1
fi
