"""POST /v1/polar/webhooks: Polar's Standard Webhooks, verified with the Polar SDK."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from polar import webhooks as polar_webhooks

from api.deps import SessionDep
from api.errors import error_body
from outbox.webhooks import receive_webhook

router = APIRouter(tags=["webhooks"])


class _AnyEventType(frozenset[str]):
    """We verify the signature with the SDK but parse only what we use: the SDK's typed
    payloads refuse some valid events (POLAR.md), and an unknown type must still get a 2xx."""

    def __contains__(self, item: object) -> bool:
        return isinstance(item, str)


def _as_dict(data: dict[str, Any]) -> dict[str, Any]:
    return data


async def _raw_body(request: Request) -> bytes:
    return await request.body()


# The handler is sync (it runs in the threadpool, like every DB route); the body is read here.
RawBody = Annotated[bytes, Depends(_raw_body)]


@router.post(
    "/v1/polar/webhooks",
    status_code=202,
    responses={403: {"description": "invalid_signature"}, 503: {"description": "not configured"}},
)
def polar_webhook(request: Request, body: RawBody, session: SessionDep) -> JSONResponse:
    """Verify, store once per `webhook-id`, apply Meter Credits grants/revokes; answer fast."""
    secret = request.app.state.settings.polar_webhook_secret
    if not secret:
        return JSONResponse(
            error_body("webhooks_not_configured", "POLAR_WEBHOOK_SECRET is not set"),
            status_code=503,
        )
    headers = dict(request.headers)
    try:
        payload = polar_webhooks.validate_event(body, headers, secret, _AnyEventType(), _as_dict)
    except polar_webhooks.PolarWebhookVerificationError as exc:
        return JSONResponse(error_body("invalid_signature", str(exc)), status_code=403)
    except polar_webhooks.PolarWebhookError:
        # Signed but not a JSON object we can read: acknowledge and keep it for inspection.
        payload = {"type": "unparseable", "raw": body.decode("utf-8", "replace")[:10_000]}
    if not isinstance(payload, dict):
        payload = {"type": "unparseable", "raw": json.dumps(payload)[:10_000]}
    webhook_id = headers.get("webhook-id", "")[:255]
    result = receive_webhook(
        session, webhook_id=webhook_id, payload=payload, settings=request.app.state.settings
    )
    return JSONResponse({"status": "accepted", "outcome": result.outcome}, status_code=202)
