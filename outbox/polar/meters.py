"""Meter matching: is a meter (as Polar's server returns it) the one that sums our events?
Used by reconcile (which meter to compare with) and doctor (is the product set up)."""

from __future__ import annotations

from typing import Any

from outbox.settings import Settings


def _clause_holds(clause: Any, name: str, other_names: bool = False) -> bool | None:
    """A meter filter (Polar's shape: `{"conjunction", "clauses"}`, clauses nest) for an
    event of ours named `name` (or, with `other_names`, for any event NOT named `name`):
    True/False, or None where it depends on what differs between such events (metadata, time,
    which other name)."""
    if not isinstance(clause, dict):
        return None
    if "clauses" in clause:
        results = [_clause_holds(c, name, other_names) for c in clause.get("clauses") or []]
        if not results:
            return True
        if clause.get("conjunction") == "or":
            return (
                True if True in results else (False if all(r is False for r in results) else None)
            )
        return False if False in results else (True if all(results) else None)
    prop = str(clause.get("property") or "").removeprefix("metadata.")
    if prop not in ("name", "source"):
        return None
    actual = name if prop == "name" else "user"
    value, operator = clause.get("value"), clause.get("operator")
    if not isinstance(value, str):
        return False  # Polar compares name/source only with strings
    if other_names and prop == "name":
        return False if (operator, value) == ("eq", name) else None
    return {
        "eq": actual == value,
        "ne": actual != value,
        "like": value in actual,
        "not_like": value not in actual,
        "gt": actual > value,
        "gte": actual >= value,
        "lt": actual < value,
        "lte": actual <= value,
    }.get(str(operator))


def sums_our_field(meter: dict[str, Any], settings: Settings) -> bool:
    """The meter (as Polar's server returns it) sums `USAGE_CREDITS_FIELD` over every event
    named `USAGE_EVENT_NAME` and nothing else: aggregation `sum` of the field (Polar strips
    the `metadata.` prefix), a filter that holds for each of our events whatever their
    metadata and fails for any other name, and not archived."""
    if meter.get("archived_at"):
        return False
    aggregation = meter.get("aggregation") or {}
    field = str(aggregation.get("property") or "")
    if aggregation.get("func") != "sum" or field.removeprefix("metadata.") != (
        settings.usage_credits_field
    ):
        return False
    filter_ = meter.get("filter") or {}
    name = settings.usage_event_name
    return (
        _clause_holds(filter_, name) is True
        and _clause_holds(filter_, name, other_names=True) is False
    )


def find_meter(meters: list[dict[str, Any]], settings: Settings) -> dict[str, Any] | None:
    """The meter reconcile compares with: `POLAR_METER_ID` if it sums our field, else the
    first meter that does."""
    ours = [m for m in meters if sums_our_field(m, settings)]
    if settings.polar_meter_id:
        ours = [m for m in ours if m.get("id") == settings.polar_meter_id]
    return ours[0] if ours else None
