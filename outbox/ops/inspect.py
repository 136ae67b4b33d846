"""What an operator reads about one event or one customer: the same answer for the console,
`outbox events show`, `outbox customers show` and the admin API (docs/howto/console.md).
Every read is bounded and uses an index."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from outbox import attempts
from outbox.errors import EventNotFound
from outbox.ledger import CreditSummary, get_credits
from outbox.models import Customer, Hold, LedgerEntry, OutboxEvent, PolarGrantCycle
from outbox.pagination import check_limit, decode_cursor, encode_cursor
from outbox.refunds import UsageRefunds, usage_refunds
from outbox.settings import Settings
from outbox.validation import check_customer_id


def sent_payload(event: OutboxEvent, settings: Settings) -> dict[str, Any]:
    """The event as it is (or was) sent to Polar."""
    from outbox.polar.gateway import build_event

    return build_event(
        name=event.name,
        customer_id=event.customer_id,
        external_id=event.external_id,
        occurred_at=event.occurred_at,
        metadata=event.event_metadata or {},
        credits_field=settings.usage_credits_field,
        credits=event.credits,
        usage_id=str(event.id),
    )


@dataclass(frozen=True)
class EventDetail:
    """One outbox row: its state, what is sent to Polar, and its whole history."""

    event: OutboxEvent
    payload: dict[str, Any]
    history: list[attempts.HistoryStep]
    # A usage's refunds so far (None for a compensating event): shown in the console.
    refunds: UsageRefunds | None = None

    def as_dict(self) -> dict[str, Any]:
        e = self.event
        return {
            "event_id": e.id,
            "external_id": e.external_id,
            "customer_id": e.customer_id,
            "credits": e.credits,
            "status": e.status,
            "attempts": e.attempts,
            "next_attempt_at": e.next_attempt_at.isoformat(),
            "lease_owner": e.lease_owner,
            "last_error": e.last_error,
            "last_replay_id": e.last_replay_id,
            "created_at": e.created_at.isoformat(),
            "delivered_at": e.delivered_at.isoformat() if e.delivered_at else None,
            "sent": self.payload,
            "history": [step.as_dict() for step in self.history],
        }


def event_detail(session: Session, event_id: int, settings: Settings) -> EventDetail:
    """The event, its payload to Polar and its history; `EventNotFound` if there is none."""
    event = session.get(OutboxEvent, event_id)
    if event is None:
        raise EventNotFound(f"no such event: {event_id}", ids=[event_id])
    return EventDetail(
        event=event,
        payload=sent_payload(event, settings),
        history=attempts.history_of(session, event_id),
        refunds=None if event.refund_of is not None else usage_refunds(session, event_id),
    )


@dataclass(frozen=True)
class CustomerDetail:
    """One customer: credits, a page of its ledger, its holds, usage events and Polar grants."""

    credits: CreditSummary
    ledger: Sequence[LedgerEntry]
    ledger_next: str | None
    holds: Sequence[Hold]
    events: Sequence[OutboxEvent]
    grants: Sequence[PolarGrantCycle]

    def as_dict(self) -> dict[str, Any]:
        c = self.credits
        return {
            "customer_id": c.customer_id,
            "balance": c.balance,
            "held": c.held,
            "granted": c.granted,
            "used": c.used,
            "ledger": [
                {
                    "id": e.id,
                    "kind": e.kind,
                    "delta": e.delta,
                    "balance_after": e.balance_after,
                    "event_id": e.event_id,
                    "hold_id": e.hold_id,
                    "reason": e.reason,
                    "created_at": e.created_at.isoformat(),
                }
                for e in self.ledger
            ],
            "ledger_next_cursor": self.ledger_next,
            "holds": [
                {
                    "id": h.id,
                    "credits": h.credits,
                    "status": h.status,
                    "captured_credits": h.captured_credits,
                    "expires_at": h.expires_at.isoformat(),
                    "created_at": h.created_at.isoformat(),
                }
                for h in self.holds
            ],
            "usage_events": [
                {
                    "event_id": e.id,
                    "credits": e.credits,
                    "status": e.status,
                    "last_error": e.last_error,
                    "created_at": e.created_at.isoformat(),
                }
                for e in self.events
            ],
            "polar_grants": [
                {
                    "grant_id": g.grant_id,
                    "cycle": g.cycle,
                    "state": g.state,
                    "units": g.units,
                    "updated_at": g.updated_at.isoformat(),
                }
                for g in self.grants
            ],
        }


def customer_detail(
    session: Session, customer_id: str, *, ledger_cursor: str | None = None, limit: int = 50
) -> CustomerDetail:
    """A customer's page (newest first, `limit` rows of each); `CustomerNotFound`."""
    credits = get_credits(session, customer_id)
    limit = check_limit(limit)
    after = decode_cursor(ledger_cursor)
    ledger_query = (
        select(LedgerEntry)
        .where(LedgerEntry.customer_id == credits.customer_id)
        .order_by(LedgerEntry.id.desc())
        .limit(limit + 1)
    )
    if after is not None:
        ledger_query = ledger_query.where(LedgerEntry.id < after)
    ledger = list(session.scalars(ledger_query))
    ledger_next = encode_cursor(ledger[limit - 1].id) if len(ledger) > limit else None
    holds = session.scalars(
        select(Hold)
        .where(Hold.customer_id == credits.customer_id)
        .order_by(Hold.id.desc())
        .limit(limit)
    ).all()
    events = session.scalars(
        select(OutboxEvent)
        .where(OutboxEvent.customer_id == credits.customer_id)
        .order_by(OutboxEvent.id.desc())
        .limit(limit)
    ).all()
    grants = session.scalars(
        select(PolarGrantCycle)
        .where(PolarGrantCycle.customer_id == credits.customer_id)
        .order_by(PolarGrantCycle.id.desc())
        .limit(limit)
    ).all()
    return CustomerDetail(
        credits=credits,
        ledger=ledger[:limit],
        ledger_next=ledger_next,
        holds=holds,
        events=events,
        grants=grants,
    )


def find_customers(session: Session, query: str, *, limit: int = 50) -> list[str]:
    """Customer ids equal to or starting with `query` (in id order, at most `limit`)."""
    query = check_customer_id(query)
    found = session.scalars(
        select(Customer.id).where(Customer.id >= query).order_by(Customer.id).limit(limit)
    ).all()
    return [c for c in found if c.startswith(query)]
