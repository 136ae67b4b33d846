"""A real Celery worker process drains the outbox to the emulator."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import Engine

import polar_emulator
from outbox.db import session_scope
from outbox.ledger import record_usage
from tests.acceptance.conftest import Worker, all_delivered, status_counts, wait_until
from tests.factories import make_customer


def test_a_celery_worker_delivers_committed_usage(
    clean_tables: Engine,
    emulator: polar_emulator.RunningEmulator,
    start_worker: Callable[..., Worker],
) -> None:
    with session_scope(clean_tables) as session:
        customer = make_customer(session, credits=100)
        for _ in range(30):
            record_usage(session, customer, 2, {"plan": "x"})
    worker = start_worker()
    wait_until(all_delivered(clean_tables, 30), 60, "delivery", worker.output)
    assert emulator.state.totals() == {customer: 60}
    assert status_counts(clean_tables) == {"delivered": 30}


@pytest.mark.parametrize("command", ["outbox worker", "celery -A worker worker"])
def test_log_format_json_is_every_line_of_the_worker_celerys_own_too(
    command: str,
    clean_tables: Engine,
    emulator: polar_emulator.RunningEmulator,
    start_worker: Callable[..., Worker],
) -> None:
    """LOG_FORMAT=json: one JSON object per line from `outbox worker` and from compose's
    `celery -A worker worker` (no banner; Celery's connected, ready and task lines included,
    with their fields), for a log pipeline."""
    with session_scope(clean_tables) as session:
        customer = make_customer(session, credits=100)
        for _ in range(5):
            record_usage(session, customer, 1)
    if command == "outbox worker":
        argv = [str(Path(sys.executable).with_name("outbox")), "worker", "--concurrency=1"]
    else:
        argv = [sys.executable, "-m", "celery", "-A", "worker", "worker", "--concurrency=1"]
        argv += ["--loglevel=INFO", "--without-gossip", "--without-mingle"]  # as compose
        argv += ["-B"]  # compose runs beat beside it: something must send the drain tasks
    worker = start_worker(argv=argv, LOG_FORMAT="json")
    wait_until(all_delivered(clean_tables, 5), 60, "delivery", worker.output)
    wait_until(lambda: "succeeded in" in worker.output(), 30, "a task's line", worker.output)
    records = []
    for line in worker.output().splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError:
                raise AssertionError(f"not JSON: {line!r}\n{worker.output()[-3000:]}") from None
    loggers = {r["logger"] for r in records}
    assert {"celery.worker.consumer.connection", "celery.apps.worker"} <= loggers, loggers
    succeeded = [r for r in records if r["logger"] == "celery.app.trace"]
    assert any(r["data"]["name"] == "outbox.drain" for r in succeeded), succeeded
    drained = [r for r in records if r["msg"] == "drain finished"]
    assert sum(r["delivered"] for r in drained) == 5, drained
