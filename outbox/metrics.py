"""Prometheus metrics of the delivery path (counters and histograms of this process).

Cluster-wide gauges (events by status, oldest pending age, credits not yet accepted by Polar)
are computed from the database at scrape time by `outbox.stats` — the table is the truth, and
that answer does not depend on how many workers run. Worker processes expose these
per-process series themselves (prometheus-client multiprocess mode under Celery prefork).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

from prometheus_client import Counter, Gauge, Histogram


class _HasCreatedAt(Protocol):
    @property
    def created_at(self) -> datetime: ...


POLAR_OUTCOMES = Counter(
    "outbox_polar_requests",
    "Ingest requests to Polar by outcome (ok, transient, rate_limited, auth, rejected).",
    ["outcome"],
)
POLAR_REQUEST_SECONDS = Histogram(
    "outbox_polar_request_seconds",
    "Time of one ingest call to Polar, retries and rate-budget waits included.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
DELIVERED = Counter("outbox_events_delivered", "Events accepted by Polar (inserted or duplicate).")
DELIVERY_LATENCY = Histogram(
    "outbox_delivery_latency_seconds",
    "From the usage's commit to its acceptance by Polar.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600, 21600, 86400),
)
POISON_EVENTS = Counter("outbox_poison_events", "Events Polar refused permanently (now failed).")
UNATTRIBUTED_REJECTIONS = Counter(
    "outbox_polar_unattributed_rejections",
    "422s from Polar naming no event of the batch: the batch is retried with backoff, "
    "nothing is failed (look at the worker's ERROR log).",
)
RESCUED = Counter("outbox_rescued_rows", "Rows whose lease expired (lost worker) and were rescued.")
POLAR_AUTH_OK = Gauge(
    "outbox_polar_credentials_ok",
    "1 while Polar accepts the access token, 0 after a 401/403.",
    multiprocess_mode="mostrecent",
)
RATE_BUDGET_USED = Gauge(
    "outbox_rate_budget_used",
    "Slots granted in the current fixed window of the shared Polar budget (as of this "
    "process's last request).",
    multiprocess_mode="mostrecent",
)

BATCH_CAP = Gauge(
    "outbox_batch_cap",
    "Most rows a worker process claims for one request: OUTBOX_BATCH_SIZE, or less after Polar "
    "answered 500 to bigger batches (outbox/delivery/sizer.py); the smallest live process's.",
    multiprocess_mode="livemin",  # a process that died with a halved cap no longer counts
)


def observe_delivered(events: Sequence[_HasCreatedAt], now: datetime) -> None:
    """Count delivered events and their commit → accepted latency."""
    DELIVERED.inc(len(events))
    for event in events:
        DELIVERY_LATENCY.observe(max(0.0, (now - event.created_at).total_seconds()))


RATE_SLOT_WAIT = Histogram(
    "outbox_rate_slot_wait_seconds",
    "How long a request waited for its slot of the paced, shared Polar budget (~0 when the "
    "budget is not the bottleneck).",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
)
RATE_BUDGET_SLOTS = Counter(
    "outbox_rate_budget_slots",
    "Slots this process took from the shared Polar budget, by priority (delivery; low: "
    "reconcile). rate() of the sum over workers is the budget in use.",
    ["priority"],
)
BATCH_EVENTS = Histogram(
    "outbox_batch_events",
    "Events per ingest request to Polar (batch fill; at most OUTBOX_BATCH_SIZE).",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 300, 400, 500, 1000, 2000, 5000),
)
RATE_BUDGET_SLOTS_UNUSED = Counter(
    "outbox_rate_budget_slots_unused",
    "Delivery slots taken and then not used: another worker had claimed the due rows while "
    "this one waited for its slot.",
)
