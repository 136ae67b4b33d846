"""Thousands of events through a hostile Polar, with a real Celery worker: all delivered, and
per customer the deduplicated sum at Polar equals the ledger.

CHAOS_EVENTS sets the size (default 5000; the README's test command runs the default).
"""

from __future__ import annotations

import os
import random
from collections import defaultdict
from collections.abc import Callable

from sqlalchemy import Engine

import polar_emulator
from outbox.db import session_scope
from outbox.ledger import record_usage
from tests.acceptance.conftest import Worker, all_delivered, status_counts, wait_until
from tests.factories import ledger_usage, make_customer

EVENTS = int(os.environ.get("CHAOS_EVENTS", "5000"))


def test_thousands_of_events_through_5xx_429_drops_and_latency(
    clean_tables: Engine,
    emulator: polar_emulator.RunningEmulator,
    start_worker: Callable[..., Worker],
) -> None:
    rng = random.Random(5)
    spent: dict[str, int] = defaultdict(int)
    with session_scope(clean_tables) as session:
        customers = [make_customer(session, credits=EVENTS * 5) for _ in range(20)]
        for n in range(EVENTS):
            customer = customers[n % len(customers)]
            credits = rng.randint(1, 5)
            record_usage(session, customer, credits, {"n": n})
            spent[customer] += credits
    emulator.configure(
        error_5xx_rate=0.3,
        rate_429_rate=0.1,
        accept_then_drop_rate=0.1,
        latency_ms=5,
        latency_jitter_ms=20,
    )
    worker = start_worker(concurrency=2, OUTBOX_BATCH_SIZE="250")
    wait_until(all_delivered(clean_tables, EVENTS), 300, "delivery", worker.output)

    assert status_counts(clean_tables) == {"delivered": EVENTS}
    stats = emulator.state.stats
    assert stats.injected_5xx and stats.status_429 and stats.dropped_after_store
    assert stats.duplicates > 0  # resends of dropped batches were deduplicated by Polar
    assert emulator.state.totals() == dict(spent) == ledger_usage(clean_tables)
