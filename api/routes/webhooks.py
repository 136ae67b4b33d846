"""POST /v1/polar/webhooks: Polar's Standard Webhooks. The signature is checked over the raw
bytes before anything else; outbox/webhooks.py stores and applies what is signed."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from api.deps import SessionDep
from api.schemas import error_body
from outbox.webhooks import receive_webhook, verify_signature

router = APIRouter(tags=["webhooks"])


async def _raw_body(request: Request) -> bytes:
    return await request.body()


# The handler is sync (it runs in the threadpool, like every DB route); the body is read here.
RawBody = Annotated[bytes, Depends(_raw_body)]


def _header(request: Request, name: str) -> bytes | None:
    """The header's bytes as sent (ASGI gives them as latin-1), or None if absent or repeated:
    two ids or timestamps would leave it open which one was signed."""
    values = request.headers.getlist(name)
    return values[0].encode("latin-1") if len(values) == 1 else None


@router.post(
    "/v1/polar/webhooks",
    status_code=202,
    responses={
        202: {"description": "verified and stored (applied if it moves credits)"},
        403: {"description": "invalid_signature: nothing was stored"},
        503: {"description": "webhooks_not_configured: POLAR_WEBHOOK_SECRET is not set"},
    },
)
def polar_webhook(request: Request, body: RawBody, session: SessionDep) -> JSONResponse:
    """Verify the signature, store the body once per `webhook-id`, apply Meter Credits grants
    and revokes; any signed body gets a 202."""
    settings = request.app.state.settings
    secret = settings.polar_webhook_secret
    if not secret:
        return JSONResponse(
            error_body("webhooks_not_configured", "POLAR_WEBHOOK_SECRET is not set"),
            status_code=503,
        )
    webhook_id = _header(request, "webhook-id")
    verify_signature(
        body,
        webhook_id=webhook_id,
        timestamp=_header(request, "webhook-timestamp"),
        signature=_header(request, "webhook-signature"),
        secret=secret,
        now=time.time(),
    )
    assert webhook_id is not None  # verify_signature refuses a request without one
    result = receive_webhook(session, webhook_id=webhook_id, body=body, settings=settings)
    return JSONResponse({"status": "accepted", "outcome": result.outcome}, status_code=202)
