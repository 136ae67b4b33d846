"""POST /v1/usage: deduct credits and enqueue the usage event in one transaction."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import ValidationError
from sqlalchemy.orm import Session
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.asyncdb import AsyncDatabase
from api.deps import UsageToken, after_commit, cached_token, in_transaction
from api.errors import response_for
from api.schemas import ERROR_RESPONSES, ErrorOut, UsageIn, UsageOut
from outbox.idempotency import (
    StoredResponse,
    UsageRequest,
    http_usage_steps,
    request_fingerprint,
    run_idempotent_usage,
)
from outbox.states import TokenScope
from outbox.validation import (
    MAX_IDEMPOTENCY_KEY_LENGTH,
    NO_CONTROL_PATTERN,
    check_customer_id,
    check_idempotency_key,
    check_metadata,
)

log = logging.getLogger("api")


class UsageRoute(APIRoute):
    """The hot route's parameters, resolved without FastAPI's dependency solver for the
    ordinary request: a JSON body that `UsageIn` accepts, a cached token with the `usage`
    scope, at most one Idempotency-Key. The endpoint then gets exactly what FastAPI would have
    given it. Anything else (a bad body, an unknown token, a missing scope) goes FastAPI's way,
    which answers it as for every other route (422, 401, 403). Measured in docs/benchmarks.md
    (docs/explanation/request-path.md)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        general = super().get_route_handler()
        endpoint = self.endpoint

        async def handler(request: Request) -> Response:
            arguments = await _ordinary_arguments(request)
            if arguments is None:
                return await general(request)
            response: Response = await endpoint(**arguments)
            return response

        return handler


async def _ordinary_arguments(request: Request) -> dict[str, Any] | None:
    headers = request.headers
    if headers.get("content-type") != "application/json":
        return None
    token = cached_token(request, TokenScope.USAGE)
    if token is None:
        return None
    keys = headers.getlist("idempotency-key")
    if len(keys) > 1:
        return None
    try:
        raw = await request.body()
    except StarletteHTTPException:
        raise  # the body limit's 413, raised as FastAPI raises it
    except Exception:
        return None  # a client gone mid-body: FastAPI's handler answers it (400)
    try:
        body = UsageIn.model_validate(json.loads(raw))
    except (ValueError, ValidationError, RecursionError):
        return None
    return {
        "body": body,
        "request": request,
        "token": token,
        "idempotency_key": keys[0] if keys else None,
    }


router = APIRouter(tags=["usage"], route_class=UsageRoute)

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        description="Recommended: a repeat with the same key and body returns the first response "
        f"(1 to {MAX_IDEMPOTENCY_KEY_LENGTH} characters, no control characters; per token).",
        json_schema_extra={
            "minLength": 1,
            "maxLength": MAX_IDEMPOTENCY_KEY_LENGTH,
            "pattern": NO_CONTROL_PATTERN,
        },
    ),
]


@router.post(
    "/v1/usage",
    status_code=201,
    response_model=UsageOut,
    responses={
        **ERROR_RESPONSES,
        402: {"model": ErrorOut, "description": "insufficient_credits"},
        404: {"model": ErrorOut, "description": "customer_not_found"},
        409: {"model": ErrorOut, "description": "idempotency_key_reused"},
    },
)
async def post_usage(
    body: UsageIn,
    request: Request,
    token: UsageToken,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """Record one generation's usage: refused at once (402) if the customer lacks credits."""
    settings = request.app.state.settings
    # Validate everything before anything is written (refusals store no idempotency record).
    check_customer_id(body.customer_id)
    metadata = check_metadata(body.metadata, credits_field=settings.usage_credits_field)
    key = check_idempotency_key(idempotency_key)
    fingerprint = ""
    if key is not None:
        fingerprint = request_fingerprint("POST", "/v1/usage", body.model_dump(mode="json"))
    usage: UsageRequest = dict(
        token_id=token.id,
        key=key,
        fingerprint=fingerprint,
        customer_id=body.customer_id,
        credits=body.credits,
        metadata=metadata,
        settings=settings,
        error_response=response_for,
    )
    database: AsyncDatabase | None = request.app.state.async_database
    if database is not None:
        # PostgreSQL, in a served app: the steps on an async connection, no thread.
        # Every statement of these steps is atomic alone: autocommit, one round trip each.
        response = await database.run(lambda: http_usage_steps(**usage), autocommit=True)
        if response.status_code == 201:
            _nudge(request)
        return JSONResponse(response.body, status_code=response.status_code)

    def work(session: Session) -> StoredResponse:
        response = run_idempotent_usage(session, **usage)
        if response.status_code == 201:
            after_commit(session, request.app.state.nudge)
        return response

    # One transaction, committed before the response is built (201 means recorded).
    response = await in_transaction(request, work)
    return JSONResponse(response.body, status_code=response.status_code)


def _nudge(request: Request) -> None:
    """The after-commit nudge of the async path (best effort, as `api.deps.after_commit`)."""
    try:
        request.app.state.nudge()
    except Exception:
        log.exception("an after-commit hook failed (the request is recorded)")
