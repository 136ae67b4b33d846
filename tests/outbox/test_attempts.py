"""An outbox row's history: written by the settle that moved it (one INSERT per settle), kept
across replays, readable per event; and the drain's heartbeat."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, event, func, select, update

import polar_emulator
from outbox import attempts
from outbox.db import session_scope
from outbox.delivery.deliverer import drain
from outbox.events import claim_batch, mark_delivered_if_claimed, rescue_expired_leases
from outbox.ledger import record_usage
from outbox.models import DeliveryAttempt, OutboxEvent, utcnow
from outbox.ops.replay import replay
from outbox.service_state import delivery_liveness
from tests.factories import make_customer
from tests.outbox.delivery.test_deliverer import make_deliverer, make_settings


@pytest.fixture
def emulator() -> Iterator[polar_emulator.RunningEmulator]:
    running = polar_emulator.serve_in_thread(config=polar_emulator.EmulatorConfig(seed=11))
    yield running
    running.stop()


def test_a_refused_event_keeps_its_history_through_a_replay_to_its_delivery(
    clean_tables: Engine, pg_url: str, emulator: polar_emulator.RunningEmulator
) -> None:
    with session_scope(clean_tables) as session:
        bad = make_customer(session, credits=10)
        event_id = record_usage(session, bad, 3).event_id
    emulator.configure(reject_customers=[bad])
    deliverer = make_deliverer(clean_tables, make_settings(pg_url, emulator), worker="w1")
    deliverer.deliver_batch()

    with session_scope(clean_tables) as session:
        replay(session, event_ids=[event_id], actor="alice", reason="customer fixed in Polar")
    emulator.configure(reject_customers=[])
    deliverer.deliver_batch()

    with session_scope(clean_tables) as session:
        steps = attempts.history_of(session, event_id)
        row = session.get(OutboxEvent, event_id)
        assert row is not None and row.status == "delivered" and row.last_error is None
    assert [s.decision for s in steps] == ["failed", "replayed", "delivered"]
    failed, replayed, delivered = steps
    # The failure stays readable after the replay: Polar's status and its whole message.
    assert failed.polar_status == 422 and bad in (failed.message or "")
    assert failed.worker == "w1" and (failed.claim_token or "").startswith("w1:")
    assert (replayed.replay_actor, replayed.replay_reason) == ("alice", "customer fixed in Polar")
    assert delivered.polar_status == 200 and delivered.attempt == 1
    assert delivered.claim_token != failed.claim_token  # another claim, another batch


def test_a_settle_that_lost_its_lease_writes_no_history(clean_tables: Engine) -> None:
    with session_scope(clean_tables) as session:
        customer = make_customer(session, credits=10)
        event_id = record_usage(session, customer, 1).event_id
    now = utcnow()
    with session_scope(clean_tables) as session:
        claim_batch(
            session, owner="slow:1", limit=10, now=now, lease_seconds=1, hold_back_until=now
        )
    later = now + timedelta(seconds=5)
    with session_scope(clean_tables) as session:
        assert rescue_expired_leases(session, now=later, max_attempts=10) == 1
    with session_scope(clean_tables) as session:
        moved = mark_delivered_if_claimed(session, ids=[event_id], owner="slow:1", now=later)
        steps = attempts.history_of(session, event_id)
    assert moved == 0
    assert [s.decision for s in steps] == ["rescued"]  # no "delivered" the row never had


def test_a_batch_writes_its_history_in_one_insert(
    clean_tables: Engine, pg_url: str, emulator: polar_emulator.RunningEmulator
) -> None:
    with session_scope(clean_tables) as session:
        customer = make_customer(session, credits=1000)
        for _ in range(200):
            record_usage(session, customer, 1)
    deliverer = make_deliverer(clean_tables, make_settings(pg_url, emulator))
    inserts: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO DELIVERY_ATTEMPTS"):
            inserts.append(statement)

    event.listen(clean_tables, "before_cursor_execute", count)
    try:
        report = deliverer.deliver_batch()
    finally:
        event.remove(clean_tables, "before_cursor_execute", count)
    assert report.delivered == 200
    assert len(inserts) == 1
    with session_scope(clean_tables) as session:
        assert session.scalar(select(func.count()).select_from(DeliveryAttempt)) == 200


def test_pruning_a_delivered_row_takes_its_history(
    clean_tables: Engine, pg_url: str, emulator: polar_emulator.RunningEmulator
) -> None:
    from outbox.events import prune_delivered

    with session_scope(clean_tables) as session:
        customer = make_customer(session, credits=10)
        record_usage(session, customer, 1)
    make_deliverer(clean_tables, make_settings(pg_url, emulator)).deliver_batch()
    with session_scope(clean_tables) as session:
        session.execute(update(OutboxEvent).values(delivered_at=utcnow() - timedelta(days=40)))
    assert prune_delivered(clean_tables, older_than=timedelta(days=30)).deleted == 1
    with session_scope(clean_tables) as session:
        assert session.scalar(select(func.count()).select_from(DeliveryAttempt)) == 0


def test_a_drain_records_the_last_drain_and_its_worker(
    clean_tables: Engine, pg_url: str, emulator: polar_emulator.RunningEmulator
) -> None:
    with session_scope(clean_tables) as session:
        customer = make_customer(session, credits=10)
        record_usage(session, customer, 1)
    drain(make_deliverer(clean_tables, make_settings(pg_url, emulator), worker="host-a:42"))
    with session_scope(clean_tables) as session:
        alive = delivery_liveness(session, seen_within=timedelta(minutes=5))
    assert alive.last_drain_worker == "host-a:42" and alive.last_drain_at is not None
    assert [w for w, _ in alive.workers] == ["host-a:42"]
