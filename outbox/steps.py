"""A unit of work written once, run by either driver: the caller's sync Session or the API's
async connection (docs/explanation/request-path.md).

A *steps* function is a generator that yields what it needs from the database and receives the
answer: `row = yield Query(statement, params)` gets the statement's first row (or None), and
`yield ROLLBACK` rolls the transaction back (the next query starts a new one). A statement
that fails raises its error at the `yield`, where the steps may catch it. They decide
everything else themselves and return (or raise) the outcome. `run_steps` drives one on a
SQLAlchemy Session, in the caller's transaction, as every library call does; the API's hot
route drives the same generator on psycopg's async connection (`api.asyncdb`), so the SQL and
the decisions are the same code on both paths.

Only statements built once at import (module constants) are yielded: the async driver compiles
each statement once and keeps it by identity.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, TypeVar

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


def run_steps(session: Session, steps: Steps[T]) -> T:
    """Drive `steps` on `session` (no commit: the caller's transaction). A statement's
    database error is raised inside the steps, at their `yield`: they may handle it."""
    reply: Callable[[], Step] = partial(steps.send, None)
    while True:
        try:
            step = reply()
        except StopIteration as done:
            result: T = done.value
            return result
        if isinstance(step, Query):
            try:
                row: Row[Any] | None = session.execute(step.statement, dict(step.params)).first()
            except DBAPIError as exc:
                reply = partial(steps.throw, exc)
            else:
                reply = partial(steps.send, row)
        else:
            session.rollback()
            reply = partial(steps.send, None)
