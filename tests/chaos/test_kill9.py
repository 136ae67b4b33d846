"""kill -9 of a worker mid-batch: its rows are rescued after their lease and delivered once in
effect by a new worker."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Engine

import polar_emulator
from outbox.db import session_scope
from outbox.ledger import record_usage
from tests.acceptance.conftest import Worker, all_delivered, status_counts, wait_until
from tests.factories import make_customer


def test_rows_of_a_killed_worker_are_rescued_and_delivered_once(
    clean_tables: Engine,
    emulator: polar_emulator.RunningEmulator,
    start_worker: Callable[..., Worker],
) -> None:
    with session_scope(clean_tables) as session:
        customer = make_customer(session, credits=10_000)
        for _ in range(1000):
            record_usage(session, customer, 3)
    # Slow Polar: each batch is in flight for 3 s, so the kill lands mid-batch.
    emulator.configure(latency_ms=3000)
    first = start_worker(concurrency=2, OUTBOX_BATCH_SIZE="200", OUTBOX_LEASE_SECONDS="5")
    wait_until(
        lambda: status_counts(clean_tables).get("inflight", 0) > 0,
        60,
        "a batch in flight",
        first.output,
    )
    first.kill9()
    stranded = status_counts(clean_tables).get("inflight", 0)
    assert stranded > 0  # the dead worker's rows are leased to nobody alive

    emulator.configure(latency_ms=0)
    second = start_worker(concurrency=2, OUTBOX_BATCH_SIZE="200", OUTBOX_LEASE_SECONDS="5")
    wait_until(all_delivered(clean_tables, 1000), 120, "delivery", second.output)
    assert emulator.state.totals() == {customer: 3000}
    assert "rescued" in second.output() or "lease expired" in second.output()
