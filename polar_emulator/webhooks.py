"""Webhooks as Polar sends them, for `outbox dev`: a Meter Credits grant (`benefit_grant.created`
of a `meter_credit` benefit), signed the Standard Webhooks way with the receiver's secret.

The customer is named where Polar puts it: `data.customer.external_id` (the id the outbox
knows); the credits are `data.properties.last_credited_units`, credited at
`data.properties.last_credited_at` (one credit per grant and cycle)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from datetime import UTC, datetime
from typing import Any


def meter_credits_granted(customer_id: str, units: int, meter_id: str) -> dict[str, Any]:
    """A new grant of `units` credits of `meter_id` to `customer_id`, credited now."""
    now = datetime.now(UTC).isoformat()
    properties = {
        "last_credited_meter_id": meter_id,
        "last_credited_units": units,
        "last_credited_at": now,
    }
    return {
        "type": "benefit_grant.created",
        "timestamp": now,
        "data": {
            "id": f"grant_{uuid.uuid4().hex[:16]}",
            "is_granted": True,
            "is_revoked": False,
            "benefit": {
                "type": "meter_credit",
                "properties": {"meter_id": meter_id, "units": units, "rollover": False},
            },
            "customer": {"id": str(uuid.uuid4()), "external_id": customer_id},
            "properties": properties,
        },
    }


def signed_request(payload: dict[str, Any], secret: str) -> tuple[bytes, dict[str, str]]:
    """The body and headers of a delivery of `payload` signed with `secret` (`whsec_...`),
    with the whole secret's bytes as the key, as Polar's server signs today."""
    body = json.dumps(payload).encode()
    webhook_id = f"msg_{uuid.uuid4().hex}"
    timestamp = str(int(time.time()))
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
    headers = {
        "webhook-id": webhook_id,
        "webhook-timestamp": timestamp,
        "webhook-signature": "v1," + base64.b64encode(digest).decode(),
        "content-type": "application/json",
    }
    return body, headers
