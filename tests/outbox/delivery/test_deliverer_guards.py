"""The guards of delivery, each seen from outside (rows, what Polar received, what another
worker can do): a 429 is honoured by every worker for its Retry-After and costs no attempt; a
claim's lease runs from the claim on and belongs to that claim alone; a request carries at
most OUTBOX_BATCH_SIZE events; a claim never waits for another claim's locks."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
import redis
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import sessionmaker

import polar_emulator
from outbox.db import session_scope
from outbox.delivery.deliverer import Deliverer, drain
from outbox.events import (
    claim_batch,
    fail_if_claimed,
    mark_delivered_if_claimed,
    new_claim_token,
    rescue_expired_leases,
)
from outbox.ledger import record_usage
from outbox.models import OutboxEvent, utcnow
from outbox.polar.gateway import Outcome, PolarGateway, build_event, events_that_fit
from outbox.polar.ratelimit import LocalRateBudget, RedisRateBudget
from outbox.settings import Settings
from outbox.states import EventStatus
from outbox.validation import (
    MAX_METADATA_KEY_LENGTH,
    MAX_METADATA_KEYS,
    MAX_METADATA_STRING_LENGTH,
    RESERVED_METADATA_KEYS,
)
from tests.factories import make_customer
from tests.outbox.delivery.test_deliverer import make_settings


@pytest.fixture
def emulator() -> Iterator[polar_emulator.RunningEmulator]:
    running = polar_emulator.serve_in_thread(config=polar_emulator.EmulatorConfig(seed=5))
    yield running
    running.stop()


def deliverer(
    engine: Engine, settings: Settings, budget: object | None = None, worker: str = "w"
) -> Deliverer:
    gateway = PolarGateway(settings, budget=budget or LocalRateBudget(100_000))  # type: ignore[arg-type]
    return Deliverer(
        sessionmaker(bind=engine, expire_on_commit=False),
        gateway,
        settings,
        worker_id=worker,
        rng=random.Random(1),
    )


def seed(engine: Engine, count: int) -> list[int]:
    with session_scope(engine) as session:
        customer = make_customer(session, credits=count)
        return [record_usage(session, customer, 1).event_id for _ in range(count)]


def rows(engine: Engine) -> list[OutboxEvent]:
    with session_scope(engine) as session:
        found = list(session.scalars(select(OutboxEvent).order_by(OutboxEvent.id)))
        session.expunge_all()
        return found


# -- (1) a 429: Retry-After honoured, every worker paused, no attempt spent ------------------


def test_a_429_holds_every_worker_back_for_its_retry_after_and_costs_no_attempt(
    clean_tables: Engine,
    pg_url: str,
    redis_url: str,
    emulator: polar_emulator.RunningEmulator,
) -> None:
    """Polar allows 1 request per window and answers 429 with Retry-After: 60 (as it does).
    Our own budget is generous (we pretend not to know), so the second request is refused:
    its rows wait at least 60 s and keep their attempts at 0; a second worker (its own
    budget object on the same Redis namespace) sends nothing to Polar during the pause."""
    # One long window (Retry-After still 60, as Polar says): the two requests never straddle
    # a window boundary, however slowly a loaded machine runs them.
    emulator.configure(rate_limit_per_minute=1, window_seconds=3600.0, retry_after_mode="polar")
    settings = make_settings(pg_url, emulator, outbox_batch_size=1)
    namespace = f"test:{uuid.uuid4().hex}"

    def shared() -> RedisRateBudget:
        return RedisRateBudget(redis.Redis.from_url(redis_url), 10_000, namespace=namespace)

    seed(clean_tables, 3)
    first = deliverer(clean_tables, settings, shared(), "first")
    assert first.deliver_batch().delivered == 1  # the window's one request
    before = time.time()
    refused = first.deliver_batch()
    assert refused.retried == 1 and refused.pause_seconds >= 59
    assert emulator.state.stats.status_429 == 1

    by_status = {r.status: r for r in rows(clean_tables) if r.status != EventStatus.DELIVERED}
    limited = [r for r in rows(clean_tables) if r.last_error and "429" in r.last_error]
    assert len(limited) == 1
    assert limited[0].attempts == 0  # not the event's fault
    assert limited[0].next_attempt_at.timestamp() >= before + 59  # Retry-After honoured
    assert set(by_status) == {EventStatus.PENDING}

    second = deliverer(clean_tables, settings, shared(), "second")
    requests = emulator.state.stats.requests
    report = drain(second, max_seconds=2)
    assert emulator.state.stats.requests == requests  # the pause holds every worker back
    assert report.delivered == 0 and report.pause_seconds >= 55
    assert second.gateway.budget.paused_for() >= 55


# -- (2) leases: from the claim on, one claim's alone ----------------------------------------


def test_a_fresh_claim_is_not_rescued_and_no_other_worker_can_take_or_settle_it(
    clean_tables: Engine,
) -> None:
    """While a claim's lease runs (60 s), a rescue, a second claim and a settle by anyone else
    (even the same worker's older claim) change nothing."""
    ids = seed(clean_tables, 4)
    now = utcnow() + timedelta(seconds=1)
    token = new_claim_token("host:1")
    with session_scope(clean_tables) as session:
        claimed = claim_batch(
            session, owner=token, limit=4, now=now, lease_seconds=60, hold_back_until=now
        )
    assert [c.id for c in claimed] == ids
    later = now + timedelta(seconds=5)
    with session_scope(clean_tables) as session:
        assert rescue_expired_leases(session, now=later, max_attempts=25) == 0
        assert (
            claim_batch(
                session,
                owner=new_claim_token("host:2"),
                limit=4,
                now=later,
                lease_seconds=60,
                hold_back_until=later,
            )
            == []
        )
        # The same worker's next claim has a token of its own: it cannot settle these rows.
        other = new_claim_token("host:1")
        assert mark_delivered_if_claimed(session, ids=ids, owner=other, now=later) == 0
        assert fail_if_claimed(session, errors={ids[0]: "x"}, owner=other, now=later) == 0
    found = rows(clean_tables)
    assert {r.status for r in found} == {EventStatus.INFLIGHT}
    assert {r.lease_owner for r in found} == {token}
    assert all(r.lease_expires_at is not None and r.lease_expires_at >= later for r in found)


def test_a_stale_batch_of_the_same_worker_cannot_settle_rows_it_lost_and_reclaimed(
    clean_tables: Engine,
) -> None:
    """Worker w's batch 1 stalls past its lease; the rows are rescued and w claims them again
    (batch 2). Batch 1 finishing late must not fail them: only batch 2 settles."""
    ids = seed(clean_tables, 2)
    t0 = utcnow() + timedelta(seconds=1)
    stale = new_claim_token("host:7")
    with session_scope(clean_tables) as session:
        claim_batch(session, owner=stale, limit=2, now=t0, lease_seconds=5, hold_back_until=t0)
    t1 = t0 + timedelta(seconds=10)
    with session_scope(clean_tables) as session:
        assert rescue_expired_leases(session, now=t1, max_attempts=25) == 2
    fresh = new_claim_token("host:7")
    with session_scope(clean_tables) as session:
        claim_batch(session, owner=fresh, limit=2, now=t1, lease_seconds=60, hold_back_until=t1)
    with session_scope(clean_tables) as session:
        assert fail_if_claimed(session, errors={i: "stale" for i in ids}, owner=stale, now=t1) == 0
        assert mark_delivered_if_claimed(session, ids=ids, owner=fresh, now=t1) == 2
    assert {r.status for r in rows(clean_tables)} == {EventStatus.DELIVERED}


# -- (3) a request carries at most a batch ---------------------------------------------------


def test_no_request_carries_more_than_outbox_batch_size_events(
    clean_tables: Engine, pg_url: str, emulator: polar_emulator.RunningEmulator
) -> None:
    seed(clean_tables, 23)
    settings = make_settings(pg_url, emulator, outbox_batch_size=7)
    report = drain(deliverer(clean_tables, settings), max_seconds=30)
    assert report.delivered == 23
    assert emulator.state.stats.accepted_batch_sizes == [7, 7, 7, 2]


def _largest_metadata() -> dict[str, str | int | float | bool]:
    """The most JSON one event's metadata can take that `check_metadata` admits: every key a
    caller may set, 40 characters of 4 bytes each, values of 500 control characters (each
    written \\u00XX, 6 bytes)."""
    room = MAX_METADATA_KEYS - len(RESERVED_METADATA_KEYS | {"credits_used"})
    key = "\U0001f600" * (MAX_METADATA_KEY_LENGTH - 3)
    return {f"k{i:02d}{key}": "\x01" * MAX_METADATA_STRING_LENGTH for i in range(room)}


def test_a_request_stays_under_polars_body_limit_whatever_the_metadata(
    clean_tables: Engine, pg_url: str, emulator: polar_emulator.RunningEmulator
) -> None:
    """A full batch of the largest metadata would be ~15 MiB, over Polar's 10 MiB (413 every
    time): each request carries what fits in half of it, the rest goes with the next ones,
    and no row spends an attempt."""
    with session_scope(clean_tables) as session:
        customer = make_customer(session, credits=100)
        for _ in range(100):
            record_usage(session, customer, 1, _largest_metadata())
    settings = make_settings(pg_url, emulator, outbox_batch_size=100)
    report = drain(deliverer(clean_tables, settings), max_seconds=60)
    assert report.delivered == 100 and report.retried == 0
    stats = emulator.state.stats
    assert stats.ingest_requests == len(stats.accepted_batch_sizes) > 1
    assert sum(stats.accepted_batch_sizes) == 100
    assert all(r.status == EventStatus.DELIVERED and r.attempts == 0 for r in rows(clean_tables))


@pytest.mark.parametrize(
    ("events", "max_bytes", "fit"),
    [
        (3, 10_000, 3),  # all fit
        (3, 60, 1),  # even one is over: one goes alone (an event is far below Polar's limit)
        (0, 10, 0),
    ],
)
def test_events_that_fit_counts_from_the_first(events: int, max_bytes: int, fit: int) -> None:
    batch = [{"name": "ai_generation", "external_id": f"usage_{i}"} for i in range(events)]
    assert events_that_fit(batch, max_bytes) == fit


def test_events_that_fit_stops_at_the_byte_the_sdk_would_send() -> None:
    batch = [{"name": "é" * 10, "n": i} for i in range(10)]  # 2 bytes a character in UTF-8
    one = len(b'{"name":"' + "é".encode() * 10 + b'","n":0}')
    body = len(b'{"events":[]}') + 4 * one + 3  # four events and their commas
    assert events_that_fit(batch, body) == 4
    assert events_that_fit(batch, body - 1) == 3


def test_the_batch_size_bound_keeps_polars_meter_rows_within_one_insert(
    emulator: polar_emulator.RunningEmulator,
) -> None:
    """Polar's server writes a meter-event row per event and matching meter in ONE INSERT and
    fails the request (500, nothing stored) past 4,681 rows: OUTBOX_BATCH_SIZE's upper bound
    leaves room for two meters on the usage event (the emulator does as Polar's server)."""
    bound = next(
        m.le for m in Settings.model_fields["outbox_batch_size"].metadata if hasattr(m, "le")
    )
    meters = emulator.state.config.meters
    count_meter = {**meters[0], "id": str(uuid.uuid4()), "aggregation": {"func": "count"}}
    emulator.state.configure({"meters": [*meters, count_meter]})
    gateway = PolarGateway(make_settings("sqlite://", emulator), budget=LocalRateBudget(100_000))

    def batch(size: int) -> list[dict[str, object]]:
        return [
            build_event(
                name="ai_generation",
                customer_id="user_1",
                external_id=f"usage_{uuid.uuid4().hex}",
                occurred_at=utcnow() - timedelta(seconds=5),
                metadata={},
                credits_field="credits_used",
                credits=1,
                usage_id=str(i),
            )
            for i in range(size)
        ]

    assert gateway.ingest(batch(bound)).inserted == bound
    too_many = batch(4682 // 2 + 1)  # 4,682 meter-event rows
    assert gateway.ingest(too_many).outcome is Outcome.TRANSIENT
    stats = emulator.state.stats
    assert stats.meter_event_overflows == stats.ingest_requests - 1 > 0  # retried in the call
    assert stats.events_inserted == bound  # a refused batch stores nothing


# -- (4) a claim never waits for another claim's locks ---------------------------------------


def test_a_second_claim_gets_the_next_rows_while_the_first_claims_transaction_is_open(
    clean_tables: Engine,
) -> None:
    """Two real connections: the first claim's transaction stays open (its rows locked); the
    second claim, on another thread, must come back at once with the next rows, not wait."""
    ids = seed(clean_tables, 6)
    now = utcnow() + timedelta(seconds=1)
    sessions = sessionmaker(bind=clean_tables)
    first = sessions()
    try:
        held = claim_batch(
            first, owner="first", limit=3, now=now, lease_seconds=60, hold_back_until=now
        )
        assert [c.id for c in held] == ids[:3]  # not committed yet: the rows stay locked
        got: list[list[int]] = []

        def second_claim() -> None:
            with session_scope(clean_tables) as session:
                session.execute(text("SET LOCAL lock_timeout = '20s'"))
                claimed = claim_batch(
                    session, owner="second", limit=3, now=now, lease_seconds=60, hold_back_until=now
                )
                got.append([c.id for c in claimed])

        started = time.monotonic()
        thread = threading.Thread(target=second_claim)
        thread.start()
        thread.join(10)
        waited = time.monotonic() - started
        assert not thread.is_alive(), "the second claim waited for the first one's row locks"
        assert got == [ids[3:]]
        assert waited < 10
        first.commit()
    finally:
        first.rollback()
        first.close()
        thread.join(30)


# -- reconcile steps back while delivery's batches are full ----------------------------------


def test_a_full_batch_makes_reconcile_wait_for_a_slot_delivery_leaves_unused(
    clean_tables: Engine,
    pg_url: str,
    redis_url: str,
    emulator: polar_emulator.RunningEmulator,
) -> None:
    """10 requests per 4 s (a slot every ~0.5 s). Delivery sends a full batch: when its next
    slot is due, reconcile (low priority) does not get it, it waits for one delivery leaves
    unused. After a batch that was not full, the due slot is reconcile's."""
    settings = make_settings(pg_url, emulator, outbox_batch_size=3, polar_rate_window_seconds=4)

    def attempt(rows: int) -> float | None:
        namespace = f"test:{uuid.uuid4().hex}"
        shared = RedisRateBudget(
            redis.Redis.from_url(redis_url), 10, namespace=namespace, window_seconds=4
        )
        reconcile = RedisRateBudget(
            redis.Redis.from_url(redis_url), 10, namespace=namespace, window_seconds=4
        )
        seed(clean_tables, rows)
        assert deliverer(clean_tables, settings, shared).deliver_batch().delivered == min(rows, 3)
        next_due = shared.last_grant_us / 1e6 + shared.pacing().interval_us / 1e6
        wait = next_due + 0.2 - time.time()
        assert wait > 0, "the batch took longer than a slot: cannot tell"
        time.sleep(wait)
        return reconcile.acquire(timeout=0, share=0.2)

    assert attempt(3) is not None  # full: reconcile waits
    with session_scope(clean_tables) as session:
        session.execute(text("DELETE FROM outbox_events"))
    assert attempt(2) is None  # not full: the due slot is reconcile's
