"""Facts shared by every process through the database (the API's /readyz reads what workers
learn): whether Polar accepts our credentials, and whether it refuses batches with 422s that
name no event."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from outbox.models import ServiceState, utcnow

POLAR_CREDENTIALS = "polar_credentials"
CREDENTIALS_OK = "ok"
CREDENTIALS_REJECTED = "rejected"
POLAR_INGEST = "polar_ingest"
INGEST_OK = "ok"
INGEST_UNATTRIBUTED_422 = "unattributed_422"


@dataclass(frozen=True)
class StateValue:
    value: str
    detail: str | None
    updated_at: datetime


def set_state(session: Session, key: str, value: str, detail: str | None = None) -> None:
    """Upsert one shared fact."""
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    now = utcnow()
    stmt = insert(ServiceState).values(key=key, value=value, detail=detail, updated_at=now)
    session.execute(
        stmt.on_conflict_do_update(
            index_elements=[ServiceState.key],
            set_={"value": value, "detail": detail, "updated_at": now},
        )
    )


def get_state(session: Session, key: str) -> StateValue | None:
    """One shared fact, or None if never set."""
    row = session.execute(
        select(ServiceState.value, ServiceState.detail, ServiceState.updated_at).where(
            ServiceState.key == key
        )
    ).one_or_none()
    return None if row is None else StateValue(row.value, row.detail, row.updated_at)
