"""Delivery against the emulator on real PostgreSQL: exactly-once in effect through faults,
poison isolation, clock skew, bad credentials."""

from __future__ import annotations

import random
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import sessionmaker

import polar_emulator
from api.app import create_app
from outbox.db import session_scope
from outbox.delivery import deliverer as deliverer_module
from outbox.delivery.deliverer import Deliverer, drain
from outbox.ledger import record_usage
from outbox.models import OutboxEvent, utcnow
from outbox.polar.gateway import PolarGateway
from outbox.polar.ratelimit import LocalRateBudget
from outbox.service_state import POLAR_CREDENTIALS, get_state
from outbox.settings import Settings, load_settings
from tests.factories import ledger_usage, make_customer


@pytest.fixture
def emulator() -> Iterator[polar_emulator.RunningEmulator]:
    running = polar_emulator.serve_in_thread(config=polar_emulator.EmulatorConfig(seed=7))
    yield running
    running.stop()


def make_settings(
    pg_url: str, emulator: polar_emulator.RunningEmulator, **extra: object
) -> Settings:
    values: dict[str, object] = {
        "database_url": pg_url,
        "polar_access_token": emulator.token,
        "polar_base_url": emulator.url,
        "outbox_clock_margin_seconds": 0,
        "outbox_backoff_base_seconds": 0.02,
        "outbox_backoff_cap_seconds": 0.2,
        "polar_timeout_seconds": 5,
    }
    values.update(extra)
    return load_settings(**values)


def make_deliverer(engine: Engine, settings: Settings, worker: str = "t") -> Deliverer:
    gateway = PolarGateway(settings, budget=LocalRateBudget(100_000))
    return Deliverer(
        sessionmaker(bind=engine, expire_on_commit=False),
        gateway,
        settings,
        worker_id=worker,
        rng=random.Random(3),
    )


def spend(engine: Engine, customers: int, events: int, seed: int = 1) -> dict[str, int]:
    """Record `events` usages spread over `customers`; return credits per customer."""
    rng = random.Random(seed)
    spent: dict[str, int] = defaultdict(int)
    with session_scope(engine) as session:
        ids = [make_customer(session, credits=events * 10) for _ in range(customers)]
        for n in range(events):
            customer = ids[n % customers]
            credits = rng.randint(1, 5)
            record_usage(session, customer, credits, {"n": n})
            spent[customer] += credits
    return dict(spent)


def drain_until_settled(deliverer: Deliverer, engine: Engine, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        drain(deliverer, max_seconds=5, max_sleep=0.5)
        with session_scope(engine) as session:
            open_rows = session.scalar(
                select(func.count()).where(OutboxEvent.status.in_(["pending", "inflight"]))
            )
        if not open_rows:
            return
        time.sleep(0.05)
    raise AssertionError("the outbox did not drain in time")


def counts(engine: Engine) -> dict[str, int]:
    with session_scope(engine) as session:
        return {
            status: int(n)
            for status, n in session.execute(
                select(OutboxEvent.status, func.count()).group_by(OutboxEvent.status)
            )
        }


@pytest.mark.slow
def test_everything_is_delivered_once_in_effect_through_faults(
    clean_tables: Engine, pg_url: str, emulator: polar_emulator.RunningEmulator
) -> None:
    spent = spend(clean_tables, customers=7, events=1500)
    emulator.configure(
        error_5xx_rate=0.3, rate_429_rate=0.1, accept_then_drop_rate=0.1, latency_ms=2
    )
    settings = make_settings(pg_url, emulator, outbox_batch_size=100)
    drain_until_settled(make_deliverer(clean_tables, settings), clean_tables, timeout=120)

    assert counts(clean_tables) == {"delivered": 1500}
    stats = emulator.state.stats
    assert stats.injected_5xx > 0 and stats.dropped_after_store > 0 and stats.status_429 > 0
    assert stats.duplicates > 0  # resends happened, and Polar deduplicated them
    assert emulator.state.totals() == spent == ledger_usage(clean_tables)


def test_a_poison_event_fails_alone_and_its_batch_is_delivered_in_the_same_cycle(
    clean_tables: Engine, pg_url: str, emulator: polar_emulator.RunningEmulator
) -> None:
    with session_scope(clean_tables) as session:
        good = make_customer(session, credits=10_000)
        bad = make_customer(session, credits=10)
        ids = [record_usage(session, good, 1).event_id for _ in range(250)]
        poison = record_usage(session, bad, 1).event_id
        ids += [record_usage(session, good, 1).event_id for _ in range(249)]
    emulator.configure(reject_customers=[bad])
    deliverer = make_deliverer(clean_tables, make_settings(pg_url, emulator))

    report = deliverer.deliver_batch()

    assert (report.claimed, report.delivered, report.failed) == (500, 499, 1)
    assert report.requests == 2  # the 422, then the resend of the 499
    with session_scope(clean_tables) as session:
        row = session.get(OutboxEvent, poison)
        assert row is not None and row.status == "failed"
        assert bad in (row.last_error or "")  # Polar's message names the refused customer
    assert counts(clean_tables) == {"delivered": 499, "failed": 1}
    assert emulator.state.totals() == {good: 499}


@pytest.mark.slow
def test_a_worker_clock_5s_ahead_of_polar_bills_everything_and_fails_nothing(
    clean_tables: Engine, pg_url: str, emulator: polar_emulator.RunningEmulator
) -> None:
    """Issue 11: Polar (the emulator, answering in Polar's union shape: the timestamp error
    under both variants plus a spurious customer_id "Field required") runs 5 s behind the
    workers, and the clock margin (1 s) is smaller than the skew. Every usage is billed once
    Polar's clock passes it, none spends an attempt, none is failed."""
    spent = spend(clean_tables, customers=2, events=40)
    emulator.configure(clock_offset_seconds=-5)  # Polar's clock is 5 s behind ours
    settings = make_settings(pg_url, emulator, outbox_max_attempts=2, outbox_clock_margin_seconds=1)
    drain_until_settled(make_deliverer(clean_tables, settings), clean_tables, timeout=60)
    assert counts(clean_tables) == {"delivered": 40}
    assert emulator.state.stats.status_422 > 0  # Polar did refuse the future timestamps
    assert emulator.state.totals() == spent
    with session_scope(clean_tables) as session:
        rows = session.execute(
            select(OutboxEvent.attempts, OutboxEvent.occurred_at, OutboxEvent.delivered_at)
        ).all()
    assert {row.attempts for row in rows} == {0}  # skew is nobody's fault
    lag = max((row.delivered_at - row.occurred_at).total_seconds() for row in rows)
    assert lag < 5 + 10  # within seconds of the skew (generous bound: a busy machine)


def test_the_clock_margin_holds_young_rows_back_so_polar_never_sees_the_future(
    clean_tables: Engine, pg_url: str, emulator: polar_emulator.RunningEmulator
) -> None:
    """A margin larger than the skew: Polar never refuses anything (a Deliverer that ignored
    the margin would send rows from Polar's future and get 422s)."""
    spent = spend(clean_tables, customers=2, events=20)
    emulator.configure(clock_offset_seconds=-1)
    settings = make_settings(pg_url, emulator, outbox_clock_margin_seconds=2.5)
    drain_until_settled(make_deliverer(clean_tables, settings), clean_tables, timeout=30)
    assert counts(clean_tables) == {"delivered": 20}
    assert emulator.state.stats.status_422 == 0
    assert emulator.state.totals() == spent


def test_the_claim_holds_a_young_row_back_even_when_an_older_row_is_due(
    clean_tables: Engine, pg_url: str, emulator: polar_emulator.RunningEmulator
) -> None:
    """The margin is the claim's own guard, not only the `has_due` look before it: with an old
    row due, the batch takes it and leaves the row younger than the margin pending."""
    with session_scope(clean_tables) as session:
        customer = make_customer(session, credits=10)
        old = record_usage(session, customer, 1)
        young = record_usage(session, customer, 2)
        long_ago = utcnow() - timedelta(minutes=5)
        session.execute(
            update(OutboxEvent)
            .where(OutboxEvent.id == old.event_id)
            .values(occurred_at=long_ago, next_attempt_at=long_ago, created_at=long_ago)
        )
    settings = make_settings(pg_url, emulator, outbox_clock_margin_seconds=60)
    report = make_deliverer(clean_tables, settings).deliver_batch()
    assert report.claimed == 1
    assert set(emulator.state.by_external_id) == {old.external_id}
    with session_scope(clean_tables) as session:
        row = session.get(OutboxEvent, young.event_id)
        assert row is not None and (row.status, row.attempts) == ("pending", 0)


def _poison_in_both_stages(engine: Engine, emulator: polar_emulator.RunningEmulator) -> list[int]:
    """Ten rows: #3 with a metadata value Polar's schema refuses (written past our validation,
    as an older release could have), #7 for a customer Polar's service refuses."""
    with session_scope(engine) as session:
        good = make_customer(session, credits=100)
        refused = make_customer(session, credits=100)
        ids = [record_usage(session, refused if n == 7 else good, 1).event_id for n in range(10)]
        session.execute(
            update(OutboxEvent).where(OutboxEvent.id == ids[3]).values(event_metadata={"note": ""})
        )
    emulator.configure(reject_customers=[refused])
    return ids


def test_isolation_goes_on_through_polars_second_validation_stage(
    clean_tables: Engine, pg_url: str, emulator: polar_emulator.RunningEmulator
) -> None:
    ids = _poison_in_both_stages(clean_tables, emulator)
    deliverer = make_deliverer(clean_tables, make_settings(pg_url, emulator))

    report = deliverer.deliver_batch()

    # schema 422 naming #3, then (resent without it) a service 422 naming #7, then accepted
    assert (report.requests, report.delivered, report.failed) == (3, 8, 2)
    with session_scope(clean_tables) as session:
        failed = dict(
            session.execute(
                select(OutboxEvent.id, OutboxEvent.last_error).where(OutboxEvent.status == "failed")
            ).all()
        )
    assert set(failed) == {ids[3], ids[7]}
    assert failed[ids[3]] == "metadata.note: String should have at least 1 character"
    assert "not accepted" in (failed[ids[7]] or "")
    assert sum(emulator.state.totals().values()) == 8


def test_isolation_is_bounded(
    clean_tables: Engine,
    pg_url: str,
    emulator: polar_emulator.RunningEmulator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Polar that keeps naming new events is given a bounded number of resends; the rest of
    the batch goes back to pending with backoff (an attempt), nothing more is failed."""
    monkeypatch.setattr(deliverer_module, "MAX_REJECTION_ROUNDS", 2)
    _poison_in_both_stages(clean_tables, emulator)
    deliverer = make_deliverer(clean_tables, make_settings(pg_url, emulator))

    report = deliverer.deliver_batch()

    assert (report.requests, report.failed, report.retried) == (2, 2, 8)
    assert counts(clean_tables) == {"failed": 2, "pending": 8}
    assert emulator.state.events == []


def metric(text: str, name: str) -> float:
    """One unlabelled sample of a /metrics page."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def test_a_422_naming_no_event_fails_nothing_and_is_loud(
    clean_tables: Engine,
    pg_url: str,
    emulator: polar_emulator.RunningEmulator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    spent = spend(clean_tables, customers=2, events=10)
    emulator.configure(unattributed_422_next=1)  # Polar: 422 {"loc": ["body", "events"]}
    settings = make_settings(pg_url, emulator)
    deliverer = make_deliverer(clean_tables, settings)
    api = TestClient(create_app(settings, engine=clean_tables))
    before = REGISTRY.get_sample_value("outbox_polar_unattributed_rejections_total") or 0.0

    report = deliverer.deliver_batch()

    assert (report.delivered, report.failed, report.retried) == (0, 0, 10)
    assert counts(clean_tables) == {"pending": 10}
    with session_scope(clean_tables) as session:
        rows = session.execute(select(OutboxEvent.attempts, OutboxEvent.last_error)).all()
    assert {row.attempts for row in rows} == {1}  # retried with backoff
    assert all("422 naming no event" in (row.last_error or "") for row in rows)
    assert any(
        r.levelname == "ERROR" and "names no event" in r.getMessage() for r in caplog.records
    )
    after = REGISTRY.get_sample_value("outbox_polar_unattributed_rejections_total")
    assert after == before + 1
    assert metric(api.get("/metrics").text, "outbox_polar_unattributed_422") == 1
    ready = api.get("/readyz")
    assert ready.status_code == 200  # reported, but the request path does not depend on Polar
    assert "naming no event" in ready.json()["checks"]["polar_ingest"]
    assert "['body', 'events']: Field required" in ready.json()["checks"]["polar_ingest"]

    with session_scope(clean_tables) as session:  # Polar accepts batches again
        session.execute(update(OutboxEvent).values(next_attempt_at=func.now()))
    drain_until_settled(deliverer, clean_tables)
    assert counts(clean_tables) == {"delivered": 10}
    assert emulator.state.totals() == spent
    assert api.get("/readyz").json()["checks"]["polar_ingest"] == "ok"
    assert metric(api.get("/metrics").text, "outbox_polar_unattributed_422") == 0


def test_rejected_credentials_pause_delivery_without_failing_rows_and_it_resumes(
    clean_tables: Engine,
    pg_url: str,
    emulator: polar_emulator.RunningEmulator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("DEBUG")
    spent = spend(clean_tables, customers=1, events=10)
    emulator.configure(accepted_tokens=["the-new-token"])
    settings = make_settings(pg_url, emulator)
    deliverer = make_deliverer(clean_tables, settings)

    report = deliverer.deliver_batch()

    assert report.pause_seconds > 0 and report.delivered == 0
    assert counts(clean_tables) == {"pending": 10}
    with session_scope(clean_tables) as session:
        state = get_state(session, POLAR_CREDENTIALS)
        assert state is not None and state.value == "rejected"
        attempts = session.scalars(select(OutboxEvent.attempts)).all()
        assert set(attempts) == {0}

    emulator.configure(accepted_tokens=[emulator.token])  # the operator fixed the token
    with session_scope(clean_tables) as session:
        session.execute(OutboxEvent.__table__.update().values(next_attempt_at=func.now()))
    drain_until_settled(deliverer, clean_tables)
    assert counts(clean_tables) == {"delivered": 10}
    with session_scope(clean_tables) as session:
        state = get_state(session, POLAR_CREDENTIALS)
        assert state is not None and state.value == "ok"
    assert emulator.state.totals() == spent
    assert "REJECTED the access token" in caplog.text  # loud
    assert emulator.token not in caplog.text  # and the secret is never logged


def test_delivery_works_on_sqlite_too(
    sqlite_engine: Engine, emulator: polar_emulator.RunningEmulator
) -> None:
    """`outbox dev` drains a SQLite outbox with the same code."""
    url = str(sqlite_engine.url)
    spent = spend(sqlite_engine, customers=2, events=30)
    emulator.configure(error_5xx_rate=0.3, seed=3)
    settings = make_settings(url, emulator, outbox_batch_size=7)
    deliverer = make_deliverer(sqlite_engine, settings)
    with session_scope(sqlite_engine) as session:  # a lost worker's rows, on SQLite
        from outbox.events import claim_batch
        from outbox.models import utcnow

        now = utcnow()
        claimed = claim_batch(
            session, owner="dead", limit=5, now=now, lease_seconds=0, hold_back_until=now
        )
        assert len(claimed) == 5
    drain_until_settled(deliverer, sqlite_engine)
    assert counts(sqlite_engine) == {"delivered": 30}
    assert emulator.state.totals() == spent == ledger_usage(sqlite_engine)
