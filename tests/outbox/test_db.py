"""outbox/db.py: `session_scope` commits on success and rolls back on any exception, on
PostgreSQL and SQLite; SQLite engines enforce foreign keys; one engine per URL per process;
database errors and URLs are told in one line without their password; a pooled connection
whose backend is gone is replaced at checkout, without a round trip.

How commands fail on a database that is missing, unreachable or unmigrated (`open_database`)
is shown as a user sees it in tests/cli/test_errors.py.
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy import event as sa_event
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from outbox.db import (
    backend_gone,
    describe_database_error,
    dispose_engines,
    get_engine,
    make_engine,
    session_scope,
)
from outbox.models import Hold, ServiceState, utcnow


def stored_keys(engine: Engine) -> list[str]:
    with Session(engine) as session:
        return list(session.scalars(select(ServiceState.key).order_by(ServiceState.key)))


def add_state(session: Session, key: str) -> None:
    session.add(ServiceState(key=key, value="v", updated_at=utcnow()))
    session.flush()


def test_session_scope_commits_what_the_block_wrote(any_engine: Engine) -> None:
    with session_scope(any_engine) as session:
        add_state(session, "written")
    assert stored_keys(any_engine) == ["written"]


class Boom(Exception):
    pass


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_session_scope_rolls_back_and_reraises_on_any_exception(
    any_engine: Engine, error: type[BaseException]
) -> None:
    with pytest.raises(error), session_scope(any_engine) as session:
        add_state(session, "half-done")
        raise error()
    assert stored_keys(any_engine) == []
    # The engine is usable afterwards: nothing was left locked or open.
    with session_scope(any_engine) as session:
        add_state(session, "next")
    assert stored_keys(any_engine) == ["next"]


def test_session_scope_takes_a_sessionmaker(any_engine: Engine) -> None:
    with session_scope(sessionmaker(bind=any_engine)) as session:
        add_state(session, "via-sessionmaker")
    assert stored_keys(any_engine) == ["via-sessionmaker"]


def test_sqlite_refuses_a_row_that_points_at_no_customer(sqlite_engine: Engine) -> None:
    """SQLite checks foreign keys only when asked: every engine of ours asks."""
    with pytest.raises(IntegrityError, match="FOREIGN KEY"), session_scope(sqlite_engine) as s:
        s.add(Hold(customer_id="nobody", credits=1, expires_at=utcnow()))
        s.flush()
    with sqlite_engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar_one() == "wal"


def test_one_engine_per_url_per_process_until_disposed(tmp_path: object) -> None:
    url = f"sqlite:///{tmp_path}/engines.db"
    first = get_engine(url)
    assert get_engine(url) is first
    assert get_engine(f"sqlite:///{tmp_path}/other.db") is not first
    dispose_engines()
    assert get_engine(url) is not first
    dispose_engines()


def test_a_pooled_connection_whose_backend_was_terminated_is_replaced_at_checkout(
    pg_url: str, pg_engine: Engine
) -> None:
    """`make_engine` pings nothing (a round trip per checkout): the checkout sees from the
    socket that the backend is gone and hands out a new connection, so no caller gets the
    error (a PostgreSQL restart does the same to every idle connection)."""
    engine = make_engine(pg_url, pool_size=1, max_overflow=0)
    assert engine.pool._pre_ping is False  # type: ignore[attr-defined]
    statements: list[str] = []
    listen = sa_event.listens_for(engine, "before_cursor_execute")
    listen(lambda _c, _cur, statement, *_: statements.append(statement))
    with engine.connect() as conn:
        first = conn.scalar(select(func.pg_backend_pid()))
    with pg_engine.connect() as other:
        assert other.scalar(select(func.pg_terminate_backend(first)))
    wait_until_gone = 0
    while wait_until_gone < 100 and not backend_gone(_pooled_socket(engine)):
        time.sleep(0.01)
        wait_until_gone += 1
    with engine.connect() as conn:
        second = conn.scalar(select(func.pg_backend_pid()))
    assert second != first
    assert statements == ["SELECT pg_backend_pid() AS pg_backend_pid_1"] * 2  # no ping
    engine.dispose()


def _pooled_socket(engine: Engine) -> int:
    record = engine.pool._pool.queue[0]  # type: ignore[attr-defined]
    return int(record.dbapi_connection.pgconn.socket)


def database_error(engine: Engine, statement: str) -> DBAPIError:
    with engine.connect() as conn, pytest.raises(DBAPIError) as caught:
        conn.exec_driver_sql(statement)
    return caught.value


def test_a_missing_table_is_told_as_an_unmigrated_schema(pg_engine: Engine) -> None:
    exc = database_error(pg_engine, "SELECT * FROM no_such_table")
    message = describe_database_error(exc, "postgresql+psycopg://u:hunter2pw@db/outbox")
    assert message.startswith("the database schema is not migrated (")
    assert "no_such_table" in message and message.endswith("run `outbox db upgrade`")
    assert "\n" not in message


def test_a_missing_sqlite_table_is_told_as_an_unmigrated_schema(tmp_path: object) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/empty.db")
    message = describe_database_error(
        database_error(engine, "SELECT * FROM customers"), str(engine.url)
    )
    engine.dispose()
    assert "not migrated (no such table: customers)" in message


def test_any_other_database_error_names_the_database_without_its_password(
    pg_engine: Engine,
) -> None:
    exc = database_error(pg_engine, "SELECT 1/0")
    message = describe_database_error(exc, "postgresql+psycopg://u:hunter2pw@db/outbox")
    assert message == "database error (postgresql+psycopg://u:***@db/outbox): division by zero"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Free text (a driver's message) masks what looks like a URL's password, unknown URL.
        ("at postgresql://u@h/db?password=hunter2pass", "at postgresql://u@h/db?password=***"),
        (
            "h/db?sslmode=require&sslpassword=k3y&x=1 !",
            "h/db?sslmode=require&sslpassword=***&x=1 !",
        ),
        ("postgresql://u:s3cr@tpw@h:5432/db", "postgresql://u:***@h:5432/db"),
        (
            "redis://:pw@r:6379/0 and postgresql://u:p@q@h/db",
            "redis://:***@r:6379/0 and postgresql://u:***@h/db",
        ),
    ],
)
def test_redact_urls_masks_passwords_in_free_text(text: str, expected: str) -> None:
    from outbox.db import redact_urls

    assert redact_urls(text) == expected


def test_url_passwords_finds_query_passwords_as_written_and_decoded() -> None:
    from outbox.db import url_passwords

    found = url_passwords("postgresql+psycopg://u@h/db?sslmode=require&password=hunter%402pass")
    assert {"hunter%402pass", "hunter@2pass"} <= set(found)
    assert url_passwords("postgresql+psycopg://u@h/db?sslpassword=k3ypass") == ["k3ypass"]
