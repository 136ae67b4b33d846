"""Delivery policy, table-driven: backoff with full jitter, Retry-After, 422 index parsing,
rate windows."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from outbox.policy import (
    backoff_seconds,
    is_lease_expired,
    next_attempt_at,
    parse_batch_rejections,
    seconds_until_next_window,
    window_allowance,
    window_start,
)

NOW = datetime(2026, 11, 25, 12, 0, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("attempts", "ceiling"),
    [(0, 2.0), (1, 4.0), (3, 16.0), (13, 16384.0), (14, 6 * 3600.0), (500, 6 * 3600.0)],
)
def test_backoff_is_full_jitter_under_an_exponential_ceiling(attempts: int, ceiling: float) -> None:
    rng = random.Random(1)
    samples = [backoff_seconds(attempts, rng) for _ in range(500)]
    assert all(0 <= s <= ceiling for s in samples)
    assert max(samples) > ceiling * 0.9 and min(samples) < ceiling * 0.1  # really full jitter


@pytest.mark.parametrize("retry_after", [None, 0.0, 30.0, 3600.0])
def test_next_attempt_is_never_sooner_than_retry_after(retry_after: float | None) -> None:
    rng = random.Random(2)
    for attempts in range(6):
        when = next_attempt_at(NOW, attempts, rng, retry_after)
        assert when >= NOW + timedelta(seconds=retry_after or 0)


@pytest.mark.parametrize(
    ("expires", "expired"),
    [
        (None, True),
        (NOW - timedelta(seconds=1), True),
        (NOW, True),
        (NOW + timedelta(seconds=1), False),
    ],
)
def test_lease_expiry(expires: datetime | None, expired: bool) -> None:
    assert is_lease_expired(NOW, expires) is expired


# Polar's real 422 shapes (POLAR.md; recorded from Polar's server in tests/contract/fixtures/):
# an event is checked against both union variants, so each schema error comes once per variant,
# plus a spurious "customer_id Field required" from the variant we do not send.
OURS, OTHER = "EventCreateExternalCustomer", "EventCreateCustomer"
SPURIOUS = "Field required"


def schema_errors(i: int, field: list[object], msg: str, type_: str) -> list[dict[str, object]]:
    """One schema fault of event `i`, as Polar lists it: under both variants, plus the spurious
    `EventCreateCustomer.customer_id` "Field required"."""
    return [
        {"type": type_, "loc": ["body", "events", i, OTHER, *field], "msg": msg, "input": "x"},
        {"type": "missing", "loc": ["body", "events", i, OTHER, "customer_id"], "msg": SPURIOUS},
        {"type": type_, "loc": ["body", "events", i, OURS, *field], "msg": msg, "input": "x"},
    ]


def bad_metadata(i: int, key: str) -> list[dict[str, object]]:
    """A metadata value that is none of str(1-500) | int | float | bool: four errors a variant."""
    members = [
        ("constrained-str", "string_too_short", "String should have at least 1 character"),
        ("int", "int_parsing", "Input should be a valid integer, unable to parse string"),
        ("float", "float_parsing", "Input should be a valid number, unable to parse string"),
        ("bool", "bool_parsing", "Input should be a valid boolean, unable to interpret input"),
    ]
    out: list[dict[str, object]] = []
    for variant in (OTHER, OURS):
        out += [
            {"type": t, "loc": ["body", "events", i, variant, "metadata", key, tag], "msg": m}
            for tag, t, m in members
        ]
        if variant == OTHER:
            out.append({"type": "missing", "loc": ["body", "events", i, OTHER, "customer_id"]})
    return out


FUTURE_MSG = "Value error, Timestamp must be in the past."
FUTURE_1 = schema_errors(1, ["timestamp"], FUTURE_MSG, "value_error")
SERVICE_CUSTOMER = {
    "type": "customer_id",
    "loc": ["body", "events", 3, "customer_id"],
    "msg": "Customer not found.",
    "input": "8fbb14ec-1c84-4ad9-9411-04df40b93f37",
}


@pytest.mark.parametrize(
    ("detail", "poison", "future", "unattributed"),
    [
        pytest.param(FUTURE_1, {}, {1}, 0, id="future timestamp in union shape: transient only"),
        pytest.param(  # the old emulator shape (field alone) is still clock skew
            [{"loc": ["body", "events", 1, "timestamp"], "msg": "Timestamp must be in the past."}],
            {},
            {1},
            0,
            id="future timestamp, no variant",
        ),
        pytest.param(
            FUTURE_1 + bad_metadata(1, "bad"),
            {},
            {1},
            0,
            id="future timestamp beside a real fault: transient (the fault is named next time)",
        ),
        pytest.param(
            schema_errors(2, ["name"], "String should have at most 128 characters", "too_long"),
            {2: "name: String should have at most 128 characters"},
            set(),
            0,
            id="name too long: poison by our variant's message, spurious customer_id ignored",
        ),
        pytest.param(
            bad_metadata(0, "bad"),
            {0: "metadata.bad: String should have at least 1 character"},
            set(),
            0,
            id="bad metadata value: one reason, not eight",
        ),
        pytest.param(
            schema_errors(4, ["timestamp"], "Input should have timezone info", "timezone_aware"),
            {4: "timestamp: Input should have timezone info"},
            set(),
            0,
            id="naive timestamp: poison",
        ),
        pytest.param(
            [SERVICE_CUSTOMER],
            {3: "customer_id: Customer not found."},
            set(),
            0,
            id="service stage error (no variant in loc): poison",
        ),
        pytest.param(
            [
                {"loc": ["body", "events", 0, OURS], "msg": "Input should be a valid dictionary"},
                {"loc": ["body", "events", 0, OTHER], "msg": "Input should be a valid dictionary"},
            ],
            {0: "Input should be a valid dictionary"},
            set(),
            0,
            id="not an object: poison",
        ),
        pytest.param(
            FUTURE_1 + schema_errors(2, ["name"], "missing", "missing"),
            {2: "name: missing"},
            {1},
            0,
            id="two events, two kinds",
        ),
        pytest.param(
            [{"loc": ["body", "events", 2, OTHER, "customer_id"], "msg": SPURIOUS}],
            {},
            set(),
            1,
            id="named only under the other variant: unattributed, never poison",
        ),
        pytest.param(
            [{"loc": ["body", "events", 9, "name"], "msg": "x"}], {}, set(), 1, id="out of range"
        ),
        pytest.param([{"loc": ["body", "events", -1, "name"], "msg": "x"}], {}, set(), 1, id="-1"),
        pytest.param(
            [{"loc": ["body", "events", "1", "name"], "msg": "x"}], {}, set(), 1, id="str index"
        ),
        pytest.param(
            [{"loc": ["body", "events", True, "name"], "msg": "x"}], {}, set(), 1, id="bool index"
        ),
        pytest.param(
            [{"type": "json_invalid", "loc": ["body", 1], "msg": "JSON decode error"}],
            {},
            set(),
            1,
            id="JSON decode error",
        ),
        pytest.param(
            [{"type": "missing", "loc": ["body", "events"], "msg": "Field required"}],
            {},
            set(),
            1,
            id="no events field",
        ),
        pytest.param([{"msg": "no loc"}], {}, set(), 1, id="no loc"),
        pytest.param(["a string"], {}, set(), 1, id="not an object"),
        pytest.param("Not a list", {}, set(), 1, id="detail a string"),
        pytest.param({"detail": "dict"}, {}, set(), 1, id="detail a dict"),
        pytest.param([], {}, set(), 0, id="empty"),
    ],
)
def test_parse_batch_rejections(
    detail: object, poison: dict[int, str], future: set[int], unattributed: int
) -> None:
    parsed = parse_batch_rejections(detail, batch_len=5)
    assert parsed.poison == poison
    assert parsed.future_timestamp == frozenset(future)
    assert len(parsed.unattributed) == unattributed


def test_an_event_is_judged_by_the_variant_we_send() -> None:
    """Had we sent `customer_id`, the spurious error would be ours: the variant decides."""
    detail = [{"loc": ["body", "events", 0, OTHER, "customer_id"], "msg": SPURIOUS}]
    assert parse_batch_rejections(detail, 1, variant=OTHER).poison == {
        0: "customer_id: " + SPURIOUS
    }
    assert parse_batch_rejections(detail, 1).poison == {}


def test_two_errors_on_one_event_are_both_kept() -> None:
    detail = [
        {"loc": ["body", "events", 0, OURS, "metadata", "a"], "msg": "too long"},
        {"loc": ["body", "events", 0, OURS, "name"], "msg": "missing"},
    ]
    assert parse_batch_rejections(detail, 1).poison == {0: "metadata.a: too long; name: missing"}


def test_rate_windows() -> None:
    assert window_start(NOW) == int(NOW.timestamp()) - 30
    assert seconds_until_next_window(NOW) == pytest.approx(30.0)
    assert seconds_until_next_window(NOW, 7) <= 7


@pytest.mark.parametrize(("limit", "allowance"), [(500, 490), (100, 98), (60, 58), (3, 1), (1, 1)])
def test_window_allowance_keeps_a_safety_margin(limit: int, allowance: int) -> None:
    assert window_allowance(limit) == allowance
