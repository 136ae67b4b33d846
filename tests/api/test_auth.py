"""Bearer-token authentication: 401 without a valid token, 403 without the scope, and neither
changes anything."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest
from fastapi.testclient import TestClient

if TYPE_CHECKING:
    from tests.api.conftest import Snapshot

Fund = Callable[[str, int], None]
Take = Callable[[], "Snapshot"]

# Every route a token guards, with a body that would succeed for an admin.
PROTECTED: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "/v1/usage", {"customer_id": "user_1", "credits": 1}),
    ("POST", "/v1/holds", {"customer_id": "user_1", "credits": 1}),
    ("GET", "/v1/customers/user_1/credits", None),
    ("GET", "/v1/customers/user_1/usage", None),
    ("POST", "/v1/customers/user_1/grants", {"credits": 5}),
    ("GET", "/v1/admin/outbox/stats", None),
    ("GET", "/v1/admin/outbox/events", None),
    ("POST", "/v1/admin/outbox/replay", {"status": "failed"}),
]
ADMIN_ONLY = [route for route in PROTECTED if "/grants" in route[1] or "/admin/" in route[1]]
USAGE_SCOPE = [route for route in PROTECTED if route not in ADMIN_ONLY]


def call(
    client: TestClient, route: tuple[str, str, dict[str, Any] | None], headers: dict[str, str]
) -> Any:
    method, path, body = route
    return client.request(method, path, json=body, headers=headers)


@pytest.fixture
def funded(fund: Fund) -> None:
    fund("user_1", 10)


BAD_AUTHORIZATION: list[tuple[str, dict[str, str]]] = [
    ("missing", {}),
    ("unknown token", {"Authorization": "Bearer pou_not-a-real-token"}),
    ("empty bearer", {"Authorization": "Bearer "}),
    ("no scheme", {"Authorization": "pou_not-a-real-token"}),
    ("basic scheme", {"Authorization": "Basic dXNlcjpwYXNz"}),
    ("oversized", {"Authorization": "Bearer " + "x" * 5000}),
]


@pytest.mark.usefixtures("funded")
def test_without_a_valid_token_every_route_is_401_and_changes_nothing(
    client: TestClient, snapshot: Take, subtests: pytest.Subtests
) -> None:
    before = snapshot()
    for route in PROTECTED:
        for name, headers in BAD_AUTHORIZATION:
            with subtests.test(f"{route[0]} {route[1]}: {name}"):
                response = call(client, route, headers)
                assert response.status_code == 401
                assert response.json()["code"] == "unauthorized"
                assert response.json()["detail"]
                assert response.headers["www-authenticate"] == "Bearer"
    assert snapshot() == before


@pytest.mark.usefixtures("funded")
def test_a_usage_token_is_403_on_admin_routes_and_changes_nothing(
    client: TestClient, usage_headers: dict[str, str], snapshot: Take, subtests: pytest.Subtests
) -> None:
    before = snapshot()
    for route in ADMIN_ONLY:
        with subtests.test(f"{route[0]} {route[1]}"):
            response = call(client, route, usage_headers)
            assert response.status_code == 403
            assert response.json()["code"] == "forbidden"
    assert snapshot() == before


def test_a_usage_token_cannot_create_a_customer_by_granting(
    client: TestClient, usage_headers: dict[str, str], snapshot: Take
) -> None:
    before = snapshot()
    response = client.post(
        "/v1/customers/brand_new/grants", json={"credits": 1000}, headers=usage_headers
    )
    assert response.status_code == 403
    assert snapshot() == before
    assert client.get("/v1/customers/brand_new/credits", headers=usage_headers).status_code == 404


@pytest.mark.usefixtures("funded")
def test_an_admin_token_may_do_everything(
    client: TestClient, admin_headers: dict[str, str], subtests: pytest.Subtests
) -> None:
    for route in PROTECTED:
        with subtests.test(f"{route[0]} {route[1]}"):
            response = call(client, route, admin_headers)
            assert response.status_code in (200, 201), response.text


@pytest.mark.usefixtures("funded")
def test_a_usage_token_may_record_usage_and_read_balances(
    client: TestClient, usage_headers: dict[str, str], subtests: pytest.Subtests
) -> None:
    for route in USAGE_SCOPE:
        with subtests.test(f"{route[0]} {route[1]}"):
            response = call(client, route, usage_headers)
            assert response.status_code in (200, 201), response.text


def test_the_scheme_is_case_insensitive(client: TestClient, usage_token: str, fund: Fund) -> None:
    fund("user_1", 1)
    response = client.get(
        "/v1/customers/user_1/credits", headers={"Authorization": f"bearer {usage_token}"}
    )
    assert response.status_code == 200


def test_without_a_token_a_malformed_body_is_still_401(client: TestClient) -> None:
    response = client.post(
        "/v1/usage", content=b'{"customer_id": ', headers={"Content-Type": "application/json"}
    )
    assert (response.status_code, response.json()["code"]) == (401, "unauthorized")


def test_without_a_token_a_wellformed_but_invalid_body_is_401(client: TestClient) -> None:
    response = client.post("/v1/usage", json={"customer_id": 5, "credits": "x"})
    assert (response.status_code, response.json()["code"]) == (401, "unauthorized")


def test_health_needs_no_token(client: TestClient) -> None:
    assert client.get("/healthz").status_code == 200
