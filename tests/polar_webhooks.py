"""Factories for Polar webhooks as Polar's server sends them (server/polar/webhook/tasks.py signs;
server/polar/benefit/strategies/meter_credit/service.py writes the grant properties)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

# A Standard Webhooks secret: `whsec_` + base64 of the key.
SECRET = "whsec_" + base64.b64encode(b"a-webhook-signing-key-for-tests").decode()
METER = "meter_1"
CYCLE_1 = "2026-11-01T00:00:00.000001+00:00"
CYCLE_2 = "2026-12-01T00:00:00.000002+00:00"
CYCLE_3 = "2027-01-01T00:00:00.000003+00:00"


def decoded_key(secret: str = SECRET) -> bytes:
    """The newer key form: the base64-decoded part after `whsec_`."""
    return base64.b64decode(secret.removeprefix("whsec_"))


def whole_secret_key(secret: str = SECRET) -> bytes:
    """The older key form, and what Polar's server signs with today: the whole secret's UTF-8."""
    return secret.encode()


def signature(key: bytes, webhook_id: bytes, timestamp: bytes, body: bytes) -> bytes:
    digest = hmac.new(key, webhook_id + b"." + timestamp + b"." + body, hashlib.sha256).digest()
    return b"v1," + base64.b64encode(digest)


def encode(payload: dict[str, Any] | str | bytes) -> bytes:
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, str):
        return payload.encode()
    return json.dumps(payload).encode()


def signed(
    payload: dict[str, Any] | str | bytes,
    webhook_id: str,
    *,
    key: bytes | None = None,
    timestamp: int | None = None,
) -> dict[str, Any]:
    """`client.post(url, **signed(...))` arguments for a correctly signed delivery."""
    body = encode(payload)
    ts = str(int(time.time()) if timestamp is None else timestamp).encode()
    sig = signature(key or decoded_key(), webhook_id.encode(), ts, body)
    return {
        "content": body,
        "headers": {
            "webhook-id": webhook_id,
            "webhook-timestamp": ts.decode(),
            "webhook-signature": sig.decode(),
            "content-type": "application/json",
        },
    }


def _grant_data(
    grant: str, customer: str, properties: dict[str, Any], meter_id: str
) -> dict[str, Any]:
    return {
        "id": grant,
        "is_granted": True,
        "is_revoked": False,
        "benefit": {"type": "meter_credit", "properties": {"meter_id": meter_id, "units": 20}},
        "customer": {"id": "polar_cus_1", "external_id": customer, "name": "Ada"},
        "properties": properties,
    }


def credited(
    kind: str = "benefit_grant.created",
    *,
    customer: str = "user_1",
    grant: str = "grant_1",
    cycle: str = CYCLE_1,
    units: int = 20,
    meter_id: str = METER,
) -> dict[str, Any]:
    """A created or cycled Meter Credits grant: Polar credited `units` at `cycle`."""
    properties = {
        "last_credited_meter_id": meter_id,
        "last_credited_units": units,
        "last_credited_at": cycle,
    }
    data = _grant_data(grant, customer, properties, meter_id)
    return {"type": kind, "timestamp": cycle, "data": data}


def revoked(
    *,
    customer: str = "user_1",
    grant: str = "grant_1",
    of_cycle: str = CYCLE_1,
    units: int = 20,
    meter_id: str = METER,
) -> dict[str, Any]:
    """A revoked grant: Polar credited minus the last credit (made at `of_cycle`)."""
    revoked_at = "2027-06-01T00:00:00.000009+00:00"
    properties = {
        "last_credited_meter_id": meter_id,
        "last_credited_units": -units,
        "last_credited_at": revoked_at,
    }
    data = _grant_data(grant, customer, properties, meter_id)
    data |= {"is_granted": False, "is_revoked": True, "revoked_at": revoked_at}
    data["previous_properties"] = {
        "last_credited_meter_id": meter_id,
        "last_credited_units": units,
        "last_credited_at": of_cycle,
    }
    return {"type": "benefit_grant.revoked", "timestamp": revoked_at, "data": data}
