"""Statements compiled once for psycopg, and psycopg's errors as SQLAlchemy raises them: what
the two raw drivers of `outbox.steps` share (the Session's own psycopg connection in
`outbox.steps.run_steps`, the API's async connections in `api.asyncdb`).

A steps statement is a module constant (`outbox.steps`), so it is compiled on its first use
and kept by identity: each later call is a dict lookup, its parameters put through the bind
processors of their types (JSONB), and `cursor.execute(sql, params)`, with none of
SQLAlchemy's per-execution machinery (docs/explanation/request-path.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from sqlalchemy.dialects.postgresql import psycopg as pg_psycopg
from sqlalchemy.exc import DBAPIError

DIALECT = pg_psycopg.dialect()  # type: ignore[no-untyped-call]
"""SQLAlchemy's PostgreSQL + psycopg dialect: what every statement here is compiled for."""


@dataclass(frozen=True)
class Compiled:
    """A statement compiled once for psycopg: its SQL, the constants SQLAlchemy bound, and the
    bind processors of its typed parameters (JSONB)."""

    sql: str
    constants: dict[str, Any]
    processors: dict[str, Callable[[Any], Any]]
    statement: Any  # kept alive: the cache is keyed by its id()

    @classmethod
    def of(cls, statement: Any) -> Compiled:
        """`statement` compiled for psycopg (named `%(name)s` parameters)."""
        compiled = statement.compile(dialect=DIALECT)
        processors = {}
        for name, bind in compiled.binds.items():
            processor = bind.type.dialect_impl(DIALECT).bind_processor(DIALECT)
            if processor is not None:
                processors[name] = processor
        constants = {k: v for k, v in compiled.params.items() if not k.startswith("p_")}
        return cls(compiled.string, constants, processors, statement)

    def params(self, given: Any) -> dict[str, Any]:
        """The parameters psycopg is given: the constants, then `given`, each processed."""
        params = {**self.constants, **given}
        for name, processor in self.processors.items():
            if name in params:
                params[name] = processor(params[name])
        return params


_compiled: dict[int, Compiled] = {}


def compile_once(statement: Any) -> Compiled:
    """`statement` compiled for psycopg, once per statement object (a module constant)."""
    compiled = _compiled.get(id(statement))
    if compiled is None:
        compiled = _compiled[id(statement)] = Compiled.of(statement)
    return compiled


def translated(
    exc: psycopg.Error,
    sql: str | None = None,
    params: Any = None,
    *,
    connection_invalidated: bool = False,
) -> DBAPIError:
    """psycopg's error as SQLAlchemy's engine raises it (`IntegrityError`, `OperationalError`,
    ... wrapping it as `.orig`), so callers and steps see one set of exception classes
    whichever driver ran the statement (and `api.errors` maps them)."""
    error = DBAPIError.instance(
        sql,
        params,
        exc,
        psycopg.Error,
        connection_invalidated=connection_invalidated,
        dialect=DIALECT,
    )
    assert isinstance(error, DBAPIError)  # psycopg.Error is a DBAPI error
    return error
