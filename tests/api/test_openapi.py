"""The OpenAPI schema states what the API enforces (limits, every status it may answer, links)
and declares the bearer scheme Swagger's Authorize needs; its limits are the checks' own (a
property test per rule: the schema accepts exactly what outbox/validation.py accepts)."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

import jsonschema_rs
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from api.app import create_app
from api.schemas import METADATA_SCHEMA
from outbox.db import make_engine
from outbox.errors import InvalidRequest
from outbox.pagination import CURSOR_PATTERN, MAX_LEGACY_CURSOR_LENGTH, decode_cursor, legacy_cursor
from outbox.settings import load_settings
from outbox.validation import (
    CUSTOMER_ID_PATTERN,
    MAX_ID,
    NO_CONTROL_PATTERN,
    check_customer_id,
    check_idempotency_key,
    check_metadata,
)


def served_schema(**overrides: Any) -> dict[str, Any]:
    app: FastAPI = create_app(
        load_settings(database_url="sqlite://", **overrides), engine=make_engine("sqlite://")
    )
    schema: dict[str, Any] = TestClient(app).get("/openapi.json").json()
    return schema


SCHEMA = served_schema()
OPERATIONS = [
    (method, path, operation)
    for path, methods in SCHEMA["paths"].items()
    for method, operation in methods.items()
]
TOKEN_ROUTES = [op for op in OPERATIONS if op[1].startswith("/v1/") and "/polar/" not in op[1]]


def component(name: str) -> dict[str, Any]:
    schema: dict[str, Any] = SCHEMA["components"]["schemas"][name]
    return schema


def parameter(path: str, method: str, name: str) -> dict[str, Any]:
    [found] = [p for p in SCHEMA["paths"][path][method]["parameters"] if p["name"] == name]
    return found


# --- the bearer scheme -------------------------------------------------------------------------


def test_a_bearer_security_scheme_is_declared_so_swagger_can_authorize() -> None:
    scheme = SCHEMA["components"]["securitySchemes"]["bearerAuth"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    for method, path, operation in OPERATIONS:
        expected = [{"bearerAuth": []}] if (method, path, operation) in TOKEN_ROUTES else None
        assert operation.get("security") == expected, (method, path)


def test_swagger_ui_is_served_with_the_schema(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200
    assert "/openapi.json" in page.text


# --- every status --------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path", "operation"), OPERATIONS, ids=lambda v: str(v)[:40])
def test_every_operation_lists_the_statuses_any_request_may_get(
    method: str, path: str, operation: dict[str, Any]
) -> None:
    statuses = set(operation["responses"])
    assert {"431", "500"} <= statuses
    if method == "post":
        assert "413" in statuses
    if path != "/healthz":
        assert "503" in statuses
    if (method, path, operation) in TOKEN_ROUTES:
        assert {"401", "403", "422"} <= statuses


@pytest.mark.parametrize(
    ("method", "path", "statuses"),
    [
        ("post", "/v1/usage", {"201", "402", "404", "409"}),
        ("post", "/v1/holds", {"201", "402", "404"}),
        ("post", "/v1/holds/{hold_id}/capture", {"201", "404", "409"}),
        ("post", "/v1/holds/{hold_id}/release", {"200", "404", "409"}),
        ("post", "/v1/customers/{customer_id}/grants", {"201", "409"}),
        ("get", "/v1/customers/{customer_id}/credits", {"200", "404"}),
        ("post", "/v1/admin/outbox/replay", {"200", "404", "409"}),
        ("post", "/v1/polar/webhooks", {"202", "403", "503"}),
    ],
)
def test_each_operation_lists_its_own_statuses(method: str, path: str, statuses: set[str]) -> None:
    assert statuses <= set(SCHEMA["paths"][path][method]["responses"])


def test_holds_link_to_their_capture_and_release() -> None:
    links = SCHEMA["paths"]["/v1/holds"]["post"]["responses"]["201"]["links"]
    assert links["capture"]["parameters"] == {"hold_id": "$response.body#/hold_id"}
    assert links["release"]["parameters"] == {"hold_id": "$response.body#/hold_id"}


# --- the limits ----------------------------------------------------------------------------------


def test_the_idempotency_key_limits_are_stated() -> None:
    for path in ("/v1/usage", "/v1/customers/{customer_id}/grants"):
        key = parameter(path, "post", "Idempotency-Key")["schema"]
        assert (key["minLength"], key["maxLength"], key["pattern"]) == (1, 255, NO_CONTROL_PATTERN)


def test_the_metadata_limits_are_stated() -> None:
    for name in ("UsageIn", "CaptureIn"):
        [metadata, _null] = component(name)["properties"]["metadata"]["anyOf"]
        assert metadata["maxProperties"] == 47  # Polar's 50 minus our three
        assert metadata["propertyNames"]["maxLength"] == 40
        assert metadata["propertyNames"]["not"] == {
            "enum": ["credits_used", "usage_external_id", "usage_id"]
        }
        string = metadata["additionalProperties"]["anyOf"][0]
        assert (string["minLength"], string["maxLength"]) == (1, 500)


def test_the_reserved_metadata_key_follows_usage_credits_field() -> None:
    schema = served_schema(usage_credits_field="units")
    [metadata, _] = schema["components"]["schemas"]["UsageIn"]["properties"]["metadata"]["anyOf"]
    assert metadata["propertyNames"]["not"] == {"enum": ["units", "usage_external_id", "usage_id"]}
    assert "`units`" in metadata["description"]


def test_ids_are_bounded_to_64_bits_exactly() -> None:
    """2^63-1, not the float 9.223372036854776e18 (= 2^63) FastAPI's model would write."""
    [ids, _] = component("ReplayIn")["properties"]["event_ids"]["anyOf"]
    assert ids["items"]["maximum"] == MAX_ID and isinstance(ids["items"]["maximum"], int)
    hold = parameter("/v1/holds/{hold_id}/release", "post", "hold_id")["schema"]
    assert (hold["minimum"], hold["maximum"]) == (1, MAX_ID)
    cursor = parameter("/v1/customers/{customer_id}/usage", "get", "cursor")["schema"]
    assert cursor["pattern"] == CURSOR_PATTERN


def test_customer_ids_have_one_rule_everywhere() -> None:
    places = [
        parameter("/v1/customers/{customer_id}/credits", "get", "customer_id")["schema"],
        parameter("/v1/admin/outbox/events", "get", "customer_id")["schema"],
        component("UsageIn")["properties"]["customer_id"],
        component("HoldIn")["properties"]["customer_id"],
        component("ReplayIn")["properties"]["customer_id"],
    ]
    for place in places:
        assert place["pattern"] == CUSTOMER_ID_PATTERN


# --- the schema's rules are the checks' rules ---------------------------------------------------

TEXT = st.text(st.characters(codec="utf-8"), min_size=1, max_size=20)
EDGES = st.sampled_from(
    [
        " ",
        "\t",
        "\n",
        "\x00",
        "\x1f",
        "\x7f",
        "\x85",
        "\x9f",
        "\xa0",
        "\u2003",
        "\u3000",
        "\ufeff",
        "a",
        "/",
    ]
)
EDGY = st.builds(
    lambda a, b, c: a + b + c, st.text(EDGES, max_size=2), TEXT, st.text(EDGES, max_size=2)
)


def accepted(check: Any, value: Any) -> bool:
    try:
        check(value)
    except InvalidRequest:
        return False
    return True


@settings(max_examples=400)
@given(st.one_of(TEXT, EDGY, st.text(EDGES, min_size=1, max_size=4)))
def test_the_customer_id_pattern_is_check_customer_id(value: str) -> None:
    assert (re.fullmatch(CUSTOMER_ID_PATTERN, value) is not None) == accepted(
        check_customer_id, value
    )
    assert jsonschema_rs.validator_for({"pattern": CUSTOMER_ID_PATTERN}).is_valid(value) == (
        re.fullmatch(CUSTOMER_ID_PATTERN, value) is not None
    )


@settings(max_examples=300)
@given(st.one_of(TEXT, EDGY))
def test_the_idempotency_key_pattern_is_check_idempotency_key(value: str) -> None:
    assert (re.fullmatch(NO_CONTROL_PATTERN, value) is not None) == accepted(
        check_idempotency_key, value
    )


def is_legacy_cursor(value: str) -> bool:
    """Exactly what the previous release's `encode_cursor` made for an id of 1..2^63-1."""
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode()
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return False
    number = raw.removeprefix("id:")
    return number.isdigit() and 1 <= int(number) <= MAX_ID and legacy_cursor(int(number)) == value


IDS_AROUND_THE_BOUNDS = st.integers(min_value=-5, max_value=10**25)
LEGACY = st.one_of(
    IDS_AROUND_THE_BOUNDS.map(legacy_cursor),
    st.sampled_from(["0", "01", "1 ", "-1", "+1", "1.0", "\uff11"]).map(
        lambda n: base64.urlsafe_b64encode(f"id:{n}".encode()).decode().rstrip("=")
    ),
    # the same bytes spelled otherwise: padded, standard alphabet, a trailing character
    IDS_AROUND_THE_BOUNDS.map(lambda n: base64.b64encode(f"id:{n}".encode()).decode()),
    st.tuples(IDS_AROUND_THE_BOUNDS.map(legacy_cursor), st.sampled_from("A=_-+/ ")).map("".join),
)


@settings(max_examples=400)
@given(st.one_of(IDS_AROUND_THE_BOUNDS.map(str), TEXT, EDGY, LEGACY))
def test_the_cursor_pattern_is_decode_cursor(value: str) -> None:
    """The pattern states the current form exactly; the previous release's form, deprecated
    (the parameter's description says so), is accepted too and nothing else."""
    in_schema = re.fullmatch(CURSOR_PATTERN, value) is not None
    assert (in_schema or is_legacy_cursor(value)) == accepted(decode_cursor, value)
    assert not (in_schema and is_legacy_cursor(value))


def test_the_cursor_parameter_admits_the_deprecated_form() -> None:
    [string, _] = parameter("/v1/customers/{customer_id}/usage", "get", "cursor")["schema"]["anyOf"]
    assert string["maxLength"] == len(legacy_cursor(MAX_ID)) == MAX_LEGACY_CURSOR_LENGTH
    assert decode_cursor(legacy_cursor(MAX_ID)) == MAX_ID
    description = parameter("/v1/customers/{customer_id}/usage", "get", "cursor")["description"]
    assert "Deprecated" in description and "base64 of `id:N`" in description


METADATA_VALUES = st.one_of(
    st.text(st.characters(codec="utf-8"), max_size=3),
    st.just("x" * 500),
    st.just("x" * 501),
    st.integers(min_value=-(2**54), max_value=2**54),
    st.sampled_from([2**53, 2**53 + 1, -(2**53), -(2**53) - 1]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=1),
)
METADATA_KEYS = st.one_of(
    st.text(st.characters(codec="utf-8"), max_size=3),
    st.just("k" * 40),
    st.just("k" * 41),
    st.sampled_from(["credits_used", "usage_id", "a\x01", "a\x85"]),
)


@settings(max_examples=400)
@pytest.mark.slow
@given(
    st.one_of(
        st.dictionaries(METADATA_KEYS, METADATA_VALUES, max_size=3),
        st.dictionaries(
            st.text("abcdefgh", min_size=3, max_size=3), st.just(1), min_size=46, max_size=50
        ),
    )
)
def test_the_metadata_schema_is_check_metadata(metadata: dict[str, Any]) -> None:
    validator = jsonschema_rs.validator_for(METADATA_SCHEMA)
    assert validator.is_valid(metadata) == accepted(check_metadata, metadata)
