"""The history of outbox rows (`delivery_attempts`): every statement on that table.

A settle writes its rows' history in its own transaction, in one INSERT (`record`): only the rows
the settle actually moved (its guarded UPDATE's RETURNING), so the history never claims an outcome
another worker overwrote. A replay keeps the history and adds a step naming the replay (who, when,
why live in `replays`). Pruning a delivered row takes its history with it (ON DELETE CASCADE).
What the console and `outbox events show` read: docs/howto/console.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import ARRAY, ColumnElement, Table, Text, bindparam, func, insert, literal, select
from sqlalchemy.orm import Session

from outbox.db import int_array
from outbox.models import DeliveryAttempt, Replay
from outbox.states import AttemptDecision

ATTEMPTS = cast(Table, DeliveryAttempt.__table__)
MAX_MESSAGE_LENGTH = 2000


@dataclass(frozen=True)
class Step:
    """One row's step, as a settle saw it."""

    event_id: int
    attempt: int
    message: str | None = None


def record(
    session: Session,
    steps: Sequence[Step],
    *,
    decision: AttemptDecision,
    now: datetime,
    claim_token: str | None = None,
    polar_status: int | None = None,
    replay_id: int | None = None,
) -> None:
    """Append one history row per step, in one INSERT (nothing for no steps): on PostgreSQL
    `INSERT ... SELECT FROM unnest(...)` of three arrays, so the statement's text is the same
    for 5 steps or 5,000; on SQLite a multi-row VALUES."""
    if not steps:
        return
    if session.get_bind().dialect.name == "postgresql":
        messages = [_clip(step.message) for step in steps]
        arrays: list[ColumnElement[Any]] = [
            int_array("event_ids", (step.event_id for step in steps)),
            int_array("attempts", (step.attempt for step in steps)),
        ]
        if any(message is not None for message in messages):
            arrays.append(bindparam("messages", messages, type_=ARRAY(Text)))
        given = (
            func.unnest(*arrays)
            .table_valued(*["event_id", "attempt", "message"][: len(arrays)])
            .render_derived(name="given")
        )
        message = given.c.message if len(arrays) == 3 else literal(None, Text)
        session.execute(
            insert(ATTEMPTS).from_select(
                [
                    "event_id",
                    "attempt",
                    "message",
                    "attempted_at",
                    "decision",
                    "claim_token",
                    "polar_status",
                    "replay_id",
                ],
                select(
                    given.c.event_id,
                    given.c.attempt,
                    message,
                    literal(now, ATTEMPTS.c.attempted_at.type),
                    literal(decision.value, ATTEMPTS.c.decision.type),
                    literal(claim_token, ATTEMPTS.c.claim_token.type),
                    literal(polar_status, ATTEMPTS.c.polar_status.type),
                    literal(replay_id, ATTEMPTS.c.replay_id.type),
                ),
            )
        )
        return
    session.execute(
        insert(ATTEMPTS),
        [
            {
                "event_id": step.event_id,
                "attempted_at": now,
                "decision": decision.value,
                "claim_token": claim_token,
                "attempt": step.attempt,
                "polar_status": polar_status,
                "message": _clip(step.message),
                "replay_id": replay_id,
            }
            for step in steps
        ],
    )


def _clip(message: str | None) -> str | None:
    return None if message is None else message[:MAX_MESSAGE_LENGTH]


@dataclass(frozen=True)
class HistoryStep:
    """One step of an event's history as an operator reads it."""

    at: datetime
    decision: str
    attempt: int
    worker: str | None
    claim_token: str | None
    polar_status: int | None
    message: str | None
    replay_id: int | None
    replay_actor: str | None
    replay_reason: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "at": self.at.isoformat(),
            "decision": self.decision,
            "attempt": self.attempt,
            "worker": self.worker,
            "claim_token": self.claim_token,
            "polar_status": self.polar_status,
            "message": self.message,
            "replay_id": self.replay_id,
            "replay_actor": self.replay_actor,
            "replay_reason": self.replay_reason,
        }


def worker_of(claim_token: str | None) -> str | None:
    """The worker part of a claim token (`<worker id>:<random>`)."""
    if claim_token is None:
        return None
    return claim_token.rsplit(":", 1)[0]


def history_of(session: Session, event_id: int, *, limit: int = 500) -> list[HistoryStep]:
    """An event's history, oldest first (at most `limit` steps: the latest ones)."""
    rows = session.execute(
        select(DeliveryAttempt, Replay.actor, Replay.reason)
        .outerjoin(Replay, Replay.id == DeliveryAttempt.replay_id)
        .where(DeliveryAttempt.event_id == event_id)
        .order_by(DeliveryAttempt.id.desc())
        .limit(limit)
    ).all()
    return [
        HistoryStep(
            at=a.attempted_at,
            decision=a.decision,
            attempt=a.attempt,
            worker=worker_of(a.claim_token),
            claim_token=a.claim_token,
            polar_status=a.polar_status,
            message=a.message,
            replay_id=a.replay_id,
            replay_actor=actor,
            replay_reason=reason,
        )
        for a, actor, reason in reversed(rows)
    ]


def throttled_since(session: Session, since: datetime) -> int:
    """Rows that Polar answered 429 for since `since` (the throttled index)."""
    return int(
        session.scalar(
            select(func.count())
            .select_from(ATTEMPTS)
            .where(ATTEMPTS.c.polar_status == 429, ATTEMPTS.c.attempted_at >= since)
        )
        or 0
    )
