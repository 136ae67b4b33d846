"""Polar webhooks that move credits: the Meter Credits benefit.

`benefit_grant.created` / `benefit_grant.cycled` of a `meter_credit` benefit grant
`data.properties.last_credited_units` credits to the customer whose `external_id` Polar sends;
`benefit_grant.revoked` takes them back, never below zero (the shortfall is recorded). With
POLAR_METER_ID set, only grants for that meter count. Each webhook is applied exactly once:
the `webhook-id` is unique in `webhook_events`, and the grant carries it as idempotency key.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from outbox.errors import OutboxError
from outbox.ledger import grant_credits, revoke_credits
from outbox.models import WebhookEvent, utcnow
from outbox.settings import Settings

log = logging.getLogger("outbox.webhooks")

GRANT_TYPES = frozenset({"benefit_grant.created", "benefit_grant.cycled"})
REVOKE_TYPES = frozenset({"benefit_grant.revoked"})


@dataclass(frozen=True)
class WebhookOutcome:
    stored: bool  # False: a redelivery of a webhook already stored (nothing applied again)
    outcome: str


def _get(data: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def credit_change(payload: dict[str, Any], settings: Settings) -> tuple[str, int] | str:
    """(customer external id, signed credits) for a Meter Credits webhook, or why it is not one."""
    kind = payload.get("type")
    if kind not in GRANT_TYPES | REVOKE_TYPES:
        return f"ignored: {kind} does not move credits"
    data = payload.get("data")
    if _get(data, "benefit", "type") != "meter_credit":
        return "ignored: not a meter_credit benefit"
    meter_id = _get(data, "benefit", "properties", "meter_id")
    if settings.polar_meter_id and meter_id != settings.polar_meter_id:
        return f"ignored: meter {meter_id} is not POLAR_METER_ID"
    customer_id = _get(data, "customer", "external_id")
    if not isinstance(customer_id, str) or not customer_id:
        return "ignored: the Polar customer has no external_id (cannot map it to ours)"
    units = _get(data, "properties", "last_credited_units")
    if isinstance(units, bool) or not isinstance(units, int) or units == 0:
        return f"ignored: last_credited_units is {units!r}"
    if kind in REVOKE_TYPES:
        return customer_id, -abs(units)
    return customer_id, units


def receive_webhook(
    session: Session, *, webhook_id: str, payload: dict[str, Any], settings: Settings
) -> WebhookOutcome:
    """Store a verified webhook once and apply it, in the caller's transaction."""
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    kind = str(payload.get("type") or "unknown")[:100]
    row_id = session.execute(
        insert(WebhookEvent)
        .values(webhook_id=webhook_id, type=kind, payload=payload, received_at=utcnow())
        .on_conflict_do_nothing(index_elements=[WebhookEvent.webhook_id])
        .returning(WebhookEvent.id)
    ).scalar_one_or_none()
    if row_id is None:
        return WebhookOutcome(stored=False, outcome="duplicate: already received")
    outcome = _apply(session, webhook_id, payload, settings)
    event = session.get(WebhookEvent, row_id)
    assert event is not None
    event.processed_at = utcnow()
    event.outcome = outcome
    log.info("webhook applied", extra={"webhook_id": webhook_id, "type": kind, "outcome": outcome})
    return WebhookOutcome(stored=True, outcome=outcome)


def _apply(session: Session, webhook_id: str, payload: dict[str, Any], settings: Settings) -> str:
    change = credit_change(payload, settings)
    if isinstance(change, str):
        return change
    customer_id, credits = change
    key = f"polar-webhook:{webhook_id}"[:255]
    reason = f"Polar {payload.get('type')} (webhook {webhook_id})"[:500]
    try:
        with session.begin_nested():
            if credits > 0:
                result = grant_credits(session, customer_id, credits, reason, idempotency_key=key)
                return f"granted {credits} credits to {customer_id}: balance {result.balance}"
            result = revoke_credits(session, customer_id, -credits, reason, idempotency_key=key)
            return f"revoked up to {-credits} credits of {customer_id}: balance {result.balance}"
    except OutboxError as exc:
        return f"not applied: {exc.detail}"
