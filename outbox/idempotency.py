"""HTTP idempotency: a repeated request with the same `Idempotency-Key` (per token) and the same
body gets the first response; the same key with another body is refused.

Race-free without a read-then-write: the key is claimed with INSERT ... ON CONFLICT DO NOTHING,
which on PostgreSQL waits for a concurrent claimer of the same key to commit or roll back.
Requests refused by validation store nothing (as Stripe does); domain refusals (402, 404) are
stored, so a repeat sees the same answer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from outbox.errors import IdempotencyConflict, OutboxError
from outbox.models import IdempotencyRecord, utcnow


@dataclass(frozen=True)
class StoredResponse:
    """A status code and a JSON body, as first answered."""

    status_code: int
    body: dict[str, Any]


def request_fingerprint(method: str, path: str, body: Any) -> str:
    """A stable hash of what the request asks for (canonical JSON of the parsed body)."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(f"{method} {path}\n{canonical}".encode()).hexdigest()


def _claim_key(session: Session, token_id: int, key: str, fingerprint: str) -> int | None:
    dialect_insert = (
        postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    )
    stmt = (
        dialect_insert(IdempotencyRecord)
        .values(token_id=token_id, key=key, request_hash=fingerprint, created_at=utcnow())
        .on_conflict_do_nothing(index_elements=["token_id", "key"])
        .returning(IdempotencyRecord.id)
    )
    record_id = session.execute(stmt).scalar_one_or_none()
    return None if record_id is None else int(record_id)


def run_idempotent(
    session: Session,
    *,
    token_id: int,
    key: str | None,
    fingerprint: str,
    action: Callable[[], StoredResponse],
    error_response: Callable[[OutboxError], StoredResponse],
) -> StoredResponse:
    """Run `action` once per (token, key); repeats get the stored first response.

    `action` runs in a savepoint: a domain refusal (an `OutboxError`) rolls back its writes and
    is stored as its error response, so the refusal is replayed too.
    """
    if key is None:
        return action()
    record_id = _claim_key(session, token_id, key, fingerprint)
    if record_id is None:
        record = session.execute(
            select(IdempotencyRecord).where(
                IdempotencyRecord.token_id == token_id, IdempotencyRecord.key == key
            )
        ).scalar_one()
        if record.request_hash != fingerprint:
            raise IdempotencyConflict(idempotency_key=key)
        assert record.status_code is not None and record.response_body is not None
        return StoredResponse(record.status_code, record.response_body)
    try:
        with session.begin_nested():
            response = action()
    except OutboxError as exc:
        response = error_response(exc)
    session.execute(
        update(IdempotencyRecord)
        .where(IdempotencyRecord.id == record_id)
        .values(status_code=response.status_code, response_body=response.body)
    )
    return response
