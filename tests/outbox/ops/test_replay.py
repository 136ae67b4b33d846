"""Operator actions: stats, replay (failed → pending, same external_id, recorded), prune."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import Engine, func, select, text, update
from sqlalchemy.orm import Session

from outbox.db import session_scope
from outbox.errors import EventNotFound, InvalidRequest, NotReplayable
from outbox.events import list_failed, outbox_stats, prune_delivered
from outbox.ledger import record_usage
from outbox.models import LedgerEntry, OutboxEvent, Replay, utcnow
from outbox.ops.replay import replay
from outbox.validation import parse_duration
from tests.factories import make_customer


def fail_events(session: Session, ids: list[int], error: str = "Polar: refused") -> None:
    session.execute(
        update(OutboxEvent)
        .where(OutboxEvent.id.in_(ids))
        .values(status="failed", last_error=error, attempts=3)
    )


def deliver_events(session: Session, ids: list[int], when: object) -> None:
    session.execute(
        update(OutboxEvent)
        .where(OutboxEvent.id.in_(ids))
        .values(status="delivered", delivered_at=when)
    )


def test_stats_count_statuses_lag_and_money_at_risk(db: Session) -> None:
    customer = make_customer(db, credits=100)
    events = [record_usage(db, customer, credits).event_id for credits in (1, 2, 3, 4)]
    fail_events(db, [events[0]])
    deliver_events(db, [events[1]], utcnow())
    stats = outbox_stats(db, now=utcnow() + timedelta(seconds=30))
    assert stats.counts == {
        "pending": 2,
        "inflight": 0,
        "delivered": 1,
        "failed": 1,
        "cancelled": 0,
    }
    assert stats.credits_undelivered == 1 + 3 + 4
    assert stats.delivered_last_minute == 1
    assert 29 <= stats.oldest_pending_seconds <= 60


def test_replay_all_failed_keeps_external_ids_and_records_who_and_why(db: Session) -> None:
    customer = make_customer(db, credits=10)
    other = make_customer(db, credits=10)
    mine = [record_usage(db, customer, 1).event_id for _ in range(3)]
    theirs = record_usage(db, other, 1).event_id
    fail_events(db, [*mine, theirs])
    before = {e.id: e.external_id for e in db.scalars(select(OutboxEvent))}

    dry = replay(db, all_failed=True, customer_id=customer, dry_run=True)
    assert dry.replayed == 3 and dry.replay_id is None
    assert len(list_failed(db)) == 4  # a dry run moves nothing

    result = replay(db, all_failed=True, customer_id=customer, actor="cli:ops", reason="fixed")
    assert sorted(result.event_ids) == sorted(mine)
    rows = {e.id: e for e in db.scalars(select(OutboxEvent))}
    for event_id in mine:
        assert rows[event_id].status == "pending"
        assert rows[event_id].attempts == 0
        assert rows[event_id].external_id == before[event_id]
        assert rows[event_id].last_replay_id == result.replay_id
    assert rows[theirs].status == "failed"
    record = db.get(Replay, result.replay_id)
    assert record is not None and record.actor == "cli:ops" and record.reason == "fixed"
    assert sorted(record.event_ids) == sorted(mine)


def test_replay_by_id_refuses_rows_that_are_not_failed_and_moves_nothing(db: Session) -> None:
    customer = make_customer(db, credits=10)
    failed_id = record_usage(db, customer, 1).event_id
    pending_id = record_usage(db, customer, 1).event_id
    fail_events(db, [failed_id])
    with pytest.raises(NotReplayable) as refused:
        replay(db, event_ids=[failed_id, pending_id])
    assert f"{pending_id} is pending" in refused.value.detail
    assert db.get(OutboxEvent, failed_id).status == "failed"  # type: ignore[union-attr]
    with pytest.raises(EventNotFound):
        replay(db, event_ids=[failed_id, 99_999_999])
    with pytest.raises(InvalidRequest):
        replay(db)


def test_prune_deletes_only_old_delivered_rows_and_keeps_the_ledger(
    clean_tables: Engine,
) -> None:
    now = utcnow()
    with session_scope(clean_tables) as session:
        customer = make_customer(session, credits=50)
        ids = [record_usage(session, customer, 1).event_id for _ in range(7)]
        deliver_events(session, ids[:4], now - timedelta(days=40))
        deliver_events(session, ids[4:5], now - timedelta(days=1))
        fail_events(session, ids[5:6])
        session.execute(  # an old failed row is never pruned either
            update(OutboxEvent)
            .where(OutboxEvent.id == ids[5])
            .values(created_at=now - timedelta(days=90))
        )
    result = prune_delivered(clean_tables, older_than=timedelta(days=30), batch_size=3)
    assert result.deleted == 4 and result.batches == 2
    with session_scope(clean_tables) as session:
        left = {e.id: e.status for e in session.scalars(select(OutboxEvent))}
        assert left == {ids[4]: "delivered", ids[5]: "failed", ids[6]: "pending"}
        usage_entries = session.scalar(select(func.count()).where(LedgerEntry.kind == "usage"))
        assert usage_entries == 7


def test_an_event_id_is_never_given_again_after_its_row_is_pruned(any_engine: Engine) -> None:
    """On SQLite (`outbox dev`) too: pruning the newest rows used to hand their ids out again,
    two usages under one event_id in the ledger and the usage history."""
    now = utcnow()
    with session_scope(any_engine) as session:
        customer = make_customer(session, credits=50)
        ids = [record_usage(session, customer, 1).event_id for _ in range(3)]
        deliver_events(session, ids, now - timedelta(days=40))
    assert prune_delivered(any_engine, older_than=timedelta(days=30)).deleted == 3
    with session_scope(any_engine) as session:
        new_id = record_usage(session, customer, 1).event_id
        entries = session.scalars(
            select(LedgerEntry.event_id).where(LedgerEntry.kind == "usage")
        ).all()
    assert new_id > max(ids)
    assert sorted(entries) == [*ids, new_id]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30d", timedelta(days=30)),
        ("12h", timedelta(hours=12)),
        ("90m", timedelta(minutes=90)),
        ("45s", timedelta(seconds=45)),
        ("2w", timedelta(weeks=2)),
    ],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "30", "d", "3x", "-1d", "0d", "1.5d", "99999999999999d"])
def test_parse_duration_refuses_bad_input(text: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_duration(text)


def test_a_dry_run_neither_waits_for_nor_blocks_a_replay(clean_tables: Engine) -> None:
    with session_scope(clean_tables) as session:
        customer = make_customer(session, credits=10)
        event_id = record_usage(session, customer, 1).event_id
        session.execute(
            update(OutboxEvent).where(OutboxEvent.id == event_id).values(status="failed")
        )
    with Session(clean_tables) as replaying, Session(clean_tables) as previewing:
        replaying.execute(
            select(OutboxEvent.id).where(OutboxEvent.id == event_id).with_for_update()
        )  # a replay in progress holds the row
        previewing.execute(text("SET LOCAL lock_timeout = '1s'"))
        by_id = replay(previewing, event_ids=[event_id], dry_run=True)
        everything = replay(previewing, all_failed=True, dry_run=True)
        assert by_id.as_dict()["would_replay"] == everything.as_dict()["would_replay"] == 1
        replaying.rollback()
