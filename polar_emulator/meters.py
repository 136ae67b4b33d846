"""Meter quantities as Polar's server computes them (`server/polar/meter/service.py`,
`get_quantities`; filter and aggregation semantics from `meter/filter.py` and
`meter/aggregation.py`, the SQL path):

- the answer has one row per point of `generate_series(start, end, '1 <interval>')`; each point
  stands for the whole bucket `date_trunc(interval, point)` (so an unaligned start still counts
  its whole hour) and is returned as given, not truncated;
- events are matched by the meter's filter, by the aggregation's type guard (a sum counts only
  JSON numbers), by `customer_id` / `external_customer_id` (OR) and `metadata[key]` (as strings);
- `total` is the sum of the rows for count/sum, their max/min for max/min, and for avg/unique it
  is computed over every matching event, whatever its time (Polar's own quirk).
"""

from __future__ import annotations

import calendar
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from starlette.datastructures import QueryParams
from starlette.responses import JSONResponse

INTERVALS = ("year", "month", "week", "day", "hour")
# polar/kit/time_queries.py
MAX_INTERVAL_DAYS = {"hour": 7, "day": 366, "week": 7 * 53, "month": 365 * 4, "year": 365 * 10}
MIN_DATETIME = datetime(2023, 1, 1, tzinfo=UTC)
AGGREGATION_FUNCTIONS = ("count", "sum", "max", "min", "avg", "unique")
FILTERABLE_FIELDS: dict[str, type] = {"timestamp": int, "name": str, "source": str}


def is_under_limits(start: datetime, end: datetime, interval: str) -> bool:
    if start > end:
        return False
    return end.toordinal() - start.toordinal() <= MAX_INTERVAL_DAYS[interval]


def truncate(moment: datetime, interval: str, zone: tzinfo) -> datetime:
    """PostgreSQL's date_trunc in the session's time zone."""
    local = moment.astimezone(zone)
    if interval == "hour":
        local = local.replace(minute=0, second=0, microsecond=0)
    else:
        local = local.replace(hour=0, minute=0, second=0, microsecond=0)
        if interval == "week":
            local -= timedelta(days=local.weekday())
        elif interval == "month":
            local = local.replace(day=1)
        elif interval == "year":
            local = local.replace(month=1, day=1)
    return local.replace(tzinfo=None).replace(tzinfo=zone)


def _add(moment: datetime, interval: str, steps: int, zone: tzinfo) -> datetime:
    if interval == "hour":
        return (moment.astimezone(UTC) + timedelta(hours=steps)).astimezone(zone)
    local = moment.astimezone(zone).replace(tzinfo=None)
    if interval in ("day", "week"):
        local += timedelta(days=steps * (7 if interval == "week" else 1))
    else:
        months = steps * (12 if interval == "year" else 1)
        year, month = divmod(local.month - 1 + months, 12)
        year += local.year
        day = min(local.day, calendar.monthrange(year, month + 1)[1])
        local = local.replace(year=year, month=month + 1, day=day)
    return local.replace(tzinfo=zone)


def series(start: datetime, end: datetime, interval: str, zone: tzinfo) -> list[datetime]:
    """generate_series(start, end, '1 <interval>') for timestamptz."""
    points = []
    point = start.astimezone(zone)
    n = 0
    while point <= end:
        points.append(point)
        n += 1
        point = _add(start, interval, n, zone)
    return points


def _clause_matches(clause: dict[str, Any], event: Any) -> bool:
    if "clauses" in clause:
        return filter_matches(clause, event)
    prop = str(clause.get("property", "")).removeprefix("metadata.")
    operator = clause.get("operator")
    expected = clause.get("value")
    if prop in FILTERABLE_FIELDS:
        if not isinstance(expected, FILTERABLE_FIELDS[prop]):
            return False
        if prop == "timestamp":
            actual: Any = int(event.timestamp.timestamp())
        else:
            actual = event.name if prop == "name" else "user"
        if operator in ("like", "not_like"):
            return _compare(str(actual), operator, _as_str(expected))
        return _compare(actual, operator, expected)
    actual = _nested(event.metadata, prop)
    if actual is None:
        return False
    if operator in ("like", "not_like"):
        return _compare(_as_str(actual), operator, _as_str(expected))
    if isinstance(actual, str):
        return _compare(actual, operator, _as_str(expected))
    if isinstance(actual, bool):
        return isinstance(expected, bool) and _compare(actual, operator, expected)
    if isinstance(actual, int | float):
        if isinstance(expected, int | float):  # a bool counts as 0/1 here, as in SQL
            return _compare(float(actual), operator, float(expected))
        return False
    return False


def _as_str(value: Any) -> str:
    if isinstance(value, bool):
        return "t" if value else "f"
    return str(value)


def _compare(actual: Any, operator: Any, expected: Any) -> bool:
    try:
        match operator:
            case "eq":
                return bool(actual == expected)
            case "ne":
                return bool(actual != expected)
            case "gt":
                return bool(actual > expected)
            case "gte":
                return bool(actual >= expected)
            case "lt":
                return bool(actual < expected)
            case "lte":
                return bool(actual <= expected)
            case "like":
                return str(expected) in str(actual)
            case "not_like":
                return str(expected) not in str(actual)
    except TypeError:
        return False
    return False


def _nested(metadata: dict[str, Any], path: str) -> Any:
    value: Any = metadata
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
        if value is None:
            return None
    return value


def filter_matches(filter_: dict[str, Any], event: Any) -> bool:
    """A meter filter (`{"conjunction", "clauses"}`, clauses nest) against one event."""
    results = [_clause_matches(c, event) for c in filter_.get("clauses") or []]
    if not results:
        return True
    return all(results) if filter_.get("conjunction") == "and" else any(results)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _aggregator(
    aggregation: dict[str, Any],
) -> tuple[Callable[[Any], bool], Callable[[list[Any]], float | None]]:
    """(does this event take part?, how its values reduce) for a meter's aggregation."""
    func = aggregation.get("func")
    prop = str(aggregation.get("property") or "").removeprefix("metadata.")
    if func == "count":
        return (lambda e: True), lambda events: float(len(events))

    def value(event: Any) -> Any:
        if prop == "timestamp":
            return event.timestamp.timestamp()
        return _nested(event.metadata, prop)

    if func == "unique":
        return (lambda e: True), lambda events: float(
            len({repr(value(e)) for e in events if value(e) is not None})
        )
    takes_part = (lambda e: True) if prop in FILTERABLE_FIELDS else (lambda e: _is_number(value(e)))
    reduce_: dict[str, Callable[[list[float]], float]] = {
        "sum": sum,
        "max": max,
        "min": min,
        "avg": lambda xs: sum(xs) / len(xs),
    }

    def reduce_values(events: list[Any]) -> float | None:
        numbers = [float(value(e)) for e in events]
        return reduce_[str(func)](numbers) if numbers else None

    return takes_part, reduce_values


def _reduce(func: str, values: Sequence[float]) -> float | None:
    if func == "count":
        return float(len(values))
    if not values:
        return None
    if func == "sum":
        return float(sum(values))
    if func == "max":
        return float(max(values))
    if func == "min":
        return float(min(values))
    if func == "avg":
        return float(sum(values) / len(values))
    return float(len(set(values)))  # unique


def quantities(
    meter: dict[str, Any],
    events: Iterable[Any],
    *,
    start: datetime,
    end: datetime,
    interval: str,
    zone: tzinfo,
    customer_ids: Sequence[str] = (),
    external_customer_ids: Sequence[str] = (),
    metadata: dict[str, list[str]] | None = None,
    customer_aggregation_function: str | None = None,
) -> dict[str, Any]:
    """The body of `GET /v1/meters/{id}/quantities` (MeterQuantities)."""
    takes_part, reduce_values = _aggregator(meter.get("aggregation") or {})
    by_customer = bool(customer_ids or external_customer_ids)
    wanted_ids, wanted_external = set(customer_ids), set(external_customer_ids)
    matching = [
        e
        for e in events
        if (
            not by_customer
            or e.customer_id in wanted_ids
            or e.external_customer_id in wanted_external
        )
        and all(_as_str_or_none(e.metadata.get(k)) in vs for k, vs in (metadata or {}).items())
        and filter_matches(meter.get("filter") or {}, e)
        and takes_part(e)
    ]
    buckets: dict[datetime, list[Any]] = {}
    for event in matching:
        buckets.setdefault(truncate(event.timestamp, interval, zone), []).append(event)

    def bucket_quantity(events_: list[Any]) -> float | None:
        if not events_:
            return None
        if customer_aggregation_function is None:
            return reduce_values(events_)
        per_customer: dict[str, list[Any]] = {}
        for e in events_:
            per_customer.setdefault(str(e.customer_id or e.external_customer_id), []).append(e)
        values = [reduce_values(group) for group in per_customer.values()]
        return _reduce(customer_aggregation_function, [v for v in values if v is not None])

    rows = []
    for point in series(start, end, interval, zone):
        quantity = bucket_quantity(buckets.get(truncate(point, interval, zone), []))
        rows.append((point, quantity))
    func = (meter.get("aggregation") or {}).get("func")
    present = [q for _, q in rows if q is not None]
    if func in ("count", "sum"):
        total: float | None = sum(present)
    elif func in ("max", "min"):
        total = (max if func == "max" else min)(present) if present else None
    else:
        total = bucket_quantity(matching)
    return {
        "quantities": [
            {"timestamp": _iso(point), "quantity": float(q or 0.0)} for point, q in rows
        ],
        "total": float(total or 0.0) if rows else 0.0,
    }


def _as_str_or_none(value: Any) -> str | None:
    if value is None or isinstance(value, dict | list):
        return None
    if isinstance(value, bool):
        return "true" if value else "false"  # jsonb ->> of a boolean
    return str(value)


def _iso(moment: datetime) -> str:
    """As Polar answers: in UTC with `Z`, whatever the `timezone` asked (seen on its server)."""
    text = moment.astimezone(UTC).isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def _query_error(errors: list[dict[str, Any]]) -> JSONResponse:
    return JSONResponse({"error": "RequestValidationError", "detail": errors}, status_code=422)


def _parse_aware(name: str, raw: str | None, errors: list[dict[str, Any]]) -> datetime | None:
    loc = ["query", name]
    if raw is None:
        errors.append({"type": "missing", "loc": loc, "msg": "Field required", "input": None})
        return None
    try:
        value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        errors.append(
            {
                "type": "datetime_from_date_parsing",
                "loc": loc,
                "msg": "Input should be a valid datetime or date",
                "input": raw,
            }
        )
        return None
    if value.tzinfo is None:
        errors.append(
            {
                "type": "timezone_aware",
                "loc": loc,
                "msg": "Input should have timezone info",
                "input": raw,
            }
        )
        return None
    return value


def _enum_error(name: str, raw: str, allowed: Sequence[str]) -> dict[str, Any]:
    expected = ", ".join(f"'{a}'" for a in allowed[:-1]) + f" or '{allowed[-1]}'"
    return {
        "type": "enum",
        "loc": ["query", name],
        "msg": f"Input should be {expected}",
        "input": raw,
        "ctx": {"expected": expected},
    }


def quantities_response(state: Any, meter_id: str, query: QueryParams) -> JSONResponse:
    """`GET /v1/meters/{id}/quantities`: Polar's validation, then `quantities`."""
    errors: list[dict[str, Any]] = []
    start = _parse_aware("start_timestamp", query.get("start_timestamp"), errors)
    if start is not None and start < MIN_DATETIME:
        errors.append(
            {
                "type": "greater_than_equal",
                "loc": ["query", "start_timestamp"],
                "msg": f"Input should be greater than or equal to {MIN_DATETIME.isoformat()}",
                "input": query.get("start_timestamp"),
            }
        )
    end = _parse_aware("end_timestamp", query.get("end_timestamp"), errors)
    interval = query.get("interval")
    if interval is None:
        errors.append(
            {
                "type": "missing",
                "loc": ["query", "interval"],
                "msg": "Field required",
                "input": None,
            }
        )
    elif interval not in INTERVALS:
        errors.append(_enum_error("interval", interval, INTERVALS))
    aggregate = query.get("customer_aggregation_function")
    if aggregate is not None and aggregate not in AGGREGATION_FUNCTIONS:
        errors.append(
            _enum_error("customer_aggregation_function", aggregate, AGGREGATION_FUNCTIONS)
        )
    try:
        zone: tzinfo = ZoneInfo(query.get("timezone", "UTC"))
    except (ZoneInfoNotFoundError, ValueError):
        errors.append(
            {
                "type": "TimeZoneName",
                "loc": ["query", "timezone"],
                "msg": "Invalid timezone name.",
                "input": query.get("timezone"),
            }
        )
        zone = UTC
    if errors:
        return _query_error(errors)
    assert start is not None and end is not None and interval is not None
    with state.lock:
        meter = next((m for m in state.config.meters if m.get("id") == meter_id), None)
        if meter is None:
            return JSONResponse({"error": "ResourceNotFound", "detail": "Not found"}, 404)
        if not is_under_limits(start, end, interval):
            return JSONResponse(
                {
                    "error": "PolarRequestValidationError",
                    "detail": [
                        {
                            "type": "value_error",
                            "loc": ["query"],
                            "msg": "The interval is too small for the given date range. "
                            "Use a larger interval or reduce the date range.",
                            "input": [start.isoformat(), end.isoformat(), interval],
                        }
                    ],
                },
                status_code=422,
            )
        metadata = {
            key[len("metadata[") : -1]: query.getlist(key)
            for key in query
            if key.startswith("metadata[") and key.endswith("]")
        }
        body = quantities(
            meter,
            list(state.events),
            start=start,
            end=end,
            interval=interval,
            zone=zone,
            customer_ids=query.getlist("customer_id"),
            external_customer_ids=query.getlist("external_customer_id"),
            metadata=metadata,
            customer_aggregation_function=aggregate,
        )
    return JSONResponse(body)
