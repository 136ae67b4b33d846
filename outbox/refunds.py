"""Corrections: refund a usage, whole or in part (docs/explanation/corrections.md).

`refund_usage` runs in the CALLER's transaction and never commits, like `record_usage`. In one
transaction the credits go back to the balance (a `refund` ledger entry pointing at the usage)
and either the usage's row is cancelled (a whole refund of a row Polar cannot hold yet: nothing
reaches Polar) or a compensating event joins the outbox (`credits_used = -n`, its own stable
`external_id`, the usage's `external_id` in its metadata), delivered like any other.

This module is the home of `usage_refunds`: per refunded usage, the credits given back so far.
One conditional upsert moves it, and `CHECK (refunded <= credits)` backs it, so concurrent
refunds of one usage never give back more than it cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, literal, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from outbox import events
from outbox.errors import EventNotFound, InvalidRequest, NotRefundable, RefundExceedsUsage
from outbox.ledger import append_ledger_entry
from outbox.models import Base, Customer, LedgerEntry, utcnow
from outbox.settings import Settings, get_settings
from outbox.states import LedgerKind
from outbox.validation import MAX_ID, MAX_REASON_LENGTH, check_credits, check_text

# The compensating event's metadata key holding the usage's `external_id`.
REFUND_OF_KEY = "refund_of"

CANCELLED = "cancelled"
COMPENSATED = "compensated"

_usage_refunds = Base.metadata.tables["usage_refunds"]


@dataclass(frozen=True)
class RefundResult:
    """A refund: its ledger entry, the usage, the credits given back, the balance after, and
    what happened at the outbox (`cancelled` or `compensated`, with the compensating event)."""

    refund_id: int
    event_id: int
    credits: int
    balance: int
    action: str
    compensation_event_id: int | None = None
    compensation_external_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """What POST /v1/usage/{event_id}/refunds and `outbox refund --json` answer."""
        return {
            "refund_id": self.refund_id,
            "event_id": self.event_id,
            "credits": self.credits,
            "balance": self.balance,
            "action": self.action,
            "compensation_event_id": self.compensation_event_id,
            "compensation_external_id": self.compensation_external_id,
        }


def check_event_id(event_id: object) -> int:
    """An outbox event id: an integer from 1 to 2**63 - 1."""
    if isinstance(event_id, bool) or not isinstance(event_id, int) or not 1 <= event_id <= MAX_ID:
        raise InvalidRequest(f"event_id must be an integer from 1 to {MAX_ID}", field="event_id")
    return event_id


def _usage_entry(session: Session, event_id: int) -> LedgerEntry:
    """The usage's ledger entry (kept when `outbox prune` deletes its row); `NotRefundable`
    for a compensating event, `EventNotFound` otherwise."""
    entries = session.scalars(
        select(LedgerEntry).where(
            LedgerEntry.event_id == event_id,
            LedgerEntry.kind.in_([LedgerKind.USAGE, LedgerKind.REFUND]),
        )
    ).all()
    for entry in entries:
        if entry.kind == LedgerKind.USAGE:
            return entry
    if entries:
        raise NotRefundable(f"event {event_id} is a refund; only a usage can be refunded")
    raise EventNotFound(f"no such usage event: {event_id}")


def _refunded_so_far(session: Session, event_id: int) -> int:
    refunded = session.scalar(
        select(_usage_refunds.c.refunded).where(_usage_refunds.c.event_id == event_id)
    )
    return int(refunded or 0)


def build_add_refunded_statement(*, guarded: bool = True) -> Any:
    """The guard: add `p_credits` to the usage's refunded total only while it stays within the
    usage's credits (the WHERE clauses: a first refund too, then every later one), in ONE
    statement; a concurrent refund of the same usage waits for the row and re-checks. Returns
    the new total, or no row when refused. `guarded=False` exists for the test that shows
    the database's CHECK (refunded <= credits) refusing on its own. PostgreSQL and SQLite."""
    r = _usage_refunds.c
    values = {
        "event_id": bindparam("p_event_id", type_=r.event_id.type),
        "customer_id": bindparam("p_customer_id", type_=r.customer_id.type),
        "credits": bindparam("p_usage_credits", type_=r.credits.type),
        "refunded": bindparam("p_credits", type_=r.refunded.type),
        "created_at": bindparam("p_now", type_=r.created_at.type),
        "updated_at": bindparam("p_now", type_=r.updated_at.type),
    }
    source = select(*values.values())
    if guarded:
        source = source.where(values["refunded"] <= values["credits"])
    else:
        source = source.where(literal(True))  # SQLite's upsert wants a WHERE on its SELECT
    statements = []
    for dialect_insert in (postgresql.insert, sqlite.insert):
        stmt = dialect_insert(_usage_refunds).from_select(list(values), source)
        refunded = _usage_refunds.c.refunded + stmt.excluded.refunded
        statements.append(
            stmt.on_conflict_do_update(
                index_elements=["event_id"],
                set_={"refunded": refunded, "updated_at": stmt.excluded.updated_at},
                where=(refunded <= _usage_refunds.c.credits) if guarded else None,
            ).returning(_usage_refunds.c.refunded)
        )
    return tuple(statements)


_ADD_REFUNDED = build_add_refunded_statement()


def add_refunded_if_within_usage(
    session: Session,
    *,
    event_id: int,
    customer_id: str,
    usage_credits: int,
    credits: int,
    statements: Any = _ADD_REFUNDED,
) -> int | None:
    """The usage's refunded total after adding `credits`, or None if that would pass its
    credits (nothing changed)."""
    pg, lite = statements
    stmt = pg if session.get_bind().dialect.name == "postgresql" else lite
    refunded = session.execute(
        stmt,
        {
            "p_event_id": event_id,
            "p_customer_id": customer_id,
            "p_usage_credits": usage_credits,
            "p_credits": credits,
            "p_now": utcnow(),
        },
    ).scalar_one_or_none()
    return None if refunded is None else int(refunded)


def refund_usage(
    session: Session,
    event_id: int,
    credits: int | None = None,
    *,
    reason: str,
    settings: Settings | None = None,
) -> RefundResult:
    """Give back `credits` (default: all not yet refunded) of a usage, in the caller's
    transaction (no commit).

    A whole refund of a row Polar cannot hold (pending or failed, and no send of it ended
    without a refusal from Polar) cancels it; anything else enqueues a compensating event. Raises
    `InvalidRequest` (bad input), `EventNotFound`, `NotRefundable` (a compensating event) and
    `RefundExceedsUsage` (more than is left of the usage, a concurrent refund included).
    """
    settings = settings or get_settings()
    event_id = check_event_id(event_id)
    clean_reason = check_text(reason, field="reason", max_length=MAX_REASON_LENGTH, required=True)
    if credits is not None:
        credits = check_credits(credits)
    usage = _usage_entry(session, event_id)
    usage_credits = -usage.delta
    if credits is None:
        credits = usage_credits - _refunded_so_far(session, event_id)
        if credits <= 0:
            raise RefundExceedsUsage(f"usage {event_id} is already refunded in full")
    refunded = add_refunded_if_within_usage(
        session,
        event_id=event_id,
        customer_id=usage.customer_id,
        usage_credits=usage_credits,
        credits=credits,
    )
    if refunded is None:
        left = usage_credits - _refunded_so_far(session, event_id)
        raise RefundExceedsUsage(
            f"usage {event_id} cost {usage_credits} credits and {left} are left to refund; "
            f"{credits} asked",
            field="credits",
        )
    now = utcnow()
    whole = refunded == credits == usage_credits
    compensation: tuple[int, str] | None = None
    if not (
        whole
        and events.cancel_if_unsent(
            session, event_id, now=now, note=f"cancelled: refunded whole ({clean_reason})"
        )
    ):
        compensation = events.enqueue_compensation(
            session,
            usage_event_id=event_id,
            customer_id=usage.customer_id,
            credits=credits,
            metadata={REFUND_OF_KEY: usage.external_id or ""},
            default_name=settings.usage_event_name,
            now=now,
        )
    balance = session.execute(
        update(Customer)
        .where(Customer.id == usage.customer_id)
        .values(balance=Customer.balance + credits, used=Customer.used - credits, updated_at=now)
        .returning(Customer.balance)
    ).scalar_one()
    refund_id = append_ledger_entry(
        session,
        customer_id=usage.customer_id,
        kind=LedgerKind.REFUND,
        delta=credits,
        balance_after=int(balance),
        now=now,
        event_id=compensation[0] if compensation else None,
        external_id=compensation[1] if compensation else None,
        reason=clean_reason,
        refund_of=event_id,
    )
    return RefundResult(
        refund_id=refund_id,
        event_id=event_id,
        credits=credits,
        balance=int(balance),
        action=COMPENSATED if compensation else CANCELLED,
        compensation_event_id=compensation[0] if compensation else None,
        compensation_external_id=compensation[1] if compensation else None,
    )


def refund_by(
    session: Session,
    event_id: int,
    credits: int | None = None,
    *,
    reason: str,
    actor: str,
    settings: Settings | None = None,
) -> RefundResult:
    """`refund_usage` recorded in the audit log (who, why, the usage, the credits, cancelled or
    compensated) with the refund, in the same transaction: by an operator (console, CLI, admin
    API) or by the application's usage token (docs/explanation/corrections.md)."""
    from outbox import audit

    result = refund_usage(session, event_id, credits, reason=reason, settings=settings)
    audit.record(
        session,
        actor=actor,
        action=audit.REFUND,
        reason=reason,
        detail={
            "event_id": result.event_id,
            "credits": result.credits,
            "action": result.action,
            "compensation_event_id": result.compensation_event_id,
            "balance": result.balance,
        },
    )
    return result


@dataclass(frozen=True)
class UsageRefunds:
    """What a usage has had back: its credits, those refunded so far, and its refund entries
    (each pointing at its compensating event, if any)."""

    usage_credits: int
    refunded: int
    entries: list[LedgerEntry]

    @property
    def refundable(self) -> int:
        return self.usage_credits - self.refunded


def usage_refunds(session: Session, event_id: int) -> UsageRefunds | None:
    """The usage's refunds so far; None if `event_id` is no usage (a compensating event, or
    no ledger entry)."""
    usage = session.scalar(
        select(LedgerEntry).where(
            LedgerEntry.event_id == event_id, LedgerEntry.kind == LedgerKind.USAGE
        )
    )
    if usage is None:
        return None
    entries = session.scalars(
        select(LedgerEntry)
        .where(LedgerEntry.customer_id == usage.customer_id, LedgerEntry.refund_of == event_id)
        .order_by(LedgerEntry.id)
    ).all()
    return UsageRefunds(
        usage_credits=-usage.delta,
        refunded=_refunded_so_far(session, event_id),
        entries=list(entries),
    )
