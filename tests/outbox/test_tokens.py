"""outbox/tokens.py: a token is shown once and stored only as its SHA-256; it authenticates
with its scope until revoked, and never after; a bad scope or name is refused naming it and
writes nothing; on PostgreSQL a revocation is announced to the API processes when it commits.

How the API processes act on that announcement (their cache, the watcher) is in
tests/api/test_token_revocation.py; 401 and 403 over HTTP in tests/api/test_auth.py.
"""

from __future__ import annotations

import hashlib

import psycopg
import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from outbox.db import session_scope
from outbox.errors import InvalidRequest
from outbox.models import ApiToken
from outbox.states import TokenScope
from outbox.tokens import (
    REVOCATION_CHANNEL,
    TokenInfo,
    authenticate,
    create_token,
    list_tokens,
    revoke_token,
)


def new_token(engine: Engine, scope: str = "usage", name: str | None = "app") -> tuple[str, int]:
    with session_scope(engine) as session:
        plaintext, info = create_token(session, scope, name=name)
    return plaintext, info.id


def who(engine: Engine, token: str) -> TokenInfo | None:
    with session_scope(engine) as session:
        return authenticate(session, token)


def test_a_token_is_shown_once_and_stored_only_as_its_hash(any_engine: Engine) -> None:
    plaintext, token_id = new_token(any_engine, "admin", name="ops")
    assert plaintext.startswith("pou_") and len(plaintext) > 40
    with session_scope(any_engine) as session:
        [row] = list_tokens(session)
        stored = [str(value) for value in row.__dict__.values()]
    assert row.id == token_id and row.token_hash == hashlib.sha256(plaintext.encode()).hexdigest()
    assert not any(plaintext in value for value in stored)
    assert who(any_engine, plaintext) == TokenInfo(id=token_id, name="ops", scope=TokenScope.ADMIN)


def test_each_token_is_new(any_engine: Engine) -> None:
    tokens = {new_token(any_engine)[0] for _ in range(5)}
    assert len(tokens) == 5
    assert {who(any_engine, token).id for token in tokens} == {1, 2, 3, 4, 5}  # type: ignore[union-attr]


def test_what_was_never_issued_authenticates_as_nobody(any_engine: Engine) -> None:
    token, _ = new_token(any_engine)
    for presented in ["", "pou_", "pou_not-a-token", f"Bearer {token}", "\ud800", "x" * 10_000]:
        assert who(any_engine, presented) is None, presented


def test_a_revoked_token_is_refused_and_the_others_still_work(any_engine: Engine) -> None:
    revoked, revoked_id = new_token(any_engine, name="leaked")
    kept, kept_id = new_token(any_engine, name="app")
    with session_scope(any_engine) as session:
        assert revoke_token(session, revoked_id) is True
    assert who(any_engine, revoked) is None
    assert who(any_engine, kept) == TokenInfo(id=kept_id, name="app", scope=TokenScope.USAGE)
    with session_scope(any_engine) as session:
        assert revoke_token(session, revoked_id) is False  # already revoked
        assert revoke_token(session, 999_999) is False  # no such token
        [first, second] = list_tokens(session)
    assert (first.id, second.id) == (revoked_id, kept_id)
    assert first.revoked_at is not None and second.revoked_at is None


def test_a_revocation_rolled_back_revokes_nothing(any_engine: Engine) -> None:
    token, token_id = new_token(any_engine)
    with pytest.raises(RuntimeError), session_scope(any_engine) as session:
        revoke_token(session, token_id)
        raise RuntimeError("the operator's transaction failed after the revoke")
    assert who(any_engine, token) is not None


@pytest.mark.parametrize(
    ("scope", "needed", "allowed"),
    [
        (TokenScope.ADMIN, TokenScope.ADMIN, True),
        (TokenScope.ADMIN, TokenScope.USAGE, True),
        (TokenScope.USAGE, TokenScope.USAGE, True),
        (TokenScope.USAGE, TokenScope.ADMIN, False),
    ],
)
def test_admin_may_do_what_usage_may_and_not_the_reverse(
    scope: TokenScope, needed: TokenScope, allowed: bool
) -> None:
    assert TokenInfo(id=1, name=None, scope=scope).allows(needed) is allowed


BAD = [
    ("root", "app", "scope", "scope must be one of: usage, admin, viewer"),
    ("ADMIN", "app", "scope", "scope must be one of: usage, admin, viewer"),
    ("usage", "n" * 201, "name", "name must be at most 200 characters"),
    ("usage", "a\x00b", "name", "name contains characters that cannot be stored"),
]


def test_a_bad_scope_or_name_is_refused_naming_it_and_creates_nothing(any_engine: Engine) -> None:
    with session_scope(any_engine) as session:
        for scope, name, field, message in BAD:
            with pytest.raises(InvalidRequest) as refused:
                create_token(session, scope, name=name)
            assert (refused.value.context, refused.value.detail) == ({"field": field}, message)
        assert session.scalar(select(func.count()).select_from(ApiToken)) == 0


def test_postgresql_announces_a_revocation_when_it_commits_and_only_then(
    clean_tables: Engine, pg_url: str
) -> None:
    _, token_id = new_token(clean_tables)
    dsn = make_url(pg_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute(f"LISTEN {REVOCATION_CHANNEL}")
        with Session(clean_tables) as session:
            assert revoke_token(session, token_id)
            session.rollback()
        with session_scope(clean_tables) as session:
            assert revoke_token(session, token_id)
        with session_scope(clean_tables) as session:
            assert not revoke_token(session, token_id)  # already revoked: nothing to announce
        listener.execute(f"NOTIFY {REVOCATION_CHANNEL}, 'end'")
        heard = [note.payload for note in listener.notifies(timeout=10, stop_after=2)]
    assert heard == [str(token_id), "end"]
