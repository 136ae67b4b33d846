"""outbox/steps.py, the Session driver: each yielded statement's first row (or None) comes
back at the `yield`; a statement that fails raises its error there, where the steps may
handle it (roll back, carry on) and still return their outcome; an error they do not handle
leaves `run_steps` unchanged; nothing is committed (the caller's transaction).

The same steps on the API's async driver: tests/api/test_usage_paths.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Engine, bindparam, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from outbox.db import session_scope
from outbox.models import ServiceState, utcnow
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


def claim_steps(key: str, value: str) -> Steps[str]:
    """Claim `key`; if it is taken, roll back and answer with the value that took it."""
    try:
        row = yield put(key, value)
    except IntegrityError as exc:
        yield ROLLBACK
        first = yield value_of(key)
        assert first is not None
        return f"taken ({sqlstate(exc)}): {first.value}"
    assert row is not None
    return f"claimed {row.key}"


def test_each_statement_answers_its_first_row_or_none(any_engine: Engine) -> None:
    def steps() -> Steps[tuple[Any, ...]]:
        missing = yield value_of("k")
        inserted = yield put("k", "v1")
        found = yield value_of("k")
        return (missing, tuple(inserted), tuple(found))

    with session_scope(any_engine) as session:
        assert run_steps(session, steps()) == (None, ("k",), ("v1",))
    assert stored(any_engine) == {"k": "v1"}


def test_a_failed_statement_raises_at_its_yield_and_the_steps_carry_on(
    any_engine: Engine,
) -> None:
    with session_scope(any_engine) as session:
        assert run_steps(session, claim_steps("k", "first")) == "claimed k"
    with session_scope(any_engine) as session:
        outcome = run_steps(session, claim_steps("k", "second"))
    code = "23505" if any_engine.dialect.name == "postgresql" else None  # unique_violation
    assert outcome == f"taken ({code}): first"
    assert stored(any_engine) == {"k": "first"}


def test_an_error_the_steps_do_not_handle_comes_out_of_run_steps(any_engine: Engine) -> None:
    def steps() -> Steps[None]:
        yield put("k", "a")
        yield put("k", "b")  # not caught

    with pytest.raises(IntegrityError), session_scope(any_engine) as session:
        run_steps(session, steps())
    assert stored(any_engine) == {}


def test_rollback_undoes_what_came_before_it_and_answers_none(any_engine: Engine) -> None:
    def steps() -> Steps[Any]:
        yield put("undone", "x")
        answer = yield ROLLBACK
        yield put("kept", "y")
        return answer

    with session_scope(any_engine) as session:
        assert run_steps(session, steps()) is None
    assert stored(any_engine) == {"kept": "y"}


def test_run_steps_commits_nothing_the_caller_rolls_back(any_engine: Engine) -> None:
    with Session(any_engine) as session:
        assert run_steps(session, claim_steps("k", "v")) == "claimed k"
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
