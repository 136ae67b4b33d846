"""Redis down: the API keeps accepting usage and delivery catches up when Redis is back.
PostgreSQL restarted for real (and its connections killed): the API answers 503 while it is
down, and the API and the workers recover by themselves.

Every server stopped here is the module's own (tests/services.py): a private PostgreSQL
cluster in a temporary directory and a private redis-server, each on a free port; the
machine's PostgreSQL and Redis are never touched."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest
from celery import Celery
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

import polar_emulator
from api.app import create_app
from api.nudge import Nudger
from outbox.db import make_engine, session_scope
from outbox.ledger import record_usage
from outbox.settings import load_settings
from outbox.tokens import create_token
from tests.acceptance.conftest import Worker, all_delivered, status_counts, wait_until
from tests.chaos.conftest import PrivatePostgres, PrivateRedis
from tests.factories import make_customer
from tests.services import cluster_identity, migrated_database


@pytest.fixture(scope="module")
def pg_url(private_postgres: PrivatePostgres) -> Iterator[str]:
    """This module's database, migrated, on its private cluster (not the session's)."""
    with migrated_database(private_postgres, "outbox_chaos") as url:
        yield url


@pytest.fixture(scope="module")
def pg_engine(pg_url: str) -> Iterator[Engine]:
    engine = make_engine(pg_url, pool_size=40, max_overflow=20)
    yield engine
    engine.dispose()


def test_redis_down_usage_is_still_accepted_and_delivered_after_it_returns(
    clean_tables: Engine,
    pg_url: str,
    emulator: polar_emulator.RunningEmulator,
    private_redis: PrivateRedis,
    start_worker: Callable[..., Worker],
) -> None:
    broker = Celery(broker=private_redis.url)
    broker.conf.broker_transport_options = {"socket_connect_timeout": 1, "socket_timeout": 1}
    nudger = Nudger(lambda: broker.send_task("outbox.drain", expires=30, retry=False))
    app = create_app(load_settings(database_url=pg_url), engine=clean_tables, nudge=nudger)
    client = TestClient(app)
    with session_scope(clean_tables) as session:
        customer = make_customer(session, credits=1000)
        token, _ = create_token(session, "usage")
    headers = {"Authorization": f"Bearer {token}"}

    def spend(n: int) -> None:
        for _ in range(n):
            response = client.post(
                "/v1/usage", json={"customer_id": customer, "credits": 1}, headers=headers
            )
            assert response.status_code == 201, response.text

    worker = start_worker(REDIS_URL=private_redis.url)
    spend(10)
    wait_until(all_delivered(clean_tables, 10), 60, "delivery with Redis up", worker.output)

    private_redis.stop()
    time.sleep(2)  # a drain task already running finishes; no new task can reach the worker
    spend(15)  # the request path does not depend on Redis
    time.sleep(2)
    assert status_counts(clean_tables) == {"delivered": 10, "pending": 15}

    private_redis.start()  # same port: Celery reconnects by itself
    wait_until(all_delivered(clean_tables, 25), 90, "catch-up after Redis returned", worker.output)
    assert emulator.state.totals() == {customer: 25}
    assert nudger.dropped > 0  # nudges were lost while Redis was down, and nothing else was
    nudger.stop()


def _worker_mid_delivery(
    engine: Engine, emulator: polar_emulator.RunningEmulator, start_worker: Callable[..., Worker]
) -> Worker:
    """A worker sending small, slow batches, once it has delivered its first hundred rows."""
    emulator.configure(latency_ms=20)
    worker = start_worker(OUTBOX_BATCH_SIZE="50")
    wait_until(
        lambda: status_counts(engine).get("delivered", 0) > 100,
        60,
        "delivery started",
        worker.output,
    )
    return worker


def test_workers_recover_when_postgresql_drops_every_connection(
    clean_tables: Engine,
    pg_url: str,
    emulator: polar_emulator.RunningEmulator,
    start_worker: Callable[..., Worker],
) -> None:
    with session_scope(clean_tables) as session:
        customer = make_customer(session, credits=100_000)
        for _ in range(3000):
            record_usage(session, customer, 1)
    worker = _worker_mid_delivery(clean_tables, emulator, start_worker)
    database = pg_url.rsplit("/", 1)[1]
    stop = threading.Event()

    def kill_connections() -> None:
        # What a PostgreSQL restart does to its clients, three times over two seconds.
        for _ in range(3):
            with clean_tables.connect() as conn:
                conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :db AND pid <> pg_backend_pid()"
                    ),
                    {"db": database},
                )
                conn.commit()
            if stop.wait(0.7):
                return

    killer = threading.Thread(target=kill_connections)
    killer.start()
    killer.join()
    wait_until(all_delivered(clean_tables, 3000), 180, "recovery", worker.output)
    assert emulator.state.totals() == {customer: 3000}


def test_the_api_and_workers_recover_from_a_real_postgresql_restart(
    clean_tables: Engine,
    pg_url: str,
    emulator: polar_emulator.RunningEmulator,
    start_worker: Callable[..., Worker],
    private_postgres: PrivatePostgres,
) -> None:
    app = create_app(load_settings(database_url=pg_url), engine=clean_tables)
    client = TestClient(app)
    with session_scope(clean_tables) as session:
        customer = make_customer(session, credits=100_000)
        token, _ = create_token(session, "usage")
        for _ in range(2000):
            record_usage(session, customer, 1)
    headers = {"Authorization": f"Bearer {token}"}

    def spend() -> tuple[int, str | None]:
        """One usage through the API: its status and error code (None on success)."""
        response = client.post(
            "/v1/usage", json={"customer_id": customer, "credits": 1}, headers=headers
        )
        return response.status_code, response.json().get("code")

    assert spend()[0] == 201  # the token is now cached, as in a running API
    worker = _worker_mid_delivery(clean_tables, emulator, start_worker)
    private_postgres.stop("fast")
    try:
        time.sleep(3)  # the worker's drains fail meanwhile; beat keeps scheduling them
        assert spend() == (503, "database_unavailable")
    finally:
        private_postgres.start()
    wait_until(lambda: spend()[0] == 201, 30, "the API after the restart")
    wait_until(all_delivered(clean_tables, 2002), 180, "delivery after the restart", worker.output)
    assert emulator.state.totals() == {customer: 2002}


def test_the_suites_guard_sees_a_postgresql_restart(private_postgres: PrivatePostgres) -> None:
    """tests/conftest.py's check of the machine's PostgreSQL compares these pairs: a restart
    changes them (here, of this module's own cluster)."""
    before = cluster_identity(private_postgres.url())
    assert before is not None and before[0] != "?"
    assert cluster_identity(private_postgres.url()) == before
    private_postgres.stop("fast")
    try:
        assert cluster_identity(private_postgres.url()) is None
    finally:
        private_postgres.start()
    after = cluster_identity(private_postgres.url())
    assert after is not None and after != before
