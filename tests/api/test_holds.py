"""POST /v1/holds, /capture and /release over HTTP: what the customer's credits, the ledger and
the outbox look like after each (the domain functions are tested in tests/outbox/test_holds.py;
these catch a route that passes the wrong thing to them, or none)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from fastapi.testclient import TestClient
from sqlalchemy import Engine, select, update

from outbox.db import session_scope
from outbox.holds import expire_holds
from outbox.ledger import ledger_balance
from outbox.models import Hold, OutboxEvent, utcnow

if TYPE_CHECKING:
    from tests.api.conftest import LiveServer, Snapshot

Fund = Callable[[str, int], None]
Take = Callable[[], "Snapshot"]


def _credits(client: TestClient, headers: dict[str, str]) -> dict[str, int]:
    response = client.get("/v1/customers/user_1/credits", headers=headers)
    assert response.status_code == 200
    body = response.json()
    return {key: body[key] for key in ("balance", "held", "used")}


def _hold(client: TestClient, headers: dict[str, str], credits: int) -> int:
    response = client.post(
        "/v1/holds", json={"customer_id": "user_1", "credits": credits}, headers=headers
    )
    assert response.status_code == 201, response.text
    return int(response.json()["hold_id"])


def _events(engine: Engine) -> list[int]:
    with session_scope(engine) as session:
        return list(session.scalars(select(OutboxEvent.credits).order_by(OutboxEvent.id)))


def _ledger_matches(engine: Engine, balance: int) -> bool:
    with session_scope(engine) as session:
        return ledger_balance(session, "user_1") == balance


def test_capture_bills_the_credits_asked_for_and_returns_the_rest(
    client: TestClient, usage_headers: dict[str, str], fund: Fund, clean_tables: Engine
) -> None:
    fund("user_1", 10)
    hold = _hold(client, usage_headers, 6)
    assert _credits(client, usage_headers) == {"balance": 4, "held": 6, "used": 0}
    response = client.post(
        f"/v1/holds/{hold}/capture",
        json={"credits": 4, "metadata": {"model": "m1"}},
        headers=usage_headers,
    )
    assert response.status_code == 201, response.text
    assert response.json()["balance"] == 6
    assert _credits(client, usage_headers) == {"balance": 6, "held": 0, "used": 4}
    assert _events(clean_tables) == [4]
    assert _ledger_matches(clean_tables, 6)


def test_capture_without_a_body_bills_the_whole_hold(
    client: TestClient, usage_headers: dict[str, str], fund: Fund, clean_tables: Engine
) -> None:
    fund("user_1", 10)
    hold = _hold(client, usage_headers, 6)
    response = client.post(f"/v1/holds/{hold}/capture", headers=usage_headers)
    assert response.status_code == 201, response.text
    assert _credits(client, usage_headers) == {"balance": 4, "held": 0, "used": 6}
    assert _events(clean_tables) == [6]


def test_release_returns_the_held_credits_bills_nothing_and_closes_the_hold(
    client: TestClient,
    usage_headers: dict[str, str],
    fund: Fund,
    clean_tables: Engine,
    snapshot: Take,
) -> None:
    fund("user_1", 10)
    hold = _hold(client, usage_headers, 8)
    assert _credits(client, usage_headers) == {"balance": 2, "held": 8, "used": 0}
    response = client.post(f"/v1/holds/{hold}/release", headers=usage_headers)
    assert response.status_code == 200, response.text
    assert response.json() == {"hold_id": hold, "balance": 10, "status": "released"}
    assert _credits(client, usage_headers) == {"balance": 10, "held": 0, "used": 0}
    assert _ledger_matches(clean_tables, 10)
    after_release = snapshot()
    # Released means closed: a capture now is refused and bills nothing; a second release
    # changes nothing.
    response = client.post(f"/v1/holds/{hold}/capture", json={"credits": 1}, headers=usage_headers)
    assert response.status_code == 409
    assert response.json()["code"] == "hold_closed"
    again = client.post(f"/v1/holds/{hold}/release", headers=usage_headers)
    assert again.json() == {"hold_id": hold, "balance": 10, "status": "released"}
    assert snapshot() == after_release
    assert _events(clean_tables) == []


def test_a_hold_past_its_expiry_cannot_be_captured_even_before_the_sweeper_ran(
    client: TestClient, usage_headers: dict[str, str], fund: Fund, clean_tables: Engine
) -> None:
    fund("user_1", 10)
    hold = _hold(client, usage_headers, 7)
    with session_scope(clean_tables) as session:  # its TTL ran out; no sweep has run
        session.execute(update(Hold).where(Hold.id == hold).values(expires_at=utcnow()))
    response = client.post(f"/v1/holds/{hold}/capture", json={"credits": 3}, headers=usage_headers)
    assert response.status_code == 409, response.text
    assert response.json()["code"] == "hold_closed"
    # The refusal released it, as the sweeper would have: everything back, nothing billed.
    assert _credits(client, usage_headers) == {"balance": 10, "held": 0, "used": 0}
    assert _events(clean_tables) == []
    assert _ledger_matches(clean_tables, 10)
    with session_scope(clean_tables) as session:
        assert session.scalar(select(Hold.status).where(Hold.id == hold)) == "expired"
        assert expire_holds(session) == 0  # nothing left for the sweeper
    response = client.post(f"/v1/holds/{hold}/capture", json={"credits": 3}, headers=usage_headers)
    assert response.status_code == 409
    assert _events(clean_tables) == []


# --- Idempotency-Key: a retried hold is the first hold ------------------------------------------


def _holds(engine: Engine) -> list[int]:
    with session_scope(engine) as session:
        return list(session.scalars(select(Hold.id).order_by(Hold.id)))


def test_a_retried_hold_with_the_same_key_returns_the_first_hold_and_holds_once(
    client: TestClient,
    usage_headers: dict[str, str],
    fund: Fund,
    clean_tables: Engine,
    new_token: Callable[[str], str],
) -> None:
    fund("user_1", 10)
    keyed = usage_headers | {"Idempotency-Key": "generation-7"}
    body = {"customer_id": "user_1", "credits": 6}
    first = client.post("/v1/holds", json=body, headers=keyed)
    again = client.post("/v1/holds", json=body, headers=keyed)
    assert first.status_code == again.status_code == 201, again.text
    assert again.json() == first.json()
    assert _holds(clean_tables) == [first.json()["hold_id"]]
    assert _credits(client, usage_headers) == {"balance": 4, "held": 6, "used": 0}

    # The same key for another body is refused and holds nothing; another token's key is its own.
    other = client.post("/v1/holds", json=body | {"credits": 1}, headers=keyed)
    assert (other.status_code, other.json()["code"]) == (409, "idempotency_key_reused")
    second_token = {
        "Authorization": f"Bearer {new_token('usage')}",
        "Idempotency-Key": "generation-7",
    }
    assert (
        client.post("/v1/holds", json=body | {"credits": 1}, headers=second_token).status_code
        == 201
    )
    assert _credits(client, usage_headers) == {"balance": 3, "held": 7, "used": 0}
    assert _ledger_matches(clean_tables, 3)


def test_a_refused_hold_is_replayed_as_refused(
    client: TestClient, usage_headers: dict[str, str], fund: Fund, clean_tables: Engine
) -> None:
    fund("user_1", 2)
    keyed = usage_headers | {"Idempotency-Key": "too-big"}
    body = {"customer_id": "user_1", "credits": 5}
    assert client.post("/v1/holds", json=body, headers=keyed).status_code == 402
    fund("user_1", 10)  # the customer can now afford it, but this key's answer was given
    assert client.post("/v1/holds", json=body, headers=keyed).status_code == 402
    assert _holds(clean_tables) == []


def test_the_same_keyed_hold_sent_at_once_from_many_threads_holds_once(
    live_server: LiveServer, usage_headers: dict[str, str], fund: Fund, clean_tables: Engine
) -> None:
    fund("user_1", 100)
    keyed = usage_headers | {"Idempotency-Key": "burst"}
    body = {"customer_id": "user_1", "credits": 10}
    barrier = threading.Barrier(8)
    with live_server.http() as http:

        def send(_: int) -> tuple[int, int]:
            barrier.wait()
            response = http.post("/v1/holds", json=body, headers=keyed)
            return response.status_code, response.json()["hold_id"]

        with ThreadPoolExecutor(8) as pool:
            answers = set(pool.map(send, range(8)))
    assert len(answers) == 1 and next(iter(answers))[0] == 201
    assert len(_holds(clean_tables)) == 1
    with session_scope(clean_tables) as session:
        assert ledger_balance(session, "user_1") == 90
