"""Request-scoped dependencies: one request = one transaction, and bearer-token auth."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.errors import error_body
from outbox.db import session_scope
from outbox.states import TokenScope
from outbox.tokens import TokenInfo, authenticate, hash_token

AFTER_COMMIT = "after_commit"
TOKEN_CACHE_SECONDS = 10.0


def get_session(request: Request) -> Iterator[Session]:
    """One transaction per request, committed BEFORE the response is sent (scope="function"),
    so a client never sees 201 for a deduction that did not commit."""
    with session_scope(request.app.state.sessionmaker) as session:
        yield session
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

    def lookup(self, session: Session, token: str) -> TokenInfo | None:
        key = hash_token(token)
        now = time.monotonic()
        with self._lock:
            hit = self._entries.get(key)
        if hit is not None and now - hit[0] < self.ttl and hit[1] is not None:
            return hit[1]
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


def current_token(request: Request, session: SessionDep) -> TokenInfo:
    """The caller's token from `Authorization: Bearer <token>`; 401 if missing or unknown."""
    header = request.headers.get("authorization")
    if not header:
        raise _unauthorized("missing Authorization header: use 'Authorization: Bearer <token>'")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > 200:
        raise _unauthorized("malformed Authorization header: use 'Authorization: Bearer <token>'")
    cache: TokenCache = request.app.state.token_cache
    info = cache.lookup(session, token)
    if info is None:
        raise _unauthorized("invalid or revoked token")
    return info


# Declares the bearer scheme in the OpenAPI schema, so Swagger's Authorize works at /docs;
# current_token reads the header itself (and answers 401 in the project's error shape).
BEARER = HTTPBearer(
    auto_error=False,
    scheme_name="bearerAuth",
    description="A token from `outbox token create`: scope `usage`, or `admin` (may do all).",
)


class RequireScope:
    """The dependency that refuses a token without `scope` (403). A class, so that the error
    handlers can find which scope a route needs (`required_scope`)."""

    def __init__(self, scope: TokenScope) -> None:
        self.scope = scope

    def __call__(
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
