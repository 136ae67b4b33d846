"""Holds: reserve credits before a long generation, then capture (bill) or release them.

A hold moves credits from `balance` to `held` (ledger `hold`, negative). Capture returns the
held credits (ledger `capture`, positive) and records the usage actually consumed (ledger
`usage` + its outbox row) in the same transaction; release returns them (ledger `release`).
Holds not captured within HOLD_TTL_SECONDS are released by the sweeper (`expire_holds`).
Every operation on a hold locks its customer's row first, then the hold: one order for all
(placing, capturing, releasing, sweeping, revoking), so none can deadlock with another, and
while a customer's row is locked no hold of theirs can be placed or closed.
A revoke of Polar credits that the balance cannot cover shrinks open holds
(`take_from_open_holds`): what a hold holds is then less than what was placed, and a hold left
with nothing is closed `revoked` (docs/explanation/webhooks.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, literal, select, true, update
from sqlalchemy.orm import Session

from outbox.errors import (
    HoldClosed,
    HoldNotFound,
    InsufficientCredits,
    InvalidRequest,
)
from outbox.ledger import (
    Spend,
    UsageResult,
    _deduct_if_covered,
    _insert_from,
    _is_postgresql,
    _spend_steps,
    append_ledger_entry,
    enqueue_usage_event,
    refusal,
    refusal_steps,
)
from outbox.models import Base, Customer, Hold, utcnow
from outbox.settings import Settings, get_settings
from outbox.states import HoldStatus, LedgerKind
from outbox.steps import Query, Steps, run_steps
from outbox.validation import Metadata, check_credits, check_customer_id, check_metadata


@dataclass(frozen=True)
class HoldResult:
    hold_id: int
    balance: int
    expires_at: datetime


@dataclass(frozen=True)
class ReleaseResult:
    hold_id: int
    balance: int
    status: str


def place_hold(
    session: Session, customer_id: str, credits: int, *, settings: Settings | None = None
) -> HoldResult:
    """Reserve `credits` (402 if not covered), in the caller's transaction."""
    settings = settings or get_settings()
    customer_id = check_customer_id(customer_id)
    credits = check_credits(credits)
    now = utcnow()
    expires_at = now + timedelta(seconds=settings.hold_ttl_seconds)
    if _is_postgresql(session):
        return run_steps(session, _place_hold_steps(customer_id, credits, now, expires_at))
    balance = session.execute(
        update(Customer)
        .where(Customer.id == customer_id, Customer.balance >= credits)
        .values(balance=Customer.balance - credits, held=Customer.held + credits, updated_at=now)
        .returning(Customer.balance)
    ).scalar_one_or_none()
    if balance is None:
        raise refusal(session, customer_id, credits)
    hold = Hold(
        customer_id=customer_id,
        credits=credits,
        status=HoldStatus.OPEN,
        expires_at=expires_at,
        created_at=now,
    )
    session.add(hold)
    session.flush()
    append_ledger_entry(
        session,
        customer_id=customer_id,
        kind=LedgerKind.HOLD,
        delta=-credits,
        balance_after=int(balance),
        now=now,
        hold_id=hold.id,
    )
    return HoldResult(hold_id=hold.id, balance=int(balance), expires_at=expires_at)


_customers = Base.metadata.tables["customers"]
_holds = Base.metadata.tables["holds"]
_ledger_entries = Base.metadata.tables["ledger_entries"]


def _param(name: str, column: Any) -> Any:
    return bindparam(name, type_=column.type)


def build_place_hold_statement() -> Any:
    """PostgreSQL: a hold placed in ONE statement: the conditional move of `p_credits` from
    the balance to `held` (`balance >= credits` is the guard), the hold, and its ledger entry,
    each inserted FROM the one before (a refused move inserts nothing, and the statement
    returns no row). Parameters: p_customer_id, p_credits, p_now, p_expires_at."""
    c, h, le = _customers.c, _holds.c, _ledger_entries.c
    moved = (
        update(_customers)
        .where(c.id == _param("p_customer_id", c.id), c.balance >= _param("p_credits", c.balance))
        .values(
            balance=c.balance - _param("p_credits", c.balance),
            held=c.held + _param("p_credits", c.held),
            updated_at=_param("p_now", c.updated_at),
        )
        .returning(c.balance)
        .cte("moved")
    )
    hold = _insert_from(
        _holds,
        {
            "customer_id": _param("p_customer_id", h.customer_id),
            "credits": _param("p_credits", h.credits),
            "revoked_credits": literal(0, h.revoked_credits.type),
            "status": literal(HoldStatus.OPEN.value, h.status.type),
            "expires_at": _param("p_expires_at", h.expires_at),
            "created_at": _param("p_now", h.created_at),
        },
        moved,
    ).cte("hold")
    entry = _insert_from(
        _ledger_entries,
        {
            "customer_id": _param("p_customer_id", le.customer_id),
            "kind": literal(LedgerKind.HOLD.value, le.kind.type),
            "delta": -_param("p_credits", le.delta),
            "balance_after": moved.c.balance,
            "hold_id": hold.c.id,
            "created_at": _param("p_now", le.created_at),
        },
        moved.join(hold, true()),
    ).cte("entry")
    return select(moved.c.balance, hold.c.id).select_from(
        moved.join(hold, true()).join(entry, true())
    )


_PLACE_HOLD = build_place_hold_statement()


def _place_hold_steps(
    customer_id: str, credits: int, now: datetime, expires_at: datetime
) -> Steps[HoldResult]:
    """PostgreSQL: `place_hold` in one round trip (`build_place_hold_statement`)."""
    row = yield Query(
        _PLACE_HOLD,
        {
            "p_customer_id": customer_id,
            "p_credits": credits,
            "p_now": now,
            "p_expires_at": expires_at,
        },
    )
    if row is None:
        raise (yield from refusal_steps(customer_id, credits))
    balance, hold_id = row
    return HoldResult(hold_id=int(hold_id), balance=int(balance), expires_at=expires_at)


def build_return_held_statement() -> Any:
    """PostgreSQL: a hold's credits back from `held` to the balance and the ledger entry that
    says so (`p_kind`: capture or release), in ONE statement. Parameters: p_customer_id,
    p_credits, p_now, p_kind, p_hold_id."""
    c, le = _customers.c, _ledger_entries.c
    returned = (
        update(_customers)
        .where(c.id == _param("p_customer_id", c.id))
        .values(
            balance=c.balance + _param("p_credits", c.balance),
            held=c.held - _param("p_credits", c.held),
            updated_at=_param("p_now", c.updated_at),
        )
        .returning(c.balance)
        .cte("returned")
    )
    entry = _insert_from(
        _ledger_entries,
        {
            "customer_id": _param("p_customer_id", le.customer_id),
            "kind": _param("p_kind", le.kind),
            "delta": _param("p_credits", le.delta),
            "balance_after": returned.c.balance,
            "hold_id": _param("p_hold_id", le.hold_id),
            "created_at": _param("p_now", le.created_at),
        },
        returned,
    ).cte("entry")
    return select(returned.c.balance).select_from(returned.join(entry, true()))


_RETURN_HELD = build_return_held_statement()


def _return_held_steps(hold: Hold, kind: LedgerKind, now: datetime) -> Steps[int]:
    row = yield Query(
        _RETURN_HELD,
        {
            "p_customer_id": hold.customer_id,
            "p_credits": hold.credits,
            "p_now": now,
            "p_kind": kind.value,
            "p_hold_id": hold.id,
        },
    )
    assert row is not None  # the customer's row is locked: it exists
    return int(row[0])


def get_hold_for_update(session: Session, hold_id: int) -> Hold:
    """The hold, locked until the transaction ends, its customer's row locked before it (the
    order every hold operation locks in); `HoldNotFound` otherwise."""
    customer_id = session.scalar(select(Hold.customer_id).where(Hold.id == hold_id))
    if customer_id is None:
        raise HoldNotFound(hold_id=hold_id)
    _lock_customer(session, customer_id)
    hold = session.scalars(select(Hold).where(Hold.id == hold_id).with_for_update()).one()
    return hold


def _lock_customer(session: Session, customer_id: str) -> None:
    session.execute(select(Customer.id).where(Customer.id == customer_id).with_for_update())


def _return_held(session: Session, hold: Hold, kind: LedgerKind, now: datetime) -> int:
    if _is_postgresql(session):
        return run_steps(session, _return_held_steps(hold, kind, now))
    balance = session.execute(
        update(Customer)
        .where(Customer.id == hold.customer_id)
        .values(
            balance=Customer.balance + hold.credits,
            held=Customer.held - hold.credits,
            updated_at=now,
        )
        .returning(Customer.balance)
    ).scalar_one()
    append_ledger_entry(
        session,
        customer_id=hold.customer_id,
        kind=kind,
        delta=hold.credits,
        balance_after=int(balance),
        now=now,
        hold_id=hold.id,
    )
    return int(balance)


def capture_hold(
    session: Session,
    hold_id: int,
    credits: int | None = None,
    metadata: Metadata | None = None,
    *,
    settings: Settings | None = None,
) -> UsageResult:
    """Bill `credits` (default: all held, at most the held amount) of an open hold and return
    the rest; capturing twice returns the first result. What a revoke took from the hold
    cannot be billed from it (`InsufficientCredits`; `HoldClosed` once it took everything)."""
    settings = settings or get_settings()
    clean_metadata = check_metadata(metadata, credits_field=settings.usage_credits_field)
    hold = get_hold_for_update(session, hold_id)
    if hold.status == HoldStatus.CAPTURED and hold.capture_response is not None:
        return UsageResult(**hold.capture_response, replayed=True)
    now = utcnow()
    if hold.status == HoldStatus.OPEN and hold.expires_at <= now:
        _close(session, hold, HoldStatus.EXPIRED, now)
    if hold.status == HoldStatus.REVOKED:
        raise HoldClosed(
            f"hold {hold_id} was emptied by a revoke of the customer's Polar credits: nothing "
            "is left to capture",
            hold_id=hold_id,
            status=hold.status,
        )
    if hold.status != HoldStatus.OPEN:
        raise HoldClosed(hold_id=hold_id, status=hold.status)
    amount = hold.credits if credits is None else check_credits(credits)
    placed = hold.credits + hold.revoked_credits
    if amount > placed:
        raise InvalidRequest(f"credits must be at most the held amount ({placed})", field="credits")
    if amount > hold.credits:
        raise InsufficientCredits(
            f"a revoke of the customer's Polar credits took {hold.revoked_credits} of hold "
            f"{hold_id}'s {placed} credits: it holds {hold.credits}; capture at most that",
            customer_id=hold.customer_id,
            credits=amount,
        )
    _return_held(session, hold, LedgerKind.CAPTURE, now)
    if _is_postgresql(session):
        spend = Spend(hold.customer_id, amount, clean_metadata, None, now, settings)
        result = run_steps(session, _spend_steps(spend, hold_id=hold.id))
        event_id, external_id, balance = result.event_id, result.external_id, result.balance
    else:
        balance, event_id, external_id = _spend_of_hold_in_three_statements(
            session, hold, amount, clean_metadata, now, settings
        )
    result = UsageResult(event_id=event_id, external_id=external_id, balance=balance)
    hold.status = HoldStatus.CAPTURED
    hold.captured_credits = amount
    hold.event_id = event_id
    hold.closed_at = now
    hold.capture_response = {
        "event_id": event_id,
        "external_id": external_id,
        "balance": balance,
    }
    session.flush()
    return result


def _spend_of_hold_in_three_statements(
    session: Session,
    hold: Hold,
    amount: int,
    metadata: Metadata,
    now: datetime,
    settings: Settings,
) -> tuple[int, int, str]:
    """SQLite: a capture's usage (deduction, outbox row, ledger entry naming the hold), one
    statement at a time; returns the balance, the event id and its `external_id`."""
    balance = _deduct_if_covered(session, hold.customer_id, amount, now)
    event_id, external_id = enqueue_usage_event(
        session,
        customer_id=hold.customer_id,
        credits=amount,
        metadata=metadata,
        occurred_at=now,
        settings=settings,
    )
    append_ledger_entry(
        session,
        customer_id=hold.customer_id,
        kind=LedgerKind.USAGE,
        delta=-amount,
        balance_after=balance,
        now=now,
        event_id=event_id,
        external_id=external_id,
        hold_id=hold.id,
    )
    return balance, event_id, external_id


class OpenHolds:
    """A customer's open holds, locked (`take_from_open_holds`), to take a revoke's rest from."""

    def __init__(self, session: Session, holds: list[Hold], now: datetime) -> None:
        self.session = session
        self.holds = holds
        self.now = now

    def take(self, credits: int, reason: str) -> dict[int, int]:
        """Take up to `credits` from the holds, newest first, back into the balance (a `release`
        entry each, for the revoke that follows to take); returns hold id -> credits taken.
        The caller holds the customer's row lock."""
        taken: dict[int, int] = {}
        for hold in sorted(self.holds, key=lambda h: h.id, reverse=True):
            if credits <= 0:
                break
            part = min(credits, hold.credits)
            credits -= part
            taken[hold.id] = part
            hold.credits -= part
            hold.revoked_credits += part
            if hold.credits == 0:
                hold.status, hold.closed_at = HoldStatus.REVOKED, self.now
            self.session.flush()
            balance = self.session.execute(
                update(Customer)
                .where(Customer.id == hold.customer_id)
                .values(
                    balance=Customer.balance + part,
                    held=Customer.held - part,
                    updated_at=self.now,
                )
                .returning(Customer.balance)
            ).scalar_one()
            append_ledger_entry(
                self.session,
                customer_id=hold.customer_id,
                kind=LedgerKind.RELEASE,
                delta=part,
                balance_after=int(balance),
                now=self.now,
                hold_id=hold.id,
                reason=f"taken from the hold by a revoke: {reason}",
            )
        return taken


def take_from_open_holds(session: Session, customer_id: str, now: datetime) -> OpenHolds:
    """The customer's open holds, locked, for a revoke to shrink. The caller holds the
    customer's row lock: no hold of theirs can be placed, captured or released meanwhile."""
    holds = session.scalars(
        select(Hold)
        .where(Hold.customer_id == customer_id, Hold.status == HoldStatus.OPEN)
        .order_by(Hold.id)
        .with_for_update()
    ).all()
    return OpenHolds(session, list(holds), now)


def _close(session: Session, hold: Hold, status: HoldStatus, now: datetime) -> int:
    kind = LedgerKind.RELEASE
    balance = _return_held(session, hold, kind, now)
    hold.status = status
    hold.closed_at = now
    session.flush()
    return balance


def release_hold(session: Session, hold_id: int) -> ReleaseResult:
    """Return the held credits (what a revoke left of them); nothing is billed. Releasing
    twice, or a hold a revoke emptied, is harmless."""
    hold = get_hold_for_update(session, hold_id)
    now = utcnow()
    if hold.status == HoldStatus.OPEN:
        balance = _close(session, hold, HoldStatus.RELEASED, now)
        return ReleaseResult(hold_id=hold.id, balance=balance, status=HoldStatus.RELEASED)
    if hold.status in (HoldStatus.RELEASED, HoldStatus.EXPIRED, HoldStatus.REVOKED):
        customer = session.get(Customer, hold.customer_id)
        assert customer is not None
        return ReleaseResult(hold_id=hold.id, balance=customer.balance, status=hold.status)
    raise HoldClosed(f"hold {hold_id} was captured; it cannot be released", hold_id=hold_id)


def expire_holds(session: Session, *, now: datetime | None = None, limit: int = 500) -> int:
    """Release open holds past their expiry (the sweeper); returns how many. Customer by
    customer (in id order), each row locked before its holds."""
    now = now or utcnow()
    due = session.execute(
        select(Hold.customer_id, Hold.id)
        .where(Hold.status == HoldStatus.OPEN, Hold.expires_at <= now)
        .order_by(Hold.expires_at)
        .limit(limit)
    ).all()
    by_customer: dict[str, list[int]] = {}
    for customer_id, hold_id in due:
        by_customer.setdefault(customer_id, []).append(hold_id)
    closed = 0
    for customer_id in sorted(by_customer):
        _lock_customer(session, customer_id)
        holds = session.scalars(
            select(Hold)
            .where(  # still open and due: another transaction may have closed it meanwhile
                Hold.id.in_(by_customer[customer_id]),
                Hold.status == HoldStatus.OPEN,
                Hold.expires_at <= now,
            )
            .order_by(Hold.id)
            .with_for_update()
        ).all()
        for hold in holds:
            _close(session, hold, HoldStatus.EXPIRED, now)
        closed += len(holds)
    return closed
