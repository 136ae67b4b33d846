"""Validation at the edge, as pure functions: what Polar would refuse, or PostgreSQL could not
store, is refused with `InvalidRequest` naming the field (table-driven)."""

from __future__ import annotations

from typing import Any

import pytest

from outbox.errors import InvalidRequest
from outbox.models import utcnow
from outbox.polar.gateway import build_event
from outbox.validation import (
    check_credits,
    check_customer_id,
    check_idempotency_key,
    check_metadata,
    check_text,
)


def refused(call: Any, *args: Any, **kwargs: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        call(*args, **kwargs)
    assert info.value.code == "invalid_request"
    assert info.value.detail
    return info.value


@pytest.mark.parametrize("credits", [1, 2, 1_000_000])
def test_credits_accepted(credits: int) -> None:
    assert check_credits(credits) == credits


@pytest.mark.parametrize(
    "credits",
    [0, -1, 1.5, 1.0, "3", True, False, None, 1_000_001, 10**30, float("nan"), [1], {"n": 1}],
)
def test_credits_refused(credits: object) -> None:
    assert refused(check_credits, credits).context["field"] == "credits"


def test_grant_credits_have_their_own_ceiling() -> None:
    assert check_credits(1_000_000_000, maximum=1_000_000_000) == 1_000_000_000
    refused(check_credits, 1_000_000_001, maximum=1_000_000_000)


@pytest.mark.parametrize("customer_id", ["x", "user_123", "a" * 128, "ünïcødé", "a b", "x@y.z"])
def test_customer_id_accepted(customer_id: str) -> None:
    assert check_customer_id(customer_id) == customer_id


@pytest.mark.parametrize(
    "customer_id",
    [
        "",
        " ",
        "  x",
        "x ",
        "\tx",
        "a" * 129,
        "a\nb",
        "a\x01b",
        "a\x00b",
        "a\x7fb",
        "a\ud800b",
        None,
        123,
        ["x"],
        b"x",
    ],
)
def test_customer_id_refused(customer_id: object) -> None:
    assert refused(check_customer_id, customer_id).context["field"] == "customer_id"


@pytest.mark.parametrize(
    "metadata",
    [
        None,
        {},
        {"plan_id": "fp_42", "rooms": 3, "area": 71.5, "premium": False},
        {f"k{i}": i for i in range(47)},
        {"k" * 40: "v" * 500},
        {"big": 2**53, "small": -(2**53)},
        {"ünï": "emoji 🏠"},
    ],
)
def test_metadata_accepted(metadata: dict[str, Any] | None) -> None:
    assert check_metadata(metadata) == (metadata or {})


@pytest.mark.parametrize(
    ("metadata", "field"),
    [
        ("plan", "metadata"),
        (["plan", 1], "metadata"),
        (3, "metadata"),
        ({f"k{i}": i for i in range(51)}, "metadata"),
        ({"k" * 41: 1}, "metadata"),
        ({"": 1}, "metadata"),
        ({"a\x00": 1}, "metadata"),
        ({"a\nb": 1}, "metadata"),
        ({"\ud800": 1}, "metadata"),
        ({1: "int key"}, "metadata"),
        ({"nested": {"a": 1}}, "metadata.nested"),
        ({"list": [1, 2]}, "metadata.list"),
        ({"none": None}, "metadata.none"),
        ({"empty": ""}, "metadata.empty"),
        ({"long": "v" * 501}, "metadata.long"),
        ({"nan": float("nan")}, "metadata.nan"),
        ({"inf": float("inf")}, "metadata.inf"),
        ({"ninf": float("-inf")}, "metadata.ninf"),
        ({"huge": 2**53 + 1}, "metadata.huge"),
        ({"huge float": 1e300}, "metadata.huge float"),
        ({"tiny float": -1e17}, "metadata.tiny float"),
        ({"nul": "a\x00b"}, "metadata.nul"),
        ({"surrogate": "a\ud800"}, "metadata.surrogate"),
        ({"credits_used": 3}, "metadata.credits_used"),
        ({"usage_id": "u1"}, "metadata.usage_id"),
    ],
)
def test_metadata_refused(metadata: object, field: str) -> None:
    assert refused(check_metadata, metadata).context["field"] == field


def test_the_configured_credits_field_is_reserved_too() -> None:
    assert check_metadata({"credits_used": 1}, credits_field="units") == {"credits_used": 1}
    error = refused(check_metadata, {"units": 1}, credits_field="units")
    assert error.context["field"] == "metadata.units"


def test_the_event_sent_to_polar_never_exceeds_fifty_metadata_keys() -> None:
    for keys in range(40, 56):
        try:
            metadata = check_metadata({f"k{i}": i for i in range(keys)})
        except InvalidRequest:
            continue
        event = build_event(
            name="ai_generation",
            customer_id="c1",
            external_id="usage_1",
            occurred_at=utcnow(),
            metadata=metadata,
            credits_field="credits_used",
            credits=1,
            usage_id="1",
        )
        assert len(event["metadata"]) <= 50, f"{keys} caller keys became {len(event['metadata'])}"


@pytest.mark.parametrize("key", [None, "k", "gen-2026-11-25/42", "x" * 255])
def test_idempotency_key_accepted(key: str | None) -> None:
    assert check_idempotency_key(key) == key


@pytest.mark.parametrize("key", ["", "x" * 256, "a\nb", "a\x00", "\ud800", 42])
def test_idempotency_key_refused(key: object) -> None:
    assert refused(check_idempotency_key, key).context["field"] == "Idempotency-Key"


@pytest.mark.parametrize(
    ("value", "required"),
    [
        (None, True),
        ("  ", True),
        ("x" * 501, False),
        ("a\x00", False),
        ("\ud800", False),
        (1, False),
    ],
)
def test_text_refused(value: object, required: bool) -> None:
    error = refused(check_text, value, field="reason", max_length=500, required=required)
    assert error.context["field"] == "reason"


def test_text_accepted() -> None:
    assert check_text(None, field="reason", max_length=5) is None
    assert check_text("a\tb", field="reason", max_length=5) == "a\tb"
