"""`GET /v1/meters/{id}/quantities` answers as Polar's server does (meter/service.py
get_quantities): one row per series point, whole buckets, the meter's filter and aggregation."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from polar.v2026_10 import Polar

import polar_emulator

BASE = datetime(2026, 11, 30, 10, 0, tzinfo=UTC)


@pytest.fixture
def emulator() -> Iterator[polar_emulator.RunningEmulator]:
    running = polar_emulator.serve_in_thread()
    yield running
    running.stop()


def event(n: int, customer: str, at: datetime, **metadata: Any) -> dict[str, Any]:
    return {
        "name": metadata.pop("name", "ai_generation"),
        "external_customer_id": customer,
        "external_id": f"e{n}",
        "timestamp": at.isoformat(),
        "metadata": {"credits_used": 2, **metadata},
    }


def get(emulator: polar_emulator.RunningEmulator, **params: Any) -> httpx.Response:
    meter = params.pop("meter", polar_emulator.METER_ID)
    return httpx.get(
        f"{emulator.url}/v1/meters/{meter}/quantities",
        params=params,
        headers={"Authorization": f"Bearer {emulator.token}"},
    )


def test_totals_per_hour_for_a_group_of_customers_honour_the_meters_filter(
    emulator: polar_emulator.RunningEmulator,
) -> None:
    sdk = Polar(emulator.token, base_url=emulator.url)
    sdk.events.ingest(
        events=[
            event(1, "a", BASE + timedelta(minutes=5)),
            event(2, "b", BASE + timedelta(minutes=59), credits_used=3),
            event(3, "c", BASE + timedelta(minutes=30)),  # not in the group
            event(4, "a", BASE + timedelta(hours=1, minutes=1)),
            event(5, "a", BASE + timedelta(minutes=6), name="other_event"),  # filtered out
            event(6, "a", BASE + timedelta(minutes=7), credits_used="3"),  # not a number
            event(7, "a", BASE + timedelta(minutes=8), credits_used=True),  # not a number
            event(8, "a", BASE - timedelta(minutes=1)),  # before the range's first hour
        ]
    )
    answer = sdk.meters.quantities(
        id=polar_emulator.METER_ID,
        start_timestamp=BASE.isoformat(),
        end_timestamp=(BASE + timedelta(hours=2)).isoformat(),
        interval="hour",
        external_customer_id=["a", "b"],
    )
    assert [(q.timestamp, q.quantity) for q in answer.quantities] == [
        ("2026-11-30T10:00:00Z", 5.0),
        ("2026-11-30T11:00:00Z", 2.0),
        ("2026-11-30T12:00:00Z", 0.0),
    ]
    assert answer.total == 7.0
    assert emulator.state.stats.quantities_requests == 1


def test_an_unaligned_start_counts_its_whole_bucket_and_is_returned_as_given(
    emulator: polar_emulator.RunningEmulator,
) -> None:
    emulator.state.store([{**event(1, "a", BASE), "timestamp": BASE}])
    start = BASE + timedelta(minutes=30)
    body = get(
        emulator,
        start_timestamp=start.isoformat(),
        end_timestamp=(start + timedelta(minutes=45)).isoformat(),
        interval="hour",
    ).json()
    # Polar's exact shape: the series point, with `Z`, and floats.
    assert body == {
        "quantities": [{"timestamp": "2026-11-30T10:30:00Z", "quantity": 2.0}],
        "total": 2.0,
    }


def test_count_and_max_meters_and_the_customer_aggregation(
    emulator: polar_emulator.RunningEmulator,
) -> None:
    name_filter = {
        "conjunction": "and",
        "clauses": [
            {
                "conjunction": "or",
                "clauses": [{"property": "name", "operator": "eq", "value": "ai_generation"}],
            }
        ],
    }
    emulator.configure(
        meters=[
            {"id": "count", "filter": name_filter, "aggregation": {"func": "count"}},
            {
                "id": "max",
                "filter": name_filter,
                "aggregation": {"func": "max", "property": "credits_used"},
            },
        ]
    )
    emulator.state.store(
        [
            {**event(1, "a", BASE), "timestamp": BASE},
            {**event(2, "a", BASE, credits_used=5), "timestamp": BASE},
            {**event(3, "b", BASE, credits_used=4), "timestamp": BASE},
        ]
    )
    window = {
        "start_timestamp": BASE.isoformat(),
        "end_timestamp": BASE.isoformat(),
        "interval": "day",
    }
    assert get(emulator, meter="count", **window).json()["total"] == 3.0
    assert get(emulator, meter="max", **window).json()["total"] == 5.0
    per_customer_sum_then_max = get(
        emulator, meter="count", customer_aggregation_function="max", **window
    ).json()
    assert per_customer_sum_then_max["total"] == 2.0  # "a" has two events


def test_errors_have_polars_shapes(emulator: polar_emulator.RunningEmulator) -> None:
    missing = get(emulator, start_timestamp=BASE.isoformat(), end_timestamp=BASE.isoformat())
    assert missing.status_code == 422
    assert missing.json() == {
        "error": "RequestValidationError",
        "detail": [
            {
                "type": "missing",
                "loc": ["query", "interval"],
                "msg": "Field required",
                "input": None,
            }
        ],
    }
    too_long = get(
        emulator,
        start_timestamp=BASE.isoformat(),
        end_timestamp=(BASE + timedelta(days=8)).isoformat(),
        interval="hour",
    )
    assert too_long.status_code == 422
    assert too_long.json()["error"] == "PolarRequestValidationError"
    unknown = get(
        emulator,
        meter="00000000-0000-4000-8000-000000000000",
        start_timestamp=BASE.isoformat(),
        end_timestamp=BASE.isoformat(),
        interval="hour",
    )
    assert unknown.status_code == 404
    assert unknown.json() == {"error": "ResourceNotFound", "detail": "Not found"}


FIXTURE = Path(__file__).parent / "fixtures" / "real_meter_quantities.json"


def test_the_emulator_answers_exactly_what_polars_own_server_answered(
    emulator: polar_emulator.RunningEmulator,
) -> None:
    """Answers recorded from Polar's server (see the fixture's `recorded`): same status, same
    body, byte for byte once parsed: series points, buckets, float sums, non-numbers and other
    names ignored, customer groups, `customer_aggregation_function`, time zones, both 422s."""
    recorded = json.loads(FIXTURE.read_text())
    names = {"$A": "cust_a", "$B": "cust_b"}

    def concrete(value: Any) -> Any:
        if isinstance(value, str):
            for placeholder, name in names.items():
                value = value.replace(placeholder, name)
            return value
        if isinstance(value, list):
            return [concrete(v) for v in value]
        return value

    events = [{k: concrete(v) for k, v in e.items()} for e in recorded["events"]]
    assert Polar(emulator.token, base_url=emulator.url).events.ingest(events=events).inserted == 10
    for answer in recorded["answers"]:
        params = {k: concrete(v) for k, v in answer["query"].items()}
        response = get(emulator, **params)
        assert (response.status_code, response.json()) == (answer["status"], answer["body"]), params
