"""Polar webhooks: verified with the SDK, stored once per webhook-id, Meter Credits applied."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select

from api.app import create_app
from outbox.db import session_scope
from outbox.ledger import get_credits, grant_credits, ledger_balance
from outbox.models import WebhookEvent
from outbox.settings import load_settings

SECRET = "whsec_" + base64.b64encode(b"a-webhook-signing-key-for-tests").decode()


def signed(payload: dict[str, Any] | str, webhook_id: str, secret: str = SECRET) -> dict[str, Any]:
    body = payload if isinstance(payload, str) else json.dumps(payload)
    timestamp = str(int(time.time()))
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{webhook_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return {
        "content": body,
        "headers": {
            "webhook-id": webhook_id,
            "webhook-timestamp": timestamp,
            "webhook-signature": "v1," + base64.b64encode(digest).decode(),
            "content-type": "application/json",
        },
    }


def meter_credit(kind: str, customer: str, units: int, meter_id: str = "meter_1") -> dict[str, Any]:
    return {
        "type": kind,
        "timestamp": "2026-11-25T00:00:00Z",
        "data": {
            "benefit": {"type": "meter_credit", "properties": {"meter_id": meter_id, "units": 20}},
            "customer": {"id": "polar_cus_1", "external_id": customer},
            "properties": {"last_credited_units": units},
        },
    }


@pytest.fixture
def client(clean_tables: Engine, pg_url: str) -> Iterator[TestClient]:
    settings = load_settings(
        database_url=pg_url, polar_webhook_secret=SECRET, polar_meter_id="meter_1"
    )
    yield TestClient(create_app(settings, engine=clean_tables))


def stored(engine: Engine) -> int:
    with session_scope(engine) as session:
        return int(session.scalar(select(func.count()).select_from(WebhookEvent)) or 0)


def test_meter_credit_grant_is_applied_once_even_when_redelivered(
    client: TestClient, clean_tables: Engine
) -> None:
    request = signed(meter_credit("benefit_grant.created", "user_1", 20), "wh_1")
    first = client.post("/v1/polar/webhooks", **request)
    again = client.post("/v1/polar/webhooks", **request)
    assert first.status_code == again.status_code == 202
    assert "duplicate" in again.json()["outcome"]
    with session_scope(clean_tables) as session:
        assert get_credits(session, "user_1").balance == 20
    assert stored(clean_tables) == 1


def test_cycle_adds_and_revoke_takes_back_never_below_zero(
    client: TestClient, clean_tables: Engine
) -> None:
    client.post(
        "/v1/polar/webhooks", **signed(meter_credit("benefit_grant.created", "u2", 20), "a")
    )
    client.post("/v1/polar/webhooks", **signed(meter_credit("benefit_grant.cycled", "u2", 20), "b"))
    with session_scope(clean_tables) as session:
        assert get_credits(session, "u2").balance == 40
        from outbox.ledger import record_usage

        record_usage(session, "u2", 35)
    response = client.post(
        "/v1/polar/webhooks", **signed(meter_credit("benefit_grant.revoked", "u2", -20), "c")
    )
    assert response.status_code == 202
    with session_scope(clean_tables) as session:
        assert get_credits(session, "u2").balance == 0
        assert ledger_balance(session, "u2") == 0


def test_other_meters_and_other_events_are_stored_and_ignored(
    client: TestClient, clean_tables: Engine
) -> None:
    other = signed(meter_credit("benefit_grant.created", "u3", 20, meter_id="meter_2"), "x1")
    state = signed({"type": "customer.state_changed", "data": {"anything": [1, 2]}}, "x2")
    assert client.post("/v1/polar/webhooks", **other).status_code == 202
    assert client.post("/v1/polar/webhooks", **state).status_code == 202
    assert stored(clean_tables) == 2
    with session_scope(clean_tables) as session:
        grant_credits(session, "probe", 1)  # the database is fine; u3 simply got nothing
        from outbox.models import Customer

        assert session.get(Customer, "u3") is None


def test_bad_signature_is_refused_and_stores_nothing(
    client: TestClient, clean_tables: Engine
) -> None:
    request = signed(
        meter_credit("benefit_grant.created", "u4", 20), "bad", secret="whsec_" + "A" * 40
    )
    response = client.post("/v1/polar/webhooks", **request)
    assert response.status_code == 403
    assert response.json()["code"] == "invalid_signature"
    missing = client.post(
        "/v1/polar/webhooks", content="{}", headers={"content-type": "application/json"}
    )
    assert missing.status_code == 403
    assert stored(clean_tables) == 0


def test_signed_garbage_is_acknowledged_not_500(client: TestClient, clean_tables: Engine) -> None:
    response = client.post("/v1/polar/webhooks", **signed("not json at all", "g1"))
    assert response.status_code == 202
    assert stored(clean_tables) == 1
