"""A unit of work written once, run by either driver: the caller's sync Session or the API's
async connection (docs/explanation/request-path.md).

A *steps* function is a generator that yields what it needs from the database and receives the
answer: `row = yield Query(statement, params)` gets the statement's first row (or None), and
`yield ROLLBACK` undoes what the steps wrote so far (the next query starts afresh). A statement
that fails raises its error at the `yield`, where the steps may catch it. They decide
everything else themselves and return (or raise) the outcome.

The two drivers share one small interface, as Procrastinate's connectors and River's drivers
do: `Pump` holds what driving a generator means (start, send a row, throw an error, collect
the outcome), so a driver only says how it runs a `Query` and what ROLLBACK undoes.
- `run_steps` (here): on a SQLAlchemy Session, in the caller's transaction, never committing
  it and never rolling it back: ROLLBACK returns to a savepoint the driver opened
  (`savepoint=True`, required of steps that may yield ROLLBACK). On PostgreSQL with psycopg
  each Query runs raw on the Session's own connection (`_PsycopgDriver`, the statements
  compiled once as the async driver's: `outbox.compiled`); elsewhere (SQLite) through
  `session.execute`.
- `api.asyncdb.AsyncDatabase.run`: on psycopg's async connection, in a transaction of its own
  (or autocommit), where ROLLBACK rolls that transaction back.
tests/outbox/test_steps.py runs the same steps on both.

Only statements built once at import (module constants) are yielded: the raw drivers compile
each statement once and keep it by identity.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, Generic, TypeVar

import psycopg
from psycopg.rows import namedtuple_row
from sqlalchemy import Row
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from outbox.compiled import compile_once, translated

T = TypeVar("T")


@dataclass(frozen=True)
class Query:
    """Run `statement` with `params` and send back its first row (None if it returned none)."""

    statement: Any
    params: Mapping[str, Any]


class _Rollback:
    def __repr__(self) -> str:
        return "ROLLBACK"


ROLLBACK: Final = _Rollback()
"""Roll the transaction back; the driver sends back None."""

Step = Query | _Rollback
Steps = Generator[Step, Any, T]


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a database error, raised by psycopg or wrapped by SQLAlchemy."""
    code = getattr(getattr(exc, "orig", exc), "sqlstate", None)
    return code if isinstance(code, str) else None


class Pump(Generic[T]):
    """Drives one steps generator: `step` is what it asks for next (None once it has
    returned, its outcome then in `result`); `answer(row)` or `fail(error)` replies."""

    def __init__(self, steps: Steps[T]) -> None:
        self._steps = steps
        self.step: Step | None = None
        self.result: T
        self._advance(partial(steps.send, None))

    def _advance(self, reply: Callable[[], Step]) -> None:
        try:
            self.step = reply()
        except StopIteration as done:
            self.step = None
            self.result = done.value

    def answer(self, row: Any) -> None:
        """Send the step's answer (a row, or None); the steps run to their next step."""
        self._advance(partial(self._steps.send, row))

    def fail(self, error: BaseException) -> None:
        """Raise `error` at the step's `yield`; the steps may handle it and carry on."""
        self._advance(partial(self._steps.throw, error))


class _RollbackAsked(Exception):
    """Raised out of a savepoint's block to roll back to it."""


def run_steps(session: Session, steps: Steps[T], *, savepoint: bool = False) -> T:
    """Drive `steps` on `session`, in the caller's transaction (never committed nor rolled back
    here). A statement's database error is raised inside the steps, at their `yield`, as
    SQLAlchemy's exception class: they may handle it. Steps that may `yield ROLLBACK` need
    `savepoint=True`: they then run inside a SAVEPOINT, and ROLLBACK returns to it (the
    caller's earlier work stays).

    On PostgreSQL with psycopg each Query runs on the Session's own connection, in the
    transaction the Session began (`_PsycopgDriver`): compiled once, executed raw. Elsewhere
    (SQLite) through `session.execute`."""
    pump = Pump(steps)
    if pump.step is None:
        return pump.result
    run_query = _query_runner(session)
    if not savepoint:
        _drive(run_query, pump, in_savepoint=False)
        return pump.result
    while True:
        try:
            with session.begin_nested():
                session.connection()  # the SAVEPOINT: a nested transaction begins lazily
                _drive(run_query, pump, in_savepoint=True)
                return pump.result
        except _RollbackAsked:
            pump.answer(None)


RunQuery = Callable[[Query], Any]


def _query_runner(session: Session) -> RunQuery:
    dialect = session.get_bind().dialect
    if dialect.name == "postgresql" and dialect.driver == "psycopg":
        return _PsycopgDriver(session).run
    return partial(_run_on_session, session)


def _run_on_session(session: Session, query: Query) -> Row[Any] | None:
    return session.execute(query.statement, dict(query.params)).first()


class _PsycopgDriver:
    """Runs each Query on the Session's own psycopg connection, inside the transaction the
    Session began (psycopg's implicit BEGIN is the Session's; its COMMIT or ROLLBACK stays the
    caller's), with the SQL compiled once (`outbox.compiled`): the per-call Python of the
    API's async driver, not SQLAlchemy's execution machinery. What `session.execute` would do
    first is done first: pending ORM changes are flushed (autoflush), so the statements see
    the caller's new rows. Errors are raised as SQLAlchemy's; a lost connection is
    invalidated as the Session's own execute does it."""

    __slots__ = ("connection", "driver_connection")

    def __init__(self, session: Session) -> None:
        if session.autoflush and (session.new or session.dirty or session.deleted):
            session.flush()
        self.connection = session.connection()
        self.driver_connection: psycopg.Connection[Any] = (
            self.connection.connection.driver_connection  # type: ignore[assignment]
        )

    def run(self, query: Query) -> Any:
        compiled = compile_once(query.statement)
        params = compiled.params(query.params)
        try:
            with self.driver_connection.cursor(row_factory=namedtuple_row) as cursor:
                cursor.execute(compiled.sql, params)
                return cursor.fetchone()
        except psycopg.Error as exc:
            lost = self.connection.dialect.is_disconnect(
                exc,  # type: ignore[arg-type]  # psycopg's, the dialect's DBAPI
                self.connection.connection,
                None,
            )
            if lost:
                self.connection.invalidate(exc)
            raise translated(exc, compiled.sql, params, connection_invalidated=lost) from exc


def _drive(run_query: RunQuery, pump: Pump[Any], *, in_savepoint: bool) -> None:
    while (step := pump.step) is not None:
        if not isinstance(step, Query):
            if in_savepoint:
                raise _RollbackAsked
            raise RuntimeError(
                "steps yielded ROLLBACK: run them with run_steps(..., savepoint=True)"
            )
        try:
            row = run_query(step)
        except DBAPIError as exc:
            pump.fail(exc)
        else:
            pump.answer(row)
