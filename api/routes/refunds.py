"""Refunds: give back a usage's credits, whole or in part (docs/explanation/corrections.md).

Who may refund: a `usage` token (the app refunding its own failed generation: the common case)
and an `admin` token (support and operators). Usage tokens are not bound to customers here, as
for POST /v1/usage: a usage token that may spend any customer's credits may refund them.
Every refund is recorded in the audit log with the token as its actor (a retry replayed by its
Idempotency-Key is not recorded again).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse

from api.deps import SessionDep, UsageToken, after_commit
from api.errors import run_keyed
from api.routes.usage import IdempotencyKey
from api.schemas import ERROR_RESPONSES, ErrorOut, RefundIn, RefundOut
from outbox.idempotency import StoredResponse
from outbox.refunds import COMPENSATED, refund_by
from outbox.validation import MAX_ID, MAX_REASON_LENGTH, check_idempotency_key, check_text

router = APIRouter(tags=["usage"])

EventId = Annotated[int, Path(ge=1, le=MAX_ID, description="The usage's `event_id`.")]


@router.post(
    "/v1/usage/{event_id}/refunds",
    status_code=201,
    response_model=RefundOut,
    responses={
        **ERROR_RESPONSES,
        404: {"model": ErrorOut, "description": "event_not_found: no such usage"},
        409: {
            "model": ErrorOut,
            "description": "refund_exceeds_usage (more than is left to refund, a concurrent "
            "refund included), not_refundable (the event is itself a refund), "
            "idempotency_key_reused",
        },
    },
)
def post_refund(
    event_id: EventId,
    body: RefundIn,
    request: Request,
    session: SessionDep,
    token: UsageToken,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """Give back a usage's credits (default: all not yet refunded). A whole refund before
    Polar can hold the usage cancels it; otherwise a compensating event (negative credits)
    follows it to Polar."""
    # Validated before anything is written: refusals of the input store no idempotency record.
    check_text(body.reason, field="reason", max_length=MAX_REASON_LENGTH, required=True)
    key = check_idempotency_key(idempotency_key)
    settings = request.app.state.settings

    def action() -> StoredResponse:
        result = refund_by(
            session,
            event_id,
            body.credits,
            reason=body.reason,
            actor=f"api-token:{token.name or token.id} ({token.scope.value})",
            settings=settings,
        )
        if result.action == COMPENSATED:
            after_commit(session, request.app.state.nudge)
        return StoredResponse(201, result.as_dict())

    return run_keyed(
        session,
        token_id=token.id,
        key=key,
        path=f"/v1/usage/{event_id}/refunds",
        body=body,
        action=action,
    )
