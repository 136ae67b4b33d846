"""POST /v1/usage over HTTP: the status codes and bodies of DESIGN.md, idempotency under a real
concurrent race, and bad input of every class refused with a machine-readable code while
changing nothing (including a property-based test over arbitrary JSON bodies)."""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, func, select

from api.app import MAX_BODY_BYTES
from outbox.db import session_scope
from outbox.errors import InvalidRequest
from outbox.ledger import get_credits, ledger_balance
from outbox.models import OutboxEvent
from outbox.validation import check_credits, check_customer_id, check_metadata

if TYPE_CHECKING:
    from tests.api.conftest import LiveServer, Snapshot

Fund = Callable[[str, int], None]
Take = Callable[[], "Snapshot"]


def post_raw(
    client: TestClient, headers: dict[str, str], body: str | bytes, **extra: str
) -> httpx.Response:
    """POST /v1/usage with a raw body (JSON text Python's `json=` could not produce)."""
    content = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    return client.post(
        "/v1/usage",
        content=content,
        headers={**headers, "Content-Type": "application/json", **extra},
    )


def events_of(engine: Engine, customer: str) -> list[OutboxEvent]:
    with session_scope(engine) as session:
        return list(
            session.scalars(
                select(OutboxEvent)
                .where(OutboxEvent.customer_id == customer)
                .order_by(OutboxEvent.id)
            )
        )


# --- the contract ---------------------------------------------------------------------------


def test_usage_is_recorded_with_its_outbox_row_and_201(
    client: TestClient, usage_headers: dict[str, str], fund: Fund, clean_tables: Engine
) -> None:
    fund("user_1", 10)
    response = client.post(
        "/v1/usage",
        json={"customer_id": "user_1", "credits": 3, "metadata": {"plan_id": "fp_42", "rooms": 3}},
        headers={**usage_headers, "Idempotency-Key": "gen-1"},
    )
    assert response.status_code == 201
    body = response.json()
    assert set(body) == {"event_id", "external_id", "balance"}
    assert body["balance"] == 7
    [event] = events_of(clean_tables, "user_1")
    assert (event.id, event.external_id) == (body["event_id"], body["external_id"])
    assert (event.credits, event.status) == (3, "pending")
    assert event.event_metadata == {"plan_id": "fp_42", "rooms": 3}
    with session_scope(clean_tables) as session:
        assert ledger_balance(session, "user_1") == get_credits(session, "user_1").balance == 7


def test_credits_default_to_one(
    client: TestClient, usage_headers: dict[str, str], fund: Fund
) -> None:
    fund("user_1", 2)
    response = client.post("/v1/usage", json={"customer_id": "user_1"}, headers=usage_headers)
    assert (response.status_code, response.json()["balance"]) == (201, 1)


def test_insufficient_credits_is_402_and_changes_nothing(
    client: TestClient, usage_headers: dict[str, str], fund: Fund, snapshot: Take
) -> None:
    fund("user_1", 2)
    before = snapshot()
    response = client.post(
        "/v1/usage", json={"customer_id": "user_1", "credits": 3}, headers=usage_headers
    )
    assert response.status_code == 402
    assert response.json()["code"] == "insufficient_credits"
    assert response.json()["detail"]
    assert snapshot() == before


def test_unknown_customer_is_404_and_creates_nothing(
    client: TestClient, usage_headers: dict[str, str], snapshot: Take
) -> None:
    before = snapshot()
    response = client.post("/v1/usage", json={"customer_id": "ghost"}, headers=usage_headers)
    assert response.status_code == 404
    assert response.json()["code"] == "customer_not_found"
    assert snapshot() == before


# --- HTTP idempotency -------------------------------------------------------------------------


def test_a_repeat_with_the_same_key_returns_the_first_response_and_bills_once(
    client: TestClient, usage_headers: dict[str, str], fund: Fund, clean_tables: Engine
) -> None:
    fund("user_1", 10)
    headers = {**usage_headers, "Idempotency-Key": "gen-1"}
    body = {"customer_id": "user_1", "credits": 2, "metadata": {"plan_id": "fp_1"}}
    first = client.post("/v1/usage", json=body, headers=headers)
    again = client.post("/v1/usage", json=body, headers=headers)
    # The same request spelled differently (key order, explicit default) is the same request.
    reordered = client.post(
        "/v1/usage",
        content=json.dumps(
            {"metadata": {"plan_id": "fp_1"}, "credits": 2, "customer_id": "user_1"}
        ),
        headers={**headers, "Content-Type": "application/json"},
    )
    assert first.status_code == again.status_code == reordered.status_code == 201
    assert first.json() == again.json() == reordered.json()
    assert len(events_of(clean_tables, "user_1")) == 1
    with session_scope(clean_tables) as session:
        assert get_credits(session, "user_1").balance == 8


def test_the_same_key_with_another_body_is_409_and_changes_nothing(
    client: TestClient, usage_headers: dict[str, str], fund: Fund, snapshot: Take
) -> None:
    fund("user_1", 10)
    headers = {**usage_headers, "Idempotency-Key": "gen-1"}
    client.post("/v1/usage", json={"customer_id": "user_1", "credits": 2}, headers=headers)
    before = snapshot()
    for other in (
        {"customer_id": "user_1", "credits": 3},
        {"customer_id": "user_1", "credits": 2, "metadata": {"plan_id": "fp_2"}},
    ):
        response = client.post("/v1/usage", json=other, headers=headers)
        assert response.status_code == 409
        assert response.json()["code"] == "idempotency_key_reused"
    assert snapshot() == before


def test_a_repeated_402_stays_402_even_after_a_top_up(
    client: TestClient, usage_headers: dict[str, str], fund: Fund, clean_tables: Engine
) -> None:
    fund("user_1", 1)
    headers = {**usage_headers, "Idempotency-Key": "gen-1"}
    body = {"customer_id": "user_1", "credits": 5}
    first = client.post("/v1/usage", json=body, headers=headers)
    fund("user_1", 10)
    again = client.post("/v1/usage", json=body, headers=headers)
    assert first.status_code == again.status_code == 402
    assert first.json() == again.json()
    assert first.json()["code"] == "insufficient_credits"
    assert events_of(clean_tables, "user_1") == []
    # A new key is a new request: now it is covered.
    fresh = client.post("/v1/usage", json=body, headers={**usage_headers, "Idempotency-Key": "g2"})
    assert fresh.status_code == 201


def test_keys_are_scoped_per_token(
    client: TestClient,
    usage_headers: dict[str, str],
    new_token: Callable[[str], str],
    fund: Fund,
    clean_tables: Engine,
) -> None:
    fund("user_1", 10)
    other = {"Authorization": f"Bearer {new_token('usage')}"}
    body = {"customer_id": "user_1", "credits": 2}
    a = client.post("/v1/usage", json=body, headers={**usage_headers, "Idempotency-Key": "k"})
    b = client.post("/v1/usage", json=body, headers={**other, "Idempotency-Key": "k"})
    assert a.status_code == b.status_code == 201
    assert a.json()["event_id"] != b.json()["event_id"]
    assert len(events_of(clean_tables, "user_1")) == 2
    with session_scope(clean_tables) as session:
        assert get_credits(session, "user_1").balance == 6


def test_twenty_concurrent_requests_with_one_key_bill_once_over_real_http(
    live_server: LiveServer, usage_headers: dict[str, str], fund: Fund, clean_tables: Engine
) -> None:
    fund("user_1", 100)
    barrier = threading.Barrier(20)
    headers = {**usage_headers, "Idempotency-Key": "gen-race"}
    body = {"customer_id": "user_1", "credits": 7, "metadata": {"plan_id": "fp_race"}}

    def post(_: int) -> tuple[int, Any]:
        barrier.wait(timeout=30)
        response = http.post("/v1/usage", json=body, headers=headers)
        return response.status_code, response.json()

    with live_server.http() as http, ThreadPoolExecutor(max_workers=20) as pool:
        responses = list(pool.map(post, range(20)))

    assert {status for status, _ in responses} == {201}
    assert all(body == responses[0][1] for _, body in responses)
    [event] = events_of(clean_tables, "user_1")
    assert event.id == responses[0][1]["event_id"]
    with session_scope(clean_tables) as session:
        assert get_credits(session, "user_1").balance == ledger_balance(session, "user_1") == 93


def test_concurrent_requests_over_real_http_never_overdraw(
    live_server: LiveServer, usage_headers: dict[str, str], fund: Fund, clean_tables: Engine
) -> None:
    fund("user_1", 100)
    rng = random.Random(5)
    amounts = [rng.randint(1, 7) for _ in range(40)]
    barrier = threading.Barrier(len(amounts))

    def post(credits: int) -> tuple[int, int]:
        barrier.wait(timeout=30)
        response = http.post(
            "/v1/usage", json={"customer_id": "user_1", "credits": credits}, headers=usage_headers
        )
        return credits, response.status_code

    with live_server.http() as http, ThreadPoolExecutor(max_workers=len(amounts)) as pool:
        outcomes = list(pool.map(post, amounts))

    assert {status for _, status in outcomes} == {201, 402}
    spent = sum(credits for credits, status in outcomes if status == 201)
    events = events_of(clean_tables, "user_1")
    assert len(events) == sum(status == 201 for _, status in outcomes)
    assert sum(e.credits for e in events) == spent
    with session_scope(clean_tables) as session:
        balance = get_credits(session, "user_1").balance
        assert balance == 100 - spent == ledger_balance(session, "user_1") >= 0
    assert all(credits > balance for credits, status in outcomes if status == 402)


# --- bad input: every class is a 4xx with a code, and nothing changes ---------------------------

VALID: dict[str, Any] = {"customer_id": "user_1", "credits": 1, "metadata": {"plan_id": "fp_1"}}


def with_field(**changes: Any) -> dict[str, Any]:
    return {**VALID, **changes}


def with_metadata(**entries: Any) -> dict[str, Any]:
    return {**VALID, "metadata": entries}


BAD_BODIES: list[tuple[str, dict[str, Any] | list[Any], str]] = [
    ("credits zero", with_field(credits=0), "credits"),
    ("credits negative", with_field(credits=-1), "credits"),
    ("credits fractional", with_field(credits=1.5), "credits"),
    ("credits integral float", with_field(credits=1.0), "credits"),
    ("credits string", with_field(credits="3"), "credits"),
    ("credits bool", with_field(credits=True), "credits"),
    ("credits null", with_field(credits=None), "credits"),
    ("credits huge", with_field(credits=10**30), "credits"),
    ("credits over bigint", with_field(credits=2**63), "credits"),
    ("credits over the ceiling", with_field(credits=1_000_001), "credits"),
    ("customer_id empty", with_field(customer_id=""), "customer_id"),
    ("customer_id padded", with_field(customer_id="  x"), "customer_id"),
    ("customer_id trailing space", with_field(customer_id="x "), "customer_id"),
    ("customer_id 129 chars", with_field(customer_id="a" * 129), "customer_id"),
    ("customer_id newline", with_field(customer_id="a\nb"), "customer_id"),
    ("customer_id control", with_field(customer_id="a\x1bb"), "customer_id"),
    ("customer_id NUL", with_field(customer_id="a\x00b"), "customer_id"),
    ("customer_id number", with_field(customer_id=42), "customer_id"),
    ("customer_id null", with_field(customer_id=None), "customer_id"),
    ("customer_id list", with_field(customer_id=["user_1"]), "customer_id"),
    ("customer_id missing", {"credits": 1}, "customer_id"),
    ("metadata string", with_field(metadata="plan"), "metadata"),
    ("metadata list", with_field(metadata=[1, 2]), "metadata"),
    ("metadata 51 keys", with_field(metadata={f"k{i}": i for i in range(51)}), "metadata"),
    ("metadata 41-char key", with_metadata(**{"k" * 41: 1}), "metadata"),
    ("metadata empty key", with_metadata(**{"": 1}), "metadata"),
    ("metadata nested", with_metadata(nested={"a": 1}), "metadata.nested"),
    ("metadata list value", with_metadata(rooms=[1, 2]), "metadata.rooms"),
    ("metadata null value", with_metadata(plan=None), "metadata.plan"),
    ("metadata empty string", with_metadata(plan=""), "metadata.plan"),
    ("metadata 501-char string", with_metadata(plan="x" * 501), "metadata.plan"),
    ("metadata NUL in string", with_metadata(plan="a\x00b"), "metadata.plan"),
    ("metadata int beyond 2^53", with_metadata(n=2**53 + 1), "metadata.n"),
    ("metadata credits_used", with_metadata(credits_used=5), "metadata.credits_used"),
    ("metadata usage_id", with_metadata(usage_id="u_1"), "metadata.usage_id"),
    (
        "metadata usage_external_id",
        with_metadata(usage_external_id="usage_x"),
        "metadata.usage_external_id",
    ),
    ("unknown field", with_field(customer="user_1"), "customer"),
    ("body is a list", [VALID], "body"),
]


@pytest.fixture
def funded(fund: Fund) -> None:
    fund("user_1", 10)


def assert_refused(
    response: httpx.Response, status: int = 422, code: str = "invalid_request"
) -> Any:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code
    assert isinstance(body["detail"], str) and body["detail"]
    return body


@pytest.mark.usefixtures("funded")
def test_bad_body_is_422_naming_the_field_and_changes_nothing(
    client: TestClient, usage_headers: dict[str, str], snapshot: Take, subtests: pytest.Subtests
) -> None:
    for case, body, field in BAD_BODIES:
        with subtests.test(case):
            before = snapshot()
            response = client.post(
                "/v1/usage", json=body, headers={**usage_headers, "Idempotency-Key": f"bad-{case}"}
            )
            assert assert_refused(response)["field"] == field
            assert snapshot() == before


def test_a_bad_metadata_value_names_exactly_its_key(
    client: TestClient, usage_headers: dict[str, str]
) -> None:
    for value in ({"a": 1}, [1], None):
        response = client.post("/v1/usage", json=with_metadata(x=value), headers=usage_headers)
        assert assert_refused(response)["field"] == "metadata.x", value


RAW_BODIES: list[tuple[str, str, str]] = [
    ("NaN metadata", '{"customer_id": "user_1", "metadata": {"x": NaN}}', "metadata.x"),
    ("Infinity metadata", '{"customer_id": "user_1", "metadata": {"x": Infinity}}', "metadata.x"),
    ("-Infinity metadata", '{"customer_id": "user_1", "metadata": {"x": -Infinity}}', "metadata.x"),
    ("overflowing float", '{"customer_id": "user_1", "metadata": {"x": 1e400}}', "metadata.x"),
    ("NaN credits", '{"customer_id": "user_1", "credits": NaN}', "credits"),
    (
        "lone surrogate value",
        '{"customer_id": "user_1", "metadata": {"x": "\\ud800"}}',
        "metadata.x",
    ),
    ("lone surrogate key", '{"customer_id": "user_1", "metadata": {"\\udfff": 1}}', "metadata"),
    ("lone surrogate customer", '{"customer_id": "a\\ud800"}', "customer_id"),
    ("escaped NUL customer", '{"customer_id": "a\\u0000"}', "customer_id"),
    ("invalid JSON", '{"customer_id": "user_1",', "body"),
    ("not JSON at all", "customer_id=user_1", "body"),
    ("empty body", "", "body"),
    ("JSON null", "null", "body"),
    ("JSON string", '"user_1"', "body"),
]


@pytest.mark.usefixtures("funded")
def test_bad_raw_json_is_422_naming_the_field_and_changes_nothing(
    client: TestClient, usage_headers: dict[str, str], snapshot: Take, subtests: pytest.Subtests
) -> None:
    for case, raw, field in RAW_BODIES:
        with subtests.test(case):
            before = snapshot()
            response = post_raw(client, usage_headers, raw, **{"Idempotency-Key": f"raw-{case}"})
            assert assert_refused(response)["field"] == field
            assert snapshot() == before


UNPARSEABLE: list[tuple[str, str | bytes, str]] = [
    # deeper than Python's JSON parser goes
    ("deep nesting", "[" * 5000 + "]" * 5000, "nested too deeply"),
    ("5000-digit number", '{"customer_id": "user_1", "credits": ' + "9" * 5000 + "}", "digits"),
    ("not UTF-8", b'{"customer_id": "user_1\xff"}', "not valid UTF-8"),
]


@pytest.mark.usefixtures("funded")
def test_unparseable_bodies_are_refused_like_any_bad_body(
    client: TestClient, usage_headers: dict[str, str], snapshot: Take, subtests: pytest.Subtests
) -> None:
    for case, raw, why in UNPARSEABLE:
        with subtests.test(case):
            before = snapshot()
            response = post_raw(client, usage_headers, raw)
            assert response.status_code == 422, response.text
            error = response.json()
            assert (error["code"], error["field"]) == ("invalid_request", "body")
            assert why in error["detail"]
            assert snapshot() == before


def test_an_unparseable_body_without_a_token_is_401(client: TestClient) -> None:
    response = post_raw(client, {}, UNPARSEABLE[0][1])
    assert (response.status_code, response.json()["code"]) == (401, "unauthorized")


@pytest.mark.usefixtures("funded")
def test_a_body_that_is_not_declared_json_is_refused(
    client: TestClient, usage_headers: dict[str, str], snapshot: Take, subtests: pytest.Subtests
) -> None:
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        with subtests.test(str(content_type)):
            before = snapshot()
            headers = dict(usage_headers)
            if content_type is not None:
                headers["Content-Type"] = content_type
            response = client.post("/v1/usage", content=json.dumps(VALID).encode(), headers=headers)
            assert response.status_code in (415, 422)
            assert response.json()["code"] in ("unsupported_media_type", "invalid_request")
            assert snapshot() == before


@pytest.mark.usefixtures("funded")
def test_an_oversized_body_is_413_request_too_large(
    client: TestClient, usage_headers: dict[str, str], snapshot: Take
) -> None:
    before = snapshot()
    padding = "x" * (MAX_BODY_BYTES + 1)
    response = post_raw(client, usage_headers, json.dumps({**VALID, "pad": padding}))
    assert_refused(response, 413, "request_too_large")

    # Without a Content-Length (chunked), the body is counted as it arrives.
    def chunks() -> Any:
        yield b'{"customer_id": "user_1", "pad": "'
        for _ in range(MAX_BODY_BYTES // 4096 + 2):
            yield b"x" * 4096
        yield b'"}'

    chunked = client.post(
        "/v1/usage", content=chunks(), headers={**usage_headers, "Content-Type": "application/json"}
    )
    assert_refused(chunked, 413, "request_too_large")
    assert snapshot() == before


@pytest.mark.usefixtures("funded")
def test_a_bad_idempotency_key_is_refused(
    client: TestClient, usage_headers: dict[str, str], snapshot: Take
) -> None:
    before = snapshot()
    for key in ("", "k" * 256):
        headers = {**usage_headers, "Idempotency-Key": key}
        response = client.post("/v1/usage", json=VALID, headers=headers)
        assert assert_refused(response)["field"] == "Idempotency-Key"
    assert snapshot() == before


# --- property: arbitrary JSON never breaks the API, and only valid usage changes anything -------

CUSTOMER = "hyp_customer"
text_chars = st.one_of(
    st.characters(exclude_categories=()),  # any code point, surrogates included
    st.sampled_from(["\x00", "\n", " ", "\ud800", "\udfff", "a", "é"]),
)
json_text = st.text(text_chars, max_size=12)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | json_text
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(json_text, children, max_size=4)
    ),
    max_leaves=12,
)
field_names = st.sampled_from(["customer_id", "credits", "metadata"]) | json_text


@st.composite
def mutated_valid_bodies(draw: st.DrawFn) -> Any:
    body: dict[str, Any] = {
        "customer_id": CUSTOMER,
        "credits": draw(st.integers(1, 5)),
        "metadata": {"plan_id": "fp_1", "rooms": 3},
    }
    for _ in range(draw(st.integers(0, 3))):
        mutation = draw(st.sampled_from(["set", "drop", "metadata_set", "metadata_drop"]))
        if mutation == "set":
            body[draw(field_names)] = draw(json_values)
        elif mutation == "drop" and body:
            body.pop(draw(st.sampled_from(sorted(body))))
        elif mutation == "metadata_set" and isinstance(body.get("metadata"), dict):
            body["metadata"][draw(json_text)] = draw(json_values)
        elif mutation == "metadata_drop" and isinstance(body.get("metadata"), dict):
            body["metadata"] = {}
    return body


arbitrary_bodies = st.one_of(
    mutated_valid_bodies(),
    mutated_valid_bodies(),  # twice: half the examples stay close to a valid body
    st.dictionaries(field_names, json_values, max_size=5),
    json_values,
)


def is_valid_usage(body: Any) -> bool:
    """The oracle: what the contract says a valid body is (independently of the API's code)."""
    if not isinstance(body, dict) or not set(body) <= {"customer_id", "credits", "metadata"}:
        return False
    try:
        check_customer_id(body.get("customer_id"))
        check_credits(body.get("credits", 1))
        check_metadata(body.get("metadata"))
    except InvalidRequest:
        return False
    return True


@pytest.mark.slow
@pytest.mark.usefixtures("clean_tables")
def test_arbitrary_json_bodies_never_break_the_api_and_refusals_change_nothing(
    client: TestClient, usage_headers: dict[str, str], fund: Fund, snapshot: Take
) -> None:
    fund(CUSTOMER, 1_000_000_000)

    @settings(
        max_examples=150,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(body=arbitrary_bodies)
    def property(body: Any) -> None:
        raw = json.dumps(body, ensure_ascii=True)  # lone surrogates become \udXXX escapes
        before = snapshot()
        response = post_raw(client, usage_headers, raw)
        after = snapshot()
        assert response.status_code != 500, response.text
        valid = is_valid_usage(body)
        event(f"{response.status_code} ({'valid' if valid else 'invalid'})")
        if response.status_code == 201:
            assert valid, f"accepted an invalid body: {raw!r}"
            credits = body.get("credits", 1)
            assert after.outbox_events == before.outbox_events + 1
            assert after.outbox_credits == before.outbox_credits + credits
            assert after.balances == before.balances - credits == after.ledger_sum
            assert set(response.json()) == {"event_id", "external_id", "balance"}
            return
        assert 400 <= response.status_code < 500, response.text
        error = response.json()
        assert isinstance(error["code"], str) and isinstance(error["detail"], str)
        assert after == before, f"refused but changed something: {raw!r}"
        if valid:  # a valid body is refused only for its customer
            assert body["customer_id"] != CUSTOMER
            assert (response.status_code, error["code"]) == (404, "customer_not_found")
        else:
            assert response.status_code == 422 and error["code"] == "invalid_request"
            assert isinstance(error["field"], str)

    property()
    with session_scope(client.app.state.engine) as session:  # type: ignore[attr-defined]
        assert get_credits(session, CUSTOMER).balance == ledger_balance(session, CUSTOMER)
        events = session.scalar(select(func.count()).where(OutboxEvent.customer_id == CUSTOMER))
        used = get_credits(session, CUSTOMER).used
        assert (events or 0) <= used
