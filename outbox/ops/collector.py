"""Cluster-wide gauges computed from the database at scrape time (`/metrics` of the API).

Why from the database: the outbox table is the truth whatever the number of workers, and a
gauge such as "credits not yet accepted by Polar" must not depend on which process is scraped.
Per-process counters and histograms of the workers (Polar outcomes, delivery latency) are in
`outbox.metrics` and exposed by each worker (multiprocess mode, `OUTBOX_METRICS_PORT`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from outbox.db import redact
from outbox.events import outbox_stats
from outbox.service_state import (
    CREDENTIALS_REJECTED,
    INGEST_UNATTRIBUTED_422,
    POLAR_CREDENTIALS,
    POLAR_INGEST,
    get_state,
)

log = logging.getLogger("outbox.collector")


class OutboxCollector(Collector):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily("outbox_database_up", "1 if the outbox database answered.")
        try:
            with Session(self.engine) as session:
                stats = outbox_stats(session)
                credentials = get_state(session, POLAR_CREDENTIALS)
                ingest = get_state(session, POLAR_INGEST)
        except Exception as exc:
            url = self.engine.url.render_as_string(hide_password=False)
            log.warning("metrics: database unreachable: %s", redact(str(exc), url))
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        events = GaugeMetricFamily(
            "outbox_events", "Outbox rows by delivery status.", labels=["status"]
        )
        for status, count in stats.counts.items():
            events.add_metric([status], count)
        yield events
        yield GaugeMetricFamily(
            "outbox_oldest_pending_seconds",
            "Age of the oldest event not yet delivered (pending or inflight): the delivery lag.",
            value=stats.oldest_pending_seconds,
        )
        yield GaugeMetricFamily(
            "outbox_credits_undelivered",
            "Usage credits committed but not yet accepted by Polar (pending+inflight+failed): "
            "money at risk.",
            value=stats.credits_undelivered,
        )
        yield GaugeMetricFamily(
            "outbox_compensations_undelivered",
            "Credits refunded whose compensating events Polar has not accepted yet "
            "(pending+inflight+failed): Polar still bills them.",
            value=stats.compensations_undelivered,
        )
        yield GaugeMetricFamily(
            "outbox_credits_refunded",
            "Credits given back by refunds, in all.",
            value=stats.credits_refunded,
        )
        yield GaugeMetricFamily(
            "outbox_delivered_last_minute",
            "Events delivered in the last 60 seconds.",
            value=stats.delivered_last_minute,
        )
        rejected = credentials is not None and credentials.value == CREDENTIALS_REJECTED
        yield GaugeMetricFamily(
            "outbox_polar_credentials_rejected",
            "1 while Polar rejects the access token (401/403): delivery is paused.",
            value=1 if rejected else 0,
        )
        unattributed = ingest is not None and ingest.value == INGEST_UNATTRIBUTED_422
        yield GaugeMetricFamily(
            "outbox_polar_unattributed_422",
            "1 while Polar refuses our batches with 422s naming no event (retried with "
            "backoff, nothing failed): until a batch goes through again.",
            value=1 if unattributed else 0,
        )
