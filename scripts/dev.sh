#!/usr/bin/env bash
# Set up (venv + dependencies) and run `outbox dev`: SQLite, the API on 127.0.0.1:8000, an
# in-process drainer and the local Polar emulator on 127.0.0.1:8765; it prints the `export` lines
# for a second terminal. Ctrl-C stops it cleanly. A deployment's DATABASE_URL or Polar token (in
# the shell or .env) is never used: --database-url URL, --polar sandbox to choose.
# Usage: ./scripts/dev.sh [outbox dev options...]
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/venv.sh
exec outbox dev "$@"
