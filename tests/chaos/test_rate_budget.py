"""Two worker processes against a Polar limited to N requests per window: they share ONE
budget through Redis, so Polar never has to refuse them (no 429 storm)."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Engine

import polar_emulator
from outbox.db import session_scope
from outbox.ledger import record_usage
from tests.acceptance.conftest import Worker, all_delivered, status_counts, wait_until
from tests.factories import make_customer

LIMIT = 20  # requests per window at "Polar"
WINDOW = 3  # seconds (60 in production; shortened so the test takes seconds)
BATCH = 5
EVENTS = 600  # 120 requests: about 7 windows at the budget


def test_two_workers_stay_within_the_shared_budget(
    clean_tables: Engine,
    emulator: polar_emulator.RunningEmulator,
    start_worker: Callable[..., Worker],
) -> None:
    with session_scope(clean_tables) as session:
        customer = make_customer(session, credits=EVENTS)
        for _ in range(EVENTS):
            record_usage(session, customer, 1)
    emulator.configure(rate_limit_per_minute=LIMIT, window_seconds=WINDOW)
    env = {
        "POLAR_REQUESTS_PER_MINUTE": str(LIMIT),
        "POLAR_RATE_WINDOW_SECONDS": str(WINDOW),
        "OUTBOX_BATCH_SIZE": str(BATCH),
    }
    workers = [start_worker(concurrency=2, **env), start_worker(concurrency=2, **env)]
    wait_until(
        all_delivered(clean_tables, EVENTS),
        240,
        "delivery",
        lambda: workers[0].output()[-3000:],
    )
    stats = emulator.state.stats
    assert status_counts(clean_tables) == {"delivered": EVENTS}
    assert stats.max_requests_in_a_window <= LIMIT
    assert stats.status_429_window == 0
    assert emulator.state.totals() == {customer: EVENTS}
