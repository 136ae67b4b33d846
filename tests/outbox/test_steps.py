"""outbox/steps.py: one suite for both drivers of the same steps (as River's driver tests
do), the Session driver `run_steps` (PostgreSQL and SQLite) and the API's async driver
(`api.asyncdb.AsyncDatabase.run`, PostgreSQL): each yielded statement's first row (or None)
comes back at the `yield`; a statement that fails raises its error there, where the steps may
handle it (roll back, carry on) and still return their outcome; an error they do not handle
comes out of the driver. The Session driver commits nothing and never rolls back the
caller's transaction: ROLLBACK returns to a savepoint of its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, bindparam, event, func, insert, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from api.asyncdb import AsyncDatabase
from outbox.db import session_scope
from outbox.models import ServiceState, utcnow
from outbox.settings import load_settings
from outbox.steps import ROLLBACK, Query, Steps, run_steps, sqlstate

# Built once at import, as the async driver requires of every yielded statement.
_INSERT = (
    insert(ServiceState)
    .values(key=bindparam("key"), value=bindparam("value"), updated_at=bindparam("now"))
    .returning(ServiceState.key)
)
_VALUE = select(ServiceState.value).where(ServiceState.key == bindparam("key"))


def put(key: str, value: str) -> Query:
    return Query(_INSERT, {"key": key, "value": value, "now": utcnow()})


def value_of(key: str) -> Query:
    return Query(_VALUE, {"key": key})


def stored(engine: Engine) -> dict[str, str]:
    with session_scope(engine) as session:
        rows = session.execute(select(ServiceState.key, ServiceState.value))
        return {key: value for key, value in rows}


Drive = Callable[[Callable[[], Steps[Any]]], Any]


@pytest.fixture(params=["session-postgresql", "session-sqlite", "async-postgresql"])
def drive(request: pytest.FixtureRequest) -> Iterator[tuple[Engine, Drive]]:
    """(engine, drive): `drive(make_steps)` runs the steps in a transaction of their own on
    one driver and commits it, as the library's caller and the API each do."""
    driver, dialect = request.param.split("-")
    engine: Engine = request.getfixturevalue(
        "clean_tables" if dialect == "postgresql" else "sqlite_engine"
    )
    if driver == "session":

        def on_session(make_steps: Callable[[], Steps[Any]]) -> Any:
            with session_scope(engine) as session:
                return run_steps(session, make_steps(), savepoint=True)

        yield engine, on_session
        return
    url = engine.url.render_as_string(hide_password=False)
    loop = asyncio.new_event_loop()
    database = AsyncDatabase(load_settings(database_url=url), size=2)

    def on_connection(make_steps: Callable[[], Steps[Any]]) -> Any:
        return loop.run_until_complete(database.run(make_steps))

    yield engine, on_connection
    loop.run_until_complete(database.close())
    loop.close()


def claim_steps(key: str, value: str) -> Steps[str]:
    """Claim `key`; if it is taken, roll back and answer with the value that took it."""
    try:
        row = yield put(key, value)
    except (IntegrityError, psycopg.errors.UniqueViolation) as exc:  # Session's, async's
        yield ROLLBACK
        first = yield value_of(key)
        assert first is not None
        return f"taken ({sqlstate(exc)}): {first.value}"
    assert row is not None
    return f"claimed {row.key}"


def test_each_statement_answers_its_first_row_or_none(drive: tuple[Engine, Drive]) -> None:
    engine, run = drive

    def steps() -> Steps[tuple[Any, ...]]:
        missing = yield value_of("k")
        inserted = yield put("k", "v1")
        found = yield value_of("k")
        return (missing, tuple(inserted), tuple(found))

    assert run(steps) == (None, ("k",), ("v1",))
    assert stored(engine) == {"k": "v1"}


def test_a_failed_statement_raises_at_its_yield_and_the_steps_carry_on(
    drive: tuple[Engine, Drive],
) -> None:
    engine, run = drive
    assert run(lambda: claim_steps("k", "first")) == "claimed k"
    outcome = run(lambda: claim_steps("k", "second"))
    code = "23505" if engine.dialect.name == "postgresql" else None  # unique_violation
    assert outcome == f"taken ({code}): first"
    assert stored(engine) == {"k": "first"}


def test_an_error_the_steps_do_not_handle_comes_out_of_the_driver(
    drive: tuple[Engine, Drive],
) -> None:
    engine, run = drive

    def steps() -> Steps[None]:
        yield put("k", "a")
        yield put("k", "b")  # not caught

    with pytest.raises(IntegrityError):
        run(steps)
    assert stored(engine) == {}


def test_rollback_undoes_what_the_steps_wrote_and_answers_none(
    drive: tuple[Engine, Drive],
) -> None:
    engine, run = drive

    def steps() -> Steps[Any]:
        yield put("undone", "x")
        answer = yield ROLLBACK
        yield put("kept", "y")
        return answer

    assert run(steps) is None
    assert stored(engine) == {"kept": "y"}


def test_a_rollback_in_the_steps_never_undoes_the_callers_own_work(any_engine: Engine) -> None:
    """The library runs in someone else's transaction: what the caller wrote before the steps
    stays, whatever the steps roll back (they return to the driver's savepoint)."""
    with session_scope(any_engine) as session:
        assert run_steps(session, claim_steps("k", "first"), savepoint=True) == "claimed k"
    with session_scope(any_engine) as session:
        session.execute(_INSERT, {"key": "callers", "value": "own", "now": utcnow()})
        outcome = run_steps(session, claim_steps("k", "second"), savepoint=True)
        assert outcome.startswith("taken")
    assert stored(any_engine) == {"k": "first", "callers": "own"}


def test_steps_that_roll_back_are_refused_without_a_savepoint(any_engine: Engine) -> None:
    def steps() -> Steps[None]:
        yield ROLLBACK

    with Session(any_engine) as session:
        session.execute(_INSERT, {"key": "callers", "value": "own", "now": utcnow()})
        with pytest.raises(RuntimeError, match="savepoint=True"):
            run_steps(session, steps())
        session.commit()
    assert stored(any_engine) == {"callers": "own"}


def test_run_steps_commits_nothing_the_caller_rolls_back(any_engine: Engine) -> None:
    with Session(any_engine) as session:
        assert run_steps(session, claim_steps("k", "v"), savepoint=True) == "claimed k"
        session.rollback()
    assert stored(any_engine) == {}


def test_steps_that_ask_for_nothing_return_their_outcome() -> None:
    def steps() -> Steps[int]:
        return 42
        yield  # a generator nonetheless

    assert run_steps(Session(), steps()) == 42


def test_sqlstate_reads_the_code_of_a_wrapped_or_a_raw_error(clean_tables: Engine) -> None:
    def steps() -> Steps[None]:
        yield put("k", "a")
        yield put("k", "b")

    with pytest.raises(IntegrityError) as caught, session_scope(clean_tables) as session:
        run_steps(session, steps())
    assert sqlstate(caught.value) == "23505"
    assert caught.value.orig is not None and sqlstate(caught.value.orig) == "23505"  # psycopg's
    assert sqlstate(ValueError("no database here")) is None


# --- the Session driver on psycopg: raw on the Session's own connection --------------------------


@contextmanager
def sqlalchemy_statements(engine: Engine) -> Iterator[list[str]]:
    """What runs through SQLAlchemy's execute on `engine` (its `before_cursor_execute`)."""
    seen: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        seen.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", count)


def test_on_psycopg_the_steps_run_raw_on_the_sessions_own_connection(
    any_engine: Engine,
) -> None:
    """PostgreSQL + psycopg: each Query runs on the Session's DBAPI connection, in its
    transaction, without SQLAlchemy's execute; elsewhere (SQLite) through session.execute."""
    with sqlalchemy_statements(any_engine) as seen, session_scope(any_engine) as session:
        connection = session.connection().connection.driver_connection
        assert run_steps(session, claim_steps("k", "v"), savepoint=True) == "claimed k"
        assert session.connection().connection.driver_connection is connection
    statements = [s for s in seen if "service_state" in s]
    if any_engine.dialect.name == "postgresql":
        assert statements == []
    else:
        assert len(statements) == 1
    assert stored(any_engine) == {"k": "v"}


def test_the_steps_see_the_callers_unflushed_orm_rows(any_engine: Engine) -> None:
    """`session.execute` flushes pending ORM changes first (autoflush): so does the raw
    driver, so a statement sees a row the caller added but did not flush."""
    with session_scope(any_engine) as session:
        session.add(ServiceState(key="pending", value="unflushed", updated_at=utcnow()))
        row = run_steps(session, (lambda: (yield value_of("pending")))())
        assert row is not None and row.value == "unflushed"
    assert stored(any_engine) == {"pending": "unflushed"}


def test_a_callers_rollback_undoes_what_the_steps_wrote(any_engine: Engine) -> None:
    """The steps run inside the caller's transaction: its ROLLBACK (not theirs) undoes them,
    and the same Session carries on in a new transaction."""
    with Session(any_engine) as session:
        session.execute(_INSERT, {"key": "callers", "value": "own", "now": utcnow()})
        assert run_steps(session, claim_steps("k", "v")) == "claimed k"
        session.rollback()
        assert run_steps(session, claim_steps("k2", "v2")) == "claimed k2"
        session.commit()
    assert stored(any_engine) == {"k2": "v2"}


def test_on_psycopg_errors_are_sqlalchemys_classes(clean_tables: Engine) -> None:
    """A failed statement raises SQLAlchemy's IntegrityError (psycopg's error as `.orig`), as
    session.execute did: callers and steps catch the same classes whichever driver ran it."""

    def steps() -> Steps[type[BaseException]]:
        yield put("k", "a")
        try:
            yield put("k", "b")
        except psycopg.Error:
            return psycopg.Error  # the raw error must not reach the steps
        except IntegrityError as exc:
            assert isinstance(exc.orig, psycopg.errors.UniqueViolation)
            return IntegrityError
        return type(None)

    with Session(clean_tables) as session:
        assert run_steps(session, steps()) is IntegrityError
        session.rollback()


def test_on_psycopg_a_lost_connection_is_invalidated_and_the_next_session_works(
    clean_tables: Engine,
) -> None:
    """A connection whose backend is gone raises SQLAlchemy's OperationalError marked
    `connection_invalidated` (as session.execute does), and is not returned to the pool."""
    with Session(clean_tables) as session:
        pid = run_steps(session, (lambda: (yield Query(_BACKEND_PID, {})))())[0]
        with clean_tables.connect() as other:
            other.execute(select(func.pg_terminate_backend(pid)))
        with pytest.raises(OperationalError) as caught:
            run_steps(session, (lambda: (yield value_of("k")))())
        assert caught.value.connection_invalidated
        session.rollback()
    with session_scope(clean_tables) as session:
        assert run_steps(session, claim_steps("k", "v")) == "claimed k"
    assert stored(clean_tables) == {"k": "v"}


_BACKEND_PID = select(func.pg_backend_pid())
