"""The emulator behaves like Polar where it matters (POLAR.md), seen through the real SDK."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from polar.base import PolarClientError, PolarRateLimitError, PolarServerError
from polar.v2026_10 import Polar
from polar.v2026_10.errors import HTTPValidationError

import polar_emulator

FUTURE = "Value error, Timestamp must be in the past."


@pytest.fixture
def emulator() -> Iterator[polar_emulator.RunningEmulator]:
    running = polar_emulator.serve_in_thread(config=polar_emulator.EmulatorConfig(seed=1))
    yield running
    running.stop()


@pytest.fixture
def sdk(emulator: polar_emulator.RunningEmulator) -> Polar:
    return Polar(emulator.token, base_url=emulator.url)


def event(n: int, customer: str = "c1", **extra: Any) -> dict[str, Any]:
    return {
        "name": "ai_generation",
        "external_customer_id": customer,
        "external_id": f"e{n}",
        "timestamp": (datetime.now(UTC) - timedelta(seconds=1)).isoformat(),
        "metadata": {"credits_used": 2, "usage_id": str(n)},
        **extra,
    }


def test_dedup_counts_like_polar_including_repeats_inside_a_batch(
    sdk: Polar, emulator: polar_emulator.RunningEmulator
) -> None:
    first = sdk.events.ingest(events=[event(1), event(2), event(1)])
    assert (first.inserted, first.duplicates) == (2, 1)
    again = sdk.events.ingest(events=[event(1), event(3)])
    assert (again.inserted, again.duplicates) == (1, 1)
    assert emulator.state.totals() == {"c1": 6}


def test_one_bad_event_rejects_the_whole_batch_with_its_index(
    sdk: Polar, emulator: polar_emulator.RunningEmulator
) -> None:
    naive = event(2, timestamp=datetime.now().replace(tzinfo=None).isoformat())
    with pytest.raises(HTTPValidationError) as refused:
        sdk.events.ingest(events=[event(1), naive, event(3, metadata={"a": [1]})])
    locs = [e.loc for e in refused.value.error.detail or []]
    assert ["body", "events", 1, "EventCreateExternalCustomer", "timestamp"] in locs
    assert ["body", "events", 2, "EventCreateExternalCustomer", "metadata", "a", "int"] in locs
    assert ["body", "events", 1, "EventCreateCustomer", "customer_id"] in locs  # Polar's noise
    assert emulator.state.events == []  # nothing stored


def test_future_timestamps_are_schema_errors_and_refused_customers_service_errors(
    sdk: Polar, emulator: polar_emulator.RunningEmulator
) -> None:
    """Stage one (schema, union-shaped) refuses the future timestamp; stage two (service) is
    reached only by a batch whose schema passes."""
    emulator.configure(clock_offset_seconds=-5, reject_customers=["blocked"])
    old = event(0, timestamp=(datetime.now(UTC) - timedelta(minutes=1)).isoformat())
    fresh = event(1, timestamp=datetime.now(UTC).isoformat())
    blocked = event(2, "blocked", timestamp="2026-01-01T00:00:00+00:00")
    with pytest.raises(HTTPValidationError) as refused:
        sdk.events.ingest(events=[old, fresh, blocked])
    detail = refused.value.error.detail or []
    assert [(d.loc, d.msg) for d in detail] == [
        (["body", "events", 1, "EventCreateCustomer", "timestamp"], FUTURE),
        (["body", "events", 1, "EventCreateCustomer", "customer_id"], "Field required"),
        (["body", "events", 1, "EventCreateExternalCustomer", "timestamp"], FUTURE),
    ]
    with pytest.raises(HTTPValidationError) as refused:
        sdk.events.ingest(events=[old, blocked])
    assert [d.loc for d in refused.value.error.detail or []] == [
        ["body", "events", 1, "external_customer_id"]
    ]
    assert emulator.state.events == []


def test_wrong_token_is_401_and_works_again_once_accepted(
    emulator: polar_emulator.RunningEmulator,
) -> None:
    wrong = Polar("not-the-token", base_url=emulator.url)
    with pytest.raises(PolarClientError) as refused:
        wrong.events.ingest(events=[event(1)])
    assert refused.value.status_code == 401
    emulator.configure(accepted_tokens=["not-the-token"])
    assert wrong.events.ingest(events=[event(1)]).inserted == 1


def test_fixed_window_rate_limit_answers_429_with_retry_after(
    sdk: Polar, emulator: polar_emulator.RunningEmulator
) -> None:
    emulator.configure(rate_limit_per_minute=3, window_seconds=2)
    time.sleep(2 - time.time() % 2)  # start at a window boundary
    for n in range(3):
        sdk.events.ingest(events=[event(n)])
    with pytest.raises(PolarRateLimitError) as limited:
        sdk.events.ingest(events=[event(9)])
    assert limited.value.retry_after is not None and 1 <= limited.value.retry_after <= 2
    time.sleep(2.1)
    assert sdk.events.ingest(events=[event(9)]).inserted == 1
    assert emulator.state.stats.status_429_window == 1


def test_faults_are_injected_at_the_configured_rates(
    sdk: Polar, emulator: polar_emulator.RunningEmulator
) -> None:
    emulator.configure(error_5xx_rate=0.3)
    failures = 0
    for n in range(200):
        try:
            sdk.events.ingest(events=[event(n)])
        except PolarServerError:
            failures += 1
    assert 40 <= failures <= 80  # 30% of 200, give or take
    emulator.configure(error_5xx_rate=0, accept_then_drop_rate=1.0)
    with pytest.raises(PolarServerError):
        sdk.events.ingest(events=[event(1000)])
    emulator.configure(accept_then_drop_rate=0)
    assert sdk.events.ingest(events=[event(1000)]).duplicates == 1  # it had been stored


def test_listing_filters_like_polar_and_hides_external_ids(
    sdk: Polar, emulator: polar_emulator.RunningEmulator
) -> None:
    sdk.events.ingest(events=[event(n, "c1" if n % 2 else "c2") for n in range(25)])
    page = sdk.events.list(external_customer_id="c1", name="ai_generation", limit=10, page=2)
    assert page.pagination.total_count == 12 and page.pagination.max_page == 2
    assert len(page.items) == 2
    one = sdk.events.list(metadata={"usage_id": "7"}, limit=10)
    assert [item.metadata["usage_id"] for item in one.items] == ["7"]
    raw = httpx.get(
        f"{emulator.url}/v1/events/", headers={"Authorization": f"Bearer {emulator.token}"}
    )
    assert "external_id" not in raw.json()["items"][0]


def test_control_api_over_http(emulator: polar_emulator.RunningEmulator, sdk: Polar) -> None:
    client = polar_emulator.EmulatorClient(emulator.url)
    sdk.events.ingest(events=[event(1), event(2, "c2")])
    assert client.totals() == {"c1": 2, "c2": 2}
    assert client.delete_event("e1") and not client.delete_event("e1")
    assert [e["external_id"] for e in client.events()] == ["e2"]
    assert client.configure(latency_ms=1)["latency_ms"] == 1
    with pytest.raises(httpx.HTTPStatusError):
        client.configure(no_such_setting=1)
    assert client.stats()["events_stored"] == 1
    client.reset()
    assert client.events() == []


def test_missing_content_length_is_411(emulator: polar_emulator.RunningEmulator) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"events": []}'

    response = httpx.post(
        f"{emulator.url}/v1/events/ingest",
        content=chunks(),
        headers={"Authorization": f"Bearer {emulator.token}"},
    )
    assert response.status_code == 411
