"""Claiming and settling outbox rows: every query names its guard.

A claim takes due `pending` rows with `FOR UPDATE SKIP LOCKED` (PostgreSQL; SQLite has one writer
at a time, BEGIN IMMEDIATE) and leases them to a claim token. Only the holder of that token may
settle a row (`..._if_claimed`: the UPDATE matches status, owner), so a slow worker whose lease
expired cannot overwrite its rescuer's outcome. Each claim gets a fresh token, so even the same
worker cannot settle a row it lost and re-claimed through an older batch.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, and_, bindparam, case, select, update
from sqlalchemy.orm import Session

from outbox.models import OutboxEvent
from outbox.policy import BACKOFF_BASE_SECONDS, BACKOFF_CAP_SECONDS, next_attempt_at
from outbox.states import EventStatus

MAX_ERROR_LENGTH = 2000
EVENTS = cast(Table, OutboxEvent.__table__)


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
        select(OutboxEvent.id)
        .where(
            OutboxEvent.status == EventStatus.PENDING,
            OutboxEvent.next_attempt_at <= now,
            OutboxEvent.occurred_at <= hold_back_until,
        )
        .order_by(OutboxEvent.next_attempt_at, OutboxEvent.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
        # A CTE is evaluated once: a subquery could be re-run by the planner and lock more.
        .cte("due")
    )
    rows = session.execute(
        update(OutboxEvent)
        .where(OutboxEvent.id.in_(select(due.c.id)))
        .values(
            status=EventStatus.INFLIGHT,
            lease_owner=owner,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            updated_at=now,
        )
        .returning(
            OutboxEvent.id,
            OutboxEvent.external_id,
            OutboxEvent.customer_id,
            OutboxEvent.name,
            OutboxEvent.credits,
            OutboxEvent.event_metadata,
            OutboxEvent.occurred_at,
            OutboxEvent.attempts,
            OutboxEvent.created_at,
        )
    ).all()
    claimed = [
        ClaimedEvent(
            id=row.id,
            external_id=row.external_id,
            customer_id=row.customer_id,
            name=row.name,
            credits=row.credits,
            metadata=dict(row.event_metadata or {}),
            occurred_at=row.occurred_at,
            attempts=row.attempts,
            created_at=row.created_at,
        )
        for row in rows
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


def _claimed_by(owner: str, ids: Iterable[int]) -> Any:
    return and_(
        OutboxEvent.id.in_(list(ids)),
        OutboxEvent.status == EventStatus.INFLIGHT,
        OutboxEvent.lease_owner == owner,
    )


def mark_delivered_if_claimed(
    session: Session, *, ids: Sequence[int], owner: str, now: datetime
) -> int:
    """inflight → delivered, only for rows still leased to `owner`; returns how many moved."""
    if not ids:
        return 0
    result = session.execute(
        update(OutboxEvent)
        .where(_claimed_by(owner, ids))
        .values(
            status=EventStatus.DELIVERED,
            delivered_at=now,
            lease_owner=None,
            lease_expires_at=None,
            last_error=None,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def _settle_each_if_claimed(
    session: Session, owner: str, params: list[dict[str, Any]], **values: Any
) -> int:
    """One guarded UPDATE per row (`b_id` in each of `params`): only rows still inflight and
    leased to `owner` move, and leave the lease. Core table, not the ORM entity: a list of
    parameters is then a plain executemany. Returns how many rows moved."""
    result = session.execute(
        update(EVENTS)
        .where(
            EVENTS.c.id == bindparam("b_id"),
            EVENTS.c.status == EventStatus.INFLIGHT,
            EVENTS.c.lease_owner == owner,
        )
        .values(lease_owner=None, lease_expires_at=None, **values),
        params,
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def fail_if_claimed(
    session: Session, *, errors: Mapping[int, str], owner: str, now: datetime
) -> int:
    """inflight → failed with Polar's message per row (a permanent error), if still claimed."""
    if not errors:
        return 0
    params = [{"b_id": row_id, "b_error": _clip(msg)} for row_id, msg in errors.items()]
    return _settle_each_if_claimed(
        session,
        owner,
        params,
        status=EventStatus.FAILED,
        attempts=EVENTS.c.attempts + 1,
        last_error=bindparam("b_error"),
        updated_at=now,
    )


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
) -> tuple[int, int]:
    """inflight → pending with backoff (full jitter, never sooner than `retry_after`), or →
    failed once `max_attempts` are spent. `count_attempt=False` for faults that are not the
    event's (rate limits, a clock ahead of Polar's, bad credentials): those never dead-letter.
    Returns (rows retried, rows failed)."""
    if not events:
        return 0, 0
    retried: list[dict[str, Any]] = []
    exhausted: dict[int, str] = {}
    for event in events:
        attempts = event.attempts + (1 if count_attempt else 0)
        if count_attempt and attempts >= max_attempts:
            exhausted[event.id] = f"gave up after {attempts} attempts; last error: {error}"
            continue
        delay_from = attempts if count_attempt else 0
        retried.append(
            {
                "b_id": event.id,
                "b_attempts": attempts,
                "b_next": next_attempt_at(
                    now, delay_from, rng, retry_after, base=backoff_base, cap=backoff_cap
                ),
            }
        )
    moved = 0
    if retried:
        moved = _settle_each_if_claimed(
            session,
            owner,
            retried,
            status=EventStatus.PENDING,
            attempts=bindparam("b_attempts"),
            next_attempt_at=bindparam("b_next"),
            last_error=_clip(error),
            updated_at=now,
        )
    failed = 0
    if exhausted:
        failed = _fail_exhausted(session, exhausted, owner, now)
    return moved, failed


def _fail_exhausted(session: Session, errors: Mapping[int, str], owner: str, now: datetime) -> int:
    return fail_if_claimed(session, errors=errors, owner=owner, now=now)


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
        .returning(OutboxEvent.id)
        .execution_options(synchronize_session=False)
    )
    return len(result.all())


def release_if_claimed(
    session: Session, *, ids: Sequence[int], owner: str, now: datetime, delay_seconds: float
) -> int:
    """inflight → pending without spending an attempt (e.g. Polar rejected our credentials:
    not the events' fault); due again after `delay_seconds`."""
    if not ids:
        return 0
    result = session.execute(
        update(OutboxEvent)
        .where(_claimed_by(owner, ids))
        .values(
            status=EventStatus.PENDING,
            next_attempt_at=now + timedelta(seconds=delay_seconds),
            lease_owner=None,
            lease_expires_at=None,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]
