"""API tokens: random bearer tokens, stored only as their SHA-256.

A revocation is announced on the PostgreSQL channel REVOCATION_CHANNEL in the revoking
transaction (delivered when it commits); each API process listens (`RevocationWatcher`) and
forgets its cached lookups at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, select, text, update
from sqlalchemy.orm import Session

from outbox.errors import InvalidRequest
from outbox.models import ApiToken, utcnow
from outbox.states import TokenScope
from outbox.validation import check_text

TOKEN_PREFIX = "pou_"  # noqa: S105 - a prefix, not a secret
REVOCATION_CHANNEL = "outbox_token_revoked"
WATCHER_NAME = "outbox-revocation-watcher"
HEARTBEAT_PREFIX = "alive:"  # a watcher's own heartbeat on the channel, not a revocation

log = logging.getLogger("outbox.tokens")


@dataclass(frozen=True)
class TokenInfo:
    """Who is calling: the token's id (idempotency keys are scoped by it), name and scope."""

    id: int
    name: str | None
    scope: TokenScope

    def allows(self, needed: TokenScope) -> bool:
        """`admin` may do everything `usage` and `viewer` may; `viewer` only reads."""
        return self.scope == TokenScope.ADMIN or self.scope == needed


def hash_token(token: str) -> str:
    """The stored form of a token."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def create_token(session: Session, scope: str, name: str | None = None) -> tuple[str, TokenInfo]:
    """Create a token; return the plaintext (shown once, never stored) and its info."""
    try:
        token_scope = TokenScope(scope)
    except ValueError:
        raise InvalidRequest(
            f"scope must be one of: {', '.join(s.value for s in TokenScope)}", field="scope"
        ) from None
    name = check_text(name, field="name", max_length=200)
    plaintext = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(name=name, scope=token_scope, token_hash=hash_token(plaintext))
    session.add(row)
    session.flush()
    return plaintext, TokenInfo(id=row.id, name=row.name, scope=token_scope)


def authenticate(session: Session, token: str) -> TokenInfo | None:
    """The token's info if it exists and is not revoked, else None."""
    row = session.execute(
        select(ApiToken.id, ApiToken.name, ApiToken.scope).where(
            ApiToken.token_hash == hash_token(token), ApiToken.revoked_at.is_(None)
        )
    ).one_or_none()
    if row is None:
        return None
    return TokenInfo(id=row.id, name=row.name, scope=TokenScope(row.scope))


def authenticate_id(session: Session, token_id: int) -> TokenInfo | None:
    """The info of the token with this id if it is not revoked, else None (the console's
    session names its token by id)."""
    row = session.execute(
        select(ApiToken.id, ApiToken.name, ApiToken.scope).where(
            ApiToken.id == token_id, ApiToken.revoked_at.is_(None)
        )
    ).one_or_none()
    if row is None:
        return None
    return TokenInfo(id=row.id, name=row.name, scope=TokenScope(row.scope))


def revoke_token(session: Session, token_id: int) -> bool:
    """Revoke a token by id; True if it was active. On PostgreSQL every API process hears of it
    when the transaction commits (REVOCATION_CHANNEL) and refuses the token from then on."""
    result = session.execute(
        update(ApiToken)
        .where(ApiToken.id == token_id, ApiToken.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
    revoked = bool(result.rowcount)  # type: ignore[attr-defined]
    if revoked and session.get_bind().dialect.name == "postgresql":
        session.execute(
            text("SELECT pg_notify(:channel, :payload)"),
            {"channel": REVOCATION_CHANNEL, "payload": str(token_id)},
        )
    return revoked


def list_tokens(session: Session) -> list[ApiToken]:
    """Every token (hashes only), oldest first."""
    return list(session.scalars(select(ApiToken).order_by(ApiToken.id)))


class RevocationWatcher:
    """LISTEN on REVOCATION_CHANNEL in a thread, on its own connection (PostgreSQL only).

    `trusted()` says whether a cache of token lookups may be believed right now. Every
    `heartbeat_seconds` the watcher NOTIFYs the channel itself and waits for its own message to
    come back: PostgreSQL delivers notifications in commit order, so once it is back, every
    revocation committed before it was sent has been heard. The cache is trusted for
    `trust_seconds` after the send of the last echoed heartbeat, no longer: a lost, stuck or
    deaf connection (say, behind a transaction-mode pooler, where LISTEN does not work) stops
    the cache within that time, and lookups go to the database. Every revocation heard, and
    every (re)connection, calls `on_change()` (forget everything cached).
    """

    def __init__(
        self,
        engine: Engine,
        on_change: Callable[[], None],
        *,
        heartbeat_seconds: float = 0.25,
        trust_seconds: float = 1.0,
    ) -> None:
        self._engine = engine
        self._on_change = on_change
        self._heartbeat = heartbeat_seconds
        self._trust = trust_seconds
        self._trusted_until = 0.0
        self._stopped = threading.Event()
        self._connection: Any = None
        self._thread = threading.Thread(
            target=self._run, name="outbox-token-revocations", daemon=True
        )

    def start(self) -> RevocationWatcher:
        self._thread.start()
        return self

    def trusted(self) -> bool:
        return time.monotonic() < self._trusted_until

    def stop(self) -> None:
        self._trusted_until = 0.0
        self._stopped.set()
        self._thread.join(timeout=2 * self._heartbeat + 1)

    def _run(self) -> None:
        failures = 0
        while not self._stopped.is_set():
            try:
                self._listen()
                failures = 0
            except Exception as exc:
                self._trusted_until = 0.0
                self._on_change()
                failures += 1
                if failures == 1 or failures % 60 == 0:
                    log.warning(
                        "token revocation listener lost (%s): tokens are checked in the "
                        "database on every request until it is back",
                        type(exc).__name__,
                    )
                self._stopped.wait(min(0.5 * failures, 5.0))
            finally:
                self._close()

    def _listen(self) -> None:
        raw = self._engine.raw_connection()
        connection = raw.driver_connection
        raw.detach()  # a connection of its own, never handed back to the pool
        self._connection = raw
        assert connection is not None
        connection.autocommit = True
        connection.execute(f"SET application_name = '{WATCHER_NAME}'")  # pg_stat_activity
        connection.execute(f"LISTEN {REVOCATION_CHANNEL}")
        self._on_change()  # whatever was cached before we listened cannot be trusted
        me = f"{HEARTBEAT_PREFIX}{secrets.token_hex(8)}:"
        beats = 0
        while not self._stopped.is_set():
            beats += 1
            beat = f"{me}{beats}"
            sent = time.monotonic()
            connection.execute("SELECT pg_notify(%s, %s)", (REVOCATION_CHANNEL, beat))
            for note in connection.notifies(timeout=self._heartbeat):
                if note.payload == beat:
                    self._trusted_until = sent + self._trust
                elif not note.payload.startswith(HEARTBEAT_PREFIX):
                    self._on_change()
            if beats == 20 and not self.trusted():
                log.warning(
                    "token revocation listener hears nothing on its connection (a "
                    "transaction-mode pooler?): tokens are checked in the database on "
                    "every request"
                )

    def _close(self) -> None:
        self._trusted_until = 0.0
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):  # it may be broken already
                connection.close()
