"""Replay: what operators do with failed events.

Replay moves `failed` → `pending` with the SAME `external_id` (so a replay of an event Polar
already holds is deduplicated and bills nothing) and records who, when, why and which rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from outbox import audit, events
from outbox.errors import EventNotFound, InvalidRequest, NotReplayable
from outbox.models import Replay, utcnow
from outbox.states import EventStatus
from outbox.validation import check_customer_id, check_text

MAX_REPLAY_IDS = 10_000


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
    if event_ids is not None:
        ids = sorted(set(event_ids))
        if not ids:
            raise InvalidRequest("event_ids must not be empty", field="event_ids")
        if len(ids) > MAX_REPLAY_IDS:
            raise InvalidRequest(f"at most {MAX_REPLAY_IDS} ids at once", field="event_ids")
        # A dry run locks nothing (a preview must never wait for, or block, a replay).
        rows = (events.get_events if dry_run else events.get_events_for_update)(session, ids)
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
        if customer_id is not None:
            customer_id = check_customer_id(customer_id)
        rows = events.get_failed_for_update(session, customer_id=customer_id, lock=not dry_run)
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
    events.requeue_if_failed(session, result.event_ids, replay_id=record.id, now=now)
    audit.record(
        session,
        actor=actor,
        action=audit.REPLAY,
        reason=reason,
        detail={
            "replay_id": record.id,
            "events": len(result.event_ids),
            "credits": result.credits,
            "event_ids": result.event_ids[:100],
        },
    )
    result.replay_id = record.id
    return result


def list_replays(session: Session, *, limit: int = 50) -> list[Replay]:
    """The latest replays, newest first."""
    return list(session.scalars(select(Replay).order_by(Replay.id.desc()).limit(limit)))
