"""POST /v1/usage on PostgreSQL without a thread: the route's unit of work (the steps of
`outbox.idempotency.http_usage_steps`) driven on psycopg's async connections
(docs/explanation/request-path.md).

The library keeps its sync Session (`record_usage` in the caller's transaction); the steps are
the same generator, with the same statements (compiled once for psycopg: `outbox.compiled`)
and the same decisions. What a request could wait for is bounded as on the sync engine
(`outbox.db.make_request_engine`): the same `lock_timeout`, `statement_timeout` and
`idle_in_transaction_session_timeout` per connection, and at most
OUTBOX_API_POOL_TIMEOUT_SECONDS for a free connection. Errors leave as the sync engine's
(SQLAlchemy's exception classes wrapping psycopg's), so `api.errors` answers them with the same
503 codes.

The pool is small and deliberate rather than psycopg_pool's: that one connects in background
workers, so with PostgreSQL down a request waits its whole timeout and gets `PoolTimeout`,
which cannot be told from "every connection is busy". Here, as in SQLAlchemy's QueuePool, the
request that needs a new connection opens it itself: PostgreSQL down is an immediate
`database_unavailable`, every connection busy is `overloaded` after the timeout. An idle
connection whose socket has something to read has lost its backend (`_alive`, no round trip)
and is dropped; a connection found broken drops every idle one opened before it (a restart
killed them all), and a transaction whose connection broke before its COMMIT was sent is run
again once on a fresh connection: PostgreSQL rolled it back, so nothing was recorded. A COMMIT
that fails is never retried (it may have committed): the request answers 503 and the client
retries with its Idempotency-Key. A usage without a key runs in autocommit, one round trip
(`run(..., autocommit=True)`): its statement is its commit, and is not retried either.
"""

from __future__ import annotations

import asyncio
import logging
import select
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg
from psycopg.pq import TransactionStatus
from psycopg.rows import namedtuple_row
from sqlalchemy.engine import make_url
from sqlalchemy.exc import TimeoutError as PoolTimeout

from api.deadline import RequestDeadline, current_deadline
from outbox.compiled import compile_once, translated
from outbox.db import (
    API_APPLICATION_NAME,
    api_connect_timeout,
    api_connection_split,
    request_session_options,
)
from outbox.settings import Settings
from outbox.steps import Pump, Query, Steps

log = logging.getLogger("api")

T = TypeVar("T")
Connection = psycopg.AsyncConnection[Any]


def libpq_conninfo(url: str) -> str:
    """A libpq URL for a SQLAlchemy one (`postgresql+psycopg://` → `postgresql://`)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class AsyncDatabase:
    """At most `size` psycopg async connections of one event loop (the API process's; by
    default its share of OUTBOX_API_DATABASE_CONNECTIONS, `outbox.db.api_connection_split`),
    each bounded as the sync request engine's, and `run`, which drives steps in one
    transaction."""

    def __init__(self, settings: Settings, *, size: int | None = None) -> None:
        self._conninfo = libpq_conninfo(settings.database_url)
        self._options = request_session_options(settings)
        self._timeout = settings.outbox_api_pool_timeout_seconds
        self._connect_timeout = api_connect_timeout(settings)
        self._slots = asyncio.Semaphore(size or api_connection_split(settings)[1])
        self._idle: list[tuple[Connection, int]] = []
        self._generation = 0  # bumped when a connection is found broken
        self._closed = False
        # Called with the connection just before COMMIT (fault-injection tests).
        self.before_commit: list[Callable[[Connection], Awaitable[None]]] = []

    async def close(self) -> None:
        """Close the idle connections; those in use are closed when their request ends."""
        self._closed = True
        idle, self._idle = self._idle, []
        for connection, _ in idle:
            await connection.close()

    async def run(self, make_steps: Callable[[], Steps[T]], *, autocommit: bool = False) -> T:
        """`make_steps()` driven in one transaction, committed before this returns. Raises what
        the steps raise (the transaction rolled back), or SQLAlchemy's database errors.

        `autocommit`: each statement is its own transaction, one round trip with no BEGIN and
        no COMMIT. Only for steps whose every statement is atomic on its own (nothing one
        writes needs undoing by a later one) and whose ROLLBACK only follows a failed statement:
        POST /v1/usage's (`outbox.idempotency.http_usage_steps`). Each statement then is its
        commit: PostgreSQL commits it before it answers, and a connection lost during one is
        never retried."""
        deadline = current_deadline.get() or RequestDeadline.none()
        for attempt in (1, 2):
            connection, generation = await self._checkout()
            fd = connection.pgconn.socket
            deadline.watch(fd)
            committing = autocommit
            try:
                if connection.autocommit != autocommit:
                    await connection.set_autocommit(autocommit)
                if autocommit:
                    for hook in self.before_commit:
                        await hook(connection)
                result = await _drive(connection, make_steps(), deadline)
                if not autocommit:
                    for hook in self.before_commit:
                        await hook(connection)
                    committing = deadline.committing = True
                    await connection.commit()
                    deadline.committing = False
                return result
            except psycopg.Error as exc:
                if connection.broken:
                    self._generation += 1  # the idle connections opened before it: dropped
                    if attempt == 1 and not committing and not deadline.expired:
                        log.warning("a database connection was lost mid-request; retrying once")
                        continue
                raise translated(exc) from exc
            finally:
                deadline.unwatch(fd)
                await self._checkin(connection, generation)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _checkout(self) -> tuple[Connection, int]:
        if self._slots.locked():
            try:
                async with asyncio.timeout(self._timeout):
                    await self._slots.acquire()
            except TimeoutError:
                raise PoolTimeout("every database connection of this process is busy") from None
        else:
            await self._slots.acquire()
        try:
            while self._idle:
                connection, generation = self._idle.pop()
                if generation == self._generation and _alive(connection):
                    return connection, generation
                await connection.close()
            generation = self._generation
            return await self._connect(), generation
        except BaseException as exc:
            self._slots.release()
            if isinstance(exc, psycopg.Error):
                raise translated(exc) from exc
            raise

    async def _connect(self) -> Connection:
        return await psycopg.AsyncConnection.connect(
            self._conninfo,
            options=self._options,
            application_name=API_APPLICATION_NAME,
            connect_timeout=self._connect_timeout,
            row_factory=namedtuple_row,
        )

    async def _checkin(self, connection: Connection, generation: int) -> None:
        try:
            status = connection.info.transaction_status
            keep = (
                not connection.broken
                and not self._closed
                and generation == self._generation
                and status != TransactionStatus.ACTIVE  # a query in flight: cancelled mid-way
            )
            if keep and status != TransactionStatus.IDLE:
                try:
                    await connection.rollback()
                except psycopg.Error:
                    keep = False
            if keep:
                self._idle.append((connection, generation))
            else:
                await connection.close()
        except BaseException:
            # Cancelled mid-request (shutdown, a client gone): the connection's state is
            # unknown; drop it without waiting on it.
            connection.pgconn.finish()
            raise
        finally:
            self._slots.release()


def _alive(connection: Connection) -> bool:
    """Whether an idle connection is still usable, without a round trip. An idle connection
    (it LISTENs to nothing) has nothing to read unless its backend is gone: a restart or
    `pg_terminate_backend` sends a FATAL and closes the socket, which makes it readable."""
    if connection.broken:
        return False
    poller = select.poll()
    poller.register(connection.pgconn.socket, select.POLLIN)
    return not poller.poll(0)


async def _drive(connection: Connection, steps: Steps[T], deadline: RequestDeadline) -> T:
    """The async driver of `outbox.steps` (the sync one is `run_steps`): each Query on the
    connection, ROLLBACK rolls this transaction back. In autocommit each statement is its own
    commit: `deadline.committing` while it is in flight (its answer says what it did)."""
    pump = Pump(steps)
    while (step := pump.step) is not None:
        if not isinstance(step, Query):
            if not connection.autocommit:  # in autocommit, the failed statement was undone
                await connection.rollback()
            pump.answer(None)
            continue
        compiled = compile_once(step.statement)
        deadline.committing = connection.autocommit
        try:
            cursor = await connection.execute(compiled.sql, compiled.params(step.params))
            answer = await cursor.fetchone()
        except psycopg.Error as exc:
            if connection.broken:
                raise  # not the steps' to handle: `run` decides
            deadline.committing = False  # the server answered: it failed, wholly
            pump.fail(exc)
            continue
        deadline.committing = False
        pump.answer(answer)
    return pump.result
