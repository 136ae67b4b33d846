"""The outbox table's home: every statement that reads or writes `outbox_events`, named by what
it guards. (One exception, on purpose: the ledger's spend writes the customer, its ledger entry and
the outbox row in one statement, docs/explanation/request-path.md.)

Delivery's side: claiming and settling.

A claim takes due `pending` rows with `FOR UPDATE SKIP LOCKED` (PostgreSQL; SQLite has one writer
at a time, BEGIN IMMEDIATE) and leases them to a claim token. Only the holder of that token may
settle a row (`..._if_claimed`: the UPDATE matches status, owner), so a slow worker whose lease
expired cannot overwrite its rescuer's outcome. Each claim gets a fresh token, so even the same
worker cannot settle a row it lost and re-claimed through an older batch.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    ARRAY,
    BigInteger,
    Engine,
    Integer,
    Table,
    and_,
    any_,
    bindparam,
    case,
    column,
    delete,
    func,
    insert,
    literal,
    literal_column,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.orm import Session

from outbox import attempts
from outbox.db import int_array, session_scope
from outbox.models import Base, OutboxEvent, utcnow
from outbox.pagination import check_limit, decode_cursor, encode_cursor
from outbox.policy import BACKOFF_BASE_SECONDS, BACKOFF_CAP_SECONDS, next_attempt_at
from outbox.states import AttemptDecision, EventStatus
from outbox.validation import check_customer_id

MAX_ERROR_LENGTH = 2000
EVENTS = cast(Table, OutboxEvent.__table__)
_usage_refunds = Base.metadata.tables["usage_refunds"]  # read for the stats only


@dataclass(frozen=True)
class ClaimedEvent:
    """A row leased to one claim: what is needed to build the Polar event and settle it."""

    id: int
    external_id: str
    customer_id: str
    name: str
    credits: int
    metadata: dict[str, Any]
    occurred_at: datetime
    attempts: int
    created_at: datetime


def new_claim_token(worker_id: str) -> str:
    """A lease owner unique to one claim: `<worker id>:<random>`."""
    return f"{worker_id[:90]}:{uuid.uuid4().hex[:12]}"


_CLAIMED_COLUMNS = (
    EVENTS.c.id,
    EVENTS.c.external_id,
    EVENTS.c.customer_id,
    EVENTS.c.name,
    EVENTS.c.credits,
    EVENTS.c.metadata,
    EVENTS.c.occurred_at,
    EVENTS.c.attempts,
    EVENTS.c.created_at,
)


def _clip(message: str) -> str:
    return message if len(message) <= MAX_ERROR_LENGTH else message[: MAX_ERROR_LENGTH - 1] + "…"


def claim_batch(
    session: Session,
    *,
    owner: str,
    limit: int,
    now: datetime,
    lease_seconds: float,
    hold_back_until: datetime,
) -> list[ClaimedEvent]:
    """Lease up to `limit` due pending rows (oldest first) to `owner`; rows other workers are
    claiming are skipped, not waited for. Rows that occurred after `hold_back_until` wait (a
    clock-skew margin: Polar refuses timestamps in its future)."""
    due = (
        select(EVENTS.c.id)
        .where(
            EVENTS.c.status == EventStatus.PENDING,
            EVENTS.c.next_attempt_at <= now,
            EVENTS.c.occurred_at <= hold_back_until,
        )
        .order_by(EVENTS.c.next_attempt_at, EVENTS.c.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
        # A CTE is evaluated once: a subquery could be re-run by the planner and lock more.
        .cte("due")
    )
    # Core on the table, not the ORM entity: plain tuples, no ORM bulk-update bookkeeping
    # (a 1,000-row batch is claimed on every request; docs/benchmarks.md, "Claim and settle").
    rows = session.execute(
        update(EVENTS)
        .where(EVENTS.c.id.in_(select(due.c.id)))
        .values(
            status=EventStatus.INFLIGHT,
            lease_owner=owner,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            updated_at=now,
        )
        .returning(*_CLAIMED_COLUMNS)
    ).all()
    claimed = [
        ClaimedEvent(
            id_, external_id, customer_id, name, credits, dict(meta or {}), at, tries, made
        )
        for id_, external_id, customer_id, name, credits, meta, at, tries, made in rows
    ]
    claimed.sort(key=lambda event: event.id)
    return claimed


def has_due(session: Session, *, now: datetime, hold_back_until: datetime) -> bool:
    """Whether any pending row is due (what `claim_batch` would take), without locking."""
    return (
        session.execute(
            select(OutboxEvent.id)
            .where(
                OutboxEvent.status == EventStatus.PENDING,
                OutboxEvent.next_attempt_at <= now,
                OutboxEvent.occurred_at <= hold_back_until,
            )
            .limit(1)
        ).first()
        is not None
    )


def _is_postgresql(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _id_among(session: Session, ids: Iterable[int]) -> Any:
    """`id = ANY(:ids)` with ONE array parameter on PostgreSQL, so the statement's text and
    its plan do not grow with the batch; `id IN (...)` on SQLite."""
    if _is_postgresql(session):
        return EVENTS.c.id == any_(int_array("ids", ids))
    return EVENTS.c.id.in_(list(ids))


def _claimed_by(session: Session, owner: str, ids: Iterable[int]) -> Any:
    """The settle guard: the row is still inflight and leased to `owner`."""
    return and_(
        _id_among(session, ids),
        EVENTS.c.status == EventStatus.INFLIGHT,
        EVENTS.c.lease_owner == owner,
    )


def mark_delivered_if_claimed(
    session: Session,
    *,
    ids: Sequence[int],
    owner: str,
    now: datetime,
    polar_status: int | None = None,
) -> int:
    """inflight → delivered, only for rows still leased to `owner`; returns how many moved.
    Their history gets a `delivered` step in the same transaction."""
    if not ids:
        return 0
    moved = session.execute(
        update(EVENTS)
        .where(_claimed_by(session, owner, ids))
        .values(
            status=EventStatus.DELIVERED,
            maybe_at_polar=True,
            delivered_at=now,
            lease_owner=None,
            lease_expires_at=None,
            last_error=None,
            updated_at=now,
        )
        .returning(EVENTS.c.id, EVENTS.c.attempts)
    ).all()
    attempts.record(
        session,
        [attempts.Step(row_id, tries + 1) for row_id, tries in moved],
        decision=AttemptDecision.DELIVERED,
        now=now,
        claim_token=owner,
        polar_status=polar_status,
    )
    return len(moved)


def _column_array(name: str, values: list[Any]) -> Any:
    """One array parameter holding a column's value for each row (for `unnest`)."""
    if isinstance(EVENTS.c[name].type, Integer | BigInteger):
        return int_array(f"v_{name}", values)
    return bindparam(f"v_{name}", values, type_=ARRAY(EVENTS.c[name].type))


def _settle_each_if_claimed(
    session: Session,
    owner: str,
    per_row: Mapping[int, Mapping[str, Any]],
    **values: Any,
) -> list[Any]:
    """One guarded UPDATE for rows with values of their own (`per_row[id][column]`, the same
    columns for every row): only rows
    still inflight and leased to `owner` move, and leave the lease. On PostgreSQL the values
    come as one array per column, joined by id (`FROM unnest(...)`): the statement is the
    same for 5 rows or 5,000; on SQLite, a CASE on the id. Returns the moved rows (id,
    attempts, last_error)."""
    columns = sorted(next(iter(per_row.values()), {}))
    if any(sorted(row) != columns for row in per_row.values()):
        raise ValueError("every row must give the same columns")
    guard = [EVENTS.c.status == EventStatus.INFLIGHT, EVENTS.c.lease_owner == owner]
    if _is_postgresql(session):
        ids = list(per_row)
        given = (
            func.unnest(
                int_array("ids", ids),
                *(
                    _column_array(column, [per_row[row_id][column] for row_id in ids])
                    for column in columns
                ),
            )
            .table_valued(
                column("id", BigInteger),
                *(column(name, EVENTS.c[name].type) for name in columns),
            )
            .render_derived(name="given")
        )
        for name in columns:
            values[name] = given.c[name]
        statement = update(EVENTS).where(EVENTS.c.id == given.c.id, *guard)
    else:
        for name in columns:
            kind = EVENTS.c[name].type  # binds go through the column's type (UTC datetimes)
            values[name] = case(
                *(
                    (EVENTS.c.id == row_id, literal(row[name], kind))
                    for row_id, row in per_row.items()
                ),
                else_=EVENTS.c[name],
            )
        statement = update(EVENTS).where(EVENTS.c.id.in_(list(per_row)), *guard)
    return list(
        session.execute(
            statement.values(lease_owner=None, lease_expires_at=None, **values).returning(
                EVENTS.c.id, EVENTS.c.attempts, EVENTS.c.last_error
            )
        ).all()
    )


def fail_if_claimed(
    session: Session,
    *,
    errors: Mapping[int, str],
    owner: str,
    now: datetime,
    maybe_at_polar: bool = False,
    polar_status: int | None = None,
) -> int:
    """inflight → failed with Polar's message per row (a permanent error), if still claimed.
    `maybe_at_polar` when the last send's outcome is unknown (attempts exhausted), not when
    Polar refused the row."""
    if not errors:
        return 0
    seen = {"maybe_at_polar": True} if maybe_at_polar else {}
    moved = _settle_each_if_claimed(
        session,
        owner,
        {row_id: {"last_error": _clip(msg)} for row_id, msg in errors.items()},
        status=EventStatus.FAILED,
        attempts=EVENTS.c.attempts + 1,
        updated_at=now,
        **seen,
    )
    attempts.record(
        session,
        [attempts.Step(row.id, row.attempts, row.last_error) for row in moved],
        decision=AttemptDecision.FAILED,
        now=now,
        claim_token=owner,
        polar_status=polar_status,
    )
    return len(moved)


def retry_later_if_claimed(
    session: Session,
    *,
    events: Sequence[ClaimedEvent],
    owner: str,
    now: datetime,
    error: str,
    rng: random.Random,
    max_attempts: int,
    retry_after: float | None = None,
    count_attempt: bool = True,
    backoff_base: float = BACKOFF_BASE_SECONDS,
    backoff_cap: float = BACKOFF_CAP_SECONDS,
    polar_status: int | None = None,
) -> tuple[int, int]:
    """inflight → pending with backoff (full jitter, never sooner than `retry_after`), or →
    failed once `max_attempts` are spent. `count_attempt=False` for faults that are not the
    event's (rate limits, a clock ahead of Polar's, bad credentials): those never dead-letter.
    Returns (rows retried, rows failed)."""
    if not events:
        return 0, 0
    retried: dict[int, dict[str, Any]] = {}
    tries: dict[int, int] = {}
    exhausted: dict[int, str] = {}
    for event in events:
        attempts_now = event.attempts + (1 if count_attempt else 0)
        tries[event.id] = event.attempts + 1
        if count_attempt and attempts_now >= max_attempts:
            exhausted[event.id] = f"gave up after {attempts_now} attempts; last error: {error}"
            continue
        delay_from = attempts_now if count_attempt else 0
        retried[event.id] = {
            "attempts": attempts_now,
            "next_attempt_at": next_attempt_at(
                now, delay_from, rng, retry_after, base=backoff_base, cap=backoff_cap
            ),
        }
    moved = 0
    # A counted attempt is a send with an unknown outcome: Polar may hold the rows. Refusals
    # Polar answered (429, a future timestamp, bad credentials) count none.
    seen = {"maybe_at_polar": True} if count_attempt else {}
    if retried:
        rows = _settle_each_if_claimed(
            session,
            owner,
            retried,
            status=EventStatus.PENDING,
            last_error=_clip(error),
            updated_at=now,
            **seen,
        )
        attempts.record(
            session,
            [attempts.Step(row.id, tries[row.id], row.last_error) for row in rows],
            decision=AttemptDecision.RETRY,
            now=now,
            claim_token=owner,
            polar_status=polar_status,
        )
        moved = len(rows)
    failed = 0
    if exhausted:
        failed = _fail_exhausted(session, exhausted, owner, now, polar_status)
    return moved, failed


def _fail_exhausted(
    session: Session,
    errors: Mapping[int, str],
    owner: str,
    now: datetime,
    polar_status: int | None = None,
) -> int:
    return fail_if_claimed(
        session,
        errors=errors,
        owner=owner,
        now=now,
        maybe_at_polar=True,
        polar_status=polar_status,
    )


def unclaim_if_claimed(session: Session, *, ids: Sequence[int], owner: str, now: datetime) -> int:
    """inflight → pending as they were (due as before, no attempt spent, no history step):
    rows claimed but not sent, because the request could not carry them
    (`outbox.polar.gateway.events_that_fit`)."""
    return len(_back_to_pending_if_claimed(session, ids, owner, now))


def _back_to_pending_if_claimed(
    session: Session, ids: Sequence[int], owner: str, now: datetime, **values: Any
) -> list[Any]:
    """inflight → pending for the rows still leased to `owner` (with `values`); the moved rows
    (id, attempts)."""
    if not ids:
        return []
    return list(
        session.execute(
            update(EVENTS)
            .where(_claimed_by(session, owner, ids))
            .values(
                status=EventStatus.PENDING,
                lease_owner=None,
                lease_expires_at=None,
                updated_at=now,
                **values,
            )
            .returning(EVENTS.c.id, EVENTS.c.attempts)
        ).all()
    )


def rescue_expired_leases(session: Session, *, now: datetime, max_attempts: int) -> int:
    """inflight rows whose lease expired (their worker died or stalled) → pending (or failed
    when out of attempts). The crash counts as an attempt, so an event that kills workers
    cannot loop forever. Returns how many rows were rescued."""
    expired = (
        select(OutboxEvent.id)
        .where(OutboxEvent.status == EventStatus.INFLIGHT, OutboxEvent.lease_expires_at < now)
        .with_for_update(skip_locked=True)
        .cte("expired")
    )
    gives_up = OutboxEvent.attempts + 1 >= max_attempts
    result = session.execute(
        update(OutboxEvent)
        .where(OutboxEvent.id.in_(select(expired.c.id)))
        .values(
            status=case((gives_up, EventStatus.FAILED), else_=EventStatus.PENDING),
            maybe_at_polar=True,  # its worker may have sent it before it was lost
            attempts=OutboxEvent.attempts + 1,
            next_attempt_at=now,
            last_error=case(
                (gives_up, "gave up: lease expired on the last attempt (worker lost)"),
                else_="lease expired: the worker was lost mid-batch; rescued",
            ),
            lease_owner=None,
            lease_expires_at=None,
            updated_at=now,
        )
        # RETURNING, not rowcount: SQLite reports -1 for a statement that starts with WITH.
        .returning(OutboxEvent.id, OutboxEvent.attempts, OutboxEvent.last_error)
        .execution_options(synchronize_session=False)
    )
    rows = result.all()
    attempts.record(
        session,
        [attempts.Step(row.id, row.attempts, row.last_error) for row in rows],
        decision=AttemptDecision.RESCUED,
        now=now,
    )
    return len(rows)


def release_if_claimed(
    session: Session,
    *,
    ids: Sequence[int],
    owner: str,
    now: datetime,
    delay_seconds: float,
    polar_status: int | None = None,
    message: str | None = None,
) -> int:
    """inflight → pending without spending an attempt (e.g. Polar rejected our credentials:
    not the events' fault); due again after `delay_seconds`."""
    moved = _back_to_pending_if_claimed(
        session, ids, owner, now, next_attempt_at=now + timedelta(seconds=delay_seconds)
    )
    attempts.record(
        session,
        [attempts.Step(row.id, row.attempts + 1, message) for row in moved],
        decision=AttemptDecision.RELEASED,
        now=now,
        claim_token=owner,
        polar_status=polar_status,
    )
    return len(moved)


# Corrections (docs/explanation/corrections.md): a usage refunded whole before Polar can have
# seen it is cancelled; otherwise a compensating event joins the outbox.

# Polar cannot hold these rows: pending or failed, and no send of them ever ended without a
# refusal from Polar (`maybe_at_polar`: set on delivery, on a send with an unknown outcome — a
# timeout, a 5xx, a lost worker, attempts exhausted — and never cleared; a replay or
# reconcile's re-queue keeps it). Inflight rows are leased: the claim holder may be sending
# them right now.
_CANCELLABLE = and_(
    EVENTS.c.status.in_([EventStatus.PENDING, EventStatus.FAILED]),
    EVENTS.c.maybe_at_polar.is_(False),
)


def cancel_if_unsent(session: Session, event_id: int, *, now: datetime, note: str) -> bool:
    """A usage's row → cancelled, only if Polar cannot hold it (`_CANCELLABLE`) and it is not
    a compensating event; whether it moved. A row being claimed right now is locked: this waits
    for the claim and then finds it inflight (no match); a row this locks is skipped by claims
    and, once cancelled, never claimed, replayed nor re-queued."""
    moved = session.execute(
        update(EVENTS)
        .where(EVENTS.c.id == event_id, EVENTS.c.refund_of.is_(None), _CANCELLABLE)
        .values(status=EventStatus.CANCELLED, last_error=_clip(note), updated_at=now)
        .returning(EVENTS.c.id)
    ).first()
    return moved is not None


def new_refund_external_id() -> str:
    """A compensating event's own `external_id`, minted once when its row is written."""
    return f"refund_{uuid.uuid4().hex}"


def enqueue_compensation(
    session: Session,
    *,
    usage_event_id: int,
    customer_id: str,
    credits: int,
    metadata: dict[str, Any],
    default_name: str,
    now: datetime,
) -> tuple[int, str]:
    """Write a compensating event for a usage: the usage's event name (`default_name` if its
    row was pruned), `-credits`, timestamped `now`, pending like any row. Its id and
    `external_id`."""
    external_id = new_refund_external_id()
    usage_name = select(EVENTS.c.name).where(EVENTS.c.id == usage_event_id).scalar_subquery()
    event_id = session.execute(
        insert(EVENTS)
        .values(
            external_id=external_id,
            customer_id=customer_id,
            name=func.coalesce(usage_name, default_name),
            credits=-credits,
            metadata=metadata,
            occurred_at=now,
            status=EventStatus.PENDING,
            attempts=0,
            next_attempt_at=now,
            created_at=now,
            updated_at=now,
            refund_of=usage_event_id,
        )
        .returning(EVENTS.c.id)
    ).scalar_one()
    return int(event_id), external_id


# The operator's side: status, listings, replay, reconcile's re-queue, pruning.

UNDELIVERED = (EventStatus.PENDING, EventStatus.INFLIGHT, EventStatus.FAILED)


@dataclass(frozen=True)
class OutboxStats:
    """What `outbox status` and GET /v1/admin/outbox/stats show (docs/operations.md)."""

    counts: dict[str, int]
    oldest_pending_seconds: float
    delivered_last_minute: int
    credits_undelivered: int
    compensations_undelivered: int = 0
    credits_refunded: int = 0

    def as_dict(self) -> dict[str, object]:
        return {
            "counts": self.counts,
            "oldest_pending_seconds": self.oldest_pending_seconds,
            "delivered_last_minute": self.delivered_last_minute,
            "credits_undelivered": self.credits_undelivered,
            "compensations_undelivered": self.compensations_undelivered,
            "credits_refunded": self.credits_refunded,
        }


def outbox_stats(session: Session, *, now: datetime | None = None) -> OutboxStats:
    """Counts by status, the age of the oldest undelivered (pending or inflight) event, the
    deliveries of the last minute, the money at risk: usage credits committed but not yet
    accepted by Polar (pending + inflight + failed) and credits given back whose compensating
    events Polar has not accepted yet (Polar still bills them); and every credit refunded."""
    now = now or utcnow()
    counts = {status.value: 0 for status in EventStatus}
    for status, count in session.execute(
        select(OutboxEvent.status, func.count()).group_by(OutboxEvent.status)
    ):
        counts[status] = int(count)
    oldest = session.scalar(
        select(func.min(OutboxEvent.created_at)).where(
            OutboxEvent.status.in_([EventStatus.PENDING, EventStatus.INFLIGHT])
        )
    )
    if oldest is not None and oldest.tzinfo is None:
        oldest = oldest.replace(tzinfo=now.tzinfo)
    delivered_last_minute = session.scalar(
        select(func.count()).where(
            OutboxEvent.status == EventStatus.DELIVERED,
            OutboxEvent.delivered_at >= now - timedelta(minutes=1),
        )
    )
    is_usage = OutboxEvent.refund_of.is_(None)
    undelivered, compensations = session.execute(
        select(
            func.coalesce(func.sum(case((is_usage, OutboxEvent.credits), else_=0)), 0),
            func.coalesce(func.sum(case((is_usage, 0), else_=-OutboxEvent.credits)), 0),
        ).where(OutboxEvent.status.in_(UNDELIVERED))
    ).one()
    refunded = session.scalar(select(func.coalesce(func.sum(_usage_refunds.c.refunded), 0)))
    return OutboxStats(
        counts=counts,
        oldest_pending_seconds=round(max(0.0, (now - oldest).total_seconds()), 3)
        if oldest
        else 0.0,
        delivered_last_minute=int(delivered_last_minute or 0),
        credits_undelivered=int(undelivered or 0),
        compensations_undelivered=int(compensations or 0),
        credits_refunded=int(refunded or 0),
    )


def list_failed(
    session: Session, *, customer_id: str | None = None, limit: int = 1000
) -> list[OutboxEvent]:
    """Failed events, oldest first (what to look at and replay)."""
    query = select(OutboxEvent).where(OutboxEvent.status == EventStatus.FAILED)
    if customer_id is not None:
        query = query.where(OutboxEvent.customer_id == check_customer_id(customer_id))
    return list(session.scalars(query.order_by(OutboxEvent.id).limit(limit)))


def list_events(
    session: Session,
    *,
    customer_id: str | None = None,
    status: str | None = None,
    cursor: str | None = None,
    limit: int = 50,
) -> tuple[Sequence[OutboxEvent], str | None]:
    """Outbox events, newest first, filtered; returns the page and the next cursor (or None)."""
    limit = check_limit(limit)
    after = decode_cursor(cursor)
    query = select(OutboxEvent).order_by(OutboxEvent.id.desc()).limit(limit + 1)
    if customer_id is not None:
        query = query.where(OutboxEvent.customer_id == customer_id)
    if status is not None:
        query = query.where(OutboxEvent.status == status)
    if after is not None:
        query = query.where(OutboxEvent.id < after)
    rows = list(session.scalars(query))
    next_cursor = encode_cursor(rows[limit - 1].id) if len(rows) > limit else None
    return rows[:limit], next_cursor


def get_events(session: Session, ids: Sequence[int]) -> list[OutboxEvent]:
    """The rows with these ids (those that exist), by id, without locking."""
    if not ids:
        return []
    query = select(OutboxEvent).where(OutboxEvent.id.in_(ids))
    return list(session.scalars(query.order_by(OutboxEvent.id)))


def get_events_for_update(session: Session, ids: Sequence[int]) -> list[OutboxEvent]:
    """The rows with these ids, locked until the transaction ends, by id."""
    query = select(OutboxEvent).with_for_update().where(OutboxEvent.id.in_(ids))
    return list(session.scalars(query.order_by(OutboxEvent.id)))


def get_failed_for_update(
    session: Session, *, customer_id: str | None = None, lock: bool = True
) -> list[OutboxEvent]:
    """Every failed row (of one customer if given), by id; locked until the transaction ends
    unless `lock=False` (a dry run)."""
    query = select(OutboxEvent).where(OutboxEvent.status == EventStatus.FAILED)
    if lock:
        query = query.with_for_update()
    if customer_id is not None:
        query = query.where(OutboxEvent.customer_id == customer_id)
    return list(session.scalars(query.order_by(OutboxEvent.id)))


def requeue_if_failed(
    session: Session, ids: Sequence[int], *, replay_id: int, now: datetime
) -> None:
    """failed → pending (a replay): attempts start again, the external_id stays; the history
    is kept and gains a `replayed` step naming the replay."""
    moved = session.execute(
        update(OutboxEvent)
        .where(OutboxEvent.id.in_(ids), OutboxEvent.status == EventStatus.FAILED)
        .values(
            status=EventStatus.PENDING,
            attempts=0,
            next_attempt_at=now,
            last_replay_id=replay_id,
            updated_at=now,
        )
        .returning(OutboxEvent.id)
        .execution_options(synchronize_session=False)
    ).all()
    attempts.record(
        session,
        [attempts.Step(row.id, 0) for row in moved],
        decision=AttemptDecision.REPLAYED,
        now=now,
        replay_id=replay_id,
    )


def requeue_if_delivered(session: Session, ids: Sequence[int], *, now: datetime, note: str) -> None:
    """delivered → pending (reconcile found Polar does not list them): same external_id."""
    moved = session.execute(
        update(OutboxEvent)
        .where(OutboxEvent.id.in_(ids), OutboxEvent.status == EventStatus.DELIVERED)
        .values(
            status=EventStatus.PENDING,
            delivered_at=None,
            next_attempt_at=now,
            attempts=0,
            last_error=note,
            updated_at=now,
        )
        .returning(OutboxEvent.id)
        .execution_options(synchronize_session=False)
    ).all()
    attempts.record(
        session,
        [attempts.Step(row.id, 0, note) for row in moved],
        decision=AttemptDecision.REQUEUED,
        now=now,
    )


def recreate_pending(
    session: Session,
    *,
    event_id: int,
    external_id: str,
    customer_id: str,
    name: str,
    credits: int,
    occurred_at: datetime,
    now: datetime,
    note: str,
    metadata: dict[str, Any] | None = None,
    refund_of: int | None = None,
) -> None:
    """A pruned row written again, pending, from its ledger entry (same id, same external_id;
    the caller's metadata went with the row: only ours is written again, `metadata`)."""
    session.add(
        OutboxEvent(
            id=event_id,
            external_id=external_id,
            customer_id=customer_id,
            name=name,
            credits=credits,
            refund_of=refund_of,
            maybe_at_polar=True,  # it had been delivered
            event_metadata=metadata or {},
            occurred_at=occurred_at,
            status=EventStatus.PENDING,
            attempts=0,
            next_attempt_at=now,
            last_error=note,
            created_at=now,
            updated_at=now,
        )
    )


@dataclass
class PruneResult:
    deleted: int
    cutoff: datetime
    batches: int


def prune_delivered(
    engine: Engine,
    *,
    older_than: timedelta,
    batch_size: int = 1000,
    now: datetime | None = None,
    progress: Callable[[int], None] | None = None,
) -> PruneResult:
    """Delete delivered rows delivered before (now - `older_than`), in small transactions. Never
    a pending, inflight or failed row; never a ledger entry (the ledger is append-only)."""
    now = now or utcnow()
    cutoff = now - older_than
    deleted = batches = 0
    while True:
        with session_scope(engine) as session:
            ids = (
                select(OutboxEvent.id)
                .where(
                    OutboxEvent.status == EventStatus.DELIVERED, OutboxEvent.delivered_at < cutoff
                )
                .limit(batch_size)
            )
            count = session.execute(
                delete(OutboxEvent)
                .where(
                    OutboxEvent.id.in_(ids.scalar_subquery()),
                    OutboxEvent.status == EventStatus.DELIVERED,
                )
                .execution_options(synchronize_session=False)
            ).rowcount  # type: ignore[attr-defined]
        if not count:
            break
        deleted += int(count)
        batches += 1
        if progress is not None:
            progress(int(count))
    return PruneResult(deleted=deleted, cutoff=cutoff, batches=batches)


# The console's reads: each bounded, each on an index (docs/benchmarks.md, "Console").


EXACT_COUNT_BELOW = 10_000


def count_by_status(session: Session) -> tuple[dict[str, int], bool]:
    """Rows per status, and whether `delivered` is an estimate. Pending, inflight and failed
    are counted exactly (partial indexes); on PostgreSQL `delivered` is the table's estimated
    size (as of its last ANALYZE) minus them once the table holds EXACT_COUNT_BELOW rows or
    more: counting millions of delivered rows on every refresh is what makes dashboards load
    their database. Exact on SQLite and for smaller tables (a fresh table has no estimate)."""
    counts = {status.value: 0 for status in EventStatus}
    undelivered = [EventStatus.PENDING, EventStatus.INFLIGHT, EventStatus.FAILED]
    for status in undelivered:
        counts[status] = int(
            session.scalar(
                select(func.count()).select_from(EVENTS).where(EVENTS.c.status == status)
            )
            or 0
        )
    estimate = None
    if session.get_bind().dialect.name == "postgresql":
        estimate = session.scalar(
            text("SELECT reltuples::bigint FROM pg_class WHERE oid = 'outbox_events'::regclass")
        )
    if estimate is None or estimate < EXACT_COUNT_BELOW:
        counts[EventStatus.DELIVERED] = int(
            session.scalar(
                select(func.count())
                .select_from(EVENTS)
                .where(EVENTS.c.status == EventStatus.DELIVERED)
            )
            or 0
        )
        return counts, False
    others = sum(counts[s] for s in undelivered)
    counts[EventStatus.DELIVERED] = max(0, int(estimate or 0) - others)
    return counts, True


@dataclass(frozen=True)
class MoneyAtRisk:
    """Credits committed but not yet accepted by Polar, and the age of the oldest such row."""

    credits_pending: int
    credits_failed: int
    oldest_undelivered_at: datetime | None


def money_at_risk(session: Session) -> MoneyAtRisk:
    """Credits of pending/inflight and failed rows; the oldest pending/inflight row's time."""
    pending = session.execute(
        select(func.coalesce(func.sum(EVENTS.c.credits), 0), func.min(EVENTS.c.created_at)).where(
            EVENTS.c.status.in_([EventStatus.PENDING, EventStatus.INFLIGHT])
        )
    ).one()
    failed = session.scalar(
        select(func.coalesce(func.sum(EVENTS.c.credits), 0)).where(
            EVENTS.c.status == EventStatus.FAILED
        )
    )
    oldest = pending[1]
    if oldest is not None and oldest.tzinfo is None:
        oldest = oldest.replace(tzinfo=UTC)
    return MoneyAtRisk(int(pending[0] or 0), int(failed or 0), oldest)


def recent_lags(session: Session, *, since: datetime, sample: int = 2000) -> list[float]:
    """Seconds from commit to Polar's acceptance of the latest `sample` deliveries since
    `since` (a bounded sample: a busy minute delivers far more rows than a page should read)."""
    rows = session.execute(
        select(OutboxEvent.created_at, OutboxEvent.delivered_at)
        .where(OutboxEvent.status == EventStatus.DELIVERED, OutboxEvent.delivered_at >= since)
        .order_by(OutboxEvent.delivered_at.desc())
        .limit(sample)
    ).all()
    return sorted(max(0.0, (d - c).total_seconds()) for c, d in rows if d is not None)


def deliveries_per_minute(session: Session, *, since: datetime, now: datetime) -> list[int]:
    """Rows delivered in each minute from `since` to `now`, oldest minute first."""
    minutes = max(1, int((now - since).total_seconds() // 60))
    counts = [0] * minutes
    if session.get_bind().dialect.name == "postgresql":
        bucket: Any = func.floor(func.extract("epoch", OutboxEvent.delivered_at - since) / 60).cast(
            Integer
        )
    else:
        bucket = func.cast(
            (func.julianday(OutboxEvent.delivered_at) - func.julianday(since)) * 1440, Integer
        )
    rows = session.execute(
        select(bucket.label("minute"), func.count())
        .where(OutboxEvent.status == EventStatus.DELIVERED, OutboxEvent.delivered_at >= since)
        .group_by(bucket)
    ).all()
    for minute, count in rows:
        if minute is not None and 0 <= int(minute) < minutes:
            counts[int(minute)] += int(count)
    return counts


@dataclass(frozen=True)
class FailedGroup:
    """Failed rows that share Polar's message."""

    message: str
    count: int
    credits: int
    oldest_at: datetime


def failed_groups(session: Session, *, limit: int = 100) -> list[FailedGroup]:
    """Failed rows grouped by their message, largest group first (at most `limit` groups)."""
    message = func.coalesce(EVENTS.c.last_error, literal_column("''"))
    rows = session.execute(
        select(message, func.count(), func.sum(EVENTS.c.credits), func.min(EVENTS.c.updated_at))
        .where(EVENTS.c.status == EventStatus.FAILED)
        .group_by(message)
        .order_by(func.count().desc(), func.min(EVENTS.c.updated_at))
        .limit(limit)
    ).all()
    groups = []
    for message, count, credits, oldest in rows:
        if oldest is not None and oldest.tzinfo is None:
            oldest = oldest.replace(tzinfo=UTC)
        groups.append(FailedGroup(message, int(count), int(credits or 0), oldest))
    return groups


@dataclass(frozen=True)
class FailedSelection:
    """What a replay of a group (or of every failed row) would move: a count, its credits and
    the first rows (a preview reads no more than that, and locks nothing)."""

    count: int
    credits: int
    first: list[OutboxEvent]


def preview_failed(
    session: Session, *, message: str | None = None, limit: int = 50
) -> FailedSelection:
    """The failed rows whose message is `message` (every failed row if None): how many, their
    credits, the first `limit` by id."""
    where = [EVENTS.c.status == EventStatus.FAILED]
    if message is not None:
        where.append(func.coalesce(EVENTS.c.last_error, literal_column("''")) == message)
    count, credits = session.execute(
        select(func.count(), func.coalesce(func.sum(EVENTS.c.credits), 0)).where(*where)
    ).one()
    first = session.scalars(
        select(OutboxEvent).where(*where).order_by(OutboxEvent.id).limit(limit)
    ).all()
    return FailedSelection(int(count), int(credits), list(first))


def failed_ids_with_message(session: Session, message: str, *, limit: int = 10_000) -> list[int]:
    """Ids of the failed rows whose message is exactly `message` ("" for none)."""
    return list(
        session.scalars(
            select(EVENTS.c.id)
            .where(
                EVENTS.c.status == EventStatus.FAILED,
                func.coalesce(EVENTS.c.last_error, literal_column("''")) == message,
            )
            .order_by(EVENTS.c.id)
            .limit(limit)
        )
    )


def search_events(
    session: Session,
    *,
    status: str | None = None,
    customer_id: str | None = None,
    error_text: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    cursor: str | None = None,
    limit: int = 50,
) -> tuple[Sequence[OutboxEvent], str | None]:
    """Outbox rows, newest first, filtered (error text: a case-insensitive substring of the
    last error); keyset pages (the next cursor, or None)."""
    limit = check_limit(limit)
    after = decode_cursor(cursor)
    query = select(OutboxEvent).order_by(OutboxEvent.id.desc()).limit(limit + 1)
    if status is not None:
        query = query.where(OutboxEvent.status == status)
    if customer_id is not None:
        query = query.where(OutboxEvent.customer_id == customer_id)
    if error_text:
        # Delivered rows carry no error: leaving them out lets the planner stay on the
        # partial indexes of the rows that can (docs/benchmarks.md, "Console").
        query = query.where(
            # Spelled as the two partial indexes' predicates, so the planner can OR them.
            or_(
                OutboxEvent.status == EventStatus.FAILED,
                OutboxEvent.status.in_([EventStatus.PENDING, EventStatus.INFLIGHT]),
            ),
            func.lower(OutboxEvent.last_error).contains(error_text.lower(), autoescape=True),
        )
    if since is not None:
        query = query.where(OutboxEvent.created_at >= since)
    if until is not None:
        query = query.where(OutboxEvent.created_at < until)
    if after is not None:
        query = query.where(OutboxEvent.id < after)
    rows = list(session.scalars(query))
    next_cursor = encode_cursor(rows[limit - 1].id) if len(rows) > limit else None
    return rows[:limit], next_cursor
