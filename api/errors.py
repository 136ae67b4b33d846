"""Every error leaves the API as `{"code": ..., "detail": ...}`; one mapping, here."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import InterfaceError, InternalError, OperationalError, ProgrammingError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.deadline import current_deadline
from api.deps import bearer_token, forbidden_body, required_scope
from api.schemas import error_body
from outbox import errors
from outbox.idempotency import StoredResponse, request_fingerprint, run_idempotent

log = logging.getLogger("api")

STATUS_BY_ERROR: dict[type[errors.OutboxError], int] = {
    errors.InvalidRequest: 422,
    errors.InvalidSignature: 403,
    errors.InsufficientCredits: 402,
    errors.CustomerNotFound: 404,
    errors.IdempotencyConflict: 409,
    errors.HoldNotFound: 404,
    errors.HoldClosed: 409,
    errors.EventNotFound: 404,
    errors.NotReplayable: 409,
    errors.NotRefundable: 409,
    errors.RefundExceedsUsage: 409,
}

CODE_BY_STATUS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
    503: "unavailable",
}


def response_for(exc: errors.OutboxError) -> StoredResponse:
    """The status and body for a domain error."""
    status = next((s for cls, s in STATUS_BY_ERROR.items() if isinstance(exc, cls)), 500)
    extra = {"field": exc.context["field"]} if "field" in exc.context else {}
    return StoredResponse(status, error_body(exc.code, exc.detail, **extra))


def run_keyed(
    session: Any,
    *,
    token_id: int,
    key: str | None,
    path: str,
    body: BaseModel,
    action: Callable[[], StoredResponse],
) -> JSONResponse:
    """`POST path` with `body` under the Idempotency-Key `key` (`outbox.idempotency`): the
    first request's answer, a domain error included, is stored and answered again to a repeat;
    the same key with another body is refused."""
    response = run_idempotent(
        session,
        token_id=token_id,
        key=key,
        fingerprint=request_fingerprint("POST", path, body.model_dump(mode="json")),
        action=action,
        error_response=response_for,
    )
    return JSONResponse(response.body, status_code=response.status_code)


def _field_of(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    if parts[:1] == ["metadata"] and len(parts) > 2:
        # ("metadata", key, "str"): pydantic names the union branch it tried last; the field
        # is the key.
        parts = parts[:2]
    return ".".join(parts) or "body"


def _describe_validation(exc: RequestValidationError) -> tuple[str, str]:
    first = exc.errors()[0] if exc.errors() else {"loc": ("body",), "msg": "invalid request"}
    field = _field_of(tuple(first.get("loc", ("body",))))
    message = str(first.get("msg", "invalid"))
    if first.get("type") == "json_invalid":
        return "body", "the request body is not valid JSON"
    if first.get("type") == "extra_forbidden":
        return field, f"unknown field {field!r}"
    return field, f"{field}: {message}"


def _unparseable(cause: BaseException) -> str:
    """Why a body could not be read at all (the JSON parser gave up before validation)."""
    if isinstance(cause, UnicodeDecodeError):
        return "the request body is not valid UTF-8"
    if isinstance(cause, RecursionError):
        return "the request body is nested too deeply"
    if isinstance(cause, ValueError) and "digits" in str(cause):
        return "the request body has a number with too many digits"
    return "the request body could not be parsed as JSON"


def _auth_refusal(request: Request) -> JSONResponse | None:
    """401 for a request to a token-protected route without a valid token, 403 for a token
    without the route's scope, else None: what the auth dependency would have answered."""
    from sqlalchemy.orm import Session

    scope = required_scope(request.scope.get("route"))
    if scope is None:
        return None

    token = bearer_token(request.headers.get("authorization", ""))
    info = None
    if token is not None:
        with Session(request.app.state.engine) as session:
            info = request.app.state.token_cache.lookup(session, token)
    if info is not None:
        if info.allows(scope):
            return None
        return JSONResponse(forbidden_body(scope), status_code=403)
    return JSONResponse(
        error_body("unauthorized", "missing, malformed, invalid or revoked bearer token"),
        status_code=401,
        headers={"WWW-Authenticate": "Bearer"},
    )


async def _invalid_body(request: Request, field: str, detail: str) -> JSONResponse:
    """422 invalid_request naming the field, or 401/403 when the token is bad or lacks the
    scope: FastAPI parses the body before the auth dependency runs, and the answer must be the
    same as if the token had been checked first, whatever the body."""
    try:
        refusal = await run_in_threadpool(_auth_refusal, request)
    except (OperationalError, InterfaceError, PoolTimeout) as exc:
        return database_refusal_response(exc)  # the token could not be checked
    if refusal is not None:
        return refusal
    return JSONResponse(error_body("invalid_request", detail, field=field), status_code=422)


def _missing_table(exc: Exception) -> bool:
    orig = getattr(exc, "orig", None)
    return getattr(orig, "sqlstate", None) == "42P01" or "no such table" in str(orig)


def _schema_not_migrated() -> JSONResponse:
    """An unmigrated database is an operator's mistake the client can only wait out: 503."""
    log.error("the database schema is not migrated: run `outbox db upgrade`")
    return JSONResponse(
        error_body(
            "schema_not_migrated",
            "the database schema is not migrated; nothing was recorded, retry later",
        ),
        status_code=503,
        headers={"Retry-After": "5"},
    )


# SQLSTATEs of the bounded waits (outbox.db.make_request_engine).
LOCK_NOT_AVAILABLE = "55P03"  # lock_timeout
QUERY_CANCELED = "57014"  # statement_timeout
IDLE_IN_TRANSACTION_TIMEOUT = "25P03"  # idle_in_transaction_session_timeout


NOTHING_RECORDED = "; nothing was recorded, retry later"
OUTCOME_UNKNOWN = (
    "the request's commit was sent to the database and its answer never came: it may or may "
    "not have been recorded. Retry with the same Idempotency-Key (a request without one may "
    "have been recorded)"
)


def _database_refusal(exc: Exception) -> tuple[str, str, str]:
    """(code, detail, Retry-After) for a database wait that ran out or a database that is down;
    `outcome_unknown` when the request's commit was in flight (api/deadline.py)."""
    deadline = current_deadline.get()
    if deadline is not None and deadline.committing:
        return "outcome_unknown", OUTCOME_UNKNOWN, "1"
    if isinstance(exc, PoolTimeout):
        return (
            "overloaded",
            "every database connection of this process is busy" + NOTHING_RECORDED,
            "1",
        )
    sqlstate = getattr(getattr(exc, "orig", None), "sqlstate", None)
    if sqlstate == LOCK_NOT_AVAILABLE:
        detail = "another request holds a row this one needs (lock timeout)"
        return "locked", detail + NOTHING_RECORDED, "1"
    if deadline is not None and deadline.expired:
        detail = f"the database did not answer within the request's {deadline.seconds:g} s deadline"
        return "database_timeout", detail + NOTHING_RECORDED, "1"
    if sqlstate in (QUERY_CANCELED, IDLE_IN_TRANSACTION_TIMEOUT):
        return "database_timeout", "the database did not answer in time" + NOTHING_RECORDED, "1"
    return "database_unavailable", "the database is unavailable" + NOTHING_RECORDED, "5"


def database_refusal_response(exc: Exception) -> JSONResponse:
    """The 503 for a database error (`_database_refusal`)."""
    code, detail, retry_after = _database_refusal(exc)
    log.error("database refusal %s: %s", code, type(exc).__name__)
    return JSONResponse(
        error_body(code, detail), status_code=503, headers={"Retry-After": retry_after}
    )


def install_error_handlers(app: FastAPI) -> None:
    """Map domain errors, validation errors, HTTP errors and surprises to the one error shape."""

    @app.exception_handler(errors.OutboxError)
    async def _domain(_: Request, exc: errors.OutboxError) -> JSONResponse:
        response = response_for(exc)
        return JSONResponse(response.body, status_code=response.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        field, detail = _describe_validation(exc)
        return await _invalid_body(request, field, detail)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.__cause__ is not None:
            # FastAPI's "error parsing the body" (raised from the parser's exception): a bad
            # body like any other.
            return await _invalid_body(request, "body", _unparseable(exc.__cause__))
        if isinstance(exc.detail, dict) and "code" in exc.detail:
            body = exc.detail
        else:
            code = CODE_BY_STATUS.get(exc.status_code, "error")
            body = error_body(code, str(exc.detail))
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(ProgrammingError)
    async def _schema_missing(request: Request, exc: Exception) -> JSONResponse:
        if _missing_table(exc):
            return _schema_not_migrated()
        return await _unexpected(request, exc)

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    @app.exception_handler(PoolTimeout)
    @app.exception_handler(InternalError)  # the idle-in-transaction timeout is one (25P03)
    async def _database_down(request: Request, exc: Exception) -> JSONResponse:
        if _missing_table(exc):  # SQLite's "no such table"
            return _schema_not_migrated()
        code, _, _ = _database_refusal(exc)
        if code == "database_unavailable" and isinstance(exc, InternalError):
            return await _unexpected(request, exc)
        return database_refusal_response(exc)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error", exc_info=exc)
        return JSONResponse(
            error_body("internal_error", "an unexpected error occurred; it has been logged"),
            status_code=500,
        )
