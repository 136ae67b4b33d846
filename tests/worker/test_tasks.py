"""worker/tasks.py: each task, called as a worker calls it (no broker needed), runs its job in
the domain and returns what it did; a worker that could only fail refuses to start with one
line and exit 2, its database password hidden.

The task names (stable and dotted) are a layout invariant: tests/test_architecture.py; the
beat schedule: tests/worker/test_celery_app.py; a real worker process delivering:
tests/acceptance/test_worker.py; `celery -A worker worker` without a token:
tests/cli/test_errors.py.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import Engine, select, update

import polar_emulator
from outbox.db import session_scope
from outbox.holds import place_hold
from outbox.models import Hold, OutboxEvent, utcnow
from outbox.settings import get_settings
from tests.outbox.delivery import test_runner
from tests.outbox.delivery.test_runner import spend, statuses
from worker import tasks

# The fixtures of a worker process delivering to the emulator, shared with the runner's tests.
emulator = test_runner.emulator
worker_env = test_runner.worker_env


def test_drain_delivers_to_polar_and_returns_the_counts(
    worker_env: pytest.MonkeyPatch, clean_tables: Engine, emulator: polar_emulator.RunningEmulator
) -> None:
    customer = spend(clean_tables, 3)
    assert tasks.drain() == {"delivered": 3, "failed": 0, "batches": 1}
    assert emulator.state.totals() == {customer: 1 + 2 + 3}
    assert tasks.drain() == {"delivered": 0, "failed": 0, "batches": 0}


def test_the_periodic_tasks_rescue_expire_and_prune(
    worker_env: pytest.MonkeyPatch, clean_tables: Engine
) -> None:
    customer = spend(clean_tables, 3)
    now = utcnow()
    with session_scope(clean_tables) as session:
        lost, old, _ = session.scalars(select(OutboxEvent.id).order_by(OutboxEvent.id))
        session.execute(
            update(OutboxEvent)
            .where(OutboxEvent.id == lost)
            .values(status="inflight", lease_owner="gone:1", lease_expires_at=now)
        )
        session.execute(
            update(OutboxEvent)
            .where(OutboxEvent.id == old)
            .values(status="delivered", delivered_at=now - timedelta(days=365))
        )
        hold = place_hold(session, customer, 2).hold_id
        session.execute(update(Hold).where(Hold.id == hold).values(expires_at=now))
    assert (tasks.rescue(), tasks.expire_holds(), tasks.prune()) == (1, 1, 1)
    assert statuses(clean_tables) == {"pending": 2}
    with session_scope(clean_tables) as session:
        assert session.scalar(select(Hold.status).where(Hold.id == hold)) == "expired"
    assert (tasks.rescue(), tasks.expire_holds(), tasks.prune()) == (0, 0, 0)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"POLAR_ACCESS_TOKEN": None},
            "error: POLAR_ACCESS_TOKEN is not set: the worker cannot deliver usage to Polar",
        ),
        (
            {"DATABASE_URL": "postgresql+psycopg://outbox:s3cret-pw@127.0.0.1:1/outbox"},
            "error: cannot open postgresql+psycopg://outbox:***@127.0.0.1:1/outbox: ",
        ),
        (  # libpq names the tail of a password with an unescaped "@" as the host
            {"DATABASE_URL": "postgresql+psycopg://outbox:s3cret@tpw@nohost.invalid:1/outbox"},
            "error: cannot open postgresql+psycopg://outbox:***@nohost.invalid:1/outbox: "
            "failed to resolve host '***@nohost.invalid'",
        ),
    ],
    ids=["no token", "database down", "a password with an @"],
)
def test_a_worker_that_could_only_fail_refuses_to_start_in_one_line(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str | None],
    message: str,
) -> None:
    monkeypatch.setenv("POLAR_ACCESS_TOKEN", "polar_oat_for_the_test")
    for name, value in env.items():
        if value is None:
            monkeypatch.delenv(name)
        else:
            monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        with pytest.raises(SystemExit) as stopped:
            tasks._refuse_to_start_unable_to_deliver()
    finally:
        get_settings.cache_clear()
    err = capsys.readouterr().err
    assert stopped.value.code == 2
    assert err.startswith(message) and err.count("\n") == 1, err
    assert "s3cret" not in err and "tpw" not in err
