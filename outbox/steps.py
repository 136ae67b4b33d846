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
  (`savepoint=True`, required of steps that may yield ROLLBACK).
- `api.asyncdb.AsyncDatabase.run`: on psycopg's async connection, in a transaction of its own
  (or autocommit), where ROLLBACK rolls that transaction back.
tests/outbox/test_steps.py runs the same steps on both.

Only statements built once at import (module constants) are yielded: the async driver compiles
each statement once and keeps it by identity.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, Generic, TypeVar

from sqlalchemy import Row
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

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
    here). A statement's database error is raised inside the steps, at their `yield`: they may
    handle it. Steps that may `yield ROLLBACK` need `savepoint=True`: they then run inside a
    SAVEPOINT, and ROLLBACK returns to it (the caller's earlier work stays)."""
    pump = Pump(steps)
    if not savepoint:
        _drive(session, pump, in_savepoint=False)
        return pump.result
    while True:
        try:
            with session.begin_nested():
                _drive(session, pump, in_savepoint=True)
                return pump.result
        except _RollbackAsked:
            pump.answer(None)


def _drive(session: Session, pump: Pump[Any], *, in_savepoint: bool) -> None:
    while (step := pump.step) is not None:
        if not isinstance(step, Query):
            if in_savepoint:
                raise _RollbackAsked
            raise RuntimeError(
                "steps yielded ROLLBACK: run them with run_steps(..., savepoint=True)"
            )
        try:
            row: Row[Any] | None = session.execute(step.statement, dict(step.params)).first()
        except DBAPIError as exc:
            pump.fail(exc)
        else:
            pump.answer(row)
