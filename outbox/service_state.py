"""Facts shared by every process through the database (the API's /readyz reads what workers
learn): whether Polar accepts our credentials, whether it refuses batches with 422s that name
no event, when delivery last drained and which workers were seen (`outbox status`, the
console's overview)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select
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


LAST_DRAIN = "delivery_last_drain"
WORKER_PREFIX = "worker:"
# A worker's heartbeat row is dropped once it is this old (a restarted worker has a new pid).
FORGET_WORKERS_AFTER = timedelta(days=1)


def record_drain(session: Session, worker_id: str, delivered: int) -> None:
    """A drain finished: the last drain (which worker, how many rows it delivered) and this
    worker's heartbeat; heartbeats of workers gone for a day are forgotten."""
    set_state(session, LAST_DRAIN, str(delivered), worker_id)
    set_state(session, (WORKER_PREFIX + worker_id)[:64], "alive", worker_id)
    session.execute(
        delete(ServiceState).where(
            ServiceState.key.startswith(WORKER_PREFIX),
            ServiceState.updated_at < utcnow() - FORGET_WORKERS_AFTER,
        )
    )


@dataclass(frozen=True)
class DeliveryLiveness:
    """Whether delivery is alive: its last drain and the workers seen recently."""

    last_drain_at: datetime | None
    last_drain_worker: str | None
    workers: list[tuple[str, datetime]]

    def as_dict(self) -> dict[str, object]:
        return {
            "last_drain_at": self.last_drain_at.isoformat() if self.last_drain_at else None,
            "last_drain_worker": self.last_drain_worker,
            "workers": [{"worker": w, "seen_at": at.isoformat()} for w, at in self.workers],
        }


def delivery_liveness(session: Session, *, seen_within: timedelta) -> DeliveryLiveness:
    """The last drain and the workers whose heartbeat is newer than `seen_within`."""
    last = get_state(session, LAST_DRAIN)
    rows = session.execute(
        select(ServiceState.detail, ServiceState.updated_at)
        .where(
            ServiceState.key.startswith(WORKER_PREFIX),
            ServiceState.updated_at >= utcnow() - seen_within,
        )
        .order_by(ServiceState.updated_at.desc())
        .limit(100)
    ).all()
    return DeliveryLiveness(
        last_drain_at=last.updated_at if last else None,
        last_drain_worker=last.detail if last else None,
        workers=[(row.detail or "?", row.updated_at) for row in rows],
    )


CONSOLE_SECRET = "console_secret"  # noqa: S105 - the key of the secret, not the secret


def console_secret(session: Session) -> str:
    """The console's signing secret kept in the database (made once, shared by every
    process), for deployments that set no OUTBOX_CONSOLE_SECRET."""
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    session.execute(
        insert(ServiceState)
        .values(key=CONSOLE_SECRET, value=secrets.token_hex(32), updated_at=utcnow())
        .on_conflict_do_nothing(index_elements=[ServiceState.key])
    )
    found = get_state(session, CONSOLE_SECRET)
    assert found is not None
    return found.value
