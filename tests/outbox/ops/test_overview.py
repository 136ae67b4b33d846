"""The console's overview on PostgreSQL and SQLite: counts, money at risk, lag, deliveries per
minute, failed groups."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import Engine, update

from outbox import events
from outbox.db import session_scope
from outbox.ledger import grant_credits, record_usage
from outbox.models import OutboxEvent, utcnow
from outbox.ops.overview import overview, percentile


def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 0.5) is None
    assert percentile([1.0], 0.99) == 1.0
    values = [float(n) for n in range(1, 101)]
    assert (percentile(values, 0.5), percentile(values, 0.99)) == (50.0, 99.0)


def test_the_overview_counts_what_is_at_risk_and_what_was_delivered(any_engine: Engine) -> None:
    now = utcnow()
    with session_scope(any_engine) as session:
        grant_credits(session, "ov_a", 100, reason="t")
        ids = [record_usage(session, "ov_a", credits).event_id for credits in (1, 2, 3, 4, 5)]
    with session_scope(any_engine) as session:
        # Two delivered (3.5 and 10.5 minutes ago, 2 s after their commit), one failed, two pending.
        for event_id, minutes in ((ids[0], 3.5), (ids[1], 10.5)):
            delivered = now - timedelta(minutes=minutes)
            session.execute(
                update(OutboxEvent)
                .where(OutboxEvent.id == event_id)
                .values(
                    status="delivered",
                    delivered_at=delivered,
                    created_at=delivered - timedelta(seconds=2),
                )
            )
        session.execute(
            update(OutboxEvent)
            .where(OutboxEvent.id == ids[2])
            .values(status="failed", last_error="422: nope")
        )
        session.execute(
            update(OutboxEvent)
            .where(OutboxEvent.id.in_(ids[3:]))
            .values(created_at=now - timedelta(minutes=7))
        )
    with session_scope(any_engine) as session:
        o = overview(session, now=now)
        groups = events.failed_groups(session)
    assert o.counts == {"pending": 2, "inflight": 0, "delivered": 2, "failed": 1, "cancelled": 0}
    assert not o.delivered_estimated  # a small table is counted exactly
    assert (o.money.credits_pending, o.money.credits_failed) == (9, 3)
    assert o.oldest_pending_seconds is not None and 419 <= o.oldest_pending_seconds <= 421
    assert o.lag_sample == 2 and o.lag_p50 == o.lag_p99 == 2.0
    assert len(o.per_minute) == 60 and sum(o.per_minute) == 2
    assert o.per_minute[-4] == 1 and o.per_minute[-11] == 1  # 3.5 and 10.5 minutes ago
    assert [(g.message, g.count, g.credits) for g in groups] == [("422: nope", 1, 3)]
