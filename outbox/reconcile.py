"""Reconcile the ledger with what Polar holds.

For a time range (default: since 24 h ago, until 5 minutes ago — Polar lists new events late),
every usage in our ledger is looked up in Polar's event list by the `usage_id` we put in its
metadata (Polar's list does not return `external_id`). Reported per customer:
- missing: in our ledger, delivered (or failed), absent at Polar — money not billed;
- in_flight: not yet delivered (pending/inflight): not a difference, just not there yet;
- unknown: at Polar under our event name, with no matching usage in our ledger;
- mismatched: both sides have it, with different credits.
`fix=True` re-queues the missing ones that were delivered (or pruned) with their original
`external_id`: if Polar did have them after all, dedup makes the resend free.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from outbox.models import LedgerEntry, OutboxEvent, utcnow
from outbox.settings import Settings
from outbox.states import EventStatus, LedgerKind
from outbox.validation import check_customer_id

DEFAULT_LOOKBACK = timedelta(hours=24)
DEFAULT_SETTLE_MARGIN = timedelta(minutes=5)
# Polar's timestamp filters are strict; ask for a slightly wider window and match by id.
QUERY_SLACK = timedelta(seconds=1)


class EventLister(Protocol):
    def list_events(
        self,
        *,
        external_customer_id: str | None,
        name: str,
        start: datetime | None,
        end: datetime | None,
        metadata: dict[str, str] | None = None,
    ) -> Iterator[dict[str, Any]]: ...


@dataclass
class CustomerReconciliation:
    customer_id: str
    ledger_credits: int = 0
    polar_credits: int = 0
    missing: list[int] = field(default_factory=list)
    in_flight: list[int] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    mismatched: list[dict[str, Any]] = field(default_factory=list)

    @property
    def differs(self) -> bool:
        return bool(self.missing or self.unknown or self.mismatched)


@dataclass
class ReconcileReport:
    since: datetime
    until: datetime
    customers: list[CustomerReconciliation]
    requeued: list[int] = field(default_factory=list)
    recreated: list[int] = field(default_factory=list)

    @property
    def differs(self) -> bool:
        return any(c.differs for c in self.customers)

    def as_dict(self) -> dict[str, Any]:
        return {
            "since": self.since.isoformat(),
            "until": self.until.isoformat(),
            "differs": self.differs,
            "totals": {
                "ledger_credits": sum(c.ledger_credits for c in self.customers),
                "polar_credits": sum(c.polar_credits for c in self.customers),
                "missing": sum(len(c.missing) for c in self.customers),
                "in_flight": sum(len(c.in_flight) for c in self.customers),
                "unknown": sum(len(c.unknown) for c in self.customers),
                "mismatched": sum(len(c.mismatched) for c in self.customers),
            },
            "customers": [
                {
                    "customer_id": c.customer_id,
                    "ledger_credits": c.ledger_credits,
                    "polar_credits": c.polar_credits,
                    "missing": c.missing,
                    "in_flight": c.in_flight,
                    "unknown": c.unknown,
                    "mismatched": c.mismatched,
                }
                for c in self.customers
            ],
            "requeued": self.requeued,
            "recreated": self.recreated,
        }


@dataclass(frozen=True)
class _Usage:
    event_id: int
    customer_id: str
    credits: int
    external_id: str | None
    created_at: datetime
    status: str | None  # None: the outbox row was pruned (it had been delivered)


def _ledger_usage(
    session: Session, customer_id: str | None, since: datetime, until: datetime
) -> list[_Usage]:
    query = (
        select(
            LedgerEntry.event_id,
            LedgerEntry.customer_id,
            LedgerEntry.delta,
            LedgerEntry.external_id,
            LedgerEntry.created_at,
            OutboxEvent.status,
        )
        .outerjoin(OutboxEvent, OutboxEvent.id == LedgerEntry.event_id)
        .where(
            LedgerEntry.kind == LedgerKind.USAGE,
            LedgerEntry.created_at >= since,
            LedgerEntry.created_at < until,
        )
        .order_by(LedgerEntry.id)
    )
    if customer_id is not None:
        query = query.where(LedgerEntry.customer_id == customer_id)
    return [
        _Usage(
            event_id=int(row.event_id),
            customer_id=row.customer_id,
            credits=-int(row.delta),
            external_id=row.external_id,
            created_at=row.created_at,
            status=row.status,
        )
        for row in session.execute(query)
    ]


def _credits_of(event: dict[str, Any], credits_field: str) -> int | None:
    value = (event.get("metadata") or {}).get(credits_field)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None  # a sum meter does not count it
    return int(value)


def reconcile(
    session: Session,
    polar: EventLister,
    settings: Settings,
    *,
    customer_id: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    fix: bool = False,
    now: datetime | None = None,
) -> ReconcileReport:
    """Compare ledger usage with Polar's events in [since, until); optionally re-queue what
    Polar lacks. Spends the shared rate budget (one request per page of 100 events)."""
    now = now or utcnow()
    until = min(until or now - DEFAULT_SETTLE_MARGIN, now)
    since = since or until - DEFAULT_LOOKBACK
    if customer_id is not None:
        customer_id = check_customer_id(customer_id)
    ours = _ledger_usage(session, customer_id, since, until)
    by_usage_id = {str(u.event_id): u for u in ours}
    per_customer: dict[str, CustomerReconciliation] = {}

    def entry(cid: str) -> CustomerReconciliation:
        return per_customer.setdefault(cid, CustomerReconciliation(customer_id=cid))

    for usage in ours:
        entry(usage.customer_id).ledger_credits += usage.credits
    seen: dict[str, int] = {}
    for event in polar.list_events(
        external_customer_id=customer_id,
        name=settings.usage_event_name,
        start=since - QUERY_SLACK,
        end=until + QUERY_SLACK,
    ):
        usage_id = str((event.get("metadata") or {}).get("usage_id", ""))
        cid = str(event.get("external_customer_id") or "")
        credits = _credits_of(event, settings.usage_credits_field)
        match = by_usage_id.get(usage_id)
        if match is None:
            timestamp = event.get("timestamp")
            if isinstance(timestamp, datetime) and not since <= timestamp < until:
                continue  # outside the window: only the slack brought it in
            entry(cid).unknown.append(usage_id or "<no usage_id>")
            entry(cid).polar_credits += credits or 0
            continue
        if usage_id in seen:
            continue  # listed twice (pagination shift): count once
        seen[usage_id] = credits or 0
        entry(match.customer_id).polar_credits += credits or 0
        if credits != match.credits:
            entry(match.customer_id).mismatched.append(
                {"event_id": match.event_id, "ledger": match.credits, "polar": credits}
            )
    requeue: list[_Usage] = []
    for usage in ours:
        if str(usage.event_id) in seen:
            continue
        if usage.status in (EventStatus.PENDING, EventStatus.INFLIGHT):
            entry(usage.customer_id).in_flight.append(usage.event_id)
            continue
        entry(usage.customer_id).missing.append(usage.event_id)
        if usage.status in (EventStatus.DELIVERED, None):
            requeue.append(usage)
    report = ReconcileReport(
        since=since,
        until=until,
        customers=sorted(per_customer.values(), key=lambda c: c.customer_id),
    )
    if fix and requeue:
        report.requeued, report.recreated = _requeue(session, requeue, settings, now)
    return report


def _requeue(
    session: Session, missing: Sequence[_Usage], settings: Settings, now: datetime
) -> tuple[list[int], list[int]]:
    """Delivered-but-missing → pending (same external_id); pruned ones are re-created."""
    existing = [u.event_id for u in missing if u.status is not None]
    if existing:
        session.execute(
            update(OutboxEvent)
            .where(OutboxEvent.id.in_(existing), OutboxEvent.status == EventStatus.DELIVERED)
            .values(
                status=EventStatus.PENDING,
                delivered_at=None,
                next_attempt_at=now,
                attempts=0,
                last_error="re-queued by reconcile: Polar did not list it",
                updated_at=now,
            )
            .execution_options(synchronize_session=False)
        )
    recreated = []
    for usage in missing:
        if usage.status is None and usage.external_id:
            session.add(
                OutboxEvent(
                    id=usage.event_id,
                    external_id=usage.external_id,
                    customer_id=usage.customer_id,
                    name=settings.usage_event_name,
                    credits=usage.credits,
                    event_metadata={},
                    occurred_at=usage.created_at,
                    status=EventStatus.PENDING,
                    attempts=0,
                    next_attempt_at=now,
                    last_error="re-created by reconcile: Polar did not list it",
                    created_at=now,
                    updated_at=now,
                )
            )
            recreated.append(usage.event_id)
    session.flush()
    return existing, recreated
