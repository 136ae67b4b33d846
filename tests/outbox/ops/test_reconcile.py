"""Reconcile's pure parts: which window it compares (and says why), how it groups customers,
how listed events are matched to rows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import cast

import pytest
from sqlalchemy.orm import Session

from outbox.ops.reconcile import (
    MAX_CUSTOMER_QUERY_CHARS,
    PolarSide,
    _Reconciler,
    _Usage,
    customer_groups,
    reconcile_window,
)
from outbox.settings import load_settings
from outbox.states import EventStatus

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


def _reconciler(rows: list[_Usage]) -> _Reconciler:
    return _Reconciler(
        cast(Session, None),  # match() reads neither the database nor Polar
        cast(PolarSide, None),
        load_settings(),
        meter_id="meter",
        interval="hour",
        since=NOW - timedelta(hours=1),
        until=NOW,
        born=None,
        ours=rows,
        fix=False,
        progress=lambda _: None,
    )


def _row(event_id: int, external_id: str, credits: int) -> _Usage:
    return _Usage(event_id, "alice", credits, external_id, NOW, EventStatus.DELIVERED, {})


def _event(credits: int, **metadata: str) -> dict[str, object]:
    return {"timestamp": NOW.isoformat(), "metadata": {"credits_used": credits, **metadata}}


def test_an_unknown_key_falls_back_to_usage_id_after_every_key_has_matched() -> None:
    """An event with a caller's own `usage_external_id` (allowed before the key was reserved)
    is its row by `usage_id`; a foreign event listed first cannot take a row whose own event
    carries our key."""
    rows = [_row(1, "ev_a", 2), _row(2, "ev_b", 3)]
    reconciler = _reconciler(rows)
    reconciler.match(
        "alice",
        rows,
        [
            _event(9, usage_external_id="someone_else", usage_id="1"),  # not ours, id collides
            _event(2, usage_external_id="ev_a", usage_id="1"),
            _event(3, usage_external_id="caller-ref-42", usage_id="2"),  # the old release's
        ],
    )
    entry = reconciler.entry("alice")
    assert (entry.unknown, entry.missing, entry.mismatched) == (["someone_else"], [], [])
    assert reconciler.requeue == []
