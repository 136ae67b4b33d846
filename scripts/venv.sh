#!/usr/bin/env bash
# Sourced by dev.sh and test.sh: create .venv if needed, activate it, install the project
# (with the extras given as $1, e.g. "[dev]") from the repo's own pinned files. pip's output is
# shown only if it fails. The install is skipped when pyproject.toml is the same as at the last
# successful install with these extras (a stamp in .venv), so a second start is quick.
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
# One stamp per extras; the plain install is also satisfied by a "[dev]" one (a superset).
pyproject_hash="$(python -c 'import hashlib; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest())')"
stamp_file=".venv/.installed${1:-}"
if [ "$(cat "$stamp_file" 2>/dev/null)" != "$pyproject_hash" ] \
  && { [ -n "${1:-}" ] || [ "$(cat ".venv/.installed[dev]" 2>/dev/null)" != "$pyproject_hash" ]; }; then
  echo "setting up .venv (pinned dependencies)..." >&2
  if ! pip_log=$(python -m pip install -q --upgrade pip 2>&1 && python -m pip install -q -e ".${1:-}" 2>&1); then
    echo "$pip_log" >&2
    echo "error: installing the project into .venv failed (see above)" >&2
    exit 1
  fi
  echo "$pyproject_hash" > "$stamp_file"
fi
