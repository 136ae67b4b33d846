"""A real Celery worker process drains the outbox to the emulator."""

from __future__ import annotations

from collections.abc import Callable

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
