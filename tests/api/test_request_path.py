"""The request path: 201 means recorded, and every wait on the database is bounded (503 with a
`code`, in bounded time, nothing recorded), never a hang or a 500.

The whole-server version (128 concurrent requests on one customer, SIGTERM) is in
tests/acceptance/test_request_path.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, event, text
from sqlalchemy.orm import Session

from api.app import create_app
from outbox.db import make_engine, make_request_engine, session_scope
from outbox.holds import place_hold
from outbox.settings import load_settings
from tests.api.conftest import bearer

if TYPE_CHECKING:
    from tests.api.conftest import Snapshot

Fund = Callable[[str, int], None]
Take = Callable[[], "Snapshot"]


@pytest.fixture
def app(clean_tables: Engine, pg_url: str, request: pytest.FixtureRequest) -> Iterator[FastAPI]:
    """Here the app runs on the engine `outbox serve` makes (every database wait bounded), so
    that a regression fails these tests instead of hanging them (and the table cleanup). A
    test may choose the pool's wait (`indirect` parameter, seconds; default 2)."""
    settings = load_settings(
        database_url=pg_url,
        outbox_api_lock_timeout_seconds=2,
        outbox_api_statement_timeout_seconds=5,
        outbox_api_pool_timeout_seconds=getattr(request, "param", 2),
    )
    app = create_app(settings)
    yield app
    app.state.engine.dispose()


@pytest.fixture
def bounded_app(clean_tables: Engine, pg_url: str) -> Iterator[FastAPI]:
    """The app on its own engine, the one `outbox serve` makes: short lock and pool waits."""
    settings = load_settings(
        database_url=pg_url,
        outbox_api_lock_timeout_seconds=0.5,
        outbox_api_pool_timeout_seconds=0.5,
    )
    app = create_app(settings)
    yield app
    app.state.engine.dispose()


@pytest.fixture
def locker(clean_tables: Engine, pg_url: str) -> Iterator[Callable[[str, object], None]]:
    """Lock a row from another connection until the test ends (`lock("customers", id)`). The
    locking session ends itself after 8 s, so a missing lock_timeout fails the test, not hang."""
    engine = make_engine(pg_url, pool_size=1, max_overflow=0)
    connection = engine.connect()
    connection.execute(text("SET idle_in_transaction_session_timeout = '8s'"))

    def lock(table: str, row_id: object) -> None:
        connection.execute(text(f"SELECT 1 FROM {table} WHERE id = :id FOR UPDATE"), {"id": row_id})

    yield lock
    try:
        connection.rollback()
        connection.close()
    finally:
        engine.dispose()


def _timed(call: Callable[[], Any]) -> tuple[Any, float]:
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


def test_a_row_lock_held_elsewhere_is_a_503_locked_in_bounded_time_and_records_nothing(
    bounded_app: FastAPI,
    clean_tables: Engine,
    usage_token: str,
    fund: Fund,
    snapshot: Take,
    locker: Callable[[str, object], None],
) -> None:
    fund("user_1", 50)
    with session_scope(clean_tables) as session:
        hold = place_hold(session, "user_1", 5).hold_id
    headers = bearer(usage_token)
    before = snapshot()
    locker("customers", "user_1")
    locker("holds", hold)
    client = TestClient(bounded_app)
    requests = [
        ("/v1/usage", {"customer_id": "user_1", "credits": 1}),
        ("/v1/holds", {"customer_id": "user_1", "credits": 1}),
        (f"/v1/holds/{hold}/capture", {"credits": 2}),
        (f"/v1/holds/{hold}/release", None),
    ]
    for path, body in requests:
        response, took = _timed(lambda p=path, b=body: client.post(p, json=b, headers=headers))
        assert response.status_code == 503, (path, response.text)
        assert response.json()["code"] == "locked", path
        assert response.headers["Retry-After"] == "1"
        assert took < 5, f"{path} answered after {took:.1f} s"
    assert snapshot() == before


def test_no_free_database_connection_is_a_503_overloaded_not_a_500(
    clean_tables: Engine, pg_url: str, usage_token: str, fund: Fund, snapshot: Take
) -> None:
    fund("user_1", 10)
    settings = load_settings(database_url=pg_url, outbox_api_pool_timeout_seconds=0.3)
    engine = make_request_engine(settings, pool_size=1, max_overflow=0)
    app = create_app(settings, engine=engine)
    before = snapshot()
    try:
        with engine.connect():  # the pool's only connection, taken
            response, took = _timed(
                lambda: TestClient(app).post(
                    "/v1/usage",
                    json={"customer_id": "user_1", "credits": 1},
                    headers=bearer(usage_token),
                )
            )
        assert response.status_code == 503, response.text
        assert response.json()["code"] == "overloaded"
        assert took < 5
        assert snapshot() == before
        # Once a connection is free again, the same request goes through.
        response = TestClient(app).post(
            "/v1/usage", json={"customer_id": "user_1", "credits": 1}, headers=bearer(usage_token)
        )
        assert response.status_code == 201
    finally:
        engine.dispose()


def _fail_the_commit(app: FastAPI, engine: Engine) -> list[int]:
    """Make the next request's COMMIT fail for real: its database session is terminated just
    before the COMMIT reaches it (what a crash of PostgreSQL or a cut network does)."""
    killed: list[int] = []

    @event.listens_for(app.state.sessionmaker, "before_commit")
    def _kill(session: Session) -> None:
        if killed or session.in_nested_transaction():  # a savepoint's release is no COMMIT
            return
        session.flush()  # what the commit would write first: only the COMMIT itself is left
        pid = session.connection().connection.driver_connection.info.backend_pid  # type: ignore[union-attr]
        with engine.connect() as other:
            other.execute(text("SELECT pg_terminate_backend(:pid, 5000)"), {"pid": pid})
        killed.append(pid)

    return killed


@pytest.mark.parametrize("route", ["usage", "capture", "hold", "grant"])
def test_201_means_recorded_a_commit_that_fails_is_never_answered_201(
    app: FastAPI,
    clean_tables: Engine,
    usage_token: str,
    admin_token: str,
    fund: Fund,
    snapshot: Take,
    route: str,
) -> None:
    fund("user_1", 20)
    with session_scope(clean_tables) as session:
        hold = place_hold(session, "user_1", 5).hold_id
    path, body, token = {
        "usage": ("/v1/usage", {"customer_id": "user_1", "credits": 3}, usage_token),
        "capture": (f"/v1/holds/{hold}/capture", {"credits": 3}, usage_token),
        "hold": ("/v1/holds", {"customer_id": "user_1", "credits": 3}, usage_token),
        "grant": ("/v1/customers/user_1/grants", {"credits": 3}, admin_token),
    }[route]
    before = snapshot()
    killed = _fail_the_commit(app, clean_tables)
    client = TestClient(app, raise_server_exceptions=False)
    response = client.post(path, json=body, headers=bearer(token))
    assert killed, "the commit was not reached"
    assert response.status_code == 503, response.text
    # The COMMIT was sent and no answer came: from here, a crash before it and one after it
    # look alike, so the client is told the outcome is unknown (it retries with its key).
    assert response.json()["code"] == "outcome_unknown"
    assert snapshot() == before  # nothing was stored: and nobody was told 201
    # The retry, with the database back, is recorded and answered 201.
    response = client.post(path, json=body, headers=bearer(token))
    assert response.status_code == 201, response.text
    assert snapshot() != before


def test_every_route_with_a_transaction_renders_its_own_response() -> None:
    """A route that takes SessionDep and returns a model would have FastAPI validate that model
    in another threadpool thread while the transaction and its row locks are still open: the
    hang of issue 14. Each such route must return a Response (api.deps.respond)."""
    from fastapi.routing import APIRoute
    from starlette.responses import Response

    from api.deps import get_session
    from api.routes import admin, customers, health, holds, usage, webhooks

    def uses_session(dependant: Any) -> bool:
        return any(d.call is get_session or uses_session(d) for d in dependant.dependencies)

    offenders = []
    checked = 0
    for module in (admin, customers, health, holds, usage, webhooks):
        for route in module.router.routes:
            if isinstance(route, APIRoute) and uses_session(route.dependant):
                checked += 1
                returns = route.endpoint.__annotations__.get("return")
                resolved = route.endpoint.__globals__.get(returns, returns)
                if not (isinstance(resolved, type) and issubclass(resolved, Response)):
                    offenders.append(f"{route.path} returns {returns}")
    assert checked >= 9  # the webhook route is async: its transaction runs in `in_transaction`
    assert offenders == []


# The pool's wait is not what this test is about: with 2 s, the 60 requests had to get through
# one row in about a second after the release, a speed assertion that a loaded machine failed
# (five 503 `overloaded` at load 9). A stuck request still fails it (join(30), then no answer).
@pytest.mark.parametrize("app", [30], indirect=True, ids=["pool_wait_30s"])
def test_a_request_waiting_for_a_lock_holds_no_thread_the_others_need(
    live_server: Any, clean_tables: Engine, usage_token: str, fund: Fund
) -> None:
    """Sixty requests on one customer while a competing transaction holds its row for a moment:
    they queue on the database, not on the threadpool, and all answer."""
    fund("user_1", 1000)
    headers = bearer(usage_token)
    answers: list[int] = []
    with clean_tables.connect() as blocker:
        blocker.execute(text("SELECT 1 FROM customers WHERE id = 'user_1' FOR UPDATE"))
        with live_server.http() as http:

            def hold() -> None:
                response = http.post(
                    "/v1/holds", json={"customer_id": "user_1", "credits": 1}, headers=headers
                )
                answers.append(response.status_code)

            threads = [threading.Thread(target=hold) for _ in range(60)]
            for thread in threads:
                thread.start()
            time.sleep(1)
            blocker.rollback()
            for thread in threads:
                thread.join(30)
    assert sorted(answers) == [201] * 60


def test_a_slow_statement_or_a_stuck_transaction_is_ended_by_postgresql_and_is_a_503(
    clean_tables: Engine, pg_url: str
) -> None:
    """statement_timeout and idle_in_transaction_session_timeout are set on the API's
    connections, and what they raise is answered 503 database_timeout (not a 500)."""
    from api.errors import _database_refusal

    settings = load_settings(database_url=pg_url, outbox_api_statement_timeout_seconds=0.2)
    engine = make_request_engine(settings)
    refusals = []
    try:
        with engine.connect() as connection, pytest.raises(Exception) as slow:
            connection.execute(text("SELECT pg_sleep(2)"))
        refusals.append(_database_refusal(slow.value)[0])
        with engine.connect() as connection, pytest.raises(Exception) as stuck:
            connection.execute(text("SELECT 1"))
            time.sleep(1)  # a request stuck with its transaction open: PostgreSQL ends it
            connection.execute(text("SELECT 1"))
        refusals.append(_database_refusal(stuck.value)[0])
    finally:
        engine.dispose()
    assert refusals[0] == "database_timeout"
    assert refusals[1] in ("database_timeout", "database_unavailable")
