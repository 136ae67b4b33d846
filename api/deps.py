"""Request-scoped dependencies: one request = one transaction, and bearer-token auth.

The rule that keeps the API from hanging: a request never holds a transaction (or a row lock)
while it waits for anything but the database. The session dependency commits when the route
function returns (scope="function"), BEFORE the response is sent, so 201 means recorded; and a
route that takes `SessionDep` returns a Response it rendered itself (`respond`). Returning a
model instead would make FastAPI validate it in ANOTHER threadpool thread while the transaction
is still open: with every thread waiting for that transaction's row lock, nothing moves again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Annotated, TypeVar

from fastapi import Depends, HTTPException, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from api.schemas import error_body
from outbox.db import session_scope
from outbox.states import TokenScope
from outbox.tokens import (
    RevocationWatcher,
    TokenInfo,
    authenticate,
    authenticate_id,
    hash_token,
)

log = logging.getLogger("api")

AFTER_COMMIT = "after_commit"
T = TypeVar("T")


def get_session(request: Request) -> Iterator[Session]:
    """One transaction per request, committed when the route function returns and BEFORE the
    response is sent (scope="function"): a failed commit answers its error, never a 201. Then
    the after-commit hooks run; they are best effort and never fail the request."""
    with session_scope(request.app.state.sessionmaker) as session:
        yield session
    _after_commit(session)


def _after_commit(session: Session) -> None:
    for hook in session.info.get(AFTER_COMMIT, ()):
        try:
            hook()
        except Exception:
            log.exception("an after-commit hook failed (the request is recorded)")


SessionDep = Annotated[Session, Depends(get_session, scope="function")]


async def in_transaction(request: Request, work: Callable[[Session], T]) -> T:
    """`work(session)` in one transaction, committed (then the after-commit hooks run) before
    this returns: what `SessionDep` gives a sync route, in ONE threadpool hand-off instead of
    three (the dependency's enter, the route, the dependency's exit). For the hot route
    (POST /v1/usage), whose route function is async; measured in docs/benchmarks.md."""
    return await run_in_threadpool(_transaction, request.app.state.sessionmaker, work)


def _transaction(maker: sessionmaker[Session], work: Callable[[Session], T]) -> T:
    with session_scope(maker) as session:
        result = work(session)
    _after_commit(session)
    return result


def after_commit(session: Session, hook: Callable[[], None]) -> None:
    """Run `hook` once the request's transaction has committed (best-effort side effects)."""
    session.info.setdefault(AFTER_COMMIT, []).append(hook)


def respond(body: BaseModel, status_code: int = 200) -> JSONResponse:
    """The answer of a route that takes `SessionDep`, rendered in the route's own thread, so
    nothing runs between the route's return and the commit (see the module docstring)."""
    return JSONResponse(body.model_dump(mode="json"), status_code=status_code)


class TokenCache:
    """Token lookups, cached only while a `RevocationWatcher` vouches for them: a revocation
    empties the cache of every API process as it commits (LISTEN/NOTIFY). Without a live
    watcher (SQLite, no lifespan, connection lost) every lookup asks the database. An entry
    also expires after MAX_AGE seconds (a token changed by hand in SQL, never announced)."""

    MAX_AGE = 60.0

    def __init__(self) -> None:
        self.watcher: RevocationWatcher | None = None
        self._lock = threading.Lock()
        self._generation = 0
        self._entries: dict[str, tuple[int, float, TokenInfo]] = {}

    def forget(self) -> None:
        """Drop every cached lookup (a token was revoked, or the watcher reconnected)."""
        with self._lock:
            self._generation += 1
            self._entries.clear()

    def _trusted(self) -> bool:
        watcher = self.watcher
        return watcher is not None and watcher.trusted()

    def cached(self, token: str) -> TokenInfo | None:
        """A cache hit only (no database, no thread): the hot path."""
        return self._hit(hash_token(token))

    def _hit(self, key: str) -> TokenInfo | None:
        if not self._trusted():
            return None
        hit = self._entries.get(key)
        if hit is None or hit[0] != self._generation or time.monotonic() - hit[1] > self.MAX_AGE:
            return None
        return hit[2]

    def lookup(self, bind: Session | Engine, token: str) -> TokenInfo | None:
        """The token's info, or None if unknown or revoked. `bind`: a session to query in, or
        an engine to open a short one on (a lookup never holds the request's connection)."""
        return self._lookup(bind, hash_token(token), lambda s: authenticate(s, token))

    def lookup_id(self, bind: Session | Engine, token_id: int) -> TokenInfo | None:
        """The info of the token with this id, or None if unknown or revoked: a console
        session's check, cached and forgotten on revocation exactly like `lookup`."""
        return self._lookup(bind, f"id:{token_id}", lambda s: authenticate_id(s, token_id))

    def _lookup(
        self, bind: Session | Engine, key: str, ask: Callable[[Session], TokenInfo | None]
    ) -> TokenInfo | None:
        info = self._hit(key)
        if info is not None:
            return info
        trusted = self._trusted()
        generation = self._generation
        if isinstance(bind, Session):
            info = ask(bind)
        else:
            with Session(bind) as session:
                info = ask(session)
        if info is not None and trusted:
            with self._lock:
                # A revocation heard while we were asking: this answer may predate it.
                if generation == self._generation:
                    if len(self._entries) > 10_000:
                        self._entries.clear()
                    self._entries[key] = (generation, time.monotonic(), info)
        return info


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(
        status_code=401,
        detail=error_body("unauthorized", detail),
        headers={"WWW-Authenticate": "Bearer"},
    )


def bearer_token(header: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` header's value, None if malformed."""
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > 200:
        return None
    return token


def cached_token(request: Request, scope: TokenScope) -> TokenInfo | None:
    """The request's token if it is cached and allows `scope`, else None (no database, no
    thread): the hot route's check (`api.routes.usage`); anything else goes the way of
    `RequireScope`, which answers 401 or 403."""
    header = request.headers.get("authorization")
    token = None if header is None else bearer_token(header)
    if token is None:
        return None
    info = request.app.state.token_cache.cached(token)
    return info if info is not None and info.allows(scope) else None


async def current_token(request: Request) -> TokenInfo:
    """The caller's token from `Authorization: Bearer <token>`; 401 if missing or unknown.
    A cache hit costs no thread and no query; a miss asks the database on a connection of its
    own, returned at once (never the request's transaction)."""
    header = request.headers.get("authorization")
    if not header:
        raise _unauthorized("missing Authorization header: use 'Authorization: Bearer <token>'")
    token = bearer_token(header)
    if token is None:
        raise _unauthorized("malformed Authorization header: use 'Authorization: Bearer <token>'")
    cache: TokenCache = request.app.state.token_cache
    info = cache.cached(token)
    if info is None:
        info = await run_in_threadpool(cache.lookup, request.app.state.engine, token)
    if info is None:
        raise _unauthorized("invalid or revoked token")
    return info


# Declares the bearer scheme in the OpenAPI schema, so Swagger's Authorize works at /docs;
# current_token reads the header itself (and answers 401 in the project's error shape).
BEARER = HTTPBearer(
    auto_error=False,
    scheme_name="bearerAuth",
    description="A token from `outbox token create`: scope `usage`, `viewer` (reads what an "
    "admin reads) or `admin` (may do all).",
)


class RequireScope:
    """The dependency that refuses a token without `scope` (403). A class, so that the error
    handlers can find which scope a route needs (`required_scope`). Async: a cached token
    costs no threadpool hand-off."""

    def __init__(self, scope: TokenScope) -> None:
        self.scope = scope

    async def __call__(
        self,
        token: Annotated[TokenInfo, Depends(current_token)],
        _: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)],
    ) -> TokenInfo:
        if not token.allows(self.scope):
            raise HTTPException(status_code=403, detail=forbidden_body(self.scope))
        return token


def forbidden_body(scope: TokenScope) -> dict[str, str]:
    return error_body("forbidden", f"this token lacks the {scope.value!r} scope")


def require(scope: TokenScope) -> RequireScope:
    return RequireScope(scope)


def required_scope(route: object) -> TokenScope | None:
    """The scope a route's token must have, or None for an open route (health, webhooks)."""
    pending = [getattr(route, "dependant", None)]
    while pending:
        dependant = pending.pop()
        if dependant is None:
            continue
        if isinstance(dependant.call, RequireScope):
            return dependant.call.scope
        pending.extend(dependant.dependencies)
    return None


UsageToken = Annotated[TokenInfo, Depends(require(TokenScope.USAGE))]
AdminToken = Annotated[TokenInfo, Depends(require(TokenScope.ADMIN))]
ReaderToken = Annotated[TokenInfo, Depends(require(TokenScope.VIEWER))]  # viewer or admin
