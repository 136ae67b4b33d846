"""kill -9 of a worker mid-batch: its rows are rescued after their lease and delivered once in
effect by a new worker, refunds made meanwhile included."""

from __future__ import annotations

import random
from collections.abc import Callable

from sqlalchemy import Engine, select

import polar_emulator
from outbox.db import session_scope
from outbox.ledger import record_usage
from outbox.models import OutboxEvent
from outbox.refunds import refund_usage
from tests.acceptance.conftest import Worker, all_delivered, status_counts, wait_until
from tests.factories import ledger_net_usage, make_customer


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


def test_refunds_during_a_batch_of_a_killed_worker_leave_polar_at_the_ledgers_net(
    clean_tables: Engine,
    emulator: polar_emulator.RunningEmulator,
    start_worker: Callable[..., Worker],
) -> None:
    """Refunds (whole and partial) land while a worker's batch is in flight; the worker is
    killed mid-batch; a new one rescues and delivers: Polar's sum per customer is the ledger's
    usage minus refunds, each usage cancelled or compensated, never both."""
    rng = random.Random(9)
    with session_scope(clean_tables) as session:
        customers = [make_customer(session, credits=10_000) for _ in range(3)]
        usages = [record_usage(session, customers[n % 3], rng.randint(1, 5)) for n in range(300)]
    emulator.configure(latency_ms=3000)
    first = start_worker(concurrency=2, OUTBOX_BATCH_SIZE="50", OUTBOX_LEASE_SECONDS="5")
    wait_until(
        lambda: status_counts(clean_tables).get("inflight", 0) > 0,
        60,
        "a batch in flight",
        first.output,
    )
    actions: dict[str, int] = {}
    for n, usage in enumerate(usages):
        if n % 3 == 2:
            continue  # billed in full
        with session_scope(clean_tables) as session:
            credits = None if n % 3 == 0 else 1
            action = refund_usage(session, usage.event_id, credits, reason="chaos").action
        actions[action] = actions.get(action, 0) + 1
    first.kill9()
    emulator.configure(latency_ms=0)
    second = start_worker(concurrency=2, OUTBOX_BATCH_SIZE="50", OUTBOX_LEASE_SECONDS="5")

    def settled() -> bool:
        counts = status_counts(clean_tables)
        return counts.get("pending", 0) + counts.get("inflight", 0) == 0

    wait_until(settled, 120, "delivery", second.output)
    assert set(status_counts(clean_tables)) <= {"delivered", "cancelled"}
    assert actions.get("cancelled", 0) > 0 and actions.get("compensated", 0) > 0, actions
    net = {c: v for c, v in ledger_net_usage(clean_tables).items() if v}
    assert {c: int(v) for c, v in emulator.state.totals().items() if v} == net
    with session_scope(clean_tables) as session:
        cancelled = set(
            session.scalars(
                select(OutboxEvent.external_id).where(OutboxEvent.status == "cancelled")
            )
        )
    assert cancelled and not cancelled & set(emulator.state.by_external_id)
