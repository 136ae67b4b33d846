#!/usr/bin/env bash
# Refresh requirements-lock.txt, the lock of every package .venv gets (the project's direct
# dependencies as pinned in pyproject.toml, with all its extras, every transitive dependency,
# and pip/setuptools/wheel), each with its version and the hashes of its files, for every
# platform and Python >= 3.11. scripts/venv.sh installs exactly this (pip --require-hashes).
# And requirements-deploy.txt, its subset that the Docker image installs (no dev tools).
# Run it after changing a dependency in pyproject.toml; tests/test_lock.py fails until you do.
# Usage: ./scripts/lock.sh [--upgrade]   (--upgrade: newest transitive versions too)
set -euo pipefail
cd "$(dirname "$0")/.."

UV_VERSION=0.13.9
tools="${TMPDIR:-/tmp}/polar-usage-outbox-lock-tools"
if [ ! -x "$tools/bin/uv" ] || [ "$("$tools/bin/uv" --version | cut -d' ' -f2)" != "$UV_VERSION" ]; then
  python3 -m venv "$tools"
  "$tools/bin/python" -m pip install -q "uv==$UV_VERSION"
fi
printf 'pip\nsetuptools\nwheel\n' | "$tools/bin/uv" pip compile pyproject.toml - \
  --extra dev --extra monitoring --generate-hashes --universal --python-version 3.11 \
  --custom-compile-command ./scripts/lock.sh --quiet -o requirements-lock.txt "$@"
printf 'pip\nsetuptools\nwheel\n' | "$tools/bin/uv" pip compile pyproject.toml - \
  --extra monitoring --generate-hashes --universal --python-version 3.11 \
  --constraint requirements-lock.txt --no-strip-markers \
  --custom-compile-command ./scripts/lock.sh --quiet -o requirements-deploy.txt
echo "requirements-lock.txt and requirements-deploy.txt refreshed; commit them" >&2
