"""Request-scoped dependencies: one request = one transaction, and bearer-token auth."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AbstractContextManager
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.errors import error_body
from outbox.db import session_scope
from outbox.states import TokenScope
from outbox.tokens import TokenInfo, authenticate, hash_token

AFTER_COMMIT = "after_commit"
TOKEN_CACHE_SECONDS = 10.0


async def get_session(request: Request) -> AsyncIterator[Session]:
    """One transaction per request, committed BEFORE the response is sent (scope="function"),
    so a client never sees 201 for a deduction that did not commit.

    Async so that opening the session (no I/O: a Session connects on first use) costs no thread
    hand-off; the commit or rollback, and the after-commit hooks, run in the thread pool."""
    scope = session_scope(request.app.state.sessionmaker)
    session = scope.__enter__()
    try:
        yield session
    except BaseException as exc:
        await run_in_threadpool(scope.__exit__, type(exc), exc, exc.__traceback__)
        raise
    await run_in_threadpool(_commit_then_hooks, scope, session)


def _commit_then_hooks(scope: AbstractContextManager[Session], session: Session) -> None:
    scope.__exit__(None, None, None)
    for hook in session.info.get(AFTER_COMMIT, ()):
        hook()


SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def after_commit(session: Session, hook: Callable[[], None]) -> None:
    """Run `hook` once the request's transaction has committed (best-effort side effects)."""
    session.info.setdefault(AFTER_COMMIT, []).append(hook)


class TokenCache:
    """Token lookups cached for a few seconds: a revoked token stops working within 10 s."""

    def __init__(self, ttl: float = TOKEN_CACHE_SECONDS) -> None:
        self.ttl = ttl
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[float, TokenInfo | None]] = {}

    def cached(self, token: str) -> TokenInfo | None:
        """The token's info if a fresh lookup found it valid, without touching the database."""
        with self._lock:
            hit = self._entries.get(hash_token(token))
        if hit is not None and time.monotonic() - hit[0] < self.ttl:
            return hit[1]
        return None

    def lookup(self, session: Session, token: str) -> TokenInfo | None:
        info = self.cached(token)
        if info is not None:
            return info
        key = hash_token(token)
        now = time.monotonic()
        info = authenticate(session, token)
        with self._lock:
            if len(self._entries) > 10_000:
                self._entries.clear()
            self._entries[key] = (now, info)
        return info


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(
        status_code=401,
        detail=error_body("unauthorized", detail),
        headers={"WWW-Authenticate": "Bearer"},
    )


async def current_token(request: Request, session: SessionDep) -> TokenInfo:
    """The caller's token from `Authorization: Bearer <token>`; 401 if missing or unknown.

    Async with a cache-hit fast path: no thread hand-off unless the database must be asked."""
    header = request.headers.get("authorization")
    if not header:
        raise _unauthorized("missing Authorization header: use 'Authorization: Bearer <token>'")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > 200:
        raise _unauthorized("malformed Authorization header: use 'Authorization: Bearer <token>'")
    cache: TokenCache = request.app.state.token_cache
    info = cache.cached(token) or await run_in_threadpool(cache.lookup, session, token)
    if info is None:
        raise _unauthorized("invalid or revoked token")
    return info


def require(scope: TokenScope) -> Callable[[TokenInfo], Coroutine[Any, Any, TokenInfo]]:
    async def check(token: Annotated[TokenInfo, Depends(current_token)]) -> TokenInfo:
        if not token.allows(scope):
            raise HTTPException(
                status_code=403,
                detail=error_body("forbidden", f"this token lacks the {scope.value!r} scope"),
            )
        return token

    return check


UsageToken = Annotated[TokenInfo, Depends(require(TokenScope.USAGE))]
AdminToken = Annotated[TokenInfo, Depends(require(TokenScope.ADMIN))]
