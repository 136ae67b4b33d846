"""outbox/delivery/runner.py, the wiring a worker process runs on (settings from the
environment, one deliverer per process, the shared Redis budget), against real PostgreSQL,
Redis and the emulator: `drain_once` delivers what is committed and asks for a helper once
when a full batch came; the periodic jobs prune, rescue and expire as configured; the
in-process drainer of `outbox dev` delivers when poked.

Delivery's own guarantees (faults, poison, leases, 429s): tests/outbox/delivery/test_deliverer*.py;
a real Celery worker: tests/acceptance/test_worker.py.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
from sqlalchemy import Engine, func, select, update

import polar_emulator
from outbox.db import session_scope
from outbox.delivery import runner
from outbox.ledger import record_usage
from outbox.models import LedgerEntry, OutboxEvent, utcnow
from outbox.polar.gateway import close_gateway
from outbox.settings import get_settings
from tests.factories import ledger_usage, make_customer


@pytest.fixture
def emulator() -> Iterator[polar_emulator.RunningEmulator]:
    running = polar_emulator.serve_in_thread()
    yield running
    running.stop()


@pytest.fixture
def worker_env(
    monkeypatch: pytest.MonkeyPatch,
    clean_tables: Engine,
    redis_url: str,
    emulator: polar_emulator.RunningEmulator,
) -> Iterator[pytest.MonkeyPatch]:
    """The environment of a worker process delivering to the emulator; set more variables
    before the first drain (settings and the deliverer are made on first use)."""
    for name, value in {
        "REDIS_URL": redis_url,
        "POLAR_ACCESS_TOKEN": emulator.token,
        "POLAR_BASE_URL": emulator.url,
        "OUTBOX_CLOCK_MARGIN_SECONDS": "0",
    }.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    runner.reset_after_fork()
    close_gateway()
    yield monkeypatch
    runner.reset_after_fork()
    close_gateway()
    get_settings.cache_clear()


def spend(engine: Engine, usages: int) -> str:
    with session_scope(engine) as session:
        customer = make_customer(session, credits=usages * 10)
        for n in range(usages):
            record_usage(session, customer, 1 + n % 3)
    return customer


def statuses(engine: Engine) -> dict[str, int]:
    with session_scope(engine) as session:
        rows = session.execute(select(OutboxEvent.status, func.count()).group_by("status"))
        return {status: int(count) for status, count in rows}


def test_drain_once_delivers_what_is_committed_and_reports_it(
    worker_env: pytest.MonkeyPatch,
    clean_tables: Engine,
    emulator: polar_emulator.RunningEmulator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    customer = spend(clean_tables, 7)
    asked: list[int] = []
    with caplog.at_level(logging.INFO, logger="outbox.runtime"):
        report = runner.drain_once(max_seconds=30, on_backlog=lambda: asked.append(1))
    assert (report.delivered, report.failed, report.batches) == (7, 0, 1)
    assert asked == []  # 7 rows is not a full batch: no helper needed
    assert statuses(clean_tables) == {"delivered": 7}
    assert emulator.state.totals() == ledger_usage(clean_tables) == {customer: 13}
    [line] = [r for r in caplog.records if r.getMessage() == "drain finished"]
    expected = {"delivered": 7, "failed": 0, "retried": 0, "batches": 1, "helper_asked": False}
    assert {field: vars(line)[field] for field in expected} == expected


def test_a_full_batch_asks_for_one_helper_and_drains_the_backlog(
    worker_env: pytest.MonkeyPatch, clean_tables: Engine, emulator: polar_emulator.RunningEmulator
) -> None:
    worker_env.setenv("OUTBOX_BATCH_SIZE", "5")
    spend(clean_tables, 12)
    asked: list[int] = []
    report = runner.drain_once(max_seconds=30, on_backlog=lambda: asked.append(1))
    assert asked == [1]
    assert (report.delivered, report.batches) == (12, 3)
    assert statuses(clean_tables) == {"delivered": 12}


def test_a_helper_that_cannot_be_asked_does_not_stop_the_drain(
    worker_env: pytest.MonkeyPatch, clean_tables: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    worker_env.setenv("OUTBOX_BATCH_SIZE", "5")
    spend(clean_tables, 6)

    def broker_down() -> None:
        raise ConnectionError("redis://broker:6379 refused")

    with caplog.at_level(logging.WARNING, logger="outbox.runtime"):
        report = runner.drain_once(max_seconds=30, on_backlog=broker_down)
    assert report.delivered == 6 and statuses(clean_tables) == {"delivered": 6}
    assert "could not ask for a helper drain: redis://broker:6379 refused" in caplog.text


def test_nothing_due_is_a_quiet_empty_report(
    worker_env: pytest.MonkeyPatch, clean_tables: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="outbox.runtime"):
        report = runner.drain_once(max_seconds=30)
    assert (report.delivered, report.failed) == (0, 0)
    assert "drain finished" not in caplog.text


def test_prune_keeps_delivered_rows_for_the_configured_days_and_the_ledger_forever(
    worker_env: pytest.MonkeyPatch, clean_tables: Engine
) -> None:
    worker_env.setenv("OUTBOX_RETENTION_DAYS", "7")
    spend(clean_tables, 3)
    now = utcnow()
    with session_scope(clean_tables) as session:
        old, recent, pending = session.scalars(select(OutboxEvent.id).order_by(OutboxEvent.id))
        for event_id, age in ((old, timedelta(days=8)), (recent, timedelta(days=6))):
            session.execute(
                update(OutboxEvent)
                .where(OutboxEvent.id == event_id)
                .values(status="delivered", delivered_at=now - age)
            )
    assert runner.prune_once() == 1
    with session_scope(clean_tables) as session:
        assert set(session.scalars(select(OutboxEvent.id))) == {recent, pending}
        assert session.scalar(select(func.count()).where(LedgerEntry.kind == "usage")) == 3


def test_rescue_makes_rows_of_a_lost_worker_claimable_again(
    worker_env: pytest.MonkeyPatch, clean_tables: Engine
) -> None:
    spend(clean_tables, 2)
    with session_scope(clean_tables) as session:
        session.execute(
            update(OutboxEvent).values(
                status="inflight",
                lease_owner="lost-host:1",
                lease_expires_at=utcnow() - timedelta(seconds=1),
            )
        )
    assert runner.rescue_once() == 2
    assert statuses(clean_tables) == {"pending": 2}


def test_one_deliverer_per_process_named_after_it(worker_env: pytest.MonkeyPatch) -> None:
    deliverer = runner.get_deliverer()
    assert runner.get_deliverer() is deliverer
    assert runner.worker_id().endswith(f":{os.getpid()}")
    runner.reset_after_fork()  # a forked child makes its own
    assert runner.get_deliverer() is not deliverer


def eventually(check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not reached in time"
        time.sleep(0.02)


def test_the_dev_drainer_delivers_when_poked_and_stops_cleanly(
    worker_env: pytest.MonkeyPatch, clean_tables: Engine, emulator: polar_emulator.RunningEmulator
) -> None:
    drainer = runner.BackgroundDrainer(get_settings(), interval=3600)  # only a poke wakes it
    drainer.start()
    try:
        customer = spend(clean_tables, 4)
        drainer.poke()
        eventually(lambda: statuses(clean_tables) == {"delivered": 4})
    finally:
        drainer.stop()
    assert not drainer._thread.is_alive()
    assert emulator.state.totals() == {customer: 1 + 2 + 3 + 1}
