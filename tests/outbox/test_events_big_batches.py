"""Claiming and settling batches of thousands of rows, on PostgreSQL (ids as one array, per-row
values joined from `unnest`) and SQLite (IN lists, CASE): the guards hold at any size, only the
owner's rows move, each row gets its own values and exactly one history step."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

from sqlalchemy import Engine, func, insert, select

from outbox.attempts import ATTEMPTS
from outbox.db import session_scope
from outbox.events import (
    EVENTS,
    ClaimedEvent,
    claim_batch,
    fail_if_claimed,
    mark_delivered_if_claimed,
    new_claim_token,
    release_if_claimed,
    rescue_expired_leases,
    retry_later_if_claimed,
    unclaim_if_claimed,
)
from outbox.models import utcnow
from outbox.policy import BACKOFF_BASE_SECONDS, BACKOFF_CAP_SECONDS, next_attempt_at


def seed_pending(engine: Engine, count: int) -> list[int]:
    """`count` due pending rows, written in one executemany (thousands of usages would be slow)."""
    at = utcnow() - timedelta(minutes=1)
    with session_scope(engine) as session:
        session.execute(
            insert(EVENTS),
            [
                {
                    "external_id": f"big-{n}",
                    "customer_id": f"cust-{n % 7}",
                    "name": "ai_generation",
                    "credits": 1,
                    "metadata": {"n": n},
                    "occurred_at": at,
                    "status": "pending",
                    "attempts": 0,
                    "next_attempt_at": at + timedelta(microseconds=n),  # claim order = n
                    "created_at": at,
                    "updated_at": at,
                }
                for n in range(count)
            ],
        )
        return list(session.scalars(select(EVENTS.c.id).order_by(EVENTS.c.id)))


def claim(
    engine: Engine, owner: str, limit: int, now: datetime, lease: float = 60
) -> list[ClaimedEvent]:
    with session_scope(engine) as session:
        return claim_batch(
            session, owner=owner, limit=limit, now=now, lease_seconds=lease, hold_back_until=now
        )


def rows(engine: Engine) -> dict[int, tuple[str, str | None, int, str | None, datetime]]:
    """id -> (status, lease owner, attempts, last error, next attempt)."""
    with session_scope(engine) as session:
        return {
            r.id: (r.status, r.lease_owner, r.attempts, r.last_error, r.next_attempt_at)
            for r in session.execute(
                select(
                    EVENTS.c.id,
                    EVENTS.c.status,
                    EVENTS.c.lease_owner,
                    EVENTS.c.attempts,
                    EVENTS.c.last_error,
                    EVENTS.c.next_attempt_at,
                )
            )
        }


def history(engine: Engine) -> list[tuple[int, str, str | None, int, str | None]]:
    """(event id, decision, claim token, attempt, message) of every step."""
    with session_scope(engine) as session:
        return [
            tuple(r)  # type: ignore[misc]
            for r in session.execute(
                select(
                    ATTEMPTS.c.event_id,
                    ATTEMPTS.c.decision,
                    ATTEMPTS.c.claim_token,
                    ATTEMPTS.c.attempt,
                    ATTEMPTS.c.message,
                ).order_by(ATTEMPTS.c.id)
            )
        ]


def test_a_5000_row_batch_settles_exactly_the_owners_rows(any_engine: Engine) -> None:
    ids = seed_pending(any_engine, 5300)
    now = utcnow()
    other = new_claim_token("other")
    others = claim(any_engine, other, 300, now)
    owner = new_claim_token("owner")
    mine = claim(any_engine, owner, 5000, now)
    assert [e.id for e in others] == ids[:300]
    assert [e.id for e in mine] == ids[300:]
    assert mine[0].metadata == {"n": 300} and mine[-1].external_id == "big-5299"

    failing = {e.id: f"refused {e.id}" for e in mine[:2500]}
    later = now + timedelta(seconds=1)
    with session_scope(any_engine) as session:
        # Every id of the table is named; only the owner's inflight rows may move.
        assert (
            fail_if_claimed(
                session,
                errors={**{i: "not mine" for i in ids[:300]}, **failing},
                owner=owner,
                now=later,
            )
            == 2500
        )
        assert mark_delivered_if_claimed(session, ids=ids, owner=owner, now=later) == 2500
        assert mark_delivered_if_claimed(session, ids=ids, owner=owner, now=later) == 0

    state = rows(any_engine)
    assert all(state[i][:2] == ("inflight", other) for i in ids[:300])
    assert {i: state[i][3] for i in failing} == failing
    assert all(state[i][:3] == ("failed", None, 1) for i in failing)
    delivered = [e.id for e in mine[2500:]]
    assert all(state[i][:2] == ("delivered", None) for i in delivered)

    steps = history(any_engine)
    assert len(steps) == 5000
    assert {s[0] for s in steps} == {e.id for e in mine}
    assert all(s[2] == owner and s[3] == 1 for s in steps)
    assert {s[0]: s[4] for s in steps if s[1] == "failed"} == failing
    assert sorted(s[0] for s in steps if s[1] == "delivered") == delivered
    assert all(s[4] is None for s in steps if s[1] == "delivered")


def test_a_stale_owners_big_settle_moves_nothing(any_engine: Engine) -> None:
    ids = seed_pending(any_engine, 2000)
    now = utcnow()
    slow = new_claim_token("slow")
    stale = claim(any_engine, slow, 2000, now, lease=1)
    later = now + timedelta(seconds=30)
    with session_scope(any_engine) as session:
        assert rescue_expired_leases(session, now=later, max_attempts=25) == 2000
    rescuer = new_claim_token("rescuer")
    fresh = claim(any_engine, rescuer, 2000, later + timedelta(seconds=1))
    assert [e.id for e in fresh] == ids
    before = rows(any_engine)

    rng = random.Random(3)
    with session_scope(any_engine) as session:
        assert mark_delivered_if_claimed(session, ids=ids, owner=slow, now=later) == 0
        assert fail_if_claimed(session, errors={i: "late" for i in ids}, owner=slow, now=later) == 0
        assert retry_later_if_claimed(
            session, events=stale, owner=slow, now=later, error="late", rng=rng, max_attempts=25
        ) == (0, 0)
        assert release_if_claimed(session, ids=ids, owner=slow, now=later, delay_seconds=5) == 0
        assert unclaim_if_claimed(session, ids=ids, owner=slow, now=later) == 0
    assert rows(any_engine) == before
    assert {s[1] for s in history(any_engine)} == {"rescued"}


def test_a_big_retry_gives_each_row_its_own_backoff(any_engine: Engine) -> None:
    ids = seed_pending(any_engine, 3000)
    now = utcnow()
    owner = new_claim_token("owner")
    batch = claim(any_engine, owner, 3000, now)
    later = now + timedelta(seconds=2)
    with session_scope(any_engine) as session:
        assert retry_later_if_claimed(
            session,
            events=batch,
            owner=owner,
            now=later,
            error="503",
            rng=random.Random(11),
            max_attempts=25,
        ) == (3000, 0)
    replay = random.Random(11)  # the same draws, in the same order (the batch, by id)
    expected = {
        e.id: next_attempt_at(
            later, 1, replay, None, base=BACKOFF_BASE_SECONDS, cap=BACKOFF_CAP_SECONDS
        )
        for e in batch
    }
    state = rows(any_engine)
    assert {i: state[i][4] for i in ids} == expected
    assert len(set(expected.values())) > 2900  # jittered: a mix-up of rows would show
    assert all(state[i][:4] == ("pending", None, 1, "503") for i in ids)
    with session_scope(any_engine) as session:
        count = session.scalar(
            select(func.count()).select_from(ATTEMPTS).where(ATTEMPTS.c.decision == "retry")
        )
    assert count == 3000
