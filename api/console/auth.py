"""The console's sign-in: an admin or viewer token exchanged for a signed, expiring session
cookie (HttpOnly, SameSite=Strict), re-checked on every request through the API's token
cache, so a revoked token ends its sessions as fast as its API access; CSRF tokens for every
form. docs/howto/console.md."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import parse_qs

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from api.deps import TokenCache
from outbox.db import session_scope
from outbox.service_state import console_secret
from outbox.states import TokenScope
from outbox.tokens import TokenInfo

SESSION_COOKIE = "outbox_console"
LOGIN_COOKIE = "outbox_console_login"  # the sign-in form's CSRF nonce, before any session
MAX_FORM_BYTES = 64 * 1024


class SignInRequired(Exception):
    """No valid session: a page redirects to the sign-in form, a change answers 401."""


class Forbidden(Exception):
    """Signed in, but the token may not do this (a viewer's change) or the CSRF check failed."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Signer:
    """HMAC-SHA256 signatures with the console's secret."""

    def __init__(self, secret: str) -> None:
        self._key = hashlib.sha256(("outbox-console:" + secret).encode()).digest()

    def sign(self, purpose: str, value: str) -> str:
        mac = hmac.new(self._key, f"{purpose}\x00{value}".encode(), hashlib.sha256)
        return base64.urlsafe_b64encode(mac.digest()).decode().rstrip("=")

    def verify(self, purpose: str, value: str, signature: str) -> bool:
        return hmac.compare_digest(self.sign(purpose, value), signature)


def signer_of(request: Request) -> Signer:
    """The app's signer, made on first use (the secret may live in the database)."""
    signer: Signer | None = getattr(request.app.state, "console_signer", None)
    if signer is None:
        secret = request.app.state.settings.outbox_console_secret
        if secret is None:
            with session_scope(request.app.state.sessionmaker) as session:
                secret = console_secret(session)
        signer = Signer(secret)
        request.app.state.console_signer = signer
    return signer


@dataclass(frozen=True)
class ConsoleSession:
    """A signed-in operator: the token, and this session's CSRF token."""

    token: TokenInfo
    csrf: str

    @property
    def can_change(self) -> bool:
        return self.token.allows(TokenScope.ADMIN)

    @property
    def actor(self) -> str:
        """Who, in the audit log and in replays."""
        name = f" ({self.token.name})" if self.token.name else ""
        return f"console: token {self.token.id}{name}"


def _encode(data: dict[str, object]) -> str:
    raw = json.dumps(data, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode(text: str) -> dict[str, object] | None:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        data = json.loads(raw)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def start_session(request: Request, response: Response, token: TokenInfo) -> None:
    """Set the session cookie of `token` on `response`."""
    minutes = request.app.state.settings.outbox_console_session_minutes
    payload = _encode(
        {"t": token.id, "e": int(time.time()) + minutes * 60, "n": secrets.token_urlsafe(12)}
    )
    value = f"{payload}.{signer_of(request).sign('session', payload)}"
    _set_cookie(request, response, SESSION_COOKIE, value, max_age=minutes * 60)
    response.delete_cookie(LOGIN_COOKIE, path="/console")


def end_session(response: Response) -> None:
    response.delete_cookie(SESSION_COOKIE, path="/console")


def _set_cookie(
    request: Request, response: Response, name: str, value: str, *, max_age: int
) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/console",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def _session_claims(request: Request) -> tuple[int, str] | None:
    """The token id and nonce of a valid, unexpired session cookie."""
    cookie = request.cookies.get(SESSION_COOKIE)
    if not cookie or cookie.count(".") != 1 or len(cookie) > 500:
        return None
    payload, signature = cookie.split(".")
    if not signer_of(request).verify("session", payload, signature):
        return None
    data = _decode(payload)
    if data is None:
        return None
    token_id, expires, nonce = data.get("t"), data.get("e"), data.get("n")
    if not isinstance(token_id, int) or not isinstance(expires, int) or not isinstance(nonce, str):
        return None
    if expires < time.time():
        return None
    return token_id, nonce


async def current_session(request: Request) -> ConsoleSession:
    """The signed-in operator; `SignInRequired` without a valid session, or when its token
    was revoked or is not admin/viewer (checked on every request, through the token cache)."""
    claims = _session_claims(request)
    if claims is None:
        raise SignInRequired
    token_id, nonce = claims
    cache: TokenCache = request.app.state.token_cache
    engine: Engine = request.app.state.engine
    token = await run_in_threadpool(cache.lookup_id, engine, token_id)
    if token is None or not token.allows(TokenScope.VIEWER):
        raise SignInRequired
    return ConsoleSession(token=token, csrf=signer_of(request).sign("csrf", nonce))


Operator = Annotated[ConsoleSession, Depends(current_session)]


async def read_form(request: Request) -> dict[str, list[str]]:
    """A url-encoded form body (small: the console's forms are)."""
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise Forbidden("the form is too large")
    try:
        return parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=20_000)
    except (UnicodeDecodeError, ValueError):
        raise Forbidden("the form could not be read") from None


def first(form: dict[str, list[str]], name: str) -> str:
    values = form.get(name) or [""]
    return values[0].strip()


def csrf_ok(operator: ConsoleSession, form: dict[str, list[str]]) -> bool:
    """Whether the form carries this session's CSRF token."""
    return hmac.compare_digest(first(form, "csrf"), operator.csrf)


def check_change(operator: ConsoleSession, form: dict[str, list[str]]) -> None:
    """A change needs the form's CSRF token and an admin token (`Forbidden`: 403)."""
    if not csrf_ok(operator, form):
        raise Forbidden("the form's CSRF token is missing or wrong: reload the page and retry")
    if not operator.can_change:
        raise Forbidden("this token is read-only (viewer): it cannot change anything")


def login_csrf(request: Request, response: Response | None = None) -> str:
    """The sign-in form's CSRF token, bound to a nonce cookie set on `response`."""
    nonce = request.cookies.get(LOGIN_COOKIE)
    if response is not None and (not nonce or len(nonce) > 64):
        nonce = secrets.token_urlsafe(16)
        _set_cookie(request, response, LOGIN_COOKIE, nonce, max_age=3600)
    return signer_of(request).sign("login", nonce or "")


def check_login_csrf(request: Request, form: dict[str, list[str]]) -> None:
    nonce = request.cookies.get(LOGIN_COOKIE)
    if not nonce or not hmac.compare_digest(first(form, "csrf"), login_csrf(request)):
        raise Forbidden("the sign-in form's CSRF token is missing or wrong: reload the page")


def authenticate_plaintext(request: Request, token: str) -> TokenInfo | None:
    """The admin or viewer token `token`, or None."""
    cache: TokenCache = request.app.state.token_cache
    with Session(request.app.state.engine) as session:
        info = cache.lookup(session, token) if 0 < len(token) <= 200 else None
    return info if info is not None and info.allows(TokenScope.VIEWER) else None
