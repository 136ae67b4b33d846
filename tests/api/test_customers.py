"""Customers over HTTP: the credit summary, usage history (newest first, cursor pages, delivery
status) and admin grants (create the customer; idempotent with a key)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, update

from outbox.db import session_scope
from outbox.ledger import get_credits, ledger_balance
from outbox.models import OutboxEvent, utcnow

if TYPE_CHECKING:
    from tests.api.conftest import LiveServer, Snapshot

Fund = Callable[[str, int], None]
Take = Callable[[], "Snapshot"]


def spend(client: TestClient, headers: dict[str, str], customer: str, credits: int) -> int:
    response = client.post(
        "/v1/usage",
        json={"customer_id": customer, "credits": credits, "metadata": {"n": credits}},
        headers=headers,
    )
    assert response.status_code == 201, response.text
    return int(response.json()["event_id"])


# --- credits ----------------------------------------------------------------------------------


def test_credit_summary_shows_balance_held_granted_and_used(
    client: TestClient, usage_headers: dict[str, str], fund: Fund
) -> None:
    fund("user_1", 10)
    spend(client, usage_headers, "user_1", 3)
    hold = client.post(
        "/v1/holds", json={"customer_id": "user_1", "credits": 2}, headers=usage_headers
    )
    assert hold.status_code == 201

    response = client.get("/v1/customers/user_1/credits", headers=usage_headers)

    assert response.status_code == 200
    assert response.json() == {
        "customer_id": "user_1",
        "balance": 5,
        "held": 2,
        "granted": 10,
        "used": 3,
    }


@pytest.mark.parametrize("path", ["credits", "usage"])
def test_an_unknown_customer_is_404(
    client: TestClient, usage_headers: dict[str, str], path: str
) -> None:
    response = client.get(f"/v1/customers/ghost/{path}", headers=usage_headers)
    assert response.status_code == 404
    assert response.json()["code"] == "customer_not_found"


# --- usage history ----------------------------------------------------------------------------


def test_usage_history_is_newest_first_in_cursor_pages_with_delivery_status(
    client: TestClient, usage_headers: dict[str, str], fund: Fund, clean_tables: Engine
) -> None:
    fund("user_1", 100)
    fund("user_2", 100)
    ids = [spend(client, usage_headers, "user_1", credits) for credits in (1, 2, 3, 4, 5)]
    spend(client, usage_headers, "user_2", 9)  # someone else's: never listed
    delivered_at = utcnow()
    with session_scope(clean_tables) as session:  # what the worker would have done
        session.execute(
            update(OutboxEvent)
            .where(OutboxEvent.id == ids[1])
            .values(status="delivered", delivered_at=delivered_at, attempts=1)
        )
        session.execute(
            update(OutboxEvent)
            .where(OutboxEvent.id == ids[3])
            .values(status="failed", last_error="Polar: metadata rejected", attempts=3)
        )

    items: list[dict[str, Any]] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor is not None:
            params["cursor"] = cursor
        response = client.get("/v1/customers/user_1/usage", params=params, headers=usage_headers)
        assert response.status_code == 200
        page = response.json()
        assert set(page) == {"items", "next_cursor"}
        assert len(page["items"]) <= 2
        items += page["items"]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break

    assert pages == 3
    assert [item["event_id"] for item in items] == ids[::-1]
    assert [item["credits"] for item in items] == [5, 4, 3, 2, 1]
    by_id = {item["event_id"]: item for item in items}
    assert [by_id[i]["status"] for i in ids] == [
        "pending",
        "delivered",
        "pending",
        "failed",
        "pending",
    ]
    assert by_id[ids[3]]["last_error"] == "Polar: metadata rejected"
    assert by_id[ids[3]]["attempts"] == 3
    assert by_id[ids[1]]["delivered_at"] is not None
    assert by_id[ids[0]]["delivered_at"] is None
    assert by_id[ids[0]]["metadata"] == {"n": 1}
    assert all(item["external_id"].startswith("usage_") for item in items)
    assert len({item["external_id"] for item in items}) == 5


def test_one_page_holds_everything_when_the_limit_allows(
    client: TestClient, usage_headers: dict[str, str], fund: Fund
) -> None:
    fund("user_1", 10)
    ids = [spend(client, usage_headers, "user_1", 1) for _ in range(3)]
    for limit in (3, 200):
        page = client.get(
            "/v1/customers/user_1/usage", params={"limit": limit}, headers=usage_headers
        ).json()
        assert [item["event_id"] for item in page["items"]] == ids[::-1]
        assert page["next_cursor"] is None


BAD_PAGES: list[tuple[dict[str, Any], str]] = [
    ({"cursor": "not-a-cursor"}, "cursor"),
    ({"cursor": "aWQ6LTE"}, "cursor"),  # base64 of "id:-1"
    ({"cursor": "x" * 101}, "cursor"),
    ({"cursor": str(2**63)}, "cursor"),  # past PostgreSQL's bigint: a 500 before
    ({"cursor": "9" * 40}, "cursor"),
    ({"cursor": "0"}, "cursor"),
    ({"cursor": "-1"}, "cursor"),
    ({"cursor": "\u0663"}, "cursor"),  # ARABIC-INDIC DIGIT THREE: str.isdigit() says yes
    ({"limit": 0}, "limit"),
    ({"limit": 201}, "limit"),
    ({"limit": -5}, "limit"),
    ({"limit": "ten"}, "limit"),
]


def test_a_bad_cursor_or_limit_is_422_naming_it(
    client: TestClient, usage_headers: dict[str, str], fund: Fund, subtests: pytest.Subtests
) -> None:
    fund("user_1", 1)
    for params, field in BAD_PAGES:
        with subtests.test(str(params)):
            response = client.get(
                "/v1/customers/user_1/usage", params=params, headers=usage_headers
            )
            assert response.status_code == 422
            assert response.json()["code"] == "invalid_request"
            assert response.json()["field"] == field


# --- grants -----------------------------------------------------------------------------------


def test_a_grant_creates_the_customer_and_adds_credits(
    client: TestClient, admin_headers: dict[str, str], clean_tables: Engine
) -> None:
    first = client.post(
        "/v1/customers/new_user/grants",
        json={"credits": 20, "reason": "Pro plan"},
        headers=admin_headers,
    )
    second = client.post(
        "/v1/customers/new_user/grants", json={"credits": 5}, headers=admin_headers
    )
    assert first.status_code == second.status_code == 201
    assert set(first.json()) == {"grant_id", "balance"}
    assert first.json()["balance"] == 20 and second.json()["balance"] == 25
    assert first.json()["grant_id"] != second.json()["grant_id"]
    summary = client.get("/v1/customers/new_user/credits", headers=admin_headers).json()
    assert summary == {
        "customer_id": "new_user",
        "balance": 25,
        "held": 0,
        "granted": 25,
        "used": 0,
    }
    with session_scope(clean_tables) as session:
        assert ledger_balance(session, "new_user") == 25


def test_a_grant_repeated_with_its_key_is_applied_once(
    client: TestClient, admin_headers: dict[str, str], clean_tables: Engine, snapshot: Take
) -> None:
    headers = {**admin_headers, "Idempotency-Key": "invoice-7"}
    body = {"credits": 20, "reason": "invoice 7"}
    first = client.post("/v1/customers/user_1/grants", json=body, headers=headers)
    again = client.post("/v1/customers/user_1/grants", json=body, headers=headers)
    assert first.status_code == again.status_code == 201
    assert first.json() == again.json()
    before = snapshot()
    conflict = client.post(
        "/v1/customers/user_1/grants", json={"credits": 21, "reason": "invoice 7"}, headers=headers
    )
    assert conflict.status_code == 409
    assert conflict.json()["code"] == "idempotency_key_reused"
    assert snapshot() == before
    with session_scope(clean_tables) as session:
        assert get_credits(session, "user_1").granted == 20


def test_concurrent_grants_with_one_key_apply_once_over_real_http(
    live_server: LiveServer, admin_headers: dict[str, str], clean_tables: Engine
) -> None:
    barrier = threading.Barrier(10)
    headers = {**admin_headers, "Idempotency-Key": "invoice-race"}

    def grant(_: int) -> tuple[int, Any]:
        barrier.wait(timeout=30)
        response = http.post(
            "/v1/customers/race_user/grants", json={"credits": 30}, headers=headers
        )
        return response.status_code, response.json()

    with live_server.http() as http, ThreadPoolExecutor(max_workers=10) as pool:
        responses = list(pool.map(grant, range(10)))

    assert {status for status, _ in responses} == {201}
    assert all(body == responses[0][1] for _, body in responses)
    with session_scope(clean_tables) as session:
        assert get_credits(session, "race_user").balance == 30
        assert ledger_balance(session, "race_user") == 30


BAD_GRANTS: list[tuple[str, dict[str, Any], str]] = [
    ("user_1", {"credits": 0}, "credits"),
    ("user_1", {"credits": -3}, "credits"),
    ("user_1", {"credits": "5"}, "credits"),
    ("user_1", {"credits": 2.5}, "credits"),
    ("user_1", {"credits": 1_000_000_001}, "credits"),
    ("user_1", {}, "credits"),
    ("user_1", {"credits": 5, "reason": "r" * 501}, "reason"),
    ("user_1", {"credits": 5, "reason": "a\x00b"}, "reason"),
    ("user_1", {"credits": 5, "memo": "x"}, "memo"),
    ("%20padded", {"credits": 5}, "customer_id"),
    ("a" * 129, {"credits": 5}, "customer_id"),
    ("tab%09id", {"credits": 5}, "customer_id"),
]


def test_a_bad_grant_is_422_naming_the_field_and_creates_nothing(
    client: TestClient, admin_headers: dict[str, str], snapshot: Take, subtests: pytest.Subtests
) -> None:
    for path_id, body, field in BAD_GRANTS:
        with subtests.test(f"{path_id[:20]} {body}"):
            before = snapshot()
            response = client.post(
                f"/v1/customers/{path_id}/grants", json=body, headers=admin_headers
            )
            assert response.status_code == 422, response.text
            assert response.json()["code"] == "invalid_request"
            assert response.json()["field"] == field
            assert snapshot() == before
