"""Polar webhooks, attacked: nothing unsigned is stored, every signed body is stored and
acknowledged, and Meter Credits grants apply once whatever the order and the webhook ids."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select

from api.app import MAX_BODY_BYTES, MAX_WEBHOOK_BODY_BYTES, create_app
from api.routes.webhooks import UnverifiedBodies
from outbox.db import session_scope
from outbox.ledger import get_credits, grant_credits, ledger_balance, record_usage
from outbox.models import Customer, Hold, LedgerEntry, OutboxEvent, PolarGrantCycle, WebhookEvent
from outbox.settings import load_settings
from tests.api.conftest import LiveServer
from tests.polar_webhooks import (
    CYCLE_1,
    CYCLE_2,
    CYCLE_3,
    SECRET,
    credited,
    decoded_key,
    encode,
    revoked,
    signature,
    signed,
    whole_secret_key,
)

URL = "/v1/polar/webhooks"


@pytest.fixture
def app(clean_tables: Engine, pg_url: str) -> FastAPI:
    settings = load_settings(
        database_url=pg_url, polar_webhook_secret=SECRET, polar_meter_id="meter_1"
    )
    return create_app(settings, engine=clean_tables)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as test_client:
        yield test_client


def stored(engine: Engine) -> list[WebhookEvent]:
    with session_scope(engine) as session:
        rows = list(session.scalars(select(WebhookEvent).order_by(WebhookEvent.id)))
        session.expunge_all()
        return rows


def balance(engine: Engine, customer: str) -> int:
    with session_scope(engine) as session:
        assert ledger_balance(session, customer) == get_credits(session, customer).balance
        return get_credits(session, customer).balance


def nothing_written(engine: Engine) -> bool:
    with session_scope(engine) as session:
        counts = [
            session.scalar(select(func.count()).select_from(table))
            for table in (WebhookEvent, Customer, LedgerEntry, PolarGrantCycle)
        ]
    return counts == [0, 0, 0, 0]


# --- unsigned: 403, nothing stored --------------------------------------------------------------


def _tampered(**change: str) -> dict[str, Any]:
    request = signed(credited(), "wh_1")
    request["headers"] |= change
    return request


def _without(header: str) -> dict[str, Any]:
    request = signed(credited(), "wh_1")
    del request["headers"][header]
    return request


def _signed_with(key: bytes, *, timestamp: int | None = None) -> dict[str, Any]:
    return signed(credited(), "wh_1", key=key, timestamp=timestamp)


def _non_utf8_bogus_signature() -> dict[str, Any]:
    headers = {
        "webhook-id": "wh_1",
        "webhook-timestamp": str(int(time.time())),
        "webhook-signature": "v1,AAAA",
    }
    return {"content": b"\xff\xfe\x00garbage", "headers": headers}


def _other_version() -> dict[str, Any]:
    request = signed(credited(), "wh_1")
    request["headers"]["webhook-signature"] = "v2," + request["headers"]["webhook-signature"][3:]
    return request


# Built when the test runs (the timestamps must be fresh), hence the lambdas.
UNSIGNED: dict[str, Callable[[], dict[str, Any]]] = {
    # The original hole: a non-UTF-8 body made the SDK raise before checking the signature.
    "non-UTF-8 body, bogus signature": _non_utf8_bogus_signature,
    "non-UTF-8 body, no headers": lambda: {"content": b"\xc3\x28"},
    "empty body, no headers": lambda: {"content": b""},
    "no webhook-id": lambda: _without("webhook-id"),
    "no webhook-timestamp": lambda: _without("webhook-timestamp"),
    "no webhook-signature": lambda: _without("webhook-signature"),
    "wrong secret": lambda: _signed_with(
        decoded_key("whsec_" + base64.b64encode(b"another").decode())
    ),
    # The base64 text after the prefix used as the key: neither of the two forms.
    "wrong key form": lambda: _signed_with(SECRET.removeprefix("whsec_").encode()),
    "stale timestamp": lambda: _signed_with(decoded_key(), timestamp=int(time.time()) - 600),
    "future timestamp": lambda: _signed_with(decoded_key(), timestamp=int(time.time()) + 600),
    "fractional timestamp": lambda: _tampered(**{"webhook-timestamp": f"{int(time.time())}.0"}),
    "another webhook-id than signed": lambda: _tampered(**{"webhook-id": "wh_2"}),
    "signature version v2": _other_version,
    "signature not base64": lambda: _tampered(**{"webhook-signature": "v1,***"}),
    "signature without version": lambda: _tampered(**{"webhook-signature": "AAAA"}),
}


@pytest.mark.parametrize("make_request", UNSIGNED.values(), ids=UNSIGNED.keys())
def test_unsigned_requests_get_403_and_store_nothing(
    client: TestClient, clean_tables: Engine, make_request: Callable[[], dict[str, Any]]
) -> None:
    response = client.post(URL, **make_request())
    assert response.status_code == 403, response.text
    assert response.json()["code"] == "invalid_signature"
    assert nothing_written(clean_tables)


def test_a_tampered_body_is_refused(client: TestClient, clean_tables: Engine) -> None:
    request = signed(credited(units=20), "wh_1")
    request["content"] = encode(credited(units=2000))
    assert client.post(URL, **request).status_code == 403
    assert nothing_written(clean_tables)


def test_a_repeated_webhook_id_header_is_refused(client: TestClient, clean_tables: Engine) -> None:
    request = signed(credited(), "wh_1")
    headers = [(k, v) for k, v in request["headers"].items()] + [("webhook-id", "wh_other")]
    response = client.post(URL, content=request["content"], headers=headers)
    assert response.status_code == 403
    assert nothing_written(clean_tables)


def test_the_pre_claim_attack_fails(client: TestClient, clean_tables: Engine) -> None:
    """An attacker posts an unsigned body under the webhook-id Polar will use next: refused,
    so Polar's real delivery with that id is applied, not dropped as a duplicate."""
    attack = {
        "content": b"\xff" * 40,
        "headers": {
            "webhook-id": "wh_real",
            "webhook-timestamp": str(int(time.time())),
            "webhook-signature": "v1,AAAA",
        },
    }
    assert client.post(URL, **attack).status_code == 403
    real = client.post(URL, **signed(credited(units=20), "wh_real"))
    assert real.status_code == 202
    assert real.json()["outcome"].startswith("granted 20 credits")
    assert balance(clean_tables, "user_1") == 20


# --- what is checked before the body is read; what an unverified body may cost ---------------


def _asgi_post(
    app: FastAPI, headers: dict[str, str], chunks: list[bytes | None]
) -> tuple[int, int]:
    """POST `chunks` to the webhook route straight through ASGI (None: the client hangs up);
    returns (status, how many times the app asked for the body)."""
    asked = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal asked
        asked += 1
        chunk = chunks[min(asked, len(chunks)) - 1]
        if chunk is None:
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": chunk, "more_body": asked < len(chunks)}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": URL,
        "raw_path": URL.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 80),
    }
    asyncio.run(app(scope, receive, send))  # type: ignore[arg-type]
    status = next((m["status"] for m in sent if m["type"] == "http.response.start"), 0)
    return status, asked


def _fresh_headers(**change: str) -> dict[str, str]:
    headers = {
        "webhook-id": "wh_1",
        "webhook-timestamp": str(int(time.time())),
        "webhook-signature": "v1,AAAA",
        "content-type": "application/json",
    }
    return {k: v for k, v in (headers | change).items() if v}


@pytest.mark.parametrize(
    "change",
    [
        {"webhook-timestamp": str(int(time.time()) - 3600)},
        {"webhook-timestamp": str(int(time.time()) + 3600)},
        {"webhook-timestamp": "soon"},
        {"webhook-id": ""},
        {"webhook-id": "wh\x01"},
        {"webhook-signature": ""},
    ],
    ids=["stale", "future", "not a time", "no id", "control character in id", "no signature"],
)
def test_what_the_headers_refuse_is_refused_before_the_body_is_read(
    app: FastAPI, clean_tables: Engine, change: dict[str, str]
) -> None:
    status, asked = _asgi_post(app, _fresh_headers(**change), [b"x" * 65536] * 160)
    assert (status, asked) == (403, 0)
    assert nothing_written(clean_tables)
    # The same request with sane headers is read (then refused for its signature).
    assert _asgi_post(app, _fresh_headers(), [b"x" * 65536] * 160) == (403, 160)


def test_a_client_that_hangs_up_mid_body_is_one_info_line_without_a_traceback(
    app: FastAPI, clean_tables: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    _asgi_post(app, _fresh_headers(), [b"x" * 65536, b"x" * 65536, None])
    lines = [r for r in caplog.records if r.levelno >= logging.INFO and r.name != "httpx"]
    assert [(r.levelname, r.getMessage()) for r in lines] == [
        ("INFO", "a webhook client disconnected before its body was complete")
    ]
    assert not any(r.exc_info for r in caplog.records)
    assert nothing_written(clean_tables)


def test_a_signed_body_that_does_not_fit_the_unverified_budget_is_503_and_retried(
    app: FastAPI, client: TestClient, clean_tables: Engine
) -> None:
    """Unverified bodies share a byte budget: a signed one that finds no room is read and
    checked without being kept, answered 503 (Polar retries); an unsigned one is still 403."""
    app.state.unverified_bodies = UnverifiedBodies(limit=len(encode(credited())) - 1)
    busy = client.post(URL, **signed(credited(), "wh_1"))
    assert (busy.status_code, busy.json()["code"]) == (503, "webhooks_busy")
    assert busy.headers["retry-after"] == "5"
    unsigned = _tampered(**{"webhook-signature": "v1,AAAA"})
    assert client.post(URL, **unsigned).status_code == 403
    assert nothing_written(clean_tables)
    assert app.state.unverified_bodies.held == 0  # every byte given back
    app.state.unverified_bodies = UnverifiedBodies()
    assert client.post(URL, **signed(credited(), "wh_1")).status_code == 202
    assert balance(clean_tables, "user_1") == 20


# --- signed: the key forms, several signatures ------------------------------------------------


@pytest.mark.parametrize("key", [decoded_key(), whole_secret_key()], ids=["decoded", "whole"])
def test_both_key_forms_are_accepted(client: TestClient, clean_tables: Engine, key: bytes) -> None:
    assert client.post(URL, **signed(credited(), "wh_1", key=key)).status_code == 202
    assert balance(clean_tables, "user_1") == 20


def test_one_matching_signature_among_several_is_enough(
    client: TestClient, clean_tables: Engine
) -> None:
    request = signed(credited(), "wh_1")
    other = signature(
        b"rotated-away",
        b"wh_1",
        request["headers"]["webhook-timestamp"].encode(),
        request["content"],
    )
    request["headers"]["webhook-signature"] = (
        f"{other.decode()} v1a,xx {request['headers']['webhook-signature']}"
    )
    assert client.post(URL, **request).status_code == 202
    assert balance(clean_tables, "user_1") == 20


def test_without_a_secret_webhooks_get_503(clean_tables: Engine, pg_url: str) -> None:
    app = create_app(load_settings(database_url=pg_url), engine=clean_tables)
    response = TestClient(app).post(URL, **signed(credited(), "wh_1"))
    assert response.status_code == 503
    assert nothing_written(clean_tables)


# --- signed: whatever it contains, stored (bytes) and acknowledged -------------------------------


DEEP = b'{"type": "benefit_grant.created", "data": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
SIGNED_ODDITIES: dict[str, bytes] = {
    "\\u0000 in a string": b'{"type": "order.paid", "data": {"note": "a\\u0000b"}}',
    "\\u0000 in the type": b'{"type": "benefit_grant.\\u0000created", "data": {}}',
    "lone surrogate": b'{"type": "order.paid", "data": {"name": "\\ud800"}}',
    "lone surrogate as customer id": encode(credited(customer="user_\ud800")),
    "\\u0000 as grant id": encode(credited(grant="g\x00")),
    "nested 50,000 deep": DEEP,
    "not UTF-8": b'{"type": "order.paid", "data": "\xff\xfe"}',
    "not JSON": b"not json at all",
    "a JSON array": b"[1, 2, 3]",
    "a JSON string": b'"benefit_grant.created"',
    "null": b"null",
    "empty": b"",
    "type is an object": b'{"type": {"a": [1]}, "data": null}',
    "huge integer units": encode(credited(units=10**400)),
    "units as a string": encode(credited()).replace(
        b'"last_credited_units": 20', b'"last_credited_units": "20"'
    ),
    "customer is a list": encode(credited()).replace(
        b'"external_id": "user_1"', b'"external_id": [1]'
    ),
}


@pytest.mark.parametrize("body", SIGNED_ODDITIES.values(), ids=SIGNED_ODDITIES.keys())
def test_every_signed_body_is_stored_as_bytes_and_acknowledged(
    client: TestClient, clean_tables: Engine, body: bytes
) -> None:
    response = client.post(URL, **signed(body, "wh_odd"))
    assert response.status_code == 202, response.text
    json.loads(response.text)  # the outcome is valid JSON even when the payload was not
    [row] = stored(clean_tables)
    assert bytes(row.body) == body
    assert row.processed_at is not None and row.outcome
    with session_scope(clean_tables) as session:
        assert session.scalar(select(func.count()).select_from(LedgerEntry)) == 0
    again = client.post(URL, **signed(body, "wh_odd"))
    assert again.status_code == 202 and "duplicate" in again.json()["outcome"]
    assert len(stored(clean_tables)) == 1


def test_what_is_irrelevant_does_not_stop_a_grant(client: TestClient, clean_tables: Engine) -> None:
    """A \\u0000 and a lone surrogate elsewhere in a signed grant: stored and still applied."""
    payload = credited(units=20)
    payload["data"]["customer"]["name"] = "Ada\x00\ud800"
    body = json.dumps(payload).encode()  # json escapes both: \u0000, \ud800
    assert b"\\u0000" in body and b"\\ud800" in body
    response = client.post(URL, **signed(body, "wh_1"))
    assert response.status_code == 202
    assert balance(clean_tables, "user_1") == 20
    assert bytes(stored(clean_tables)[0].body) == body


def test_long_webhook_ids_are_kept_whole_and_do_not_collide(
    client: TestClient, clean_tables: Engine
) -> None:
    prefix = "wh_" + "x" * 300
    first = client.post(URL, **signed(credited(grant="g1", customer="u1"), prefix + "1"))
    second = client.post(URL, **signed(credited(grant="g2", customer="u2"), prefix + "2"))
    assert first.status_code == second.status_code == 202
    assert "granted" in second.json()["outcome"]
    assert [row.webhook_id for row in stored(clean_tables)] == [prefix + "1", prefix + "2"]
    assert balance(clean_tables, "u1") == balance(clean_tables, "u2") == 20


def test_a_webhook_larger_than_the_api_limit_is_stored_and_applied(
    client: TestClient, clean_tables: Engine
) -> None:
    """Polar documents no size for its webhooks, and disables an endpoint that keeps refusing:
    this route takes up to 10 MiB, not the 256 KiB of the rest of the API."""
    payload = credited(units=20)
    payload["data"]["customer"]["metadata"] = {"notes": "x" * (4 * MAX_BODY_BYTES)}
    body = json.dumps(payload).encode()
    assert MAX_BODY_BYTES < len(body) < MAX_WEBHOOK_BODY_BYTES
    response = client.post(URL, **signed(body, "wh_big"))
    assert response.status_code == 202, response.text
    assert balance(clean_tables, "user_1") == 20
    assert bytes(stored(clean_tables)[0].body) == body


def test_a_webhook_over_10_mib_is_413_and_stores_nothing(
    client: TestClient, clean_tables: Engine
) -> None:
    payload = credited(units=20)
    payload["data"]["customer"]["metadata"] = {"notes": "x" * MAX_WEBHOOK_BODY_BYTES}
    response = client.post(URL, **signed(payload, "wh_huge"))
    assert response.status_code == 413
    assert response.json()["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        for _ in range(MAX_WEBHOOK_BODY_BYTES // 65536 + 2):
            yield b"x" * 65536

    chunked = client.post(URL, content=chunks(), headers=signed(b"", "wh_chunked")["headers"])
    assert chunked.status_code == 413
    assert chunked.json()["code"] == "request_too_large"
    assert nothing_written(clean_tables)


def test_a_webhook_id_is_shown_cut_at_10000_characters_but_deduplicated_whole(
    client: TestClient, clean_tables: Engine
) -> None:
    """docs/explanation/webhooks.md: `webhook_id` keeps the first 10,000 characters; the
    dedup key is the SHA-256 of the whole header."""
    prefix = "wh_" + "y" * 10_500
    first = client.post(URL, **signed(credited(grant="g1", customer="u1"), prefix + "1"))
    second = client.post(URL, **signed(credited(grant="g2", customer="u2"), prefix + "2"))
    assert first.status_code == second.status_code == 202
    assert "granted" in second.json()["outcome"]
    assert [row.webhook_id for row in stored(clean_tables)] == [prefix[:10_000]] * 2
    assert balance(clean_tables, "u1") == balance(clean_tables, "u2") == 20


# --- the per-grant state machine ----------------------------------------------------------------


def post(client: TestClient, payload: dict[str, Any], webhook_id: str) -> str:
    response = client.post(URL, **signed(payload, webhook_id))
    assert response.status_code == 202, response.text
    return str(response.json()["outcome"])


def test_a_redelivery_is_stored_once_and_applied_once(
    client: TestClient, clean_tables: Engine
) -> None:
    post(client, credited(), "wh_1")
    assert "duplicate" in post(client, credited(), "wh_1")
    assert balance(clean_tables, "user_1") == 20
    assert len(stored(clean_tables)) == 1


def test_the_same_grant_under_two_webhook_ids_is_credited_once(
    client: TestClient, clean_tables: Engine
) -> None:
    post(client, credited(units=20), "wh_1")
    assert "already credited" in post(client, credited(units=20), "wh_2")
    assert balance(clean_tables, "user_1") == 20
    assert len(stored(clean_tables)) == 2  # both deliveries are kept


def test_each_cycle_credits_once(client: TestClient, clean_tables: Engine) -> None:
    post(client, credited("benefit_grant.created", cycle=CYCLE_1), "wh_1")
    post(client, credited("benefit_grant.cycled", cycle=CYCLE_2), "wh_2")
    post(client, credited("benefit_grant.cycled", cycle=CYCLE_2), "wh_2_again")
    post(client, credited("benefit_grant.cycled", cycle=CYCLE_3), "wh_3")
    assert balance(clean_tables, "user_1") == 60
    post(client, revoked(of_cycle=CYCLE_3), "wh_4")
    assert balance(clean_tables, "user_1") == 40


def test_revoke_before_grant_nets_zero(client: TestClient, clean_tables: Engine) -> None:
    with session_scope(clean_tables) as session:
        grant_credits(session, "user_1", 5, reason="support")
    assert "remembered" in post(client, revoked(of_cycle=CYCLE_1), "wh_revoke")
    assert "cancelled" in post(client, credited(cycle=CYCLE_1), "wh_create")
    assert "already cancelled" in post(client, credited(cycle=CYCLE_1), "wh_create_again")
    assert "already cancelled" in post(client, revoked(of_cycle=CYCLE_1), "wh_revoke_again")
    assert balance(clean_tables, "user_1") == 5
    with session_scope(clean_tables) as session:
        assert session.scalars(select(PolarGrantCycle.state)).all() == ["cancelled"]


def test_a_revoke_takes_back_never_below_zero_and_records_the_shortfall(
    client: TestClient, clean_tables: Engine
) -> None:
    post(client, credited(units=20), "wh_1")
    with session_scope(clean_tables) as session:
        record_usage(session, "user_1", 15)
    assert "revoked 5 of 20 credits" in post(client, revoked(units=20), "wh_2")
    assert "duplicate" in post(client, revoked(units=20), "wh_3")
    assert balance(clean_tables, "user_1") == 0
    with session_scope(clean_tables) as session:
        entry = session.scalars(select(LedgerEntry).where(LedgerEntry.kind == "revoke")).one()
        assert entry.delta == -5
        assert "shortfall: 15 of 20" in (entry.reason or "")


def test_a_revoke_that_polar_applied_to_nothing_takes_nothing(
    client: TestClient, clean_tables: Engine
) -> None:
    """Polar leaves the credits when another grant of the benefit remains: the revoked
    payload keeps positive units (benefit/grant/service.py)."""
    post(client, credited(units=20), "wh_1")
    unchanged = revoked()
    unchanged["data"]["properties"] = unchanged["data"]["previous_properties"]
    assert "took no credits back" in post(client, unchanged, "wh_2")
    assert balance(clean_tables, "user_1") == 20


def test_a_re_granted_grant_credits_its_new_cycle(client: TestClient, clean_tables: Engine) -> None:
    """Polar reuses the grant (same id) when a customer subscribes again: a new credit time."""
    post(client, credited(cycle=CYCLE_1), "wh_1")
    post(client, revoked(of_cycle=CYCLE_1), "wh_2")
    post(client, credited(cycle=CYCLE_3), "wh_3")
    assert balance(clean_tables, "user_1") == 20


def _books(engine: Engine, customer: str) -> tuple[int, int]:
    """(balance, held), after checking the ledger equals the balance and `held` what the open
    holds hold."""
    with session_scope(engine) as session:
        summary = get_credits(session, customer)
        open_held = session.scalar(
            select(func.coalesce(func.sum(Hold.credits), 0)).where(Hold.status == "open")
        )
        assert ledger_balance(session, customer) == summary.balance
        assert summary.held == open_held
        return summary.balance, summary.held


@pytest.mark.parametrize("then", ["release", "capture", "capture part", "spend"])
def test_a_revoke_takes_back_the_credits_a_hold_holds(
    client: TestClient, clean_tables: Engine, usage_headers: dict[str, str], then: str
) -> None:
    """The review's case: Polar grants 100, the app holds 100 for a long generation, Polar
    revokes the grant. The revoke takes the 100 from the hold, says so, and nothing the app
    does with the hold next gives them back."""
    post(client, credited(units=100), "wh_grant")
    held = client.post(
        "/v1/holds", json={"customer_id": "user_1", "credits": 100}, headers=usage_headers
    )
    assert held.status_code == 201, held.text
    hold_id = held.json()["hold_id"]

    outcome = post(client, revoked(units=100), "wh_revoke")

    assert outcome == (
        f"revoked 100 of 100 credits of user_1 (0 from the balance; 100 from hold {hold_id}): "
        "balance 0"
    )
    assert _books(clean_tables, "user_1") == (0, 0)
    if then == "release":
        response = client.post(f"/v1/holds/{hold_id}/release", headers=usage_headers)
        assert (response.status_code, response.json()["status"]) == (200, "revoked")
    elif then.startswith("capture"):
        body = {"credits": 40} if then == "capture part" else {}
        response = client.post(f"/v1/holds/{hold_id}/capture", json=body, headers=usage_headers)
        assert (response.status_code, response.json()["code"]) == (409, "hold_closed")
    else:
        response = client.post(
            "/v1/usage", json={"customer_id": "user_1", "credits": 100}, headers=usage_headers
        )
        assert (response.status_code, response.json()["code"]) == (402, "insufficient_credits")
    assert _books(clean_tables, "user_1") == (0, 0)
    with session_scope(clean_tables) as session:
        assert session.scalar(select(func.count()).select_from(OutboxEvent)) == 0


def test_a_revoke_takes_what_the_balance_lacks_from_a_hold_and_leaves_the_rest(
    client: TestClient, clean_tables: Engine, usage_headers: dict[str, str]
) -> None:
    post(client, credited(units=100), "wh_grant")
    with session_scope(clean_tables) as session:
        grant_credits(session, "user_1", 30, reason="support")
    held = client.post(
        "/v1/holds", json={"customer_id": "user_1", "credits": 100}, headers=usage_headers
    )
    hold_id = held.json()["hold_id"]

    outcome = post(client, revoked(units=100), "wh_revoke")

    assert outcome == (
        f"revoked 100 of 100 credits of user_1 (30 from the balance; 70 from hold {hold_id}): "
        "balance 0"
    )
    assert _books(clean_tables, "user_1") == (0, 30)
    # 30 are the support grant's: the hold may bill them, no more.
    too_much = client.post(
        f"/v1/holds/{hold_id}/capture", json={"credits": 100}, headers=usage_headers
    )
    assert (too_much.status_code, too_much.json()["code"]) == (402, "insufficient_credits")
    released = client.post(f"/v1/holds/{hold_id}/release", headers=usage_headers)
    assert released.json() == {"hold_id": hold_id, "balance": 30, "status": "released"}
    assert _books(clean_tables, "user_1") == (30, 0)


def test_other_meters_and_events_are_stored_and_ignored(
    client: TestClient, clean_tables: Engine
) -> None:
    assert "ignored" in post(client, credited(meter_id="meter_2", customer="u3"), "x1")
    assert "ignored" in post(client, {"type": "customer.state_changed", "data": {"a": [1]}}, "x2")
    no_cycle = credited(customer="u3")
    del no_cycle["data"]["properties"]["last_credited_at"]
    assert "not applied" in post(client, no_cycle, "x3")
    assert len(stored(clean_tables)) == 3
    with session_scope(clean_tables) as session:
        assert session.get(Customer, "u3") is None


# --- concurrency (real threads, real PostgreSQL) ------------------------------------------------


def _post_all_at_once(live_server: LiveServer, requests: list[dict[str, Any]]) -> list[int]:
    barrier = threading.Barrier(len(requests))
    statuses: list[int] = []
    lock = threading.Lock()
    with live_server.http() as http:

        def send(request: dict[str, Any]) -> None:
            barrier.wait()
            status = http.post(URL, **request).status_code
            with lock:
                statuses.append(status)

        threads = [threading.Thread(target=send, args=(r,)) for r in requests]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    return statuses


def test_one_delivery_posted_from_many_threads_credits_once(
    live_server: LiveServer, clean_tables: Engine
) -> None:
    request = signed(credited(units=20), "wh_concurrent")
    statuses = _post_all_at_once(live_server, [request] * 8)
    assert statuses == [202] * 8
    assert balance(clean_tables, "user_1") == 20
    assert len(stored(clean_tables)) == 1


def test_one_grant_under_many_webhook_ids_at_once_credits_once(
    live_server: LiveServer, clean_tables: Engine
) -> None:
    requests = [signed(credited(units=20), f"wh_{i}") for i in range(8)]
    requests += [signed(revoked(grant="grant_2", units=7), f"wh_r{i}") for i in range(4)]
    requests += [signed(credited(grant="grant_2", units=7), f"wh_c{i}") for i in range(4)]
    statuses = _post_all_at_once(live_server, requests)
    assert statuses == [202] * 16
    # grant_1 credited once; grant_2 revoked and credited in any order: net zero.
    assert balance(clean_tables, "user_1") == 20
    assert len(stored(clean_tables)) == 16
