"""Holds: reserve, capture (bill what was used, return the rest), release, expire."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from outbox.errors import HoldClosed, HoldNotFound, InsufficientCredits, InvalidRequest
from outbox.holds import capture_hold, expire_holds, place_hold, release_hold
from outbox.ledger import get_credits, ledger_balance
from outbox.models import Hold, OutboxEvent, utcnow
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
