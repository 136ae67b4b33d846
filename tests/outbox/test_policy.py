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


FUTURE = {
    "loc": ["body", "events", 1, "timestamp"],
    "msg": "Timestamp must be in the past.",
    "type": "value_error",
}


@pytest.mark.parametrize(
    ("detail", "poison", "future", "unattributed"),
    [
        (  # a schema error names the union variant, then the field
            [
                {
                    "loc": ["body", "events", 2, "EventCreateExternalCustomer", "timestamp"],
                    "msg": "Input should have timezone info",
                    "type": "timezone_aware",
                }
            ],
            {2: "EventCreateExternalCustomer.timestamp: Input should have timezone info"},
            set(),
            0,
        ),
        (  # a service error names the field alone
            [{"loc": ["body", "events", 0, "external_customer_id"], "msg": "bad", "type": "v"}],
            {0: "external_customer_id: bad"},
            set(),
            0,
        ),
        ([FUTURE], {}, {1}, 0),  # clock skew: transient, never poison
        (  # both kinds on one index: poison
            [FUTURE, {"loc": ["body", "events", 1, "name"], "msg": "missing", "type": "m"}],
            {1: "name: missing"},
            set(),
            0,
        ),
        ([{"loc": ["body", "events", 9, "name"], "msg": "x"}], {}, set(), 1),  # out of range
        ([{"loc": ["body", "events", -1, "name"], "msg": "x"}], {}, set(), 1),
        ([{"loc": ["body", "events", "1", "name"], "msg": "x"}], {}, set(), 1),  # not an int
        ([{"loc": ["body", "events", True, "name"], "msg": "x"}], {}, set(), 1),  # bool
        ([{"loc": ["body"], "msg": "JSON decode error"}], {}, set(), 1),
        ([{"msg": "no loc"}], {}, set(), 1),
        (["a string"], {}, set(), 1),
        ("Not a list", {}, set(), 1),
        ({"detail": "dict"}, {}, set(), 1),
        ([], {}, set(), 0),
    ],
)
def test_parse_batch_rejections(
    detail: object, poison: dict[int, str], future: set[int], unattributed: int
) -> None:
    parsed = parse_batch_rejections(detail, batch_len=5)
    assert parsed.poison == poison
    assert parsed.future_timestamp == frozenset(future)
    assert len(parsed.unattributed) == unattributed


def test_two_errors_on_one_event_are_both_kept() -> None:
    detail = [
        {"loc": ["body", "events", 0, "metadata", "a"], "msg": "too long"},
        {"loc": ["body", "events", 0, "name"], "msg": "missing"},
    ]
    assert parse_batch_rejections(detail, 1).poison == {0: "metadata.a: too long; name: missing"}


def test_rate_windows() -> None:
    assert window_start(NOW) == int(NOW.timestamp()) - 30
    assert seconds_until_next_window(NOW) == pytest.approx(30.0)
    assert seconds_until_next_window(NOW, 7) <= 7


@pytest.mark.parametrize(("limit", "allowance"), [(500, 490), (100, 98), (60, 58), (3, 1), (1, 1)])
def test_window_allowance_keeps_a_safety_margin(limit: int, allowance: int) -> None:
    assert window_allowance(limit) == allowance
