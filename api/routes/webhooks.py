"""POST /v1/polar/webhooks: Polar's Standard Webhooks. What can be checked without the body is
checked before it is read (the secret is set; the headers are there once each; the timestamp is
within five minutes; the id is sane); the signature is computed as the body streams in, and what
an unverified body may buffer is bounded for the whole process (`UnverifiedBodies`).
outbox/webhooks.py stores and applies what is signed (docs/explanation/webhooks.md)."""

from __future__ import annotations

import logging
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from api.deps import in_transaction
from api.schemas import error_body
from outbox.webhooks import SignatureCheck, receive_webhook

log = logging.getLogger("api")

router = APIRouter(tags=["webhooks"])

# What the bodies of every webhook request not verified yet may hold in memory together, in
# one API process: more than the largest body the route takes (10 MiB), so a large signed
# delivery goes through when nothing else is arriving.
MAX_UNVERIFIED_BYTES = 16 * 1024 * 1024


class UnverifiedBodies:
    """A byte budget shared by the webhook requests of one process (one event loop, so no
    lock): a body is kept while it is being verified only as long as the budget has room. One
    that does not fit is still read and checked, without being kept: unsigned, it is refused
    (403) as any other; signed, it is answered 503 `webhooks_busy` and Polar retries it."""

    def __init__(self, limit: int = MAX_UNVERIFIED_BYTES) -> None:
        self.limit = limit
        self.held = 0

    def take(self, size: int) -> bool:
        if self.held + size > self.limit:
            return False
        self.held += size
        return True

    def give_back(self, size: int) -> None:
        self.held -= size


def _header(request: Request, name: str) -> bytes | None:
    """The header's bytes as sent (ASGI gives them as latin-1), or None if absent or repeated:
    two ids or timestamps would leave it open which one was signed."""
    values = request.headers.getlist(name)
    return values[0].encode("latin-1") if len(values) == 1 else None


async def _verified_body(
    request: Request, check: SignatureCheck, budget: UnverifiedBodies
) -> bytes | None:
    """The body, read as it arrives with the signature computed over it; `InvalidSignature`
    if it is not signed; None if it is signed but was too large for the budget's room."""
    parts: list[bytes] = []
    kept = 0
    keeping = True
    try:
        async for chunk in request.stream():
            check.update(chunk)
            if keeping and budget.take(len(chunk)):
                parts.append(chunk)
                kept += len(chunk)
            elif keeping:
                keeping = False
                parts.clear()
                budget.give_back(kept)
                kept = 0
        check.verify()
        return b"".join(parts) if keeping else None
    finally:
        budget.give_back(kept)


@router.post(
    "/v1/polar/webhooks",
    status_code=202,
    responses={
        202: {"description": "verified and stored (applied if it moves credits)"},
        403: {"description": "invalid_signature: nothing was stored"},
        503: {
            "description": "webhooks_not_configured: POLAR_WEBHOOK_SECRET is not set; "
            "webhooks_busy: unverified bodies fill this process's memory budget (nothing was "
            "stored; Polar retries)"
        },
    },
)
async def polar_webhook(request: Request) -> Response:
    """Verify the signature, store the body once per `webhook-id`, apply Meter Credits grants
    and revokes; any signed body gets a 202."""
    settings = request.app.state.settings
    secret = settings.polar_webhook_secret
    if not secret:
        return JSONResponse(
            error_body("webhooks_not_configured", "POLAR_WEBHOOK_SECRET is not set"),
            status_code=503,
        )
    # Before a byte of the body is read: the headers, the id and the timestamp window.
    check = SignatureCheck(
        webhook_id=_header(request, "webhook-id"),
        timestamp=_header(request, "webhook-timestamp"),
        signature=_header(request, "webhook-signature"),
        secret=secret,
        now=time.time(),
    )
    try:
        body = await _verified_body(request, check, request.app.state.unverified_bodies)
    except ClientDisconnect:
        # Nobody to answer, nothing stored: one line, no traceback (anyone may do this).
        log.info("a webhook client disconnected before its body was complete")
        return Response(status_code=400)
    if body is None:
        return JSONResponse(
            error_body(
                "webhooks_busy",
                "webhook bodies being verified fill this process's memory budget; nothing was "
                "stored, retry later",
            ),
            status_code=503,
            headers={"Retry-After": "5"},
        )
    result = await in_transaction(
        request,
        lambda session: receive_webhook(
            session, webhook_id=check.webhook_id, body=body, settings=settings
        ),
    )
    return JSONResponse({"status": "accepted", "outcome": result.outcome}, status_code=202)
