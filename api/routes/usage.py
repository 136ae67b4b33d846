"""POST /v1/usage: deduct credits and enqueue the usage event in one transaction."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from api.deps import UsageToken, after_commit, in_transaction
from api.errors import response_for
from api.schemas import ERROR_RESPONSES, ErrorOut, UsageIn, UsageOut
from outbox.idempotency import StoredResponse, request_fingerprint, run_idempotent_usage
from outbox.validation import (
    MAX_IDEMPOTENCY_KEY_LENGTH,
    NO_CONTROL_PATTERN,
    check_customer_id,
    check_idempotency_key,
    check_metadata,
)

router = APIRouter(tags=["usage"])

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

    def work(session: Session) -> StoredResponse:
        response = run_idempotent_usage(
            session,
            token_id=token.id,
            key=key,
            fingerprint=fingerprint,
            customer_id=body.customer_id,
            credits=body.credits,
            metadata=metadata,
            settings=settings,
            error_response=response_for,
        )
        if response.status_code == 201:
            after_commit(session, request.app.state.nudge)
        return response

    # One transaction, committed before the response is built (201 means recorded).
    response = await in_transaction(request, work)
    return JSONResponse(response.body, status_code=response.status_code)
