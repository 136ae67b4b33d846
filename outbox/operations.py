"""What operators see and do: stats, failed events, replay, prune.

Replay moves `failed` → `pending` with the SAME `external_id` (so a replay of an event Polar
already holds is deduplicated and bills nothing) and records who, when, why and which rows.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import Engine, delete, func, select, update
from sqlalchemy.orm import Session

from outbox.db import session_scope
from outbox.errors import EventNotFound, InvalidRequest, NotReplayable
from outbox.models import OutboxEvent, Replay, utcnow
from outbox.states import EventStatus
from outbox.validation import check_customer_id, check_text

UNDELIVERED = (EventStatus.PENDING, EventStatus.INFLIGHT, EventStatus.FAILED)
MAX_REPLAY_IDS = 10_000


@dataclass(frozen=True)
class OutboxStats:
    """The stats object of DESIGN.md (`outbox status`, GET /v1/admin/outbox/stats)."""

    counts: dict[str, int]
    oldest_pending_seconds: float
    delivered_last_minute: int
    credits_undelivered: int

    def as_dict(self) -> dict[str, object]:
        return {
            "counts": self.counts,
            "oldest_pending_seconds": self.oldest_pending_seconds,
            "delivered_last_minute": self.delivered_last_minute,
            "credits_undelivered": self.credits_undelivered,
        }


def outbox_stats(session: Session, *, now: datetime | None = None) -> OutboxStats:
    """Counts by status, the age of the oldest undelivered (pending or inflight) event, the
    deliveries of the last minute, and the credits committed but not yet accepted by Polar
    (pending + inflight + failed: the money at risk)."""
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
    undelivered = session.scalar(
        select(func.coalesce(func.sum(OutboxEvent.credits), 0)).where(
            OutboxEvent.status.in_(UNDELIVERED)
        )
    )
    return OutboxStats(
        counts=counts,
        oldest_pending_seconds=round(max(0.0, (now - oldest).total_seconds()), 3)
        if oldest
        else 0.0,
        delivered_last_minute=int(delivered_last_minute or 0),
        credits_undelivered=int(undelivered or 0),
    )


def list_failed(
    session: Session, *, customer_id: str | None = None, limit: int = 1000
) -> list[OutboxEvent]:
    """Failed events, oldest first (what to look at and replay)."""
    query = select(OutboxEvent).where(OutboxEvent.status == EventStatus.FAILED)
    if customer_id is not None:
        query = query.where(OutboxEvent.customer_id == check_customer_id(customer_id))
    return list(session.scalars(query.order_by(OutboxEvent.id).limit(limit)))


@dataclass
class ReplayResult:
    """What a replay moved (or, with dry_run, would move)."""

    replayed: int
    event_ids: list[int]
    dry_run: bool
    replay_id: int | None = None
    credits: int = 0
    details: list[dict[str, object]] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        """What the CLI's `--json` and POST /v1/admin/outbox/replay answer: `replayed` is what
        moved (0 in a dry run), `would_replay` what a dry run would move (null otherwise)."""
        return {
            "replayed": 0 if self.dry_run else self.replayed,
            "would_replay": self.replayed if self.dry_run else None,
            "event_ids": self.event_ids,
            "credits": self.credits,
            "dry_run": self.dry_run,
            "replay_id": self.replay_id,
        }


def replay(
    session: Session,
    *,
    event_ids: Sequence[int] | None = None,
    all_failed: bool = False,
    customer_id: str | None = None,
    dry_run: bool = False,
    actor: str = "operator",
    reason: str | None = None,
) -> ReplayResult:
    """failed → pending, keeping each row's `external_id`; recorded in `replays`.

    By ids: every id must exist (`EventNotFound`) and be failed (`NotReplayable` names the
    others); nothing moves otherwise. `all_failed`: every failed row (of one customer if given).
    """
    if (event_ids is None) == (not all_failed):
        raise InvalidRequest("give event ids, or every failed event (not both)", field="event_ids")
    if customer_id is not None and not all_failed:
        raise InvalidRequest(
            "a customer only narrows a replay of every failed event", field="customer_id"
        )
    reason = check_text(reason, field="reason", max_length=500)
    actor = check_text(actor, field="actor", max_length=200) or "operator"
    query = select(OutboxEvent).with_for_update()
    if event_ids is not None:
        ids = sorted(set(event_ids))
        if not ids:
            raise InvalidRequest("event_ids must not be empty", field="event_ids")
        if len(ids) > MAX_REPLAY_IDS:
            raise InvalidRequest(f"at most {MAX_REPLAY_IDS} ids at once", field="event_ids")
        rows = list(session.scalars(query.where(OutboxEvent.id.in_(ids)).order_by(OutboxEvent.id)))
        missing = sorted(set(ids) - {row.id for row in rows})
        if missing:
            raise EventNotFound(f"no such event: {', '.join(map(str, missing[:20]))}", ids=missing)
        not_failed = [row for row in rows if row.status != EventStatus.FAILED]
        if not_failed:
            listing = ", ".join(f"{row.id} is {row.status}" for row in not_failed[:20])
            raise NotReplayable(
                f"only failed events can be replayed: {listing}; nothing was replayed",
                ids=[row.id for row in not_failed],
            )
    else:
        query = query.where(OutboxEvent.status == EventStatus.FAILED)
        if customer_id is not None:
            query = query.where(OutboxEvent.customer_id == check_customer_id(customer_id))
        rows = list(session.scalars(query.order_by(OutboxEvent.id)))
    result = ReplayResult(
        replayed=len(rows),
        event_ids=[row.id for row in rows],
        dry_run=dry_run,
        credits=sum(row.credits for row in rows),
        details=[
            {
                "event_id": row.id,
                "customer_id": row.customer_id,
                "credits": row.credits,
                "external_id": row.external_id,
                "last_error": row.last_error,
            }
            for row in rows
        ],
    )
    if dry_run or not rows:
        return result
    now = utcnow()
    record = Replay(actor=actor, reason=reason, event_ids=result.event_ids, created_at=now)
    session.add(record)
    session.flush()
    session.execute(
        update(OutboxEvent)
        .where(OutboxEvent.id.in_(result.event_ids), OutboxEvent.status == EventStatus.FAILED)
        .values(
            status=EventStatus.PENDING,
            attempts=0,
            next_attempt_at=now,
            last_replay_id=record.id,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    result.replay_id = record.id
    return result


def list_replays(session: Session, *, limit: int = 50) -> list[Replay]:
    """The latest replays, newest first."""
    return list(session.scalars(select(Replay).order_by(Replay.id.desc()).limit(limit)))


_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration(text: str, field: str = "older_than") -> timedelta:
    """'30d', '12h', '90m', '45s', '2w' → timedelta; `InvalidRequest` otherwise."""
    match = _DURATION.match(text or "")
    if not match:
        raise InvalidRequest(
            f"{field} must be a number and a unit (s, m, h, d, w), e.g. 30d; got {text!r}",
            field=field,
        )
    value, unit = int(match.group(1)), match.group(2)
    if value <= 0:
        raise InvalidRequest(f"{field} must be positive", field=field)
    try:
        return timedelta(**{_UNITS[unit]: value})
    except OverflowError:
        raise InvalidRequest(f"{field} is too large", field=field) from None


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
