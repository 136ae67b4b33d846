"""Holds: reserve credits before a long generation, then capture or release them."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from api.deps import SessionDep, UsageToken, after_commit, respond
from api.errors import response_for, run_keyed
from api.routes.usage import IdempotencyKey
from api.schemas import (
    ERROR_RESPONSES,
    CaptureIn,
    ErrorOut,
    HoldIn,
    HoldOut,
    PathId,
    ReleaseOut,
    UsageOut,
)
from outbox.errors import HoldClosed
from outbox.holds import capture_hold, place_hold, release_hold
from outbox.idempotency import StoredResponse
from outbox.validation import check_customer_id, check_idempotency_key

router = APIRouter(prefix="/v1/holds", tags=["holds"])

HoldId = PathId
HOLD_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorOut, "description": "hold_not_found"},
    409: {"model": ErrorOut, "description": "hold_closed"},
}


@router.post(
    "",
    status_code=201,
    response_model=HoldOut,
    responses={
        **ERROR_RESPONSES,
        402: {"model": ErrorOut, "description": "insufficient_credits"},
        404: {"model": ErrorOut, "description": "customer_not_found"},
        409: {"model": ErrorOut, "description": "idempotency_key_reused"},
    },
)
def post_hold(
    body: HoldIn,
    request: Request,
    session: SessionDep,
    token: UsageToken,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """Reserve credits; they are released by themselves after HOLD_TTL_SECONDS. A repeat with
    the same Idempotency-Key and body returns the first hold (nothing more is held)."""
    check_customer_id(body.customer_id)
    key = check_idempotency_key(idempotency_key)

    def action() -> StoredResponse:
        result = place_hold(
            session, body.customer_id, body.credits, settings=request.app.state.settings
        )
        out = HoldOut(hold_id=result.hold_id, balance=result.balance, expires_at=result.expires_at)
        return StoredResponse(201, out.model_dump(mode="json"))

    return run_keyed(
        session, token_id=token.id, key=key, path="/v1/holds", body=body, action=action
    )


@router.post(
    "/{hold_id}/capture",
    status_code=201,
    response_model=UsageOut,
    responses={
        **ERROR_RESPONSES,
        **HOLD_ERRORS,
        402: {
            "model": ErrorOut,
            "description": "insufficient_credits: a revoke of Polar credits took part of the hold",
        },
    },
)
def post_capture(
    hold_id: HoldId,
    request: Request,
    session: SessionDep,
    _: UsageToken,
    body: CaptureIn | None = None,
) -> JSONResponse:
    """Bill what the generation used (default: all held); the rest returns to the balance.
    Capturing twice returns the first result. A revoke of the customer's Polar credits may
    have taken part of the hold (402 for more than is left) or all of it (409)."""
    body = body or CaptureIn()
    try:
        result = capture_hold(
            session, hold_id, body.credits, body.metadata, settings=request.app.state.settings
        )
    except HoldClosed as exc:
        # Answered, not raised, so that the transaction commits: a hold found past its expiry
        # has just been released (its credits are back now, not at the next sweep).
        refusal = response_for(exc)
        return JSONResponse(refusal.body, status_code=refusal.status_code)
    if not result.replayed:
        after_commit(session, request.app.state.nudge)
    return JSONResponse(
        {"event_id": result.event_id, "external_id": result.external_id, "balance": result.balance},
        status_code=201,
    )


@router.post(
    "/{hold_id}/release",
    response_model=ReleaseOut,
    responses={**ERROR_RESPONSES, **HOLD_ERRORS},
)
def post_release(hold_id: HoldId, session: SessionDep, _: UsageToken) -> JSONResponse:
    """Return the held credits; nothing is billed."""
    result = release_hold(session, hold_id)
    return respond(ReleaseOut(hold_id=result.hold_id, balance=result.balance, status=result.status))
