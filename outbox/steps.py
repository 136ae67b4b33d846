"""A unit of work written once, run by either driver: the caller's sync Session or the API's
async connection (issue 13).

A *steps* function is a generator that yields what it needs from the database and receives the
answer: `row = yield Query(statement, params)` gets the statement's first row (or None), and
`yield ROLLBACK` rolls the transaction back (the next query starts a new one). It decides
everything else itself and returns (or raises) the outcome. `run_steps` drives one on a
SQLAlchemy Session, in the caller's transaction, as every library call does; the API's hot
route drives the same generator on psycopg's async connection (`api.fastpath`), so the SQL and
the decisions are the same code on both paths.

Only statements built once at import (module constants) are yielded: the async driver compiles
each statement once and keeps it by identity.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from sqlalchemy import Row
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


def run_steps(session: Session, steps: Steps[T]) -> T:
    """Drive `steps` on `session` (no commit: the caller's transaction)."""
    answer: Row[Any] | None = None
    while True:
        try:
            step = steps.send(answer)
        except StopIteration as done:
            result: T = done.value
            return result
        if isinstance(step, Query):
            answer = session.execute(step.statement, dict(step.params)).first()
        else:
            session.rollback()
            answer = None
