"""Reconcile's pure parts: which window it compares (and says why), how it groups customers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from outbox.reconcile import MAX_CUSTOMER_QUERY_CHARS, customer_groups, reconcile_window

NOW = datetime(2026, 12, 1, 11, 47, 3, tzinfo=UTC)
LONG_AGO = NOW - timedelta(days=400)


def test_the_default_window_reaches_now_and_says_so() -> None:
    """Right after the walkthrough, reconcile must see the usage just recorded (issue 12)."""
    since, until, interval, note = reconcile_window(None, None, NOW, LONG_AGO)
    assert (since, until, interval) == (
        datetime(2026, 11, 30, 11, tzinfo=UTC),
        datetime(2026, 12, 1, 12, tzinfo=UTC),
        "hour",
    )
    assert "the last 24 h" in note and "up to now" in note and "whole hours" in note


@pytest.mark.parametrize(
    ("since", "until", "expected"),
    [
        # whole hours around the request
        (
            NOW - timedelta(hours=2, minutes=5),
            NOW - timedelta(minutes=10),
            (datetime(2026, 12, 1, 9, tzinfo=UTC), datetime(2026, 12, 1, 12, tzinfo=UTC), "hour"),
        ),
        # an aligned end stays where it is
        (
            datetime(2026, 12, 1, 9, tzinfo=UTC),
            datetime(2026, 12, 1, 11, tzinfo=UTC),
            (datetime(2026, 12, 1, 9, tzinfo=UTC), datetime(2026, 12, 1, 11, tzinfo=UTC), "hour"),
        ),
        # past 7 days Polar takes no hourly request: whole days
        (
            NOW - timedelta(days=30),
            None,
            (datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 2, tzinfo=UTC), "day"),
        ),
        # never in the future
        (
            NOW - timedelta(hours=1),
            NOW + timedelta(days=3),
            (datetime(2026, 12, 1, 10, tzinfo=UTC), datetime(2026, 12, 1, 12, tzinfo=UTC), "hour"),
        ),
    ],
)
def test_windows(
    since: datetime, until: datetime | None, expected: tuple[datetime, datetime, str]
) -> None:
    assert reconcile_window(since, until, NOW, LONG_AGO)[:3] == expected


def test_nothing_before_the_database_began_is_compared() -> None:
    born = NOW - timedelta(minutes=30)
    since, until, _, note = reconcile_window(NOW - timedelta(days=2), None, NOW, born)
    assert (since, until) == (
        datetime(2026, 12, 1, 11, tzinfo=UTC),
        datetime(2026, 12, 1, 12, tzinfo=UTC),
    )
    assert "first ledger entry" in note


def test_customer_groups_fit_one_request_line_and_keep_every_customer() -> None:
    customers = [f"customer_{n:05d}" for n in range(1000)]
    groups = customer_groups(customers)
    assert [c for g in groups for c in g] == customers
    for group in groups:
        assert sum(len("&external_customer_id=") + len(c) for c in group) <= (
            MAX_CUSTOMER_QUERY_CHARS
        )
    assert len(groups) == 7  # 36 characters each: 166 per request
    assert customer_groups(["a b/é"]) == [["a b/é"]]
