"""Shared fixtures: a real PostgreSQL database (fresh, migrated, per test session), a real Redis,
and SQLite for what `outbox dev` uses.

Two isolation tiers (as River and Procrastinate do):
- `db`: a session inside a transaction that is rolled back at the end (fast; most tests);
- `pg_engine` + `clean_tables`: real commits for concurrency tests; tables are emptied after.

With CI=true a missing PostgreSQL or Redis FAILS the run instead of skipping.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from outbox.db import dispose_engines, make_engine
from outbox.migrate import upgrade
from outbox.models import Base
from outbox.settings import get_settings

# The machine's PostgreSQL (tests never stop it: see machine_postgresql_untouched).
MACHINE_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
# Where the tests' databases live: this server if set, else a cluster of the run's own (see
# `pg_server`), else the machine's.
TEST_DATABASE_URL = os.environ.get("TEST_DATABASE_URL")
TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", "")
MACHINE_REDIS_URL = "redis://127.0.0.1:6379/15"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
SLOW_DIRECTORIES = ("acceptance", "chaos")  # whole-system runs: real processes, servers, waits


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Whole-system tests (tests/acceptance, tests/chaos) are `slow`: the fast tier, `pytest -m
    "not slow"` (./scripts/test.sh --fast), leaves them out, with the tests marked one by one.
    Two tests with one node id stop the run: pytest-xdist would run only one of them."""
    root = Path(__file__).parent
    twins = duplicate_node_ids(items)
    if twins:
        # pytest-xdist (scripts/test.sh) schedules by node id: of items sharing one, one runs.
        raise pytest.UsageError(f"tests share a node id, so all but one would not run: {twins}")
    for item in items:
        parts = item.path.relative_to(root).parts if item.path.is_relative_to(root) else ()
        if parts and parts[0] in SLOW_DIRECTORIES:
            item.add_marker(pytest.mark.slow)


def duplicate_node_ids(items: list[pytest.Item]) -> list[str]:
    counts = Counter(item.nodeid for item in items)
    return sorted(nodeid for nodeid, n in counts.items() if n > 1)


def skip_locally_fail_in_ci(message: str) -> NoReturn:
    """Something the test needs is not on this machine: skip here, but fail in CI, where a
    suite that silently skips its database (or its restart, or compose) proves nothing."""
    if IN_CI:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def service_missing(what: str, exc: BaseException) -> NoReturn:
    skip_locally_fail_in_ci(f"{what} is not reachable: {exc}")


@pytest.fixture(scope="session", autouse=True)
def machine_postgresql_untouched() -> Iterator[None]:
    """The machine's PostgreSQL (TEST_DATABASE_URL's server, which other people and the
    developer's own `outbox serve` use) is the same postmaster, started at the same time, at
    the end of the run as at its start: a test that stops or restarts a server does it to one
    of its own (tests/services.py). Fails the run (an error at the last teardown) otherwise."""
    from tests.services import cluster_identity

    server = make_url(TEST_DATABASE_URL or MACHINE_DATABASE_URL).set(database="postgres")
    server = server.render_as_string(hide_password=False)
    before = cluster_identity(server)
    yield
    if before is None:
        return  # not reachable at the start: the tests that needed it skipped or failed
    after = cluster_identity(server)
    if after != before:
        pytest.fail(
            f"the machine's PostgreSQL at {make_url(server).host}:{make_url(server).port} was "
            f"stopped or restarted during the run (postmaster pid, start time: {before} -> "
            f"{after}); a test must use a cluster of its own (tests/services.py)",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """The PostgreSQL server of this run's databases, as a URL to connect to it with.

    TEST_DATABASE_URL's when set. Else a cluster of the run's own (tests/services.py: initdb
    into a temporary directory, a free port, 200 connections, no fsync), so that the run never
    competes for the shared server's `max_connections` (64 threads spending at once met "too
    many clients already" there, from other people's work) nor loads it. Else, where the
    server binaries are not installed, the machine's on 127.0.0.1:5432."""
    from tests.services import PrivatePostgres, can_run_private_postgres

    if TEST_DATABASE_URL or not can_run_private_postgres():
        yield TEST_DATABASE_URL or MACHINE_DATABASE_URL
        return
    server = PrivatePostgres()
    server.start()
    yield server.url("postgres")
    server.destroy()


@pytest.fixture(scope="session")
def pg_url(pg_server: str) -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, migrated to head, dropped after."""
    base = make_url(pg_server)
    name = f"outbox_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    # No pool: the chaos tests restart PostgreSQL, and the drop at the end needs a live connection.
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except sa.exc.OperationalError as exc:
        service_missing("PostgreSQL", exc)
    url = base.set(database=name).render_as_string(hide_password=False)
    upgrade(url)
    os.environ["DATABASE_URL"] = url
    get_settings.cache_clear()
    yield url
    dispose_engines()
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


@pytest.fixture(scope="module")
def private_postgres() -> Iterator[Any]:
    """A PostgreSQL cluster of the module's own (tests/services.py), running: for tests that
    stop it, or that need more connections than a shared server has free."""
    from tests.services import PrivatePostgres

    server = PrivatePostgres()
    server.start()
    yield server
    server.destroy()


@pytest.fixture(scope="session")
def pg_engine(pg_url: str) -> Iterator[Engine]:
    engine = make_engine(pg_url, pool_size=80, max_overflow=20)
    yield engine
    engine.dispose()


@pytest.fixture
def empty_pg_url(pg_server: str) -> Iterator[str]:
    """A PostgreSQL database that exists and answers but was never migrated."""
    base = make_url(pg_server)
    name = f"outbox_unmigrated_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except sa.exc.OperationalError as exc:
        service_missing("PostgreSQL", exc)
    yield base.set(database=name).render_as_string(hide_password=False)
    dispose_engines()
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


def truncate_all(engine: Engine) -> None:
    """Empty every table and restart its ids. DELETE, not TRUNCATE: on tables this small it is
    ten times faster (a TRUNCATE makes new files for every table and index; twice per test it
    was most of the fast tier's time). The ledger's append-only trigger (and the foreign keys')
    is off for this transaction: session_replication_role = replica, which needs a superuser
    (as the tests' `postgres` is); without one, TRUNCATE (which fires no trigger)."""
    if engine.dialect.name != "postgresql":
        raise NotImplementedError
    tables = Base.metadata.sorted_tables
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("SET LOCAL session_replication_role = replica")
            for table in reversed(tables):
                conn.exec_driver_sql(f'DELETE FROM "{table.name}"')
            sequences = conn.exec_driver_sql(
                "SELECT sequencename FROM pg_sequences WHERE schemaname = current_schema()"
            ).scalars()
            for sequence in list(sequences):
                conn.exec_driver_sql(f'ALTER SEQUENCE "{sequence}" RESTART')
    except sa.exc.ProgrammingError:  # not a superuser
        names = ", ".join(f'"{t.name}"' for t in tables)
        with engine.begin() as conn:
            conn.exec_driver_sql(f"TRUNCATE {names} RESTART IDENTITY CASCADE")


@pytest.fixture
def clean_tables(pg_engine: Engine) -> Iterator[Engine]:
    """For tests that commit for real (threads, processes): tables are emptied before and after."""
    truncate_all(pg_engine)
    yield pg_engine
    truncate_all(pg_engine)
    # Idle pooled connections count against max_connections (100 by default): let them go,
    # so the next test's worker processes and threads find room.
    pg_engine.dispose()
    dispose_engines()


@pytest.fixture
def db(pg_engine: Engine) -> Iterator[Session]:
    """A session in a transaction rolled back at the end; code under test may use savepoints."""
    with pg_engine.connect() as conn:
        trans = conn.begin()
        session = Session(bind=conn, join_transaction_mode="create_savepoint")
        try:
            yield session
        finally:
            session.close()
            trans.rollback()


@pytest.fixture
def sqlite_engine(tmp_path: object) -> Iterator[Engine]:
    """A migrated SQLite database in a temporary file (what `outbox dev` uses)."""
    url = f"sqlite:///{tmp_path}/outbox.db"
    upgrade(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


@pytest.fixture(params=["postgresql", "sqlite"])
def any_engine(request: pytest.FixtureRequest) -> Engine:
    """The same test on PostgreSQL (production) and SQLite (`outbox dev`), with real commits."""
    if request.param == "postgresql":
        engine: Engine = request.getfixturevalue("clean_tables")
    else:
        engine = request.getfixturevalue("sqlite_engine")
    return engine


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The run's Redis: TEST_REDIS_URL's when set; else a redis-server of the run's own
    (tests/services.py, a free port), so that two runs at once (a developer's two terminals,
    CI beside a benchmark) never flush each other's keys; else, without the binary, database 15
    of the machine's on 127.0.0.1:6379."""
    from tests.services import PrivateRedis, redis_server_installed

    server = None
    url = TEST_REDIS_URL or MACHINE_REDIS_URL
    if not TEST_REDIS_URL and redis_server_installed():
        server = PrivateRedis(Path(tempfile.mkdtemp(prefix="outbox-test-redis-")))
        server.start()
        url = server.url
    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except redis.RedisError as exc:
        service_missing("Redis", exc)
    finally:
        client.close()
    yield url
    if server is not None:
        server.stop()
        shutil.rmtree(server.dir, ignore_errors=True)
