"""The console's overview: one cheap read of how delivery is doing and what money is at
risk. Each query is bounded and uses an index (EXPLAIN: docs/benchmarks.md, "Console")."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from outbox import attempts, events
from outbox.models import utcnow
from outbox.service_state import DeliveryLiveness, delivery_liveness

LAG_WINDOW = timedelta(minutes=15)
RATE_WINDOW = timedelta(hours=1)
WORKERS_SEEN_WITHIN = timedelta(minutes=5)


def percentile(sorted_values: list[float], share: float) -> float | None:
    """The nearest-rank percentile of already sorted values (None for none)."""
    if not sorted_values:
        return None
    rank = max(0, min(len(sorted_values) - 1, int(share * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


@dataclass(frozen=True)
class Budget:
    """The shared Polar request budget this rate window: used of allowed."""

    used: int
    allowed: int


@dataclass(frozen=True)
class Overview:
    counts: dict[str, int]
    delivered_estimated: bool
    money: events.MoneyAtRisk
    oldest_pending_seconds: float | None
    lag_p50: float | None
    lag_p99: float | None
    lag_sample: int
    per_minute: list[int]
    throttled_last_15_min: int
    budget: Budget | None
    liveness: DeliveryLiveness
    now: datetime


def overview(
    session: Session,
    *,
    budget: Callable[[], Budget | None] = lambda: None,
    now: datetime | None = None,
) -> Overview:
    """Everything the overview page shows, in a handful of indexed queries."""
    now = now or utcnow()
    counts, estimated = events.count_by_status(session)
    money = events.money_at_risk(session)
    lags = events.recent_lags(session, since=now - LAG_WINDOW)
    oldest = money.oldest_undelivered_at
    return Overview(
        counts=counts,
        delivered_estimated=estimated,
        money=money,
        oldest_pending_seconds=None if oldest is None else max(0.0, (now - oldest).total_seconds()),
        lag_p50=percentile(lags, 0.5),
        lag_p99=percentile(lags, 0.99),
        lag_sample=len(lags),
        per_minute=events.deliveries_per_minute(session, since=now - RATE_WINDOW, now=now),
        throttled_last_15_min=attempts.throttled_since(session, now - LAG_WINDOW),
        budget=budget(),
        liveness=delivery_liveness(session, seen_within=WORKERS_SEEN_WITHIN),
        now=now,
    )
