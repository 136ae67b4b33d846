"""outbox/ops/collector.py: the cluster-wide gauges of /metrics, read from real rows on
PostgreSQL and SQLite: rows per status, the delivery lag, the credits at risk, the deliveries
of the last minute, Polar refusing our token or our batches; a database that does not answer
is `outbox_database_up 0` and nothing else (a scrape never fails).

The same gauges following a fault and its repair over HTTP: tests/acceptance/test_operators.py.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, update

from outbox.db import make_engine, session_scope
from outbox.ledger import record_usage
from outbox.models import OutboxEvent, utcnow
from outbox.ops.collector import OutboxCollector
from outbox.service_state import (
    CREDENTIALS_OK,
    CREDENTIALS_REJECTED,
    INGEST_OK,
    INGEST_UNATTRIBUTED_422,
    POLAR_CREDENTIALS,
    POLAR_INGEST,
    set_state,
)
from tests.factories import make_customer

GAUGES = [
    "outbox_database_up",
    "outbox_events",
    "outbox_oldest_pending_seconds",
    "outbox_credits_undelivered",
    "outbox_compensations_undelivered",
    "outbox_credits_refunded",
    "outbox_delivered_last_minute",
    "outbox_polar_credentials_rejected",
    "outbox_polar_unattributed_422",
]


def scrape(engine: Engine) -> dict[str, float]:
    """What a Prometheus scrape reads: every sample, named with its labels."""
    registry = CollectorRegistry()
    registry.register(OutboxCollector(engine))
    samples: dict[str, float] = {}
    for family in registry.collect():
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sample.labels.items())
            samples[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return samples


def test_an_empty_outbox_reads_zero_everywhere(any_engine: Engine) -> None:
    assert scrape(any_engine) == {
        "outbox_database_up": 1,
        'outbox_events{status="pending"}': 0,
        'outbox_events{status="inflight"}': 0,
        'outbox_events{status="delivered"}': 0,
        'outbox_events{status="failed"}': 0,
        'outbox_events{status="cancelled"}': 0,
        "outbox_oldest_pending_seconds": 0,
        "outbox_credits_undelivered": 0,
        "outbox_compensations_undelivered": 0,
        "outbox_credits_refunded": 0,
        "outbox_delivered_last_minute": 0,
        "outbox_polar_credentials_rejected": 0,
        "outbox_polar_unattributed_422": 0,
    }


def test_the_gauges_count_the_rows(any_engine: Engine) -> None:
    now = utcnow()
    with session_scope(any_engine) as session:
        customer = make_customer(session, credits=100)
        ids = [record_usage(session, customer, credits).event_id for credits in (1, 2, 3, 4, 5, 6)]
        pending_old, _pending, inflight, delivered, delivered_earlier, failed = ids

        def set_row(event_id: int, **values: object) -> None:
            session.execute(update(OutboxEvent).where(OutboxEvent.id == event_id).values(values))

        set_row(pending_old, created_at=now - timedelta(minutes=10))
        set_row(
            inflight,
            status="inflight",
            lease_owner="host:1",
            lease_expires_at=now + timedelta(minutes=1),
        )
        set_row(delivered, status="delivered", delivered_at=now)
        set_row(delivered_earlier, status="delivered", delivered_at=now - timedelta(minutes=5))
        set_row(failed, status="failed", last_error="422: customer_id: Customer not found.")
    samples = scrape(any_engine)
    assert {k: v for k, v in samples.items() if k.startswith("outbox_events")} == {
        'outbox_events{status="pending"}': 2,
        'outbox_events{status="inflight"}': 1,
        'outbox_events{status="delivered"}': 2,
        'outbox_events{status="failed"}': 1,
        'outbox_events{status="cancelled"}': 0,
    }
    assert samples["outbox_credits_undelivered"] == 1 + 2 + 3 + 6  # pending, inflight, failed
    assert samples["outbox_delivered_last_minute"] == 1
    assert 600 <= samples["outbox_oldest_pending_seconds"] < 3600  # the 10-minute-old row


@pytest.mark.parametrize(
    ("key", "value", "gauge", "reads"),
    [
        (POLAR_CREDENTIALS, CREDENTIALS_REJECTED, "outbox_polar_credentials_rejected", 1),
        (POLAR_CREDENTIALS, CREDENTIALS_OK, "outbox_polar_credentials_rejected", 0),
        (POLAR_INGEST, INGEST_UNATTRIBUTED_422, "outbox_polar_unattributed_422", 1),
        (POLAR_INGEST, INGEST_OK, "outbox_polar_unattributed_422", 0),
    ],
)
def test_polar_refusing_us_reads_one_until_it_accepts_again(
    clean_tables: Engine, key: str, value: str, gauge: str, reads: int
) -> None:
    with session_scope(clean_tables) as session:
        set_state(session, key, value, "what the worker saw")
    samples = scrape(clean_tables)
    assert samples[gauge] == reads
    others = {"outbox_polar_credentials_rejected", "outbox_polar_unattributed_422"} - {gauge}
    assert [samples[other] for other in others] == [0]


def test_a_database_that_does_not_answer_reads_down_and_nothing_else() -> None:
    engine = make_engine(
        "postgresql+psycopg://outbox:pw@127.0.0.1:1/outbox", connect_args={"connect_timeout": 2}
    )
    try:
        assert scrape(engine) == {"outbox_database_up": 0}
    finally:
        engine.dispose()


def test_every_gauge_has_help_for_the_operator(clean_tables: Engine) -> None:
    registry = CollectorRegistry()
    registry.register(OutboxCollector(clean_tables))
    families = {family.name: family for family in registry.collect()}
    assert sorted(families) == sorted(GAUGES)
    assert all(family.type == "gauge" and family.documentation for family in families.values())


def test_the_warning_of_a_database_down_carries_no_piece_of_its_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = make_engine("postgresql+psycopg://outbox:s3cr@tpw@nohost.invalid:1/outbox")
    try:
        with caplog.at_level("WARNING", logger="outbox.collector"):
            assert scrape(engine) == {"outbox_database_up": 0}
    finally:
        engine.dispose()
    assert "database unreachable" in caplog.text
    assert "tpw@" not in caplog.text and "s3cr" not in caplog.text
