"""POST /v1/usage/{event_id}/refunds and POST /v1/customers/{id}/debits over HTTP: what the
balance, the ledger and the outbox look like after each, codes for every refusal, the
Idempotency-Key honoured, and which tokens may do what."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select

from outbox.db import session_scope
from outbox.ledger import ledger_balance
from outbox.models import AuditEntry, LedgerEntry, OutboxEvent

Fund = Callable[[str, int], None]


def _spend(client: TestClient, headers: dict[str, str], credits: int) -> int:
    response = client.post(
        "/v1/usage", json={"customer_id": "user_1", "credits": credits}, headers=headers
    )
    assert response.status_code == 201, response.text
    return int(response.json()["event_id"])


def _refund(client: TestClient, headers: dict[str, str], event_id: int, **body: Any) -> Any:
    return client.post(f"/v1/usage/{event_id}/refunds", json=body, headers=headers)


def _balance(engine: Engine) -> tuple[int, int]:
    with session_scope(engine) as session:
        balance = session.scalar(select(func.sum(LedgerEntry.delta)))
        return int(balance or 0), ledger_balance(session, "user_1")


def test_a_refund_answers_what_it_did_and_the_balance_after(
    client: TestClient, usage_headers: dict[str, str], fund: Fund, clean_tables: Engine
) -> None:
    fund("user_1", 10)
    whole = _spend(client, usage_headers, 3)
    partial = _spend(client, usage_headers, 4)

    cancelled = _refund(client, usage_headers, whole, reason="the generation failed")
    assert cancelled.status_code == 201, cancelled.text
    body = cancelled.json()
    assert {k: body[k] for k in ("event_id", "credits", "balance", "action")} == {
        "event_id": whole,
        "credits": 3,
        "balance": 6,
        "action": "cancelled",
    }
    assert isinstance(body["refund_id"], int) and body["compensation_event_id"] is None

    compensated = _refund(client, usage_headers, partial, credits=1, reason="goodwill")
    assert compensated.status_code == 201
    assert compensated.json()["action"] == "compensated"
    assert compensated.json()["balance"] == 7
    with session_scope(clean_tables) as session:
        row = session.get(OutboxEvent, compensated.json()["compensation_event_id"])
        assert row is not None and (row.credits, row.refund_of) == (-1, partial)
    assert _balance(clean_tables) == (7, 7)
    credits = client.get("/v1/customers/user_1/credits", headers=usage_headers).json()
    assert (credits["balance"], credits["used"]) == (7, 3)
    listed = client.get("/v1/customers/user_1/usage", headers=usage_headers).json()["items"]
    assert [(i["event_id"], i["credits"], i["status"], i["refund_of"]) for i in listed] == [
        (compensated.json()["compensation_event_id"], -1, "pending", partial),
        (partial, 4, "pending", None),
        (whole, 3, "cancelled", None),
    ]


def test_refusals_have_codes_and_change_nothing(
    client: TestClient, usage_headers: dict[str, str], fund: Fund, clean_tables: Engine
) -> None:
    fund("user_1", 10)
    usage = _spend(client, usage_headers, 2)
    refund = _refund(client, usage_headers, usage, credits=1, reason="r").json()
    before = _balance(clean_tables)
    cases = [
        (usage, {"credits": 2, "reason": "r"}, 409, "refund_exceeds_usage"),
        (refund["compensation_event_id"], {"reason": "r"}, 409, "not_refundable"),
        (10**9, {"reason": "r"}, 404, "event_not_found"),
        (usage, {"credits": 0, "reason": "r"}, 422, "invalid_request"),
        (usage, {"credits": 1}, 422, "invalid_request"),
        (usage, {"credits": 1, "reason": "   "}, 422, "invalid_request"),
        (usage, {"credits": "1", "reason": "r"}, 422, "invalid_request"),
        (usage, {"credits": 1, "reason": "r", "extra": 1}, 422, "invalid_request"),
    ]
    for event_id, body, status, code in cases:
        response = _refund(client, usage_headers, event_id, **body)
        assert (response.status_code, response.json()["code"]) == (status, code), body
    response = client.post("/v1/usage/0/refunds", json={"reason": "r"}, headers=usage_headers)
    assert response.status_code == 422
    assert _balance(clean_tables) == before


def test_the_idempotency_key_makes_a_retried_refund_give_back_once(
    client: TestClient, usage_headers: dict[str, str], fund: Fund, clean_tables: Engine
) -> None:
    fund("user_1", 10)
    usage = _spend(client, usage_headers, 5)
    headers = {**usage_headers, "Idempotency-Key": "refund-1"}
    first = _refund(client, headers, usage, credits=2, reason="r")
    again = _refund(client, headers, usage, credits=2, reason="r")
    assert first.status_code == again.status_code == 201
    assert first.json() == again.json()
    other = _refund(client, headers, usage, credits=3, reason="r")
    assert (other.status_code, other.json()["code"]) == (409, "idempotency_key_reused")
    assert _balance(clean_tables) == (7, 7)


def test_usage_and_admin_tokens_may_refund_only_admin_may_debit(
    client: TestClient,
    usage_headers: dict[str, str],
    admin_headers: dict[str, str],
    fund: Fund,
    clean_tables: Engine,
) -> None:
    fund("user_1", 10)
    usage = _spend(client, usage_headers, 4)
    assert _refund(client, admin_headers, usage, credits=1, reason="support").status_code == 201
    assert _refund(client, usage_headers, usage, credits=1, reason="app").status_code == 201
    assert _refund(client, {}, usage, credits=1, reason="r").status_code == 401

    debit = {"credits": 3, "reason": "granted twice by mistake"}
    refused = client.post("/v1/customers/user_1/debits", json=debit, headers=usage_headers)
    assert refused.status_code == 403
    done = client.post("/v1/customers/user_1/debits", json=debit, headers=admin_headers)
    assert done.status_code == 201, done.text
    assert done.json()["balance"] == 10 - 4 + 2 - 3
    too_much = client.post(
        "/v1/customers/user_1/debits", json={"credits": 99, "reason": "r"}, headers=admin_headers
    )
    assert (too_much.status_code, too_much.json()["code"]) == (402, "insufficient_credits")
    unknown = client.post("/v1/customers/nobody/debits", json=debit, headers=admin_headers)
    assert (unknown.status_code, unknown.json()["code"]) == (404, "customer_not_found")
    assert _balance(clean_tables) == (5, 5)
    # Both refunds and the debit are audited with their token; the refusals are not.
    with session_scope(clean_tables) as session:
        entries = session.scalars(select(AuditEntry).order_by(AuditEntry.id)).all()
        audited = [(e.action, e.reason, e.detail["credits"]) for e in entries]
        assert [e.actor.rsplit(" ", 1)[-1] for e in entries[:2]] == ["(admin)", "(usage)"]
        assert all(e.actor.startswith("api-token:") for e in entries)
    assert audited == [
        ("refund", "support", 1),
        ("refund", "app", 1),
        ("debit", "granted twice by mistake", 3),
    ]


def test_a_refund_retried_with_its_key_is_audited_once(
    client: TestClient, usage_headers: dict[str, str], fund: Fund, clean_tables: Engine
) -> None:
    fund("user_1", 10)
    usage = _spend(client, usage_headers, 5)
    headers = {**usage_headers, "Idempotency-Key": "refund-audit"}
    for _ in range(2):
        assert _refund(client, headers, usage, credits=2, reason="r").status_code == 201
    with session_scope(clean_tables) as session:
        entries = session.scalars(select(AuditEntry)).all()
        assert [(e.action, e.detail["event_id"], e.detail["credits"]) for e in entries] == [
            ("refund", usage, 2)
        ]
