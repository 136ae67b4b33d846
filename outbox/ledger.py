"""The credit ledger and the transactional enqueue.

`record_usage` and `grant_credits` are the public library API: they run in the CALLER's session
and never commit, so an application can deduct credits and record the usage event in the same
transaction as its own rows (the point of a transactional outbox). If the caller's transaction
rolls back, nothing happened: no deduction, no ledger entry, no outbox row.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, exists, func, insert, literal, select, true, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from outbox.errors import CustomerNotFound, IdempotencyConflict, InsufficientCredits
from outbox.models import Base, Customer, LedgerEntry, OutboxEvent, utcnow
from outbox.settings import Settings, get_settings
from outbox.states import EventStatus, LedgerKind
from outbox.steps import Query, Steps, run_steps
from outbox.validation import (
    MAX_GRANT_CREDITS,
    MAX_REASON_LENGTH,
    Metadata,
    check_credits,
    check_customer_id,
    check_idempotency_key,
    check_metadata,
    check_text,
)


@dataclass(frozen=True)
class UsageResult:
    """A recorded usage: its outbox event, the id Polar dedups on, the balance left."""

    event_id: int
    external_id: str
    balance: int
    replayed: bool = False


@dataclass(frozen=True)
class GrantResult:
    """A grant: its ledger entry id and the balance after it."""

    grant_id: int
    balance: int
    replayed: bool = False


def new_external_id() -> str:
    """A fresh, globally unique `external_id`, minted once when the outbox row is written."""
    return f"usage_{uuid.uuid4().hex}"


def _is_postgresql(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def get_customer_for_update(session: Session, customer_id: str) -> Customer | None:
    """The customer row, locked until the transaction ends (serializes spends per customer)."""
    return session.scalars(
        select(Customer).where(Customer.id == customer_id).with_for_update()
    ).one_or_none()


# The hot path's statements, built once: Core statements on the tables (not the ORM entities)
# skip the ORM's per-call statement construction and bulk-persistence machinery, and reuse one
# compiled form. On PostgreSQL the three writes of a spend are one statement (`_SPEND`); SQLite
# runs them one by one. Measured in bench/enqueue.py (docs/benchmarks.md).
_customers = Base.metadata.tables["customers"]
_outbox_events = Base.metadata.tables["outbox_events"]
_ledger_entries = Base.metadata.tables["ledger_entries"]


def build_deduct_statement(*, guarded: bool = True) -> Any:
    """The conditional deduction: `balance >= credits` in the WHERE clause is the guard (no
    read-then-write race); `guarded=False` exists for the test that shows the database's
    CHECK (balance >= 0) refusing an overdraft on its own."""
    c = _customers.c
    stmt = update(_customers).where(c.id == bindparam("p_customer_id"))
    if guarded:
        stmt = stmt.where(c.balance >= bindparam("p_credits"))
    return stmt.values(
        balance=c.balance - bindparam("p_credits"),
        used=c.used + bindparam("p_credits"),
        updated_at=bindparam("p_now", type_=c.updated_at.type),
    ).returning(c.balance)


_DEDUCT = build_deduct_statement()
_INSERT_EVENT = insert(_outbox_events).returning(_outbox_events.c.id)
_INSERT_ENTRY = insert(_ledger_entries).returning(_ledger_entries.c.id)


def _insert_from(table: Any, values: dict[str, Any], source: Any) -> Any:
    """INSERT INTO table (the keys) SELECT (the values) FROM source ... RETURNING id."""
    return (
        insert(table)
        .from_select(list(values), select(*values.values()).select_from(source))
        .returning(table.c.id)
    )


def build_spend_statement(deduct: Any, *, of_hold: bool = False) -> Any:
    """PostgreSQL: the conditional deduction, the outbox row and the ledger entry in ONE
    statement (data-modifying CTEs), one round trip instead of three. The event and the entry
    are inserted FROM the deduction's RETURNING, so a refused deduction inserts nothing and
    the statement returns no row. Parameters: as `_DEDUCT`, plus p_external_id, p_name,
    p_metadata and p_idempotency_key (and p_hold_id, `of_hold`: a capture's usage)."""
    e, le = _outbox_events.c, _ledger_entries.c

    def param(name: str, column: Any) -> Any:
        return bindparam(name, type_=column.type)

    deducted = deduct.cte("deducted")
    event = _insert_from(
        _outbox_events,
        {
            "external_id": param("p_external_id", e.external_id),
            "customer_id": param("p_customer_id", e.customer_id),
            "name": param("p_name", e.name),
            "credits": param("p_credits", e.credits),
            "metadata": param("p_metadata", e.metadata),
            "occurred_at": param("p_now", e.occurred_at),
            "status": literal(EventStatus.PENDING.value, e.status.type),
            "attempts": literal(0, e.attempts.type),
            "next_attempt_at": param("p_now", e.next_attempt_at),
            "created_at": param("p_now", e.created_at),
            "updated_at": param("p_now", e.updated_at),
        },
        deducted,
    ).cte("event")
    entry = _insert_from(
        _ledger_entries,
        {
            "customer_id": param("p_customer_id", le.customer_id),
            "kind": literal(LedgerKind.USAGE.value, le.kind.type),
            "delta": -param("p_credits", le.delta),
            "balance_after": deducted.c.balance,
            "event_id": event.c.id,
            "external_id": param("p_external_id", le.external_id),
            "idempotency_key": param("p_idempotency_key", le.idempotency_key),
            "created_at": param("p_now", le.created_at),
        }
        | ({"hold_id": param("p_hold_id", le.hold_id)} if of_hold else {}),
        deducted.join(event, true()),
    ).cte("entry")
    return select(deducted.c.balance, event.c.id).select_from(
        deducted.join(event, true()).join(entry, true())
    )


_SPEND = build_spend_statement(_DEDUCT)
_SPEND_OF_HOLD = build_spend_statement(_DEDUCT, of_hold=True)


def _deduct_if_covered(session: Session, customer_id: str, credits: int, now: datetime) -> int:
    """Deduct `credits` only if the balance covers them, in ONE conditional UPDATE (no
    read-then-write race); return the new balance. The CHECK (balance >= 0) backs it up."""
    balance = session.execute(
        _DEDUCT, {"p_customer_id": customer_id, "p_credits": credits, "p_now": now}
    ).scalar_one_or_none()
    if balance is not None:
        return int(balance)
    raise refusal(session, customer_id, credits)


_CUSTOMER_EXISTS = select(exists().where(_customers.c.id == bindparam("p_customer_id")))


def refusal(
    session: Session, customer_id: str, credits: int
) -> InsufficientCredits | CustomerNotFound:
    """Why a conditional deduction matched no row: the customer lacks credits, or is unknown."""
    return run_steps(session, refusal_steps(customer_id, credits))


def refusal_steps(customer_id: str, credits: int) -> Steps[InsufficientCredits | CustomerNotFound]:
    """`refusal`, as steps (`outbox.steps`)."""
    row = yield Query(_CUSTOMER_EXISTS, {"p_customer_id": customer_id})
    if row is not None and row[0]:
        return InsufficientCredits(customer_id=customer_id, credits=credits)
    return CustomerNotFound(customer_id=customer_id)


def _entry_by_key(
    session: Session, customer_id: str, kind: LedgerKind, idempotency_key: str, credits: int
) -> LedgerEntry | None:
    """The customer's earlier entry of `kind` with this key; raises `IdempotencyConflict` if
    that entry was for another amount."""
    entry = session.scalars(
        select(LedgerEntry).where(
            LedgerEntry.customer_id == customer_id,
            LedgerEntry.kind == kind,
            LedgerEntry.idempotency_key == idempotency_key,
        )
    ).one_or_none()
    if entry is None:
        return None
    if abs(entry.delta) != credits:
        raise IdempotencyConflict(idempotency_key=idempotency_key)
    return entry


def _existing_usage(
    session: Session, customer_id: str, credits: int, metadata: Metadata, idempotency_key: str
) -> UsageResult | None:
    """The first usage with this key, if any. Another amount is a conflict, and so is other
    metadata while the first event is still in the outbox (`outbox prune` deletes delivered
    events past the retention; after that only the amount can be compared)."""
    entry = _entry_by_key(session, customer_id, LedgerKind.USAGE, idempotency_key, credits)
    if entry is None:
        return None
    assert entry.event_id is not None
    first_metadata = session.scalar(
        select(OutboxEvent.event_metadata).where(OutboxEvent.id == entry.event_id)
    )
    if first_metadata is not None and first_metadata != metadata:
        raise IdempotencyConflict(idempotency_key=idempotency_key)
    # The first result, as the HTTP path replays it: the balance right after that usage.
    return UsageResult(
        event_id=entry.event_id,
        external_id=entry.external_id or "",
        balance=entry.balance_after,
        replayed=True,
    )


def enqueue_usage_event(
    session: Session,
    *,
    customer_id: str,
    credits: int,
    metadata: Metadata,
    occurred_at: datetime,
    settings: Settings,
) -> tuple[int, str]:
    """Write the outbox row for a usage (no deduction: the caller has done it); return its id
    and `external_id`."""
    external_id = new_external_id()
    event_id = session.execute(
        _INSERT_EVENT,
        {
            "external_id": external_id,
            "customer_id": customer_id,
            "name": settings.usage_event_name,
            "credits": credits,
            "metadata": metadata,
            "occurred_at": occurred_at,
            "status": EventStatus.PENDING,
            "attempts": 0,
            "next_attempt_at": occurred_at,
            "created_at": occurred_at,
            "updated_at": occurred_at,
        },
    ).scalar_one()
    return int(event_id), external_id


def append_ledger_entry(
    session: Session,
    *,
    customer_id: str,
    kind: LedgerKind,
    delta: int,
    balance_after: int,
    now: datetime,
    event_id: int | None = None,
    external_id: str | None = None,
    hold_id: int | None = None,
    reason: str | None = None,
    idempotency_key: str | None = None,
    refund_of: int | None = None,
) -> int:
    """Append one ledger entry (the ledger is append-only, in the database too)."""
    entry_id = session.execute(
        _INSERT_ENTRY,
        {
            "customer_id": customer_id,
            "kind": kind,
            "delta": delta,
            "balance_after": balance_after,
            "event_id": event_id,
            "external_id": external_id,
            "hold_id": hold_id,
            "reason": reason,
            "idempotency_key": idempotency_key,
            "refund_of": refund_of,
            "created_at": now,
        },
    ).scalar_one()
    return int(entry_id)


def record_usage(
    session: Session,
    customer_id: str,
    credits: int = 1,
    metadata: Metadata | None = None,
    idempotency_key: str | None = None,
    *,
    settings: Settings | None = None,
) -> UsageResult:
    """Deduct `credits` from the customer and enqueue the usage event, in the caller's
    transaction (no commit).

    Raises `InvalidRequest` (bad input), `CustomerNotFound`, `InsufficientCredits`, and
    `IdempotencyConflict` (the same `idempotency_key` was used for another amount, or other
    metadata while the first event is still in the outbox). With an `idempotency_key` already
    used for this customer with the same arguments, returns the first result (`replayed=True`)
    and deducts nothing.
    """
    spend = Spend.validated(
        customer_id, credits, metadata, settings or get_settings(), idempotency_key
    )
    if _is_postgresql(session):
        if spend.idempotency_key is None:
            return run_steps(session, _spend_steps(spend))
        return run_steps(session, _keyed_spend_steps(spend))
    if spend.idempotency_key is not None:
        # Lock the customer first so two calls with the same key serialize here.
        if get_customer_for_update(session, spend.customer_id) is None:
            raise CustomerNotFound(customer_id=spend.customer_id)
        existing = _existing_usage(
            session, spend.customer_id, spend.credits, spend.metadata, spend.idempotency_key
        )
        if existing is not None:
            return existing
    return _spend_in_three_statements(session, spend)


@dataclass(frozen=True)
class Spend:
    """A validated usage, ready to write (both spend paths take one)."""

    customer_id: str
    credits: int
    metadata: Metadata
    idempotency_key: str | None
    now: datetime
    settings: Settings

    @classmethod
    def validated(
        cls,
        customer_id: object,
        credits: object,
        metadata: object,
        settings: Settings,
        idempotency_key: object = None,
    ) -> Spend:
        """The arguments checked (`InvalidRequest` naming the field), stamped `now`."""
        return cls(
            check_customer_id(customer_id),
            check_credits(credits),
            check_metadata(metadata, credits_field=settings.usage_credits_field),
            check_idempotency_key(idempotency_key, field="idempotency_key"),
            utcnow(),
            settings,
        )

    def params(self, external_id: str) -> dict[str, Any]:
        """The parameters of the spend statements (`_SPEND` and those built on it)."""
        return {
            "p_customer_id": self.customer_id,
            "p_credits": self.credits,
            "p_now": self.now,
            "p_external_id": external_id,
            "p_name": self.settings.usage_event_name,
            "p_metadata": self.metadata,
            "p_idempotency_key": self.idempotency_key,
        }


def usage_steps(
    customer_id: str, credits: int, metadata: Metadata | None, *, settings: Settings
) -> Steps[UsageResult]:
    """PostgreSQL: `record_usage` without an idempotency key, as steps (`outbox.steps`): what
    POST /v1/usage runs on the API's async connection. Raises what `record_usage` raises."""
    spend = Spend.validated(customer_id, credits, metadata, settings)
    return (yield from _spend_steps(spend))


def _spend_steps(spend: Spend, *, hold_id: int | None = None) -> Steps[UsageResult]:
    """PostgreSQL: deduction, outbox row and ledger entry in one round trip (`_SPEND`); with
    `hold_id`, the usage of a capture (its entry names the hold)."""
    external_id = new_external_id()
    params = spend.params(external_id)
    if hold_id is not None:
        params["p_hold_id"] = hold_id
    row = yield Query(_SPEND if hold_id is None else _SPEND_OF_HOLD, params)
    if row is None:
        raise (yield from refusal_steps(spend.customer_id, spend.credits))
    balance, event_id = row
    return UsageResult(event_id=int(event_id), external_id=external_id, balance=int(balance))


_LOCK_CUSTOMER = (
    select(_customers.c.id).where(_customers.c.id == bindparam("p_customer_id")).with_for_update()
)


def build_keyed_spend_statement() -> Any:
    """PostgreSQL, `record_usage` with an idempotency key, once the customer's row is locked:
    the customer's earlier usage with this key (`earlier`: its entry and its event's metadata,
    if the event is still in the outbox) and, only if there is none, the spend of `_SPEND`, in
    ONE statement. It must run after the lock, as a statement of its own: a statement sees
    what was committed before it began, so one that waited for the lock would not see the
    usage that the lock's holder had just committed with the same key. Parameters: as
    `_SPEND`. One row, every column nullable: balance and event_id (spent), then the earlier
    entry's first_event_id, first_external_id, first_balance, first_delta, first_metadata."""
    le, e = _ledger_entries.c, _outbox_events.c
    earlier = (
        select(le.event_id, le.external_id, le.balance_after, le.delta, e.metadata)
        .select_from(_ledger_entries.outerjoin(_outbox_events, e.id == le.event_id))
        .where(
            le.customer_id == bindparam("p_customer_id"),
            le.kind == literal(LedgerKind.USAGE.value, le.kind.type),
            le.idempotency_key == bindparam("p_idempotency_key", type_=le.idempotency_key.type),
        )
        .cte("earlier")
    )
    deduct = build_deduct_statement().where(~exists(select(literal(1)).select_from(earlier)))
    spent = build_spend_statement(deduct).subquery("spent")
    one = select(literal(1).label("one")).subquery("one")
    return select(
        spent.c.balance,
        spent.c.id.label("event_id"),
        earlier.c.event_id.label("first_event_id"),
        earlier.c.external_id.label("first_external_id"),
        earlier.c.balance_after.label("first_balance"),
        earlier.c.delta.label("first_delta"),
        earlier.c.metadata.label("first_metadata"),
    ).select_from(one.outerjoin(spent, true()).outerjoin(earlier, true()))


_KEYED_SPEND = build_keyed_spend_statement()


def _keyed_spend_steps(spend: Spend) -> Steps[UsageResult]:
    """PostgreSQL, `record_usage` with an idempotency key in two round trips: the customer's
    row locked (two calls with the same key serialize there), then the lookup of the key and
    the spend in one statement (`build_keyed_spend_statement`). The same outcomes as
    `_existing_usage` then `_spend_in_three_statements` on SQLite."""
    assert spend.idempotency_key is not None
    locked = yield Query(_LOCK_CUSTOMER, {"p_customer_id": spend.customer_id})
    if locked is None:
        raise CustomerNotFound(customer_id=spend.customer_id)
    external_id = new_external_id()
    row = yield Query(_KEYED_SPEND, spend.params(external_id))
    assert row is not None  # the statement always returns its one row
    if row.first_delta is not None:  # the key was used: nothing was spent
        if abs(row.first_delta) != spend.credits:
            raise IdempotencyConflict(idempotency_key=spend.idempotency_key)
        if row.first_metadata is not None and row.first_metadata != spend.metadata:
            raise IdempotencyConflict(idempotency_key=spend.idempotency_key)
        assert row.first_event_id is not None
        # The first result, as the HTTP path replays it: the balance right after that usage.
        return UsageResult(
            event_id=int(row.first_event_id),
            external_id=row.first_external_id or "",
            balance=int(row.first_balance),
            replayed=True,
        )
    if row.event_id is None:
        raise (yield from refusal_steps(spend.customer_id, spend.credits))
    return UsageResult(
        event_id=int(row.event_id), external_id=external_id, balance=int(row.balance)
    )


def _spend_in_three_statements(session: Session, spend: Spend) -> UsageResult:
    """SQLite (no data-modifying CTEs): the same three writes as `_SPEND`, one by one."""
    balance = _deduct_if_covered(session, spend.customer_id, spend.credits, spend.now)
    event_id, external_id = enqueue_usage_event(
        session,
        customer_id=spend.customer_id,
        credits=spend.credits,
        metadata=spend.metadata,
        occurred_at=spend.now,
        settings=spend.settings,
    )
    append_ledger_entry(
        session,
        customer_id=spend.customer_id,
        kind=LedgerKind.USAGE,
        delta=-spend.credits,
        balance_after=balance,
        now=spend.now,
        event_id=event_id,
        external_id=external_id,
        idempotency_key=spend.idempotency_key,
    )
    return UsageResult(event_id=event_id, external_id=external_id, balance=balance)


def _dialect_insert(session: Session) -> type[postgresql.Insert] | type[sqlite.Insert]:
    return postgresql.Insert if _is_postgresql(session) else sqlite.Insert


def ensure_customer(session: Session, customer_id: str) -> None:
    """Create the customer with a zero balance if it does not exist (race-free upsert)."""
    now = utcnow()
    stmt = (
        _dialect_insert(session)(Customer)
        .values(
            id=customer_id, balance=0, held=0, granted=0, used=0, created_at=now, updated_at=now
        )
        .on_conflict_do_nothing(index_elements=[Customer.id])
    )
    session.execute(stmt)


def _existing_grant(
    session: Session, customer_id: str, credits: int, idempotency_key: str
) -> GrantResult | None:
    entry = _entry_by_key(session, customer_id, LedgerKind.GRANT, idempotency_key, credits)
    if entry is None:
        return None
    return GrantResult(grant_id=entry.id, balance=entry.balance_after, replayed=True)


def grant_credits(
    session: Session,
    customer_id: str,
    credits: int,
    reason: str | None = None,
    idempotency_key: str | None = None,
) -> GrantResult:
    """Add `credits` to the customer (created if new), in the caller's transaction (no commit).

    With an `idempotency_key` already used for this customer's grants, returns the first result
    (`replayed=True`) and adds nothing.
    """
    customer_id = check_customer_id(customer_id)
    credits = check_credits(credits, maximum=MAX_GRANT_CREDITS)
    reason = check_text(reason, field="reason", max_length=MAX_REASON_LENGTH)
    idempotency_key = check_idempotency_key(idempotency_key, field="idempotency_key")
    now = utcnow()
    ensure_customer(session, customer_id)
    if idempotency_key is not None:
        get_customer_for_update(session, customer_id)
        existing = _existing_grant(session, customer_id, credits, idempotency_key)
        if existing is not None:
            return existing
    balance = session.execute(
        update(Customer)
        .where(Customer.id == customer_id)
        .values(
            balance=Customer.balance + credits, granted=Customer.granted + credits, updated_at=now
        )
        .returning(Customer.balance)
    ).scalar_one()
    grant_id = append_ledger_entry(
        session,
        customer_id=customer_id,
        kind=LedgerKind.GRANT,
        delta=credits,
        balance_after=int(balance),
        now=now,
        reason=reason,
        idempotency_key=idempotency_key,
    )
    return GrantResult(grant_id=grant_id, balance=int(balance))


def grant_by_operator(
    session: Session,
    customer_id: str,
    credits: int,
    reason: str | None,
    *,
    actor: str,
    idempotency_key: str | None = None,
) -> GrantResult:
    """`grant_credits` by a person (console, CLI, admin API), recorded in the audit log with
    the grant, in the same transaction (a retried grant, replayed by its key, is not recorded
    again)."""
    from outbox import audit

    result = grant_credits(session, customer_id, credits, reason, idempotency_key)
    return _audited(session, result, audit.GRANT, actor, reason, customer_id, credits)


def _audited(
    session: Session,
    result: GrantResult,
    action: str,
    actor: str,
    reason: str | None,
    customer_id: str,
    credits: int,
) -> GrantResult:
    """`result` of an operator's grant or debit, recorded in the audit log in the caller's
    transaction, unless it is a replay of one already recorded."""
    from outbox import audit

    if not result.replayed:
        detail = {"customer_id": customer_id, "credits": credits, "balance": result.balance}
        audit.record(session, actor=actor, action=action, reason=reason, detail=detail)
    return result


@dataclass(frozen=True)
class CreditSummary:
    """A customer's credits: spendable balance, held by open holds, total granted and used."""

    customer_id: str
    balance: int
    held: int
    granted: int
    used: int


def get_credits(session: Session, customer_id: str) -> CreditSummary:
    """The customer's credit summary; `CustomerNotFound` if it never received a grant."""
    customer_id = check_customer_id(customer_id)
    customer = session.get(Customer, customer_id)
    if customer is None:
        raise CustomerNotFound(customer_id=customer_id)
    return CreditSummary(
        customer_id=customer.id,
        balance=customer.balance,
        held=customer.held,
        granted=customer.granted,
        used=customer.used,
    )


def ledger_balance(session: Session, customer_id: str) -> int:
    """The sum of the customer's ledger entries (always equal to its balance)."""
    total = session.scalar(
        select(func.coalesce(func.sum(LedgerEntry.delta), 0)).where(
            LedgerEntry.customer_id == customer_id
        )
    )
    return int(total or 0)


@dataclass(frozen=True)
class RevokeResult:
    """A revoke: its ledger entry, the balance after it, and exactly what it took: from the
    balance, from each open hold (hold id -> credits), and what it could not take (spent)."""

    entry_id: int
    balance: int
    taken: int
    from_balance: int
    from_holds: dict[int, int]
    shortfall: int


def revoke_credits(
    session: Session,
    customer_id: str,
    credits: int,
    reason: str | None = None,
    idempotency_key: str | None = None,
) -> RevokeResult:
    """Take back up to `credits`: from the balance first, then from the customer's open holds,
    newest first (each shrinks; one left with nothing is closed `revoked`), so no release or
    capture can bring them back. What was already spent cannot be taken: that shortfall is
    written in the entry's reason. In the caller's transaction (docs/explanation/webhooks.md).

    Each hold's part goes back to the balance first (a `release` entry of that hold), then one
    `revoke` entry takes the whole: the ledger stays equal to the balance, and open holds'
    credits to `held`."""
    from outbox.holds import take_from_open_holds  # holds builds on the ledger

    customer_id = check_customer_id(customer_id)
    credits = check_credits(credits, maximum=MAX_GRANT_CREDITS)
    now = utcnow()
    note = reason or "revoked"
    # The customer's row, then its holds: the order every hold operation locks in. With the
    # row locked no hold of theirs can be placed or closed until this commits.
    customer = get_customer_for_update(session, customer_id)
    if customer is None:
        raise CustomerNotFound(customer_id=customer_id)
    holds = take_from_open_holds(session, customer_id, now)
    from_balance = min(credits, customer.balance)
    from_holds = holds.take(credits - from_balance, note)
    held = sum(from_holds.values())
    taken = from_balance + held
    shortfall = credits - taken
    if held:
        note += f" (took {from_balance} from the balance and {held} from holds " + (
            ", ".join(f"#{hold_id}: {n}" for hold_id, n in from_holds.items()) + ")"
        )
    if shortfall:
        note += f" (shortfall: {shortfall} of {credits} credits were already spent)"
    balance = session.execute(
        update(Customer)
        .where(Customer.id == customer_id)
        .values(
            balance=Customer.balance - taken,
            granted=func.greatest(Customer.granted - taken, 0)
            if _is_postgresql(session)
            else func.max(Customer.granted - taken, 0),
            updated_at=now,
        )
        .returning(Customer.balance)
    ).scalar_one()
    entry_id = append_ledger_entry(
        session,
        customer_id=customer_id,
        kind=LedgerKind.REVOKE,
        delta=-taken,
        balance_after=int(balance),
        now=now,
        reason=note,
        idempotency_key=idempotency_key,
    )
    return RevokeResult(
        entry_id=entry_id,
        balance=int(balance),
        taken=taken,
        from_balance=from_balance,
        from_holds=from_holds,
        shortfall=shortfall,
    )


def debit_credits(
    session: Session,
    customer_id: str,
    credits: int,
    reason: str,
    idempotency_key: str | None = None,
) -> GrantResult:
    """An operator takes `credits` back from the customer's balance (a `debit` entry with the
    reason), in the caller's transaction; never below zero: `InsufficientCredits` if the
    balance does not cover them (nothing changes), `CustomerNotFound` for an unknown customer.
    With an `idempotency_key` already used for this customer's debits, returns the first
    result (`replayed=True`). Returns the debit entry id (as `grant_id`) and the balance."""
    customer_id = check_customer_id(customer_id)
    credits = check_credits(credits, maximum=MAX_GRANT_CREDITS)
    clean_reason = check_text(reason, field="reason", max_length=MAX_REASON_LENGTH, required=True)
    idempotency_key = check_idempotency_key(idempotency_key, field="idempotency_key")
    now = utcnow()
    if idempotency_key is not None:
        if get_customer_for_update(session, customer_id) is None:
            raise CustomerNotFound(customer_id=customer_id)
        entry = _entry_by_key(session, customer_id, LedgerKind.DEBIT, idempotency_key, credits)
        if entry is not None:
            return GrantResult(grant_id=entry.id, balance=entry.balance_after, replayed=True)
    balance = session.execute(
        update(Customer)
        .where(Customer.id == customer_id, Customer.balance >= credits)
        .values(
            balance=Customer.balance - credits,
            granted=func.greatest(Customer.granted - credits, 0)
            if _is_postgresql(session)
            else func.max(Customer.granted - credits, 0),
            updated_at=now,
        )
        .returning(Customer.balance)
    ).scalar_one_or_none()
    if balance is None:
        raise refusal(session, customer_id, credits)
    entry_id = append_ledger_entry(
        session,
        customer_id=customer_id,
        kind=LedgerKind.DEBIT,
        delta=-credits,
        balance_after=int(balance),
        now=now,
        reason=clean_reason,
        idempotency_key=idempotency_key,
    )
    return GrantResult(grant_id=entry_id, balance=int(balance))


def debit_by_operator(
    session: Session,
    customer_id: str,
    credits: int,
    reason: str,
    *,
    actor: str,
    idempotency_key: str | None = None,
) -> GrantResult:
    """`debit_credits` by a person (CLI, admin API), recorded in the audit log with the debit,
    in the same transaction (a retried debit, replayed by its key, is not recorded again)."""
    from outbox import audit

    result = debit_credits(session, customer_id, credits, reason, idempotency_key)
    return _audited(session, result, audit.DEBIT, actor, reason, customer_id, credits)
