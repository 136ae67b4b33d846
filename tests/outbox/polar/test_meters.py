"""`outbox doctor` (and reconcile, which compares with the meter doctor finds) reads meters as
Polar's server returns them: the aggregation's property without its `metadata.` prefix
(meter/aggregation.py strips it), filters whose clauses nest, `and`/`or`, archived meters."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from outbox.polar.meters import find_meter, sums_our_field
from outbox.settings import load_settings

# GET /v1/meters/ of Polar's own server (snapshot 2026-08-22), one item, as it answered here.
REAL_SERVER_METER: dict[str, Any] = {
    "metadata": {},
    "created_at": "2026-12-01T10:50:28.058462Z",
    "modified_at": "2026-12-01T10:50:28.064695Z",
    "id": "d42c1b48-95b3-491f-8ba2-59123f3c5791",
    "name": "AI Generation Credits",
    "unit": "scalar",
    "custom_label": None,
    "custom_multiplier": None,
    "filter": {
        "conjunction": "and",
        "clauses": [{"property": "name", "operator": "eq", "value": "ai_generation"}],
    },
    "aggregation": {"func": "sum", "property": "credits_used"},
    "organization_id": "99d2f633-3dd1-4b36-9942-1dd9f7eb7a2c",
    "archived_at": None,
}


def meter(**changes: Any) -> dict[str, Any]:
    out = copy.deepcopy(REAL_SERVER_METER)
    out.update(changes)
    return out


def name_is(value: str, operator: str = "eq") -> dict[str, Any]:
    return {"property": "name", "operator": operator, "value": value}


SETTINGS = load_settings(database_url="sqlite://")


@pytest.mark.parametrize(
    "candidate",
    [
        REAL_SERVER_METER,
        meter(aggregation={"func": "sum", "property": "metadata.credits_used"}),
        meter(filter={"conjunction": "and", "clauses": [name_is("ai_generation")]}),
        meter(  # nested, as Polar's dashboard builds groups
            filter={
                "conjunction": "and",
                "clauses": [{"conjunction": "or", "clauses": [name_is("ai_generation")]}],
            }
        ),
        meter(  # a second clause that holds for every event of ours
            filter={
                "conjunction": "and",
                "clauses": [name_is("ai_generation"), {**name_is("user"), "property": "source"}],
            }
        ),
    ],
)
def test_a_meter_summing_our_field_over_our_events_is_found(candidate: dict[str, Any]) -> None:
    assert sums_our_field(candidate, SETTINGS)
    assert find_meter([candidate], SETTINGS) == candidate


@pytest.mark.parametrize(
    "candidate",
    [
        meter(archived_at="2026-11-30T00:00:00Z"),
        meter(aggregation={"func": "count"}),
        meter(aggregation={"func": "max", "property": "credits_used"}),
        meter(aggregation={"func": "sum", "property": "tokens"}),
        meter(filter={"conjunction": "and", "clauses": [name_is("other")]}),
        meter(filter={"conjunction": "and", "clauses": []}),  # counts every event
        meter(  # also counts other events
            filter={"conjunction": "or", "clauses": [name_is("ai_generation"), name_is("x")]}
        ),
        meter(  # counts only some of ours (depends on the caller's metadata)
            filter={
                "conjunction": "and",
                "clauses": [
                    name_is("ai_generation"),
                    {"property": "metadata.plan", "operator": "eq", "value": "pro"},
                ],
            }
        ),
        meter(filter={"conjunction": "and", "clauses": [name_is("ai_gen", "like")]}),
    ],
)
def test_a_meter_that_would_count_something_else_is_refused(candidate: dict[str, Any]) -> None:
    assert not sums_our_field(candidate, SETTINGS)
    assert find_meter([candidate], SETTINGS) is None


def test_polar_meter_id_picks_among_meters_that_sum_our_field() -> None:
    other = meter(id="other")
    chosen = load_settings(database_url="sqlite://", polar_meter_id=REAL_SERVER_METER["id"])
    assert find_meter([other, REAL_SERVER_METER], chosen) == REAL_SERVER_METER
    wrong = load_settings(database_url="sqlite://", polar_meter_id="not-a-meter")
    assert find_meter([other, REAL_SERVER_METER], wrong) is None
