"""POST /v1/usage and the customer endpoints over HTTP: status codes and bodies exactly as
DESIGN.md; idempotency under a race of identical requests over real HTTP; bad input changes
nothing."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, func, select

from api.app import create_app
from outbox.db import session_scope
from outbox.models import Customer, IdempotencyRecord, LedgerEntry, OutboxEvent
from outbox.settings import load_settings
from outbox.tokens import create_token
from tests.api.live import live_server
from tests.factories import make_customer


@pytest.fixture
def app(clean_tables: Engine, pg_url: str) -> Any:
    return create_app(load_settings(database_url=pg_url), engine=clean_tables)


@pytest.fixture
def tokens(clean_tables: Engine) -> dict[str, str]:
    with session_scope(clean_tables) as session:
        usage, _ = create_token(session, "usage", name="app")
        other, _ = create_token(session, "usage", name="other app")
        admin, _ = create_token(session, "admin", name="ops")
    return {"usage": usage, "other": other, "admin": admin}


@pytest.fixture
def client(app: Any) -> Iterator[TestClient]:
    with TestClient(app) as test_client:
        yield test_client


def auth(token: str, key: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {token}"}
    if key is not None:
        headers["Idempotency-Key"] = key
    return headers


def snapshot(engine: Engine) -> tuple[int, ...]:
    """Row counts and the total balance: what any write would change."""
    with session_scope(engine) as session:
        return (
            int(session.scalar(select(func.count()).select_from(Customer)) or 0),
            int(session.scalar(select(func.coalesce(func.sum(Customer.balance), 0))) or 0),
            int(session.scalar(select(func.count()).select_from(LedgerEntry)) or 0),
            int(session.scalar(select(func.count()).select_from(OutboxEvent)) or 0),
            int(session.scalar(select(func.count()).select_from(IdempotencyRecord)) or 0),
        )


def seed_customer(engine: Engine, credits: int = 10, customer_id: str = "user_1") -> str:
    with session_scope(engine) as session:
        return make_customer(session, credits=credits, customer_id=customer_id)


def test_usage_status_codes_and_bodies(
    client: TestClient, tokens: dict[str, str], clean_tables: Engine
) -> None:
    seed_customer(clean_tables, 5)
    ok = client.post(
        "/v1/usage", json={"customer_id": "user_1", "credits": 2}, headers=auth(tokens["usage"])
    )
    assert ok.status_code == 201
    body = ok.json()
    assert set(body) == {"event_id", "external_id", "balance"} and body["balance"] == 3
    default = client.post(
        "/v1/usage", json={"customer_id": "user_1"}, headers=auth(tokens["usage"])
    )
    assert default.status_code == 201 and default.json()["balance"] == 2  # credits default 1

    broke = client.post(
        "/v1/usage", json={"customer_id": "user_1", "credits": 3}, headers=auth(tokens["usage"])
    )
    assert broke.status_code == 402 and broke.json()["code"] == "insufficient_credits"
    nobody = client.post("/v1/usage", json={"customer_id": "nobody"}, headers=auth(tokens["usage"]))
    assert nobody.status_code == 404 and nobody.json()["code"] == "customer_not_found"

    assert client.post("/v1/usage", json={"customer_id": "user_1"}).status_code == 401
    bad_token = client.post("/v1/usage", json={"customer_id": "user_1"}, headers=auth("pou_nope"))
    assert bad_token.status_code == 401 and bad_token.json()["code"] == "unauthorized"
    grant = client.post(
        "/v1/customers/user_1/grants", json={"credits": 5}, headers=auth(tokens["usage"])
    )
    assert grant.status_code == 403 and grant.json()["code"] == "forbidden"


def test_idempotency_key_repeats_the_first_response_and_refuses_another_body(
    client: TestClient, tokens: dict[str, str], clean_tables: Engine
) -> None:
    seed_customer(clean_tables, 4)
    body = {"customer_id": "user_1", "credits": 3, "metadata": {"plan_id": "fp_1"}}
    first = client.post("/v1/usage", json=body, headers=auth(tokens["usage"], "k1"))
    again = client.post("/v1/usage", json=body, headers=auth(tokens["usage"], "k1"))
    assert (again.status_code, again.json()) == (first.status_code, first.json())
    other = client.post(
        "/v1/usage", json={**body, "credits": 1}, headers=auth(tokens["usage"], "k1")
    )
    assert other.status_code == 409 and other.json()["code"] == "idempotency_key_reused"
    # A refusal is repeated too: the same 402, even after credits arrive.
    refused = client.post("/v1/usage", json=body, headers=auth(tokens["usage"], "k2"))
    assert refused.status_code == 402
    client.post("/v1/customers/user_1/grants", json={"credits": 10}, headers=auth(tokens["admin"]))
    repeat = client.post("/v1/usage", json=body, headers=auth(tokens["usage"], "k2"))
    assert (repeat.status_code, repeat.json()) == (402, refused.json())
    # Keys are scoped per token: the same key from another token is another request.
    theirs = client.post("/v1/usage", json=body, headers=auth(tokens["other"], "k1"))
    assert theirs.status_code == 201 and theirs.json()["event_id"] != first.json()["event_id"]


def test_20_identical_requests_racing_over_http_deduct_once(
    app: Any, tokens: dict[str, str], clean_tables: Engine
) -> None:
    seed_customer(clean_tables, 100)
    body = {"customer_id": "user_1", "credits": 7, "metadata": {"plan_id": "fp_9"}}
    responses: list[httpx.Response] = []
    lock = threading.Lock()
    with live_server(app) as url:
        barrier = threading.Barrier(20)

        def post() -> None:
            with httpx.Client(base_url=url, timeout=30) as http:
                barrier.wait()
                response = http.post("/v1/usage", json=body, headers=auth(tokens["usage"], "race"))
            with lock:
                responses.append(response)

        threads = [threading.Thread(target=post) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(responses) == 20
    assert {r.status_code for r in responses} == {201}
    assert len({json.dumps(r.json(), sort_keys=True) for r in responses}) == 1
    with session_scope(clean_tables) as session:
        assert session.scalar(select(func.count()).select_from(OutboxEvent)) == 1
        assert session.get(Customer, "user_1").balance == 93  # type: ignore[union-attr]


def test_customer_credits_history_and_grants(
    client: TestClient, tokens: dict[str, str], clean_tables: Engine
) -> None:
    created = client.post(
        "/v1/customers/new_user/grants",
        json={"credits": 9, "reason": "promo"},
        headers=auth(tokens["admin"], "g1"),
    )
    assert created.status_code == 201 and created.json()["balance"] == 9
    repeat = client.post(
        "/v1/customers/new_user/grants",
        json={"credits": 9, "reason": "promo"},
        headers=auth(tokens["admin"], "g1"),
    )
    assert repeat.json() == created.json()
    ids = []
    for n in range(5):
        response = client.post(
            "/v1/usage",
            json={"customer_id": "new_user", "metadata": {"n": n}},
            headers=auth(tokens["usage"]),
        )
        ids.append(response.json()["event_id"])
    credits = client.get("/v1/customers/new_user/credits", headers=auth(tokens["usage"])).json()
    assert credits == {"customer_id": "new_user", "balance": 4, "held": 0, "granted": 9, "used": 5}
    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get(
            "/v1/customers/new_user/usage", params=params, headers=auth(tokens["usage"])
        ).json()
        seen += [item["event_id"] for item in page["items"]]
        assert all(item["status"] == "pending" for item in page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(ids, reverse=True)  # newest first, every event once
    missing = client.get("/v1/customers/ghost/usage", headers=auth(tokens["usage"]))
    assert missing.status_code == 404


BAD_BODIES: list[tuple[str, Any]] = [
    ("credits", {"customer_id": "user_1", "credits": 0}),
    ("credits", {"customer_id": "user_1", "credits": -1}),
    ("credits", {"customer_id": "user_1", "credits": 1.5}),
    ("credits", {"customer_id": "user_1", "credits": "3"}),
    ("credits", {"customer_id": "user_1", "credits": True}),
    ("credits", {"customer_id": "user_1", "credits": None}),
    ("credits", {"customer_id": "user_1", "credits": 10**12}),
    ("customer_id", {"customer_id": ""}),
    ("customer_id", {"customer_id": "  user_1"}),
    ("customer_id", {"customer_id": "u" * 129}),
    ("customer_id", {"customer_id": "user\n1"}),
    ("customer_id", {"customer_id": "user\x001"}),
    ("customer_id", {"customer_id": 42}),
    ("customer_id", {}),
    ("metadata", {"customer_id": "user_1", "metadata": [1]}),
    ("metadata", {"customer_id": "user_1", "metadata": {f"k{i}": i for i in range(51)}}),
    ("metadata", {"customer_id": "user_1", "metadata": {"k" * 41: 1}}),
    ("metadata", {"customer_id": "user_1", "metadata": {"a": {"nested": 1}}}),
    ("metadata", {"customer_id": "user_1", "metadata": {"a": [1, 2]}}),
    ("metadata", {"customer_id": "user_1", "metadata": {"a": None}}),
    ("metadata", {"customer_id": "user_1", "metadata": {"a": ""}}),
    ("metadata", {"customer_id": "user_1", "metadata": {"a": "x" * 501}}),
    ("metadata", {"customer_id": "user_1", "metadata": {"credits_used": 3}}),
    ("metadata", {"customer_id": "user_1", "metadata": {"usage_id": "1"}}),
    ("metadata", {"customer_id": "user_1", "metadata": {"a": 2**60}}),
    ("extra", {"customer_id": "user_1", "credit": 1}),
]


@pytest.mark.parametrize(("field", "body"), BAD_BODIES)
def test_bad_input_is_a_422_naming_the_field_and_changes_nothing(
    client: TestClient, tokens: dict[str, str], clean_tables: Engine, field: str, body: Any
) -> None:
    seed_customer(clean_tables, 10)
    before = snapshot(clean_tables)
    response = client.post("/v1/usage", json=body, headers=auth(tokens["usage"], "k"))
    assert response.status_code == 422, response.text
    error = response.json()
    assert error["code"] == "invalid_request" and error["detail"]
    if field != "extra":
        assert error["field"].startswith(field), error
    assert snapshot(clean_tables) == before


@pytest.mark.parametrize(
    ("raw", "content_type"),
    [
        (b'{"customer_id": "user_1", "metadata": {"a": NaN}}', "application/json"),
        (b'{"customer_id": "user_1", "metadata": {"a": Infinity}}', "application/json"),
        (b'{"customer_id": "user_1", "metadata": {"a": "\\ud800"}}', "application/json"),
        (b'{"customer_id": "\\ud800"}', "application/json"),
        (b'{"customer_id": "user_1"', "application/json"),
        (b"customer_id=user_1", "application/x-www-form-urlencoded"),
        (b"\xff\xfe", "application/json"),
        (b"[]", "application/json"),
    ],
)
def test_raw_bodies_that_are_not_valid_json_objects_are_refused(
    client: TestClient, tokens: dict[str, str], clean_tables: Engine, raw: bytes, content_type: str
) -> None:
    seed_customer(clean_tables, 10)
    before = snapshot(clean_tables)
    response = client.post(
        "/v1/usage", content=raw, headers={**auth(tokens["usage"]), "content-type": content_type}
    )
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["code"]
    assert snapshot(clean_tables) == before


def test_oversized_bodies_bad_cursors_and_limits(
    client: TestClient, tokens: dict[str, str], clean_tables: Engine
) -> None:
    seed_customer(clean_tables, 10)
    huge = client.post("/v1/usage", content=b"x" * 300_000, headers=auth(tokens["usage"]))
    assert huge.status_code == 413 and huge.json()["code"] == "request_too_large"
    for params in ({"cursor": "garbage"}, {"limit": 0}, {"limit": 1000}):
        response = client.get(
            "/v1/customers/user_1/usage", params=params, headers=auth(tokens["usage"])
        )
        assert response.status_code == 422 and response.json()["code"] == "invalid_request"


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    body=JSON
    | st.fixed_dictionaries(
        {"customer_id": st.just("user_1") | st.text(max_size=140)},
        optional={"credits": JSON | st.integers(), "metadata": JSON},
    )
)
def test_no_body_ever_yields_a_500_and_refusals_change_nothing(
    client: TestClient, tokens: dict[str, str], clean_tables: Engine, body: Any
) -> None:
    with session_scope(clean_tables) as session:
        if session.get(Customer, "user_1") is None:
            make_customer(session, credits=10**9, customer_id="user_1")
    before = snapshot(clean_tables)
    response = client.post("/v1/usage", json=body, headers=auth(tokens["usage"]))
    assert response.status_code in (201, 402, 404, 422), response.text
    if response.status_code == 201:
        return
    assert set(response.json()) >= {"code", "detail"}
    assert snapshot(clean_tables) == before
