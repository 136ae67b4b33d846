"""Claiming and settling on real PostgreSQL: SKIP LOCKED claims never overlap, only the lease
holder settles, expired leases are rescued, attempts run out into `failed`."""

from __future__ import annotations

import random
import threading
from datetime import timedelta

from sqlalchemy import Engine, select, update

from outbox.db import session_scope
from outbox.events import (
    claim_batch,
    fail_if_claimed,
    mark_delivered_if_claimed,
    new_claim_token,
    release_if_claimed,
    rescue_expired_leases,
    retry_later_if_claimed,
)
from outbox.ledger import record_usage
from outbox.models import OutboxEvent, utcnow
from tests.factories import make_customer


def seed(engine: Engine, count: int, credits: int = 1) -> list[int]:
    with session_scope(engine) as session:
        customer = make_customer(session, credits=count * credits)
        return [record_usage(session, customer, credits).event_id for _ in range(count)]


def claim(engine: Engine, owner: str, limit: int = 500, now: object = None, lease: float = 60):
    now = now or utcnow() + timedelta(seconds=5)
    with session_scope(engine) as session:
        return claim_batch(
            session, owner=owner, limit=limit, now=now, lease_seconds=lease, hold_back_until=now
        )


def statuses(engine: Engine) -> dict[int, str]:
    with session_scope(engine) as session:
        return {e.id: e.status for e in session.scalars(select(OutboxEvent))}


def test_concurrent_claims_never_overlap(clean_tables: Engine) -> None:
    ids = seed(clean_tables, 600)
    claimed: list[list[int]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def worker(n: int) -> None:
        barrier.wait()
        while True:
            batch = claim(clean_tables, new_claim_token(f"w{n}"), limit=25)
            if not batch:
                return
            with lock:
                claimed.append([e.id for e in batch])

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = [i for batch in claimed for i in batch]
    assert len(flat) == len(set(flat)) == 600
    assert sorted(flat) == sorted(ids)
    assert set(statuses(clean_tables).values()) == {"inflight"}


def test_claim_takes_oldest_due_rows_and_holds_back_fresh_ones(clean_tables: Engine) -> None:
    ids = seed(clean_tables, 5)
    with session_scope(clean_tables) as session:
        session.execute(
            update(OutboxEvent)
            .where(OutboxEvent.id == ids[0])
            .values(next_attempt_at=utcnow() + timedelta(hours=1))
        )
    now = utcnow()
    with session_scope(clean_tables) as session:
        # Nothing occurred before the hold-back cutoff: nothing is claimed.
        assert not claim_batch(
            session,
            owner="o",
            limit=10,
            now=now,
            lease_seconds=60,
            hold_back_until=now - timedelta(minutes=1),
        )
    batch = claim(clean_tables, "o2", limit=2)
    assert [e.id for e in batch] == ids[1:3]


def test_only_the_lease_holder_settles(clean_tables: Engine) -> None:
    ids = seed(clean_tables, 3)
    owner = new_claim_token("a")
    claim(clean_tables, owner)
    now = utcnow()
    with session_scope(clean_tables) as session:
        assert mark_delivered_if_claimed(session, ids=ids, owner="someone-else", now=now) == 0
        assert fail_if_claimed(session, errors={ids[0]: "x"}, owner="someone-else", now=now) == 0
        assert mark_delivered_if_claimed(session, ids=ids, owner=owner, now=now) == 3
        # Settling twice cannot happen: the rows are no longer inflight.
        assert mark_delivered_if_claimed(session, ids=ids, owner=owner, now=now) == 0
    assert set(statuses(clean_tables).values()) == {"delivered"}


def test_a_slow_worker_cannot_overwrite_its_rescuers_outcome(clean_tables: Engine) -> None:
    ids = seed(clean_tables, 2)
    slow = new_claim_token("slow")
    claim(clean_tables, slow, lease=1)
    later = utcnow() + timedelta(seconds=30)
    with session_scope(clean_tables) as session:
        assert rescue_expired_leases(session, now=later, max_attempts=25) == 2
    rescuer = new_claim_token("rescuer")
    assert len(claim(clean_tables, rescuer, now=later + timedelta(seconds=1))) == 2
    with session_scope(clean_tables) as session:
        mark_delivered_if_claimed(session, ids=ids, owner=rescuer, now=later)
        # The slow worker wakes up with a failure: it must change nothing.
        assert fail_if_claimed(session, errors={ids[0]: "late"}, owner=slow, now=later) == 0
        rng = random.Random(1)
        events = claim_batch(
            session, owner="x", limit=1, now=later, lease_seconds=1, hold_back_until=later
        )
        assert events == []
        assert retry_later_if_claimed(
            session, events=[], owner=slow, now=later, error="late", rng=rng, max_attempts=25
        ) == (0, 0)
    assert set(statuses(clean_tables).values()) == {"delivered"}


def test_rescue_counts_the_lost_attempt_and_gives_up_at_the_limit(clean_tables: Engine) -> None:
    ids = seed(clean_tables, 1)
    with session_scope(clean_tables) as session:
        session.execute(update(OutboxEvent).values(attempts=24))
    claim(clean_tables, "dead", lease=1)
    with session_scope(clean_tables) as session:
        assert rescue_expired_leases(session, now=utcnow() + timedelta(minutes=5), max_attempts=25)
        event = session.get(OutboxEvent, ids[0])
        assert event is not None
        assert (event.status, event.attempts) == ("failed", 25)
        assert "lease expired" in (event.last_error or "")


def test_retry_backs_off_and_exhausts_into_failed(clean_tables: Engine) -> None:
    ids = seed(clean_tables, 2)
    with session_scope(clean_tables) as session:
        session.execute(update(OutboxEvent).where(OutboxEvent.id == ids[1]).values(attempts=24))
    owner = new_claim_token("w")
    batch = claim(clean_tables, owner)
    now = utcnow()
    with session_scope(clean_tables) as session:
        moved, failed = retry_later_if_claimed(
            session,
            events=batch,
            owner=owner,
            now=now,
            error="503 from Polar",
            rng=random.Random(7),
            max_attempts=25,
            retry_after=30,
        )
        assert (moved, failed) == (1, 1)
        first = session.get(OutboxEvent, ids[0])
        second = session.get(OutboxEvent, ids[1])
        assert first is not None and second is not None
        assert first.status == "pending" and first.attempts == 1
        assert first.next_attempt_at >= now + timedelta(seconds=30)  # Retry-After honoured
        assert second.status == "failed" and "gave up after 25 attempts" in (
            second.last_error or ""
        )


def test_faults_that_are_not_the_events_fault_spend_no_attempt(clean_tables: Engine) -> None:
    ids = seed(clean_tables, 1)
    owner = new_claim_token("w")
    batch = claim(clean_tables, owner)
    now = utcnow()
    with session_scope(clean_tables) as session:
        retry_later_if_claimed(
            session,
            events=batch,
            owner=owner,
            now=now,
            error="429",
            rng=random.Random(),
            max_attempts=1,
            retry_after=60,
            count_attempt=False,
        )
        event = session.get(OutboxEvent, ids[0])
        assert event is not None and (event.status, event.attempts) == ("pending", 0)
    owner = new_claim_token("w")
    claim(clean_tables, owner, now=now + timedelta(minutes=2))
    with session_scope(clean_tables) as session:
        assert release_if_claimed(session, ids=ids, owner=owner, now=now, delay_seconds=30) == 1
        event = session.get(OutboxEvent, ids[0])
        assert event is not None and (event.status, event.attempts) == ("pending", 0)
