"""What an operator does at 3 a.m., end to end: see failures, fix, replay (billing nothing
twice), reconcile with Polar, watch the metrics come back to zero."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlalchemy.orm import sessionmaker
from typer.testing import CliRunner

import polar_emulator
from api.app import create_app
from cli.main import app as cli
from outbox.db import session_scope
from outbox.delivery.deliverer import Deliverer, drain
from outbox.ledger import record_usage
from outbox.polar.gateway import PolarGateway, close_gateway
from outbox.polar.ratelimit import LocalRateBudget
from outbox.settings import Settings, get_settings
from tests.factories import make_customer

runner = CliRunner()


@pytest.fixture
def env(
    pg_url: str,
    clean_redis: str,
    emulator: polar_emulator.RunningEmulator,
    monkeypatch: pytest.MonkeyPatch,
    clean_tables: Engine,
) -> Iterator[Settings]:
    for key, value in {
        "DATABASE_URL": pg_url,
        # The test's own Redis DB for the shared rate budget (not localhost's DB 0, where other
        # processes take slots), and a budget that never makes reconcile wait for a slot.
        "REDIS_URL": clean_redis,
        "POLAR_REQUESTS_PER_MINUTE": "100000",
        "POLAR_ACCESS_TOKEN": emulator.token,
        "POLAR_BASE_URL": emulator.url,
        "OUTBOX_CLOCK_MARGIN_SECONDS": "0",
        "OUTBOX_BACKOFF_BASE_SECONDS": "0.01",
        "OUTBOX_BACKOFF_CAP_SECONDS": "0.05",
        "OUTBOX_MAX_ATTEMPTS": "3",
    }.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    close_gateway()
    yield get_settings()
    close_gateway()
    get_settings.cache_clear()


def deliver_all(engine: Engine, settings: Settings) -> None:
    deliverer = Deliverer(
        sessionmaker(bind=engine, expire_on_commit=False),
        PolarGateway(settings, budget=LocalRateBudget(100_000)),
        settings,
        rng=random.Random(1),
    )
    for _ in range(20):
        report = drain(deliverer, max_seconds=5, max_sleep=0.2)
        if report.batches == 0:
            return


def outbox(*args: str) -> tuple[int, str]:
    result = runner.invoke(cli, list(args))
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.stdout


def test_failed_events_are_visible_then_replayed_once_the_cause_is_fixed(
    clean_tables: Engine, env: Settings, emulator: polar_emulator.RunningEmulator
) -> None:
    with session_scope(clean_tables) as session:
        good = make_customer(session, credits=100)
        blocked = make_customer(session, credits=100)
        for n in range(6):
            record_usage(session, good if n % 2 else blocked, 2)
    emulator.configure(reject_customers=[blocked])
    deliver_all(clean_tables, env)

    code, out = outbox("failed", "--json")
    failed = json.loads(out)
    assert code == 0 and len(failed) == 3
    assert all(row["customer_id"] == blocked for row in failed)
    assert all(blocked in row["last_error"] for row in failed)  # Polar's reason, verbatim
    assert emulator.state.totals() == {good: 6}

    emulator.configure(reject_customers=[])  # the cause is fixed (e.g. on Polar's side)
    code, out = outbox("replay", "--all-failed", "--reason", "customer unblocked", "--json")
    assert code == 0 and len(json.loads(out)["event_ids"]) == 3
    deliver_all(clean_tables, env)
    assert emulator.state.totals() == {good: 6, blocked: 6}

    # Replaying the same events again (force them back to failed) bills nothing twice.
    with session_scope(clean_tables) as session:
        from sqlalchemy import update

        from outbox.models import OutboxEvent

        session.execute(
            update(OutboxEvent)
            .where(OutboxEvent.customer_id == blocked)
            .values(status="failed", delivered_at=None, last_error="forced for the test")
        )
    code, _ = outbox("replay", "--all-failed", "--customer", blocked)
    assert code == 0
    deliver_all(clean_tables, env)
    assert emulator.state.totals() == {good: 6, blocked: 6}
    assert emulator.state.stats.duplicates >= 3


def test_reconcile_finds_an_event_polar_lost_and_fix_repairs_it(
    clean_tables: Engine, env: Settings, emulator: polar_emulator.RunningEmulator
) -> None:
    with session_scope(clean_tables) as session:
        customer = make_customer(session, credits=100)
        results = [record_usage(session, customer, 5) for _ in range(4)]
    deliver_all(clean_tables, env)
    until = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()
    since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()

    code, out = outbox("reconcile", "--since", since, "--until", until, "--json")
    assert code == 0 and json.loads(out)["differs"] is False

    assert emulator.state.delete(results[1].external_id)  # Polar "loses" one event
    code, out = outbox("reconcile", "--since", since, "--until", until, "--json")
    report = json.loads(out)
    assert code == 1
    assert report["customers"][0]["missing"] == [results[1].event_id]
    assert report["totals"] == {
        "ledger_credits": 20,
        "polar_credits": 15,
        "missing": 1,
        "failed": 0,
        "in_flight": 0,
        "unknown": 0,
        "mismatched": 0,
        "unsettled": 0,
    }

    code, out = outbox("reconcile", "--since", since, "--until", until, "--fix", "--json")
    assert code == 1 and json.loads(out)["requeued"] == [results[1].event_id]
    deliver_all(clean_tables, env)
    code, _ = outbox("reconcile", "--since", since, "--until", until)
    assert code == 0
    assert emulator.state.totals() == {customer: 20}


def metric(text: str, name: str, labels: str = "") -> float:
    for line in text.splitlines():
        if line.startswith(name + labels + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name}{labels} not in /metrics")


def test_metrics_and_readiness_follow_a_fault_and_return_to_zero(
    clean_tables: Engine, env: Settings, emulator: polar_emulator.RunningEmulator
) -> None:
    api = TestClient(create_app(env, engine=clean_tables))
    with session_scope(clean_tables) as session:
        customer = make_customer(session, credits=100)
        for _ in range(5):
            record_usage(session, customer, 3)
    emulator.configure(accepted_tokens=["rotated"])  # Polar now rejects our token
    deliver_all(clean_tables, env)

    text = api.get("/metrics").text
    assert metric(text, "outbox_credits_undelivered") == 15
    assert metric(text, "outbox_events", '{status="pending"}') == 5
    assert metric(text, "outbox_oldest_pending_seconds") > 0
    assert metric(text, "outbox_polar_credentials_rejected") == 1
    ready = api.get("/readyz")
    assert ready.status_code == 503 and "rejected" in ready.json()["checks"]["polar_credentials"]

    emulator.configure(accepted_tokens=[emulator.token])
    with session_scope(clean_tables) as session:
        from sqlalchemy import func, update

        from outbox.models import OutboxEvent

        session.execute(update(OutboxEvent).values(next_attempt_at=func.now()))
    deliver_all(clean_tables, env)

    text = api.get("/metrics").text
    assert metric(text, "outbox_credits_undelivered") == 0
    assert metric(text, "outbox_oldest_pending_seconds") == 0
    assert metric(text, "outbox_events", '{status="delivered"}') == 5
    assert metric(text, "outbox_polar_credentials_rejected") == 0
    assert api.get("/readyz").status_code == 200
