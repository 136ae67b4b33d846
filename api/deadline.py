"""A deadline per request on its database work, kept by the application whatever the network
does (docs/explanation/guarantees.md).

PostgreSQL's own timeouts (`lock_timeout`, `statement_timeout`) end a wait only if the server's
answer can reach us, and TCP keepalives only notice a peer that is gone: a stuck pooler or a
network that stops forwarding while still acknowledging every byte leaves a request waiting on
its socket for ever. So every request gets a `RequestDeadline`, which starts at its first
database connection: when it runs out, the socket of every connection the request holds is
shut down (`shutdown(2)`, not `close`: the driver still owns the descriptor), so the driver's
wait ends at once with an error and the request answers 503. Both paths register their
connections: the sync engine's pool through its checkout/checkin events
(`install_request_deadlines`), the async connections of POST /v1/usage in `api.asyncdb`.

Whether the request may have been recorded is known from one fact: a COMMIT (or, in autocommit,
a writing statement) was sent and its answer never came. Then the answer is 503
`outcome_unknown` and the client retries with the same `Idempotency-Key`; otherwise nothing was
recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import weakref
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger("api")


class RequestDeadline:
    """One request's deadline on its database work, and whether a commit of it is in flight.
    Thread-safe: a sync route's connections are watched from threadpool threads, the deadline
    fires on the event loop."""

    def __init__(self, seconds: float, loop: asyncio.AbstractEventLoop | None) -> None:
        self.seconds = seconds
        self.expired = False
        self.committing = False  # a commit was sent and has not returned
        self._loop = loop
        self._lock = threading.Lock()
        self._sockets: dict[int, int] = {}  # descriptor -> its socket's inode
        self._timer: asyncio.TimerHandle | None = None
        self._armed = False

    @classmethod
    def none(cls) -> RequestDeadline:
        """A deadline that never fires (work outside a request: tests, scripts)."""
        return cls(float("inf"), None)

    def watch(self, fd: int) -> None:
        """A connection's socket is the request's from now on; the first starts the clock.
        Past the deadline, a new connection is cut at once (the request's time is spent)."""
        inode = _inode(fd)
        with self._lock:
            if self.expired:
                _shut(fd, inode)
                return
            self._sockets[fd] = inode
            arm, self._armed = not self._armed, True
        if arm and self._loop is not None:
            if _on_loop(self._loop):
                self._arm()
            else:
                self._loop.call_soon_threadsafe(self._arm)

    def unwatch(self, fd: int) -> None:
        with self._lock:
            self._sockets.pop(fd, None)

    def _arm(self) -> None:
        if not self.expired and self._timer is None and self._loop is not None:
            self._timer = self._loop.call_later(self.seconds, self.expire)

    def expire(self) -> None:
        """The deadline ran out: end every wait on the request's connections now."""
        with self._lock:
            self.expired = True
            sockets, self._sockets = self._sockets, {}
        if sockets:
            log.warning(
                "a request's database work passed its %g s deadline: %d connection(s) cut",
                self.seconds,
                len(sockets),
            )
        for fd, inode in sockets.items():
            _shut(fd, inode)

    def cancel(self) -> None:
        """The request is over."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _inode(fd: int) -> int:
    try:
        return os.fstat(fd).st_ino
    except OSError:
        return -1


def _shut(fd: int, inode: int) -> None:
    """Shut the socket down for both directions: a read on it returns at once (EOF), a write
    fails. The descriptor stays its driver's to close. Only if it is still the same socket:
    libpq closes the descriptor of a connection it finds lost, and the number may be reused."""
    if inode < 0 or _inode(fd) != inode:
        return
    with contextlib.suppress(OSError):
        sock = socket.socket(fileno=fd)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        finally:
            sock.detach()  # not ours: never close it


current_deadline: ContextVar[RequestDeadline | None] = ContextVar("request_deadline", default=None)


class RequestDeadlines:
    """ASGI middleware: a `RequestDeadline` for every HTTP request (`current_deadline`)."""

    def __init__(self, app: ASGIApp, seconds: Callable[[], float]) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = RequestDeadline(self.seconds(), asyncio.get_running_loop())
        token = current_deadline.set(deadline)
        try:
            await self.app(scope, receive, send)
        finally:
            deadline.cancel()
            current_deadline.reset(token)


_installed: weakref.WeakSet[Engine] = weakref.WeakSet()


def install_request_deadlines(engine: Engine) -> None:
    """The sync path (PostgreSQL): each connection checked out during a request is watched by
    its deadline until it is checked in; a COMMIT sent is `committing` until it returned.
    Once per engine (an engine may serve several apps: tests)."""
    if engine in _installed:
        return
    _installed.add(engine)

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        deadline = current_deadline.get()
        if deadline is not None:
            fd = dbapi_connection.pgconn.socket
            record.info["deadline"] = (deadline, fd)
            deadline.watch(fd)

    def forget(record: Any) -> None:
        watched = record.info.pop("deadline", None) if record is not None else None
        if watched is not None:
            deadline, fd = watched
            deadline.unwatch(fd)

    # Checked in, or invalidated or closed before that (its descriptor is about to go).
    event.listen(engine, "checkin", lambda _dbapi, record: forget(record))
    event.listen(engine, "invalidate", lambda _dbapi, record, _exc: forget(record))
    event.listen(engine, "close", lambda _dbapi, record: forget(record))

    @event.listens_for(engine, "commit")
    def _commit(_connection: Any) -> None:
        deadline = current_deadline.get()
        if deadline is not None:
            deadline.committing = True


@event.listens_for(Session, "after_commit")
def _committed(_session: Session) -> None:
    """A request's COMMIT returned (any session: it matters only inside a request)."""
    deadline = current_deadline.get()
    if deadline is not None:
        deadline.committing = False
