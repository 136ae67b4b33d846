#!/usr/bin/env bash
# Set up (venv + dependencies) and run the whole test suite: lint, types, migrations, pytest.
# Usage: ./scripts/test.sh [--fast] [pytest args...]
#   --fast: the same checks, and every test but the `slow` ones (pytest -m "not slow": the
#   whole-system runs of tests/acceptance and tests/chaos, and the tests marked slow).
# pytest runs on nproc + 1 worker processes (pytest-xdist, one test file per worker at a time),
# each with a PostgreSQL cluster and a redis-server of its own (tests/conftest.py). Most of the
# slow tier waits on processes it started, so one worker more than there are cores keeps them
# busy. TEST_WORKERS=N chooses N; TEST_WORKERS=0 runs every test in this process.
set -euo pipefail
cd "$(dirname "$0")/.."

marker=()
if [ "${1:-}" = "--fast" ]; then
  shift
  marker=(-m "not slow")
fi

. scripts/venv.sh

bash scripts/services.sh

# docker-compose.yml is validated by tests/test_compose.py with `docker compose config` (or the
# standalone docker-compose). Without either, CI installs Debian's docker-compose.
if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null; then
  if [ "${CI:-}" = "true" ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "== installing docker-compose (Debian) to validate docker-compose.yml" >&2
    apt-get install -y -q docker-compose >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q docker-compose >/dev/null; }
  fi
fi

# The console's browser tests (tests/api/console/test_browser.py) drive Debian's Chromium with
# Playwright (its own browser download is not reachable from CI). CI installs it; without it
# they fail there (and are skipped on a laptop).
if [ ! -x /usr/bin/chromium ]; then
  if [ "${CI:-}" = "true" ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "== installing chromium (Debian) for the console's browser tests" >&2
    apt-get install -y -q chromium >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null; }
  fi
fi

echo "== ruff" >&2
ruff check .
ruff format --check .
echo "== mypy --strict" >&2
mypy
echo "== alembic check (models and migrations agree)" >&2
CHECK_DB="outbox_alembic_check_$$"
psql -q -h 127.0.0.1 -U postgres -d postgres -c "CREATE DATABASE $CHECK_DB" >/dev/null
trap 'psql -q -h 127.0.0.1 -U postgres -d postgres -c "DROP DATABASE IF EXISTS $CHECK_DB WITH (FORCE)" >/dev/null' EXIT
DATABASE_URL="postgresql+psycopg://postgres@127.0.0.1:5432/$CHECK_DB" alembic upgrade head
DATABASE_URL="postgresql+psycopg://postgres@127.0.0.1:5432/$CHECK_DB" alembic check
echo "== pytest" >&2
export CI="${CI:-false}"
workers="${TEST_WORKERS:-$(($(nproc) + 1))}"
python -m pytest -n "$workers" --dist loadfile ${marker[@]+"${marker[@]}"} "$@"
