"""Refunds (outbox/refunds.py): credits back, a cancelled row or a compensating event, and the
database's guard that a usage is never refunded beyond its credits, under real concurrency."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import Engine, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from outbox import events
from outbox.db import session_scope
from outbox.errors import (
    CustomerNotFound,
    EventNotFound,
    InsufficientCredits,
    InvalidRequest,
    NotRefundable,
    NotReplayable,
    RefundExceedsUsage,
)
from outbox.holds import capture_hold, place_hold
from outbox.ledger import debit_credits, get_credits, ledger_balance, record_usage
from outbox.models import LedgerEntry, OutboxEvent, UsageRefund, utcnow
from outbox.ops.replay import replay
from outbox.refunds import (
    REFUND_OF_KEY,
    add_refunded_if_within_usage,
    build_add_refunded_statement,
    refund_usage,
)
from tests.factories import make_customer


def claim_all(session: Session, owner: str = "w:1") -> list[int]:
    now = utcnow()
    claimed = events.claim_batch(
        session,
        owner=owner,
        limit=1000,
        now=now + timedelta(seconds=1),
        lease_seconds=60,
        hold_back_until=now + timedelta(seconds=1),
    )
    return [event.id for event in claimed]


def row(session: Session, event_id: int) -> OutboxEvent:
    found = session.get(OutboxEvent, event_id, populate_existing=True)
    assert found is not None
    return found


def test_a_whole_refund_of_an_unsent_usage_cancels_it_and_restores_the_balance(
    any_engine: Engine,
) -> None:
    with session_scope(any_engine) as session:
        customer = make_customer(session, credits=10)
        usage = record_usage(session, customer, 4)
        result = refund_usage(session, usage.event_id, reason="generation failed")
    assert (result.action, result.credits, result.balance) == ("cancelled", 4, 10)
    assert result.compensation_event_id is None
    with session_scope(any_engine) as session:
        assert row(session, usage.event_id).status == "cancelled"
        assert session.scalar(select(func.count()).select_from(OutboxEvent)) == 1
        credits = get_credits(session, customer)
        assert (credits.balance, credits.used) == (10, 0)
        assert ledger_balance(session, customer) == 10
        entry = session.get(LedgerEntry, result.refund_id)
        assert entry is not None and entry.kind == "refund" and entry.delta == 4
        assert (entry.refund_of, entry.event_id, entry.reason) == (
            usage.event_id,
            None,
            "generation failed",
        )
        # A cancelled row is never claimed.
        assert claim_all(session) == []


def test_a_partial_refund_enqueues_a_compensating_event_then_the_rest_by_default(
    any_engine: Engine,
) -> None:
    with session_scope(any_engine) as session:
        customer = make_customer(session, credits=10)
        usage = record_usage(session, customer, 5, {"model": "m"})
        first = refund_usage(session, usage.event_id, 2, reason="goodwill")
        rest = refund_usage(session, usage.event_id, reason="the rest")
        with pytest.raises(RefundExceedsUsage):
            refund_usage(session, usage.event_id, 1, reason="once more")
        with pytest.raises(RefundExceedsUsage):
            refund_usage(session, usage.event_id, reason="and the default")
    assert (first.action, first.credits, first.balance) == ("compensated", 2, 7)
    assert (rest.action, rest.credits, rest.balance) == ("compensated", 3, 10)
    with session_scope(any_engine) as session:
        assert row(session, usage.event_id).status == "pending"  # the usage still goes
        assert first.compensation_event_id is not None
        compensation = row(session, first.compensation_event_id)
        assert compensation.credits == -2 and compensation.refund_of == usage.event_id
        assert compensation.status == "pending" and compensation.name == "ai_generation"
        assert compensation.external_id == first.compensation_external_id
        assert compensation.external_id != usage.external_id
        assert compensation.event_metadata == {REFUND_OF_KEY: usage.external_id}
        assert ledger_balance(session, customer) == get_credits(session, customer).balance == 10
        assert get_credits(session, customer).used == 0
        refunded = session.get(UsageRefund, usage.event_id)
        assert refunded is not None and (refunded.refunded, refunded.credits) == (5, 5)


def test_a_usage_in_flight_is_compensated_never_cancelled(db: Session) -> None:
    """The claim holds a lease: its worker may be sending the row right now."""
    customer = make_customer(db, credits=10)
    usage = record_usage(db, customer, 3)
    assert claim_all(db) == [usage.event_id]
    result = refund_usage(db, usage.event_id, reason="r")
    assert result.action == "compensated"
    assert row(db, usage.event_id).status == "inflight"
    assert result.compensation_event_id is not None
    assert row(db, result.compensation_event_id).credits == -3


@pytest.mark.parametrize(
    ("status", "maybe_at_polar", "action"),
    [
        ("pending", False, "cancelled"),  # never sent, or refused by Polar (429, skew, 401)
        ("failed", False, "cancelled"),  # Polar refused it (a 422 naming it)
        # A send with an unknown outcome (a timeout, a 5xx, a lost worker): Polar may hold it.
        ("pending", True, "compensated"),
        ("failed", True, "compensated"),  # attempts exhausted, or replayed and failed again
        ("delivered", True, "compensated"),
    ],
)
def test_what_a_whole_refund_does_depends_on_whether_polar_may_hold_the_usage(
    db: Session, status: str, maybe_at_polar: bool, action: str
) -> None:
    customer = make_customer(db, credits=10)
    usage = record_usage(db, customer, 2)
    db.execute(
        update(OutboxEvent)
        .where(OutboxEvent.id == usage.event_id)
        .values(
            status=status,
            maybe_at_polar=maybe_at_polar,
            delivered_at=utcnow() if status == "delivered" else None,
        )
    )
    result = refund_usage(db, usage.event_id, reason="r")
    assert result.action == action
    expected = "cancelled" if action == "cancelled" else status
    assert row(db, usage.event_id).status == expected
    assert get_credits(db, customer).balance == 10


def test_every_send_that_polar_did_not_refuse_marks_the_row_maybe_at_polar(db: Session) -> None:
    """What makes a whole refund compensate instead of cancel, transition by transition."""
    import random

    customer = make_customer(db, credits=100)
    ids = [record_usage(db, customer, 1).event_id for _ in range(6)]
    now = utcnow() + timedelta(seconds=1)

    def claim(owner: str) -> list[events.ClaimedEvent]:
        return events.claim_batch(
            db, owner=owner, limit=100, now=now, lease_seconds=60, hold_back_until=now
        )

    def flags() -> dict[int, bool]:
        return {i: row(db, i).maybe_at_polar for i in ids}

    batch = claim("w:1")
    rng = random.Random(1)
    # Refusals Polar answered (429, a timestamp in its future): no attempt, nothing marked.
    events.retry_later_if_claimed(
        db,
        events=batch,
        owner="w:1",
        now=now,
        error="429",
        rng=rng,
        max_attempts=5,
        count_attempt=False,
        backoff_base=0,
        backoff_cap=0,
    )
    events.release_if_claimed(db, ids=[], owner="w:1", now=now, delay_seconds=0)
    assert not any(flags().values())
    batch = {e.id: e for e in claim("w:2")}
    events.fail_if_claimed(db, errors={ids[0]: "422 naming it"}, owner="w:2", now=now)
    events.retry_later_if_claimed(
        db,
        events=[batch[ids[1]]],
        owner="w:2",
        now=now,
        error="timeout",
        rng=rng,
        max_attempts=5,
        backoff_base=0,
        backoff_cap=0,
    )
    events.retry_later_if_claimed(
        db,
        events=[batch[ids[2]]],
        owner="w:2",
        now=now,
        error="5xx",
        rng=rng,
        max_attempts=1,
        backoff_base=0,
        backoff_cap=0,
    )  # attempts exhausted: failed
    events.mark_delivered_if_claimed(db, ids=[ids[3]], owner="w:2", now=now)
    events.rescue_expired_leases(db, now=now + timedelta(seconds=61), max_attempts=5)
    assert flags() == {
        ids[0]: False,  # refused by Polar
        ids[1]: True,
        ids[2]: True,
        ids[3]: True,
        ids[4]: True,  # rescued: its worker may have sent it
        ids[5]: True,
    }
    assert row(db, ids[2]).status == "failed"
    assert refund_usage(db, ids[0], reason="r").action == "cancelled"
    assert refund_usage(db, ids[2], reason="r").action == "compensated"


def test_a_pruned_usage_is_refunded_by_a_compensating_event(db: Session) -> None:
    customer = make_customer(db, credits=10)
    usage = record_usage(db, customer, 2)
    db.execute(
        update(OutboxEvent)
        .where(OutboxEvent.id == usage.event_id)
        .values(status="delivered", delivered_at=utcnow())
    )
    db.execute(OutboxEvent.__table__.delete().where(OutboxEvent.id == usage.event_id))
    result = refund_usage(db, usage.event_id, reason="r")
    assert result.action == "compensated" and result.compensation_event_id is not None
    assert row(db, result.compensation_event_id).name == "ai_generation"


def test_refusals_name_the_problem_and_change_nothing(db: Session) -> None:
    customer = make_customer(db, credits=10)
    usage = record_usage(db, customer, 2)
    compensation = refund_usage(db, usage.event_id, 1, reason="r").compensation_event_id
    assert compensation is not None
    before = (get_credits(db, customer).balance, ledger_balance(db, customer))
    with pytest.raises(NotRefundable):
        refund_usage(db, compensation, reason="a refund of a refund")
    with pytest.raises(EventNotFound):
        refund_usage(db, 10**12, reason="r")
    with pytest.raises(RefundExceedsUsage):
        refund_usage(db, usage.event_id, 2, reason="only 1 is left")
    for bad in ({"credits": 0}, {"credits": True}, {"credits": "1"}):
        with pytest.raises(InvalidRequest):
            refund_usage(db, usage.event_id, reason="r", **bad)  # type: ignore[arg-type]
    for reason in ("", "  ", None, "x" * 2000):
        with pytest.raises(InvalidRequest):
            refund_usage(db, usage.event_id, reason=reason)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest):
        refund_usage(db, 0, reason="r")
    assert (get_credits(db, customer).balance, ledger_balance(db, customer)) == before


def test_a_capture_of_a_hold_is_refundable_like_any_usage(db: Session) -> None:
    customer = make_customer(db, credits=10)
    hold = place_hold(db, customer, 6)
    captured = capture_hold(db, hold.hold_id, 4)
    assert get_credits(db, customer).balance == 6
    result = refund_usage(db, captured.event_id, reason="the generation failed")
    assert (result.action, result.balance) == ("cancelled", 10)
    assert ledger_balance(db, customer) == 10


def test_replay_never_resurrects_a_cancelled_row(db: Session) -> None:
    customer = make_customer(db, credits=10)
    usage = record_usage(db, customer, 2)
    other = record_usage(db, customer, 1)
    db.execute(
        update(OutboxEvent)
        .where(OutboxEvent.id.in_([usage.event_id, other.event_id]))
        .values(status="failed", attempts=3, last_error="refused")
    )
    assert refund_usage(db, usage.event_id, reason="r").action == "cancelled"
    with pytest.raises(NotReplayable):
        replay(db, event_ids=[usage.event_id])
    assert replay(db, all_failed=True).event_ids == [other.event_id]
    # The statement itself, given the cancelled row's id, moves nothing.
    events.requeue_if_failed(db, [usage.event_id], replay_id=1, now=utcnow())
    assert row(db, usage.event_id).status == "cancelled"
    assert row(db, other.event_id).status == "pending"


def test_the_database_refuses_a_refund_beyond_the_usage_without_the_guard(db: Session) -> None:
    """The conditional upsert's WHERE clauses removed: CHECK (refunded <= credits) refuses."""
    customer = make_customer(db, credits=10)
    usage = record_usage(db, customer, 3)
    unguarded = build_add_refunded_statement(guarded=False)
    args = {"event_id": usage.event_id, "customer_id": customer, "usage_credits": 3}
    assert add_refunded_if_within_usage(db, credits=2, statements=unguarded, **args) == 2
    with pytest.raises(IntegrityError, match="ck_usage_refunds_refunded_within_usage"):
        with db.begin_nested():
            add_refunded_if_within_usage(db, credits=2, statements=unguarded, **args)
    # Guarded, the same refund is refused without an error.
    assert add_refunded_if_within_usage(db, credits=2, **args) is None
    assert add_refunded_if_within_usage(db, credits=1, **args) == 3


def _race(engine: Engine, n: int, work: object) -> tuple[list[object], list[BaseException]]:
    barrier = threading.Barrier(n)
    results: list[object] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run(i: int) -> None:
        barrier.wait()
        try:
            with session_scope(engine) as session:
                out = work(session, i)  # type: ignore[operator]
            with lock:
                results.append(out)
        except BaseException as exc:  # every outcome is checked below
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, errors


@pytest.mark.parametrize("amount", [1, 3, None])
def test_32_concurrent_refunds_of_one_usage_never_give_back_more_than_it_cost(
    clean_tables: Engine, amount: int | None
) -> None:
    with session_scope(clean_tables) as session:
        customer = make_customer(session, credits=100)
        usage = record_usage(session, customer, 20)
    results, errors = _race(
        clean_tables,
        32,
        lambda session, i: refund_usage(session, usage.event_id, amount, reason=f"r{i}"),
    )
    assert all(isinstance(e, RefundExceedsUsage) for e in errors), errors
    given_back = sum(r.credits for r in results)  # type: ignore[attr-defined]
    expected = {1: 20, 3: 18, None: 20}[amount]
    assert given_back == expected and len(errors) == 32 - len(results)
    with session_scope(clean_tables) as session:
        balance = get_credits(session, customer).balance
        assert balance == 80 + given_back == ledger_balance(session, customer)
        refunded = session.get(UsageRefund, usage.event_id)
        assert refunded is not None and refunded.refunded == given_back
        compensations = session.scalar(
            select(func.coalesce(func.sum(OutboxEvent.credits), 0)).where(
                OutboxEvent.refund_of == usage.event_id
            )
        )
        cancelled = row(session, usage.event_id).status == "cancelled"
        # Whatever the interleaving: the usage is either cancelled (one whole refund) or its
        # compensations add up to what was given back.
        assert (cancelled and compensations == 0 and given_back == 20) or (
            not cancelled and -compensations == given_back
        )


def test_an_operator_debit_takes_credits_back_never_below_zero(db: Session) -> None:
    customer = make_customer(db, credits=10)
    result = debit_credits(db, customer, 4, "duplicate grant")
    assert result.balance == 6 == ledger_balance(db, customer)
    entry = db.get(LedgerEntry, result.grant_id)
    assert entry is not None and (entry.kind, entry.delta, entry.reason) == (
        "debit",
        -4,
        "duplicate grant",
    )
    with pytest.raises(InsufficientCredits):
        debit_credits(db, customer, 7, "more than the balance")
    with pytest.raises(CustomerNotFound):
        debit_credits(db, "nobody_here", 1, "r")
    with pytest.raises(InvalidRequest):
        debit_credits(db, customer, 1, "")
    again = debit_credits(db, customer, 2, "keyed", idempotency_key="k1")
    replayed = debit_credits(db, customer, 2, "keyed", idempotency_key="k1")
    assert replayed.replayed and replayed.grant_id == again.grant_id
    assert get_credits(db, customer).balance == 4 == ledger_balance(db, customer)


def test_status_counts_refunds_and_the_compensations_polar_has_not_accepted(
    db: Session,
) -> None:
    db.execute(OutboxEvent.__table__.delete())  # the stats are over the whole table
    db.execute(UsageRefund.__table__.delete())
    customer = make_customer(db, credits=20)
    billed = record_usage(db, customer, 5)
    cancelled = record_usage(db, customer, 3)
    refund_usage(db, billed.event_id, 2, reason="partial")
    refund_usage(db, cancelled.event_id, reason="whole")
    stats = events.outbox_stats(db)
    assert stats.counts["cancelled"] == 1 and stats.counts["pending"] == 2
    assert stats.credits_undelivered == 5  # the usage; a cancelled row is no money at risk
    assert stats.compensations_undelivered == 2
    assert stats.credits_refunded == 5


def test_refunds_and_debits_on_sqlite_too(sqlite_engine: Engine) -> None:
    """`outbox dev` runs on SQLite: the guarded upsert and the debit's floor hold there too."""
    with session_scope(sqlite_engine) as session:
        customer = make_customer(session, credits=10)
        usage = record_usage(session, customer, 4)
        refund_usage(session, usage.event_id, 3, reason="r")
        with pytest.raises(RefundExceedsUsage):
            refund_usage(session, usage.event_id, 2, reason="r")
        assert debit_credits(session, customer, 9, "r").balance == 0
        with pytest.raises(InsufficientCredits):
            debit_credits(session, customer, 1, "r")
        assert get_credits(session, customer).granted == 1
        assert ledger_balance(session, customer) == 0


def test_the_metrics_count_refunds_and_pending_compensations(clean_tables: Engine) -> None:
    from outbox.ops.collector import OutboxCollector

    with session_scope(clean_tables) as session:
        customer = make_customer(session, credits=10)
        usage = record_usage(session, customer, 4)
        refund_usage(session, usage.event_id, 3, reason="r")
    gauges = {
        family.name: family.samples[0].value
        for family in OutboxCollector(clean_tables).collect()
        if family.samples and not family.samples[0].labels
    }
    assert gauges["outbox_credits_undelivered"] == 4
    assert gauges["outbox_compensations_undelivered"] == 3
    assert gauges["outbox_credits_refunded"] == 3
