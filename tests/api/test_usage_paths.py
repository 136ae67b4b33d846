"""POST /v1/usage has two drivers for one unit of work (issue 13): a served app on PostgreSQL runs
it on psycopg's async connections (`api.asyncdb`), without a thread; an app without its
lifespan (and SQLite) runs the same steps on a Session in the threadpool. Here: that a served
app really takes the async path, that the async path keeps every guarantee of the sync one (201
means recorded, every wait bounded, a lost connection never double-bills), and that the fast
parameter resolution of the route answers exactly what FastAPI's own would."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select, text

from api import routes
from api.app import MAX_BODY_BYTES, create_app
from api.asyncdb import AsyncDatabase
from outbox.db import make_engine, session_scope
from outbox.models import OutboxEvent
from outbox.settings import load_settings
from tests.api.conftest import bearer

if TYPE_CHECKING:
    from tests.api.conftest import Snapshot

Fund = Callable[[str, int], None]
Take = Callable[[], "Snapshot"]
USAGE = {"customer_id": "user_1", "credits": 1}


@pytest.fixture
def served(clean_tables: Engine, pg_url: str) -> Iterator[tuple[FastAPI, TestClient]]:
    """The app with its lifespan running (as under `outbox serve`), short waits."""
    settings = load_settings(
        database_url=pg_url,
        outbox_api_lock_timeout_seconds=0.5,
        outbox_api_pool_timeout_seconds=0.5,
    )
    app = create_app(settings, engine=clean_tables)
    with TestClient(app, raise_server_exceptions=False) as client:
        watcher = app.state.token_cache.watcher
        deadline = time.monotonic() + 10
        while not watcher.trusted():  # token lookups are cached from here on
            assert time.monotonic() < deadline, "the revocation watcher never connected"
            time.sleep(0.01)
        yield app, client


def _database(app: FastAPI) -> AsyncDatabase:
    database = app.state.async_database
    assert isinstance(database, AsyncDatabase), "a served app on PostgreSQL has one"
    return database


def _events(engine: Engine) -> int:
    with session_scope(engine) as session:
        return int(session.scalar(select(func.count()).select_from(OutboxEvent)) or 0)


def _post(client: TestClient, token: str, **headers: str) -> Any:
    return client.post("/v1/usage", json=USAGE, headers={**bearer(token), **headers})


def test_a_served_app_records_usage_on_its_async_connections(
    served: tuple[FastAPI, TestClient], usage_token: str, fund: Fund, clean_tables: Engine
) -> None:
    app, client = served
    commits: list[int] = []

    async def seen(connection: psycopg.AsyncConnection[Any]) -> None:
        commits.append(connection.info.backend_pid)

    _database(app).before_commit.append(seen)
    fund("user_1", 10)
    for key in (None, "k1"):
        response = _post(client, usage_token, **({"Idempotency-Key": key} if key else {}))
        assert response.status_code == 201, response.text
    assert len(commits) == 2  # both went the async way (the sync path never calls the hook)
    assert _events(clean_tables) == 2


def test_without_its_lifespan_the_app_runs_the_same_steps_in_a_thread(
    clean_tables: Engine, pg_url: str, usage_token: str, fund: Fund
) -> None:
    app = create_app(load_settings(database_url=pg_url), engine=clean_tables)
    assert app.state.async_database is None
    fund("user_1", 10)
    client = TestClient(app)
    assert _post(client, usage_token).status_code == 201
    assert _post(client, usage_token, **{"Idempotency-Key": "k"}).json() == (
        _post(client, usage_token, **{"Idempotency-Key": "k"}).json()
    )
    assert _events(clean_tables) == 2


@pytest.mark.parametrize("key", [None, "k-commit"])
def test_a_commit_that_fails_on_the_async_path_is_never_answered_201(
    served: tuple[FastAPI, TestClient],
    usage_token: str,
    fund: Fund,
    snapshot: Take,
    clean_tables: Engine,
    key: str | None,
) -> None:
    """What tests/api/test_request_path.py checks on the sync path: the session is terminated
    just before its committing round trip (the COMMIT with a key; without one, the statement
    itself, run in autocommit). Not retried: a commit may have happened."""
    app, client = served
    fund("user_1", 10)
    before = snapshot()
    killed: list[int] = []

    async def kill(connection: psycopg.AsyncConnection[Any]) -> None:
        if not killed:
            killed.append(connection.info.backend_pid)
            with clean_tables.connect() as other:
                other.execute(text("SELECT pg_terminate_backend(:pid, 5000)"), {"pid": killed[0]})

    _database(app).before_commit.append(kill)
    headers = {"Idempotency-Key": key} if key else {}
    response = _post(client, usage_token, **headers)
    assert killed, "the commit was not reached"
    assert response.status_code == 503, response.text
    # Its committing round trip got no answer: the outcome is unknown to the app (the client
    # retries with its key); here nothing was recorded, and nobody was told 201.
    assert response.json()["code"] == "outcome_unknown"
    assert snapshot() == before
    response = _post(client, usage_token, **headers)
    assert response.status_code == 201, response.text
    assert _events(clean_tables) == 1


def test_a_connection_lost_while_idle_costs_no_request_and_bills_once(
    served: tuple[FastAPI, TestClient], usage_token: str, fund: Fund, clean_tables: Engine
) -> None:
    """A PostgreSQL restart kills every idle connection: the next request finds its connection
    broken before anything was committed, and is run again once on a fresh one."""
    app, client = served
    fund("user_1", 10)
    pids: list[int] = []

    async def remember(connection: psycopg.AsyncConnection[Any]) -> None:
        pids.append(connection.info.backend_pid)

    _database(app).before_commit.append(remember)
    assert _post(client, usage_token).status_code == 201
    with clean_tables.connect() as other:
        other.execute(text("SELECT pg_terminate_backend(:pid, 5000)"), {"pid": pids[0]})
    response = _post(client, usage_token)
    assert response.status_code == 201, response.text
    assert pids[-1] != pids[0]  # a fresh connection
    assert _events(clean_tables) == 2


def test_every_connection_busy_is_a_503_overloaded_in_bounded_time(
    served: tuple[FastAPI, TestClient], usage_token: str, fund: Fund, snapshot: Take, pg_url: str
) -> None:
    app, client = served
    fund("user_1", 10)
    settings = load_settings(database_url=pg_url, outbox_api_pool_timeout_seconds=0.3)
    app.state.async_database = tiny = AsyncDatabase(settings, size=1)
    assert client.portal is not None
    taken = client.portal.call(tiny._checkout)  # the only connection, held
    before = snapshot()
    try:
        started = time.monotonic()
        response = _post(client, usage_token)
        assert response.status_code == 503, response.text
        assert response.json()["code"] == "overloaded"
        assert response.headers["Retry-After"] == "1"
        assert time.monotonic() - started < 5
        assert snapshot() == before
    finally:
        client.portal.call(tiny._checkin, *taken)
    assert _post(client, usage_token).status_code == 201
    client.portal.call(tiny.close)


def test_postgresql_unreachable_is_a_503_database_unavailable_at_once(
    served: tuple[FastAPI, TestClient], usage_token: str, fund: Fund, snapshot: Take
) -> None:
    app, client = served
    fund("user_1", 10)
    _post(client, usage_token)  # the token is cached: only the usage's connection fails
    nowhere = load_settings(database_url="postgresql+psycopg://postgres@127.0.0.1:1/none")
    app.state.async_database = AsyncDatabase(nowhere)
    before = snapshot()
    started = time.monotonic()
    response = _post(client, usage_token)
    assert response.status_code == 503, response.text
    assert response.json()["code"] == "database_unavailable"
    assert time.monotonic() - started < 3  # not the pool timeout: nobody is waiting for a slot
    assert snapshot() == before


def test_a_row_lock_held_elsewhere_is_a_503_locked_on_the_async_path(
    served: tuple[FastAPI, TestClient], usage_token: str, fund: Fund, snapshot: Take, pg_url: str
) -> None:
    _, client = served
    fund("user_1", 10)
    before = snapshot()
    engine = make_engine(pg_url, pool_size=1, max_overflow=0)
    try:
        with engine.connect() as locker:
            locker.execute(text("SET idle_in_transaction_session_timeout = '8s'"))
            locker.execute(text("SELECT 1 FROM customers WHERE id = 'user_1' FOR UPDATE"))
            started = time.monotonic()
            for key in (None, "locked-key"):
                response = _post(client, usage_token, **({"Idempotency-Key": key} if key else {}))
                assert response.status_code == 503, response.text
                assert response.json()["code"] == "locked"
            assert time.monotonic() - started < 5
            locker.rollback()
    finally:
        engine.dispose()
    assert snapshot() == before
    assert _post(client, usage_token, **{"Idempotency-Key": "locked-key"}).status_code == 201


# -- the route's fast parameter resolution answers what FastAPI's would ----------------------

REQUESTS: list[tuple[str, bytes, dict[str, str]]] = [
    ("ordinary", b'{"customer_id": "user_1", "credits": 2}', {}),
    ("metadata", b'{"customer_id": "user_1", "metadata": {"plan": "fp_1", "n": 2}}', {}),
    ("keyed", b'{"customer_id": "user_1"}', {"Idempotency-Key": "same"}),
    ("keyed again", b'{"customer_id": "user_1"}', {"Idempotency-Key": "same"}),
    ("key reused", b'{"customer_id": "user_1", "credits": 3}', {"Idempotency-Key": "same"}),
    ("bad key", b'{"customer_id": "user_1"}', {"Idempotency-Key": "a\x7fb"}),
    ("402", b'{"customer_id": "user_1", "credits": 100000}', {}),
    ("404", b'{"customer_id": "ghost"}', {}),
    ("credits as text", b'{"customer_id": "user_1", "credits": "2"}', {}),
    ("credits as float", b'{"customer_id": "user_1", "credits": 2.0}', {}),
    ("credits zero", b'{"customer_id": "user_1", "credits": 0}', {}),
    ("huge credits", b'{"customer_id": "user_1", "credits": 1' + b"0" * 30 + b"}", {}),
    ("extra field", b'{"customer_id": "user_1", "colour": "red"}', {}),
    ("no customer", b'{"credits": 1}', {}),
    ("customer id spaces", b'{"customer_id": " user_1"}', {}),
    ("lone surrogate", b'{"customer_id": "user_\\ud800"}', {}),
    ("NUL in metadata", b'{"customer_id": "user_1", "metadata": {"k": "a\\u0000"}}', {}),
    ("reserved metadata", b'{"customer_id": "user_1", "metadata": {"credits_used": 5}}', {}),
    ("NaN", b'{"customer_id": "user_1", "metadata": {"k": NaN}}', {}),
    ("not JSON", b'{"customer_id": ', {}),
    ("not UTF-8", b'{"customer_id": "\xff"}', {}),
    ("array", b"[1, 2]", {}),
    ("empty", b"", {}),
    ("text/plain", b'{"customer_id": "user_1"}', {"Content-Type": "text/plain"}),
    ("json; charset", b'{"customer_id": "user_1"}', {"Content-Type": "application/json; x=1"}),
    ("no token", b'{"customer_id": "user_1"}', {"Authorization": ""}),
    ("bad token", b'{"customer_id": "user_1"}', {"Authorization": "Bearer nope"}),
    ("basic auth", b'{"customer_id": "user_1"}', {"Authorization": "Basic dXNlcjpwdw=="}),
]
VARYING = ("event_id", "external_id")  # minted per request


def _answers(client: TestClient, token: str) -> list[Any]:
    answers = []
    for name, body, headers in REQUESTS:
        sent = {"Content-Type": "application/json", **bearer(token), **headers}
        response = client.post("/v1/usage", content=body, headers=sent)
        payload = response.json()
        for field in VARYING:
            payload.pop(field, None)
        answers.append((name, response.status_code, payload))
    return answers


def test_the_fast_resolution_answers_what_fastapi_answers(
    served: tuple[FastAPI, TestClient],
    usage_token: str,
    admin_token: str,
    fund: Fund,
    clean_tables: Engine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every request of REQUESTS, once resolved by the route's fast path (where it applies) and
    once with the fast path switched off (FastAPI's solver for all), from the same state: the
    same statuses and bodies, and the same money moved."""
    _, client = served
    resolved: list[bool] = []
    original = routes.usage._ordinary_arguments

    async def counted(request: object) -> dict[str, Any] | None:
        arguments = await original(request)  # type: ignore[arg-type]
        resolved.append(arguments is not None)
        return arguments

    async def never(_: object) -> None:
        return None

    results = []
    for fast in (True, False):
        with session_scope(clean_tables) as session:
            session.execute(
                text(
                    "TRUNCATE idempotency_records, ledger_entries, delivery_attempts, outbox_events"
                )
            )
            session.execute(text("DELETE FROM customers"))
        fund("user_1", 50)
        with monkeypatch.context() as patch:
            patch.setattr(routes.usage, "_ordinary_arguments", counted if fast else never)
            results.append(_answers(client, usage_token))
            # An admin token may do everything, a usage one is cached: the same both ways.
            admin = client.post("/v1/usage", json=USAGE, headers=bearer(admin_token))
            results[-1].append(("admin token", admin.status_code, None))
        with session_scope(clean_tables) as session:
            balance = session.execute(text("SELECT balance FROM customers")).scalar_one()
        results[-1].append(("balance", balance, None))
    fast, general = results
    assert fast == general
    statuses = {name: status for name, status, _ in fast}
    assert statuses["ordinary"] == statuses["keyed"] == 201
    assert statuses["key reused"] == 409
    assert statuses["402"] == 402 and statuses["404"] == 404
    assert statuses["no token"] == statuses["bad token"] == 401
    # The fast path did answer the ordinary requests (the token was cached).
    assert sum(resolved) >= 8, resolved


def test_a_body_past_the_limit_without_content_length_is_413_on_the_fast_path_too(
    served: tuple[FastAPI, TestClient], usage_token: str, fund: Fund, snapshot: Take
) -> None:
    """The fast path reads the body itself: the body limit's 413 still leaves as FastAPI's."""
    _, client = served
    fund("user_1", 10)
    assert _post(client, usage_token).status_code == 201  # the token is cached from here on
    before = snapshot()
    padding = b" " * (MAX_BODY_BYTES + 1)
    chunks = iter([b'{"customer_id": "user_1"', padding, b"}"])  # sent chunked
    headers = {"Content-Type": "application/json", **bearer(usage_token)}
    response = client.post("/v1/usage", content=chunks, headers=headers)
    assert response.status_code == 413, response.text
    assert response.json()["code"] == "request_too_large"
    assert snapshot() == before
