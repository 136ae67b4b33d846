"""API tokens: random bearer tokens, stored only as their SHA-256."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from outbox.errors import InvalidRequest
from outbox.models import ApiToken, utcnow
from outbox.states import TokenScope
from outbox.validation import check_text

TOKEN_PREFIX = "pou_"  # noqa: S105 - a prefix, not a secret


@dataclass(frozen=True)
class TokenInfo:
    """Who is calling: the token's id (idempotency keys are scoped by it), name and scope."""

    id: int
    name: str | None
    scope: TokenScope

    def allows(self, needed: TokenScope) -> bool:
        """`admin` may do everything `usage` may."""
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


def revoke_token(session: Session, token_id: int) -> bool:
    """Revoke a token by id; True if it was active."""
    result = session.execute(
        update(ApiToken)
        .where(ApiToken.id == token_id, ApiToken.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def list_tokens(session: Session) -> list[ApiToken]:
    """Every token (hashes only), oldest first."""
    return list(session.scalars(select(ApiToken).order_by(ApiToken.id)))
