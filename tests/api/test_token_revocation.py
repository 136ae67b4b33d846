"""Token revocation takes effect within a second (in practice a few milliseconds) on every API
process, while a valid token costs no query on the hot path.

Each process caches lookups only while its RevocationWatcher listens on PostgreSQL's
REVOCATION_CHANNEL; `revoke_token` notifies in the revoking transaction. The same with real
`outbox serve` processes and the real `outbox token revoke`: tests/acceptance/test_request_path.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, event, text

from api.app import create_app
from outbox.db import session_scope
from outbox.settings import load_settings
from outbox.tokens import WATCHER_NAME, authenticate, revoke_token
from tests.api.conftest import bearer

Fund = Callable[[str, int], None]
# The promise made in docs/howto/tokens.md.
REVOKED_WITHIN = 1.0


@pytest.fixture
def processes(clean_tables: Engine, pg_url: str) -> Iterator[list[TestClient]]:
    """Two API 'processes': two apps, each with its own cache and watcher (lifespan on)."""
    clients = [
        TestClient(create_app(load_settings(database_url=pg_url), engine=clean_tables))
        for _ in range(2)
    ]
    for client in clients:
        client.__enter__()
    yield clients
    for client in clients:
        client.__exit__(None, None, None)


def _wait_trusted(app: FastAPI) -> None:
    deadline = time.monotonic() + 10
    while not (app.state.token_cache.watcher and app.state.token_cache.watcher.trusted()):
        assert time.monotonic() < deadline, "the revocation watcher never connected"
        time.sleep(0.02)


def _refused_within(client: TestClient, headers: dict[str, str], seconds: float) -> float:
    """Seconds until the token is refused (every answer after that must be 401 too)."""
    started = time.monotonic()
    while True:
        status = client.get("/v1/customers/user_1/credits", headers=headers).status_code
        took = time.monotonic() - started
        if status == 401:
            return took
        assert status == 200
        assert took < seconds, f"the revoked token still worked after {took:.2f} s"
        time.sleep(0.005)


def _token_queries(engine: Engine) -> list[str]:
    seen: list[str] = []

    @event.listens_for(engine, "before_cursor_execute")
    def _seen(_c: object, _cur: object, statement: str, *_: object) -> None:
        if "api_tokens" in statement:
            seen.append(statement)

    return seen


def test_a_revoked_token_is_refused_by_every_process_within_a_second(
    processes: list[TestClient], clean_tables: Engine, usage_token: str, fund: Fund
) -> None:
    fund("user_1", 5)
    headers = bearer(usage_token)
    for client in processes:
        _wait_trusted(client.app)  # type: ignore[arg-type]
        for _ in range(2):  # the second is served from the cache
            assert client.get("/v1/customers/user_1/credits", headers=headers).status_code == 200
    with session_scope(clean_tables) as session:
        info = authenticate(session, usage_token)
        assert info is not None and revoke_token(session, info.id)
    for client in processes:
        _refused_within(client, headers, REVOKED_WITHIN)
        response = client.post(
            "/v1/usage", json={"customer_id": "user_1", "credits": 1}, headers=headers
        )
        assert response.status_code == 401


def test_a_known_token_costs_no_query_while_the_watcher_listens(
    processes: list[TestClient], clean_tables: Engine, usage_token: str, fund: Fund
) -> None:
    fund("user_1", 5)
    client = processes[0]
    _wait_trusted(client.app)  # type: ignore[arg-type]
    headers = bearer(usage_token)
    seen = _token_queries(clean_tables)
    for _ in range(5):
        assert client.get("/v1/customers/user_1/credits", headers=headers).status_code == 200
    assert len(seen) == 1  # the first lookup only


def test_without_a_watcher_every_lookup_asks_the_database(
    clean_tables: Engine, pg_url: str, usage_token: str, fund: Fund
) -> None:
    """No lifespan (hence no watcher), as under a bare ASGI server: nothing is cached, so a
    revocation (even one made by hand in SQL, never announced) is seen by the next request."""
    fund("user_1", 5)
    client = TestClient(create_app(load_settings(database_url=pg_url), engine=clean_tables))
    headers = bearer(usage_token)
    assert client.get("/v1/customers/user_1/credits", headers=headers).status_code == 200
    with clean_tables.begin() as connection:
        connection.execute(text("UPDATE api_tokens SET revoked_at = now()"))
    assert client.get("/v1/customers/user_1/credits", headers=headers).status_code == 401


def test_a_lost_watcher_connection_stops_the_cache_until_it_listens_again(
    processes: list[TestClient], clean_tables: Engine, usage_token: str, fund: Fund
) -> None:
    """The listener's connection is cut; a revocation made meanwhile, by hand and never
    announced, is still refused within the promise: the cache is not believed while the
    watcher is deaf, and is emptied when it listens again."""
    fund("user_1", 5)
    client = processes[0]
    app: FastAPI = client.app  # type: ignore[assignment]
    _wait_trusted(app)
    headers = bearer(usage_token)
    for _ in range(2):
        assert client.get("/v1/customers/user_1/credits", headers=headers).status_code == 200
    with clean_tables.begin() as connection:
        cut = connection.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND application_name = :name"
            ),
            {"name": WATCHER_NAME},
        ).all()
        assert len(cut) == len(processes)
        connection.execute(text("UPDATE api_tokens SET revoked_at = now()"))
    _refused_within(client, headers, REVOKED_WITHIN + 0.5)
    _wait_trusted(app)  # and it listens again
