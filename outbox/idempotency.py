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
from http import HTTPStatus
from typing import Any, TypedDict, Unpack

from sqlalchemy import and_, bindparam, case, exists, func, literal, select, true, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from outbox.errors import IdempotencyConflict, OutboxError
from outbox.ledger import (
    Spend,
    UsageResult,
    build_deduct_statement,
    build_spend_statement,
    new_external_id,
    record_usage,
    refusal_steps,
    usage_steps,
)
from outbox.models import Base, IdempotencyRecord, utcnow
from outbox.settings import Settings
from outbox.steps import ROLLBACK, Query, Steps, run_steps, sqlstate
from outbox.validation import Metadata

# The HTTP idempotency record of POST /v1/usage, written by the spend's own statement
# (PostgreSQL): one round trip for the lookup, the spend and the record.
_outbox_events = Base.metadata.tables["outbox_events"]
_idempotency_records = Base.metadata.tables["idempotency_records"]


def build_keyed_spend_statement() -> Any:
    """PostgreSQL, POST /v1/usage with an `Idempotency-Key`: the spend of `_SPEND` and the
    key's record in ONE statement, no savepoint. The record is looked up first (`existing`):
    if the key was used (committed), nothing is deducted and the statement returns the first
    response. Otherwise the spend runs and the record is INSERTed with its 201 response,
    `ON CONFLICT DO NOTHING`: a concurrent request with the same key makes this insert wait
    for it, and if it commits first `claim` is empty and the statement raises `KEY_TAKEN`, so
    its spend is undone with it, even in autocommit (the caller then replays the winner's
    record: `http_usage_steps`). Parameters: as
    `_SPEND`, plus p_token_id, p_key and p_request_hash. One row, every column nullable:
    balance and event_id (spent), claim_id (recorded), request_hash, status_code and
    response_body (the key's earlier record)."""
    r = _idempotency_records.c

    def param(name: str, column: Any) -> Any:
        return bindparam(name, type_=column.type)

    existing = (
        select(r.request_hash, r.status_code, r.response_body)
        .where(r.token_id == param("p_token_id", r.token_id), r.key == param("p_key", r.key))
        .cte("existing")
    )
    deduct = build_deduct_statement().where(~exists(select(literal(1)).select_from(existing)))
    spend = build_spend_statement(deduct)
    # The CTEs of the spend, reused: deducted, event (and entry, joined in `spend`).
    spent = spend.subquery("spent")
    response = func.jsonb_build_object(
        "event_id",
        spent.c.id,
        "external_id",
        param("p_external_id", _outbox_events.c.external_id),
        "balance",
        spent.c.balance,
    )
    claim = (
        postgresql.insert(_idempotency_records)
        .from_select(
            ["token_id", "key", "request_hash", "status_code", "response_body", "created_at"],
            select(
                param("p_token_id", r.token_id),
                param("p_key", r.key),
                param("p_request_hash", r.request_hash),
                literal(HTTPStatus.CREATED.value, r.status_code.type),
                response,
                param("p_now", r.created_at),
            ).select_from(spent),
        )
        .on_conflict_do_nothing(index_elements=["token_id", "key"])
        .returning(r.id)
        .cte("claim")
    )
    one = select(literal(1).label("one")).subquery("one")
    # Spent but not recorded: a concurrent request with this key committed first. The whole
    # statement must be undone: the function raises KEY_TAKEN (migration 8b2f4d6a1c3e).
    taken = case(
        (and_(spent.c.id.is_not(None), claim.c.id.is_(None)), func.outbox_idempotency_key_taken())
    )
    return select(
        spent.c.balance,
        spent.c.id.label("event_id"),
        claim.c.id.label("claim_id"),
        existing.c.request_hash,
        existing.c.status_code,
        existing.c.response_body,
        taken.label("key_taken"),
    ).select_from(one.outerjoin(spent, true()).outerjoin(claim, true()).outerjoin(existing, true()))


KEY_TAKEN = "OB001"  # SQLSTATE of outbox_idempotency_key_taken()


_KEYED_SPEND = build_keyed_spend_statement()


@dataclass(frozen=True)
class KeyedSpend:
    """What `keyed_spend_steps` did: `result` if it spent; `claimed` if the key's record was
    written with it (201 recorded); `first` (request hash, status, body) if the key was used
    before. Spent but not claimed: a concurrent request with the key committed first."""

    result: UsageResult | None
    claimed: bool
    first: tuple[str, int, dict[str, Any]] | None


def keyed_spend_steps(
    customer_id: str,
    credits: int,
    metadata: Metadata | None,
    *,
    token_id: int,
    key: str,
    request_hash: str,
    settings: Settings,
) -> Steps[KeyedSpend]:
    """PostgreSQL only: the spend and its HTTP idempotency record in one statement
    (`build_keyed_spend_statement`), as steps (`outbox.steps`); the caller
    (`http_usage_steps`) decides what each outcome answers."""
    spend = Spend.validated(customer_id, credits, metadata, settings)
    external_id = new_external_id()
    row = yield Query(
        _KEYED_SPEND,
        {
            **spend.params(external_id),  # its idempotency_key is None: the HTTP key is `p_key`
            "p_token_id": token_id,
            "p_key": key,
            "p_request_hash": request_hash,
        },
    )
    assert row is not None  # the statement always returns its one row
    result = (
        None
        if row.event_id is None
        else UsageResult(
            event_id=int(row.event_id), external_id=external_id, balance=int(row.balance)
        )
    )
    first = (
        None
        if row.request_hash is None
        else (row.request_hash, int(row.status_code), dict(row.response_body))
    )
    return KeyedSpend(result=result, claimed=row.claim_id is not None, first=first)


@dataclass(frozen=True)
class StoredResponse:
    """A status code and a JSON body, as first answered."""

    status_code: int
    body: dict[str, Any]


def request_fingerprint(method: str, path: str, body: Any) -> str:
    """A stable hash of what the request asks for (canonical JSON of the parsed body)."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(f"{method} {path}\n{canonical}".encode()).hexdigest()


def _is_postgresql(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _claim_key(
    session: Session,
    token_id: int,
    key: str,
    fingerprint: str,
    response: StoredResponse | None = None,
) -> int | None:
    """Insert the key's record (with its response if already known); None if the key is
    taken (after waiting for a concurrent claimer to commit or roll back)."""
    dialect_insert = postgresql.insert if _is_postgresql(session) else sqlite.insert
    values: dict[str, Any] = {
        "token_id": token_id,
        "key": key,
        "request_hash": fingerprint,
        "created_at": utcnow(),
    }
    if response is not None:
        values |= {"status_code": response.status_code, "response_body": response.body}
    stmt = (
        dialect_insert(IdempotencyRecord)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["token_id", "key"])
        .returning(IdempotencyRecord.id)
    )
    record_id = session.execute(stmt).scalar_one_or_none()
    return None if record_id is None else int(record_id)


def _replay(
    first: tuple[str, int | None, dict[str, Any] | None], key: str, fingerprint: str
) -> StoredResponse:
    """The first response to this key, or `IdempotencyConflict` if it was for another body."""
    request_hash, status_code, body = first
    if request_hash != fingerprint:
        raise IdempotencyConflict(idempotency_key=key)
    assert status_code is not None and body is not None
    return StoredResponse(status_code, body)


def _stored(session: Session, token_id: int, key: str, fingerprint: str) -> StoredResponse:
    return run_steps(session, _stored_steps(token_id, key, fingerprint))


def _usage_body(result: UsageResult) -> dict[str, Any]:
    return {
        "event_id": result.event_id,
        "external_id": result.external_id,
        "balance": result.balance,
    }


ErrorResponse = Callable[[OutboxError], StoredResponse]


class UsageRequest(TypedDict):
    """The arguments of `run_idempotent_usage` and `http_usage_steps` past the session."""

    token_id: int
    key: str | None
    fingerprint: str
    customer_id: str
    credits: int
    metadata: Metadata | None
    settings: Settings
    error_response: ErrorResponse


def run_idempotent_usage(session: Session, **request: Unpack[UsageRequest]) -> StoredResponse:
    """POST /v1/usage: `record_usage` once per (token, key), as `run_idempotent` does, in the
    request's own session (a spend undone by a concurrent request's key returns to a
    savepoint, never rolls the session back). On PostgreSQL, the steps of `http_usage_steps`
    (what the API runs on its async connection), driven here on the session; on SQLite,
    `run_idempotent` with a savepoint."""
    if _is_postgresql(session):
        return run_steps(session, http_usage_steps(**request), savepoint=True)

    def action() -> StoredResponse:
        result = record_usage(
            session,
            request["customer_id"],
            request["credits"],
            request["metadata"],
            settings=request["settings"],
        )
        return StoredResponse(201, _usage_body(result))

    return run_idempotent(
        session,
        token_id=request["token_id"],
        key=request["key"],
        fingerprint=request["fingerprint"],
        action=action,
        error_response=request["error_response"],
    )


def http_usage_steps(
    *,
    token_id: int,
    key: str | None,
    fingerprint: str,
    customer_id: str,
    credits: int,
    metadata: Metadata | None,
    settings: Settings,
    error_response: ErrorResponse,
) -> Steps[StoredResponse]:
    """PostgreSQL, POST /v1/usage as steps (`outbox.steps`). Without a key: the one-statement
    spend (a refusal raises, as `record_usage` does). With a key: ONE statement and no
    savepoint (`keyed_spend_steps`): the lookup of the key, the spend and the key's record
    with its 201 response; a replay is that one statement too (it spends nothing). A refusal
    (402, 404) spends nothing and is stored as the key's response by a second statement. When a
    concurrent request with the same key commits first, the statement raises (`KEY_TAKEN`),
    which undoes its spend, and the winner's response is replayed. Every statement is atomic
    on its own and a ROLLBACK only follows a failed statement: these steps may run in
    autocommit (`api.asyncdb.AsyncDatabase.run`)."""
    if key is None:
        result = yield from usage_steps(customer_id, credits, metadata, settings=settings)
        return StoredResponse(201, _usage_body(result))
    try:
        outcome = yield from keyed_spend_steps(
            customer_id,
            credits,
            metadata,
            token_id=token_id,
            key=key,
            request_hash=fingerprint,
            settings=settings,
        )
    except Exception as exc:
        if sqlstate(exc) != KEY_TAKEN:
            raise
        # A concurrent request with this key committed its record while this one spent: the
        # statement was undone (it raised), the transaction is aborted.
        yield ROLLBACK
        return (yield from _stored_steps(token_id, key, fingerprint))
    if outcome.claimed:
        assert outcome.result is not None
        return StoredResponse(201, _usage_body(outcome.result))
    if outcome.first is not None:
        return _replay(outcome.first, key, fingerprint)
    assert outcome.result is None, "a spend without its key's record raises KEY_TAKEN"
    response = error_response((yield from refusal_steps(customer_id, credits)))
    claimed = yield Query(
        _CLAIM_WITH_RESPONSE,
        {
            "p_token_id": token_id,
            "p_key": key,
            "p_request_hash": fingerprint,
            "p_status_code": response.status_code,
            "p_response_body": response.body,
            "p_created_at": utcnow(),
        },
    )
    if claimed is None:
        return (yield from _stored_steps(token_id, key, fingerprint))
    return response


_records = Base.metadata.tables["idempotency_records"]
# PostgreSQL: a refusal's record, with its response (http_usage_steps).
_CLAIM_WITH_RESPONSE = (
    postgresql.insert(_records)
    .values(
        {
            name: bindparam(f"p_{name}", type_=_records.c[name].type)
            for name in (
                "token_id",
                "key",
                "request_hash",
                "status_code",
                "response_body",
                "created_at",
            )
        }
    )
    .on_conflict_do_nothing(index_elements=["token_id", "key"])
    .returning(_records.c.id)
)
_STORED = select(_records.c.request_hash, _records.c.status_code, _records.c.response_body).where(
    _records.c.token_id == bindparam("p_token_id"), _records.c.key == bindparam("p_key")
)


def _stored_steps(token_id: int, key: str, fingerprint: str) -> Steps[StoredResponse]:
    """The key's committed record, replayed (`_replay`)."""
    row = yield Query(_STORED, {"p_token_id": token_id, "p_key": key})
    assert row is not None, "the key's record was committed by another request"
    return _replay((row.request_hash, row.status_code, row.response_body), key, fingerprint)


def run_idempotent(
    session: Session,
    *,
    token_id: int,
    key: str | None,
    fingerprint: str,
    action: Callable[[], StoredResponse],
    error_response: ErrorResponse,
) -> StoredResponse:
    """Run `action` once per (token, key); repeats get the stored first response.

    `action` runs in a savepoint: a domain refusal (an `OutboxError`) rolls back its writes and
    is stored as its error response, so the refusal is replayed too.
    """
    if key is None:
        return action()
    record_id = _claim_key(session, token_id, key, fingerprint)
    if record_id is None:
        return _stored(session, token_id, key, fingerprint)
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
