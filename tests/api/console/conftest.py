"""Console fixtures: the app with its console, signed-in clients, failed events."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, update

from api.app import create_app
from outbox.db import session_scope
from outbox.events import claim_batch, fail_if_claimed
from outbox.ledger import grant_credits, record_usage
from outbox.models import OutboxEvent, utcnow
from outbox.settings import load_settings
from outbox.tokens import create_token

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def csrf_of(html: str) -> str:
    found = CSRF.search(html)
    assert found is not None, "the page has no form with a CSRF token"
    return found.group(1)


@pytest.fixture
def console_app(clean_tables: Engine, pg_url: str) -> FastAPI:
    return create_app(load_settings(database_url=pg_url), engine=clean_tables)


def make_token(engine: Engine, scope: str, name: str | None = None) -> tuple[str, int]:
    with session_scope(engine) as session:
        plaintext, info = create_token(session, scope, name=name or f"{scope} operator")
    return plaintext, info.id


def sign_in(client: TestClient, token: str) -> TestClient:
    page = client.get("/console/login")
    answer = client.post(
        "/console/login",
        data={"token": token, "csrf": csrf_of(page.text)},
        follow_redirects=False,
    )
    assert answer.status_code == 303 and answer.headers["location"] == "/console"
    return client


@pytest.fixture
def signed_in(console_app: FastAPI, clean_tables: Engine) -> Callable[[str], TestClient]:
    """A client signed in with a new token of the given scope (closed at the end)."""
    clients: list[TestClient] = []

    def make(scope: str) -> TestClient:
        token, _ = make_token(clean_tables, scope)
        client = TestClient(console_app)
        client.__enter__()
        clients.append(client)
        return sign_in(client, token)

    yield make  # type: ignore[misc]
    for client in clients:
        client.__exit__(None, None, None)


def make_failed(
    engine: Engine,
    *,
    customer: str,
    message: str,
    count: int = 1,
    metadata: dict[str, str | int | float | bool] | None = None,
) -> list[int]:
    """`count` usage events of `customer`, failed with Polar's `message`.

    A worker may be draining (the browser tests run one): the events are committed not yet
    due, and made due in the transaction that claims them (its row locks make the worker's
    SKIP LOCKED pass them by), so that no worker takes them first."""
    with session_scope(engine) as session:
        grant_credits(session, customer, 100 * count, reason="test")
        ids = [record_usage(session, customer, 2, metadata or {}).event_id for _ in range(count)]
        session.execute(
            update(OutboxEvent)
            .where(OutboxEvent.id.in_(ids))
            .values(next_attempt_at=utcnow() + timedelta(days=1))
        )
    now = utcnow()
    owner = f"test-worker:{ids[0]}"
    with session_scope(engine) as session:
        session.execute(
            update(OutboxEvent).where(OutboxEvent.id.in_(ids)).values(next_attempt_at=now)
        )
        claimed = claim_batch(
            session, owner=owner, limit=10_000, now=now, lease_seconds=60, hold_back_until=now
        )
        assert {c.id for c in claimed} >= set(ids)
        others = [c.id for c in claimed if c.id not in ids]
        assert not others
        fail_if_claimed(
            session, errors={i: message for i in ids}, owner=owner, now=now, polar_status=422
        )
    return ids


__all__ = ["Iterator"]
