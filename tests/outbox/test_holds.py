"""Holds: reserve, capture (bill what was used, return the rest), release, expire."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from outbox.db import session_scope
from outbox.errors import HoldClosed, HoldNotFound, InsufficientCredits, InvalidRequest
from outbox.holds import capture_hold, expire_holds, place_hold, release_hold
from outbox.ledger import get_credits, ledger_balance, record_usage, revoke_credits
from outbox.models import Hold, LedgerEntry, OutboxEvent, utcnow
from tests.factories import make_customer


def test_hold_moves_credits_to_held_and_capture_bills_only_what_was_used(db: Session) -> None:
    customer = make_customer(db, credits=10)
    hold = place_hold(db, customer, 6)
    summary = get_credits(db, customer)
    assert (summary.balance, summary.held) == (4, 6)

    usage = capture_hold(db, hold.hold_id, 4, {"plan_id": "fp_1"})

    summary = get_credits(db, customer)
    assert (summary.balance, summary.held, summary.used) == (6, 0, 4)
    assert ledger_balance(db, customer) == 6
    event = db.get(OutboxEvent, usage.event_id)
    assert event is not None and event.credits == 4 and event.customer_id == customer


def test_capturing_twice_returns_the_first_result_and_bills_once(db: Session) -> None:
    customer = make_customer(db, credits=5)
    hold = place_hold(db, customer, 5)
    first = capture_hold(db, hold.hold_id)
    second = capture_hold(db, hold.hold_id, 1)
    assert (second.event_id, second.external_id) == (first.event_id, first.external_id)
    assert second.replayed
    assert db.scalar(select(func.count()).select_from(OutboxEvent)) == 1
    assert get_credits(db, customer).used == 5


def test_a_hold_needs_credits_and_cannot_capture_more_than_held(db: Session) -> None:
    customer = make_customer(db, credits=3)
    with pytest.raises(InsufficientCredits):
        place_hold(db, customer, 4)
    hold = place_hold(db, customer, 2)
    with pytest.raises(InvalidRequest):
        capture_hold(db, hold.hold_id, 3)
    assert get_credits(db, customer).held == 2


def test_release_returns_everything_and_bills_nothing(db: Session) -> None:
    customer = make_customer(db, credits=8)
    hold = place_hold(db, customer, 8)
    released = release_hold(db, hold.hold_id)
    again = release_hold(db, hold.hold_id)
    assert released.balance == again.balance == 8
    assert db.scalar(select(func.count()).select_from(OutboxEvent)) == 0
    with pytest.raises(HoldClosed):
        capture_hold(db, hold.hold_id)
    assert ledger_balance(db, customer) == 8


def test_a_captured_hold_cannot_be_released(db: Session) -> None:
    customer = make_customer(db, credits=2)
    hold = place_hold(db, customer, 2)
    capture_hold(db, hold.hold_id, 1)
    with pytest.raises(HoldClosed):
        release_hold(db, hold.hold_id)


def test_expired_holds_are_released_by_the_sweeper_and_cannot_be_captured(db: Session) -> None:
    customer = make_customer(db, credits=5)
    hold = place_hold(db, customer, 5)
    assert expire_holds(db, now=utcnow() + timedelta(hours=1)) == 1
    row = db.get(Hold, hold.hold_id)
    assert row is not None and row.status == "expired"
    assert get_credits(db, customer).balance == 5
    with pytest.raises(HoldClosed):
        capture_hold(db, hold.hold_id)


def test_unknown_hold(db: Session) -> None:
    with pytest.raises(HoldNotFound):
        capture_hold(db, 987654321)


# --- a revoke of Polar credits reaches what is held -------------------------------------------


def _books(db: Session, customer: str) -> tuple[int, int, int]:
    """(balance, held, used), after checking that the ledger equals the balance, that `held`
    is what the open holds hold, and that nothing was created: granted = balance+held+used."""
    summary = get_credits(db, customer)
    open_held = db.scalar(
        select(func.coalesce(func.sum(Hold.credits), 0)).where(
            Hold.customer_id == customer, Hold.status == "open"
        )
    )
    assert ledger_balance(db, customer) == summary.balance
    assert summary.held == open_held
    assert summary.granted == summary.balance + summary.held + summary.used
    return summary.balance, summary.held, summary.used


def test_a_revoke_takes_the_balance_first_then_shrinks_the_newest_holds(db: Session) -> None:
    customer = make_customer(db, credits=100)
    older = place_hold(db, customer, 30)
    newer = place_hold(db, customer, 50)
    assert _books(db, customer) == (20, 80, 0)

    result = revoke_credits(db, customer, 90, reason="Polar revoke")

    assert (result.taken, result.from_balance, result.shortfall) == (90, 20, 0)
    assert result.from_holds == {newer.hold_id: 50, older.hold_id: 20}
    assert _books(db, customer) == (0, 10, 0)
    emptied, shrunk = db.get(Hold, newer.hold_id), db.get(Hold, older.hold_id)
    assert emptied is not None and shrunk is not None
    assert (emptied.status, emptied.credits, emptied.revoked_credits) == ("revoked", 0, 50)
    assert (shrunk.status, shrunk.credits, shrunk.revoked_credits) == ("open", 10, 20)
    revoke = db.scalars(select(LedgerEntry).where(LedgerEntry.kind == "revoke")).one()
    assert revoke.delta == -90


@pytest.mark.parametrize("then", ["release", "capture", "capture part", "expire", "spend"])
def test_credits_a_revoke_took_from_a_hold_never_come_back(db: Session, then: str) -> None:
    """The review's case: 100 granted, 100 held, the grant revoked: whatever happens to the
    hold next, the customer cannot spend those credits."""
    customer = make_customer(db, credits=100)
    hold = place_hold(db, customer, 100)
    result = revoke_credits(db, customer, 100)
    assert (result.taken, result.from_holds, result.shortfall) == (100, {hold.hold_id: 100}, 0)
    assert _books(db, customer) == (0, 0, 0)

    if then == "release":
        assert release_hold(db, hold.hold_id).status == "revoked"
    elif then in ("capture", "capture part"):
        with pytest.raises(HoldClosed, match="emptied by a revoke"):
            capture_hold(db, hold.hold_id, None if then == "capture" else 40)
    elif then == "expire":
        assert expire_holds(db, now=utcnow() + timedelta(days=30)) == 0
    else:
        with pytest.raises(InsufficientCredits):
            record_usage(db, customer, 1)

    assert _books(db, customer) == (0, 0, 0)
    assert db.scalar(select(func.count()).select_from(OutboxEvent)) == 0


def test_a_hold_a_revoke_shrank_bills_and_returns_only_what_is_left(db: Session) -> None:
    customer = make_customer(db, credits=100)
    hold = place_hold(db, customer, 100)
    revoke_credits(db, customer, 70)  # 0 from the balance, 70 from the hold
    assert _books(db, customer) == (0, 30, 0)
    with pytest.raises(InsufficientCredits, match="took 70 of hold"):
        capture_hold(db, hold.hold_id, 31)
    with pytest.raises(InvalidRequest):
        capture_hold(db, hold.hold_id, 101)  # more than was ever held
    usage = capture_hold(db, hold.hold_id, 25)
    assert usage.balance == 5
    assert _books(db, customer) == (5, 0, 25)


def test_a_revoke_larger_than_balance_and_holds_records_the_shortfall(db: Session) -> None:
    customer = make_customer(db, credits=10)
    place_hold(db, customer, 4)
    record_usage(db, customer, 3)
    result = revoke_credits(db, customer, 20)
    assert (result.taken, result.from_balance, result.shortfall) == (7, 3, 13)
    assert _books(db, customer) == (0, 0, 3)


def test_revokes_racing_captures_releases_and_spends_never_deadlock_nor_create_credits(
    clean_tables: Engine,
) -> None:
    """Real threads, real PostgreSQL: revokes lock the open holds before the customer, as
    capture, release and the sweeper do, so they wait for each other and never deadlock; and
    whatever the interleaving, the books add up."""
    with session_scope(clean_tables) as session:
        customer = make_customer(session, credits=1000)
        holds = [place_hold(session, customer, 30).hold_id for _ in range(20)]
    work: list[Callable[[Session], object]] = []
    for n, hold_id in enumerate(holds):
        if n % 2:
            work.append(lambda s, h=hold_id: capture_hold(s, h, 10))
        else:
            work.append(lambda s, h=hold_id: release_hold(s, h))
    work += [lambda s: revoke_credits(s, customer, 150) for _ in range(6)]
    work += [lambda s: record_usage(s, customer, 5) for _ in range(6)]
    work += [lambda s: place_hold(s, customer, 20) for _ in range(4)]
    barrier = threading.Barrier(len(work))
    failures: list[str] = []

    def run(task: Callable[[Session], object]) -> None:
        barrier.wait()
        try:
            with session_scope(clean_tables) as session:
                task(session)
        except (HoldClosed, InsufficientCredits):
            pass  # a revoke emptied the hold, or took what the spend needed: fine
        except Exception as exc:
            failures.append(f"{type(exc).__name__}: {exc}"[:300])

    threads = [threading.Thread(target=run, args=(task,)) for task in work]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert failures == []
    with session_scope(clean_tables) as session:
        balance, held, used = _books(session, customer)
        revoked = -sum(
            session.scalars(select(LedgerEntry.delta).where(LedgerEntry.kind == "revoke"))
        )
    assert balance + held + used + revoked == 1000
    # Only what was spent escapes a revoke: a revoke fell short only once nothing was left.
    assert revoked == 6 * 150 or balance + held == 0
