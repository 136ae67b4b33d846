#!/usr/bin/env bash
# Sourced by dev.sh and test.sh: create .venv if needed, activate it, and install exactly
# requirements-lock.txt (every dependency, transitive ones too, by version and hash: what
# passed CI; ./scripts/lock.sh refreshes it), then the project itself (editable). pip's output
# is shown only if it fails. The install is skipped when pyproject.toml and the lock are the
# same as at the last successful install (a stamp in .venv), so a second start is quick.
# dev.sh and test.sh started at once wait for each other's install (a lock, .venv.lock).
PYTHON="${PYTHON:-python3}"
_venv_stamp() {
  "$PYTHON" -c 'import hashlib; print(hashlib.sha256(open("pyproject.toml", "rb").read() + open("requirements-lock.txt", "rb").read()).hexdigest())'
}
_venv_install() {
  if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv || return 1
  fi
  [ "$(cat .venv/.installed 2>/dev/null)" = "$(_venv_stamp)" ] && return 0
  echo "setting up .venv (locked dependencies, requirements-lock.txt)..." >&2
  local pip_only pip_log
  # The venv's own pip may be too old for a hashed lock: first the locked pip, by its hashes.
  pip_only="$(mktemp)"
  awk '/^pip==/ {p = 1; print; next} p && /^ +--hash/ {print; next} {p = 0}' \
    requirements-lock.txt > "$pip_only"
  if ! pip_log=$(.venv/bin/python -m pip install -q --require-hashes -r "$pip_only" 2>&1 \
    && .venv/bin/python -m pip install -q --require-hashes -r requirements-lock.txt 2>&1 \
    && .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 \
    && .venv/bin/python -m pip check 2>&1); then
    rm -f "$pip_only"
    echo "$pip_log" >&2
    echo "error: installing the project into .venv failed (see above; after changing" \
      "pyproject.toml, run ./scripts/lock.sh)" >&2
    return 1
  fi
  rm -f "$pip_only"
  _venv_stamp > .venv/.installed
}
# One install at a time per checkout: a second script waits here, then finds it done.
if command -v flock >/dev/null; then
  exec 9>.venv.lock
  flock 9
  _venv_install || { flock -u 9; exit 1; }
  flock -u 9
  exec 9>&-
else  # macOS has no flock: a directory is created atomically
  until mkdir .venv.lock.d 2>/dev/null; do sleep 1; done
  _venv_install || { rmdir .venv.lock.d; exit 1; }
  rmdir .venv.lock.d
fi
. .venv/bin/activate
