"""The audit log (`audit_log`): every operator change, who, when, what and why; every
statement on that table. Shown in the console (docs/howto/console.md)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from outbox.models import AuditEntry, utcnow

REPLAY = "replay"
GRANT = "grant"
RECONCILE_FIX = "reconcile_fix"
RECONCILE = "reconcile"
REFUND = "refund"
DEBIT = "debit"


def record(
    session: Session, *, actor: str, action: str, reason: str | None, detail: dict[str, Any]
) -> None:
    """Append one entry, in the caller's transaction (with the change it records)."""
    session.add(
        AuditEntry(
            actor=actor[:200], action=action, reason=reason, detail=detail, created_at=utcnow()
        )
    )


def latest(session: Session, *, limit: int = 50, before: int | None = None) -> Sequence[AuditEntry]:
    """The newest entries first (older ones: `before` an id)."""
    query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
    if before is not None:
        query = query.where(AuditEntry.id < before)
    return list(session.scalars(query))
