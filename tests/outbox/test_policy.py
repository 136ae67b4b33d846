"""Delivery policy, table-driven: backoff with full jitter, Retry-After, 422 index parsing,
rate windows, the paced budget (properties checked with hypothesis)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from outbox.policy import (
    Pacing,
    backoff_seconds,
    is_lease_expired,
    next_attempt_at,
    pacing,
    parse_batch_rejections,
    seconds_until_next_window,
    take_slot,
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


# -- pacing: any window of Polar's, wherever it starts, holds at most the allowance ----------


def most_in_any_window(grants: list[int], window_us: int) -> int:
    """The most grants in any half-open interval [s, s + window) (it suffices to start at
    each grant)."""
    grants = sorted(grants)
    most, j = 0, 0
    for i, start in enumerate(grants):
        j = max(j, i)
        while j < len(grants) and grants[j] < start + window_us:
            j += 1
        most = max(most, j - i)
    return most


def run_callers(
    pace: Pacing, asks: list[tuple[int, bool]], *, retry: bool = True, busy_every: int = 0
) -> tuple[list[int], list[int]]:
    """Callers asking at the given times (microseconds, low priority or not); a refused caller
    asks again when told (like `_WaitingBudget`), up to a bound; delivery is "busy" for every
    `busy_every`-th try (0: never). Returns (all grants, low grants)."""
    tat = low_tat = 0
    grants: list[int] = []
    low_grants: list[int] = []
    queue = sorted(asks)
    tries = 0
    while queue and tries < 20_000:
        tries += 1
        now, low = queue.pop(0)
        busy = bool(busy_every) and tries % busy_every == 0
        decision = take_slot(tat, low_tat, now, pace, low=low, delivery_busy=busy)
        if decision.wait_us is None:
            tat, low_tat = decision.tat_us, decision.low_tat_us
            grants.append(now)
            if low:
                low_grants.append(now)
        elif retry:
            queue.append((now + decision.wait_us, low))
            queue.sort()
    return grants, low_grants


@settings(max_examples=200, deadline=None)
@given(
    allowance=st.integers(1, 600),
    window=st.sampled_from([1, 2, 3, 60]),
    share=st.sampled_from([None, 0.1, 0.2, 0.5]),
    busy_every=st.integers(0, 3),
    asks=st.lists(st.tuples(st.integers(0, 200_000_000), st.booleans()), min_size=1, max_size=300),
)
def test_no_interval_of_one_window_ever_holds_more_than_the_allowance(
    allowance: int,
    window: int,
    share: float | None,
    busy_every: int,
    asks: list[tuple[int, bool]],
) -> None:
    """Whatever the callers do (bursts, late, low priority or not), and wherever Polar's window
    starts: at most `allowance` grants in any interval of one window, and at most the low
    priority cap of low-priority ones."""
    cap = 0 if share is None else max(1, int(allowance * share))
    pace = pacing(allowance, window, low_cap=cap)
    grants, low_grants = run_callers(
        pace, [(t, low and cap > 0) for t, low in asks], busy_every=busy_every
    )
    assert grants  # the first caller is never refused
    assert most_in_any_window(grants, window * 1_000_000) <= allowance
    if cap:
        assert most_in_any_window(low_grants, window * 1_000_000) <= cap


@pytest.mark.parametrize(("limit", "window"), [(100, 60), (500, 60), (30, 2)])
def test_a_saturated_budget_spends_almost_all_of_it_evenly(limit: int, window: int) -> None:
    """Callers always waiting (each asks again when told, a little late): at least 97% of
    Polar's limit per window, every window; and the first fifth of a window holds no more than
    its fifth of the allowance (plus two): the budget is spread, not spent at the start."""
    allowance = window_allowance(limit)
    pace = pacing(allowance, window)
    window_us = window * 1_000_000
    rng = random.Random(5)
    asks = [(rng.randrange(0, 2000), False) for _ in range(8)]  # 8 workers, always busy
    tat = low_tat = 0
    grants: list[int] = []
    while asks:
        asks.sort()
        now, _ = asks.pop(0)
        if now > 5 * window_us:
            continue
        decision = take_slot(tat, low_tat, now, pace)
        late = rng.randrange(0, 3000)  # scheduling and a Redis round trip: up to 3 ms late
        if decision.wait_us is None:
            tat, low_tat = decision.tat_us, decision.low_tat_us
            grants.append(now)
            asks.append((now + 1000 + late, False))
        else:
            asks.append((now + decision.wait_us + late, False))
    per_window = [
        sum(1 for g in grants if k * window_us <= g < (k + 1) * window_us) for k in range(5)
    ]
    first_fifths = [
        sum(1 for g in grants if k * window_us <= g < k * window_us + window_us // 5)
        for k in range(5)
    ]
    # The interval alone sets the pace: callers up to 3 ms late lose nothing.
    assert min(per_window) >= window_us // pace.interval_us - 1
    if window == 60:
        assert min(per_window) >= 0.97 * limit
    assert max(per_window) <= allowance
    assert most_in_any_window(grants, window_us) <= allowance
    # An interval of length L holds fewer than 1 + (L + tolerance) / interval slots: a fifth.
    assert max(first_fifths) < 1 + (window_us / 5 + pace.tolerance_us) / pace.interval_us
    assert max(first_fifths) <= allowance / 5 + 2


def test_a_lone_request_on_an_idle_budget_is_granted_at_once() -> None:
    pace = pacing(98, 60)
    assert take_slot(0, 0, 10**15, pace).wait_us is None
    busy = take_slot(0, 0, 10**15, pace)
    second = take_slot(busy.tat_us, 0, 10**15, pace)
    assert second.wait_us == pace.interval_us - pace.tolerance_us  # the next slot, not a minute


def test_a_low_priority_caller_steps_back_while_delivery_sends_full_batches() -> None:
    pace = pacing(98, 60, low_cap=19)
    now = 10**15
    delivery = take_slot(0, 0, now, pace)
    due = delivery.tat_us  # the next slot is due
    assert take_slot(delivery.tat_us, 0, due, pace, low=True).wait_us is None
    # Delivery's batches are full: only a slot it left unused.
    assert take_slot(delivery.tat_us, 0, due, pace, low=True, delivery_busy=True).wait_us
    later = now + 2 * pace.interval_us  # delivery left a whole slot unused
    assert take_slot(delivery.tat_us, 0, later, pace, low=True, delivery_busy=True).wait_us is None
