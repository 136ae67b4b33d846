"""API fixtures: the app on the test PostgreSQL (real commits), tokens, an in-process client,
a LIVE uvicorn server for real concurrent HTTP, and a snapshot of every table a request may
write (to prove that a refused request changed nothing)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select

from api.app import create_app
from outbox.db import session_scope
from outbox.ledger import grant_credits
from outbox.models import Customer, IdempotencyRecord, LedgerEntry, OutboxEvent
from outbox.settings import load_settings
from outbox.tokens import create_token


@pytest.fixture
def app(clean_tables: Engine, pg_url: str) -> FastAPI:
    return create_app(load_settings(database_url=pg_url), engine=clean_tables)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as test_client:
        yield test_client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _token(engine: Engine, scope: str) -> str:
    with session_scope(engine) as session:
        plaintext, _ = create_token(session, scope, name=f"test {scope}")
    return plaintext


@pytest.fixture
def usage_token(clean_tables: Engine) -> str:
    return _token(clean_tables, "usage")


@pytest.fixture
def admin_token(clean_tables: Engine) -> str:
    return _token(clean_tables, "admin")


@pytest.fixture
def usage_headers(usage_token: str) -> dict[str, str]:
    return bearer(usage_token)


@pytest.fixture
def admin_headers(admin_token: str) -> dict[str, str]:
    return bearer(admin_token)


@pytest.fixture
def new_token(clean_tables: Engine) -> Callable[[str], str]:
    """Another token of the given scope (idempotency keys are scoped per token)."""
    return lambda scope: _token(clean_tables, scope)


@pytest.fixture
def fund(clean_tables: Engine) -> Callable[[str, int], None]:
    """Grant credits to a customer (creating it), committed."""

    def grant(customer: str, credits: int) -> None:
        with session_scope(clean_tables) as session:
            grant_credits(session, customer, credits, reason="test")

    return grant


@dataclass(frozen=True)
class Snapshot:
    """What a request may change: rows of every written table and the money in them."""

    customers: int
    balances: int
    ledger_entries: int
    ledger_sum: int
    outbox_events: int
    outbox_credits: int
    idempotency_records: int


@pytest.fixture
def snapshot(clean_tables: Engine) -> Callable[[], Snapshot]:
    def take() -> Snapshot:
        with session_scope(clean_tables) as session:

            def one(query: object) -> int:
                return int(session.scalar(query) or 0)  # type: ignore[call-overload]

            return Snapshot(
                customers=one(select(func.count()).select_from(Customer)),
                balances=one(select(func.sum(Customer.balance))),
                ledger_entries=one(select(func.count()).select_from(LedgerEntry)),
                ledger_sum=one(select(func.sum(LedgerEntry.delta))),
                outbox_events=one(select(func.count()).select_from(OutboxEvent)),
                outbox_credits=one(select(func.sum(OutboxEvent.credits))),
                idempotency_records=one(select(func.count()).select_from(IdempotencyRecord)),
            )

    return take


@dataclass
class LiveServer:
    url: str
    server: uvicorn.Server
    thread: threading.Thread

    def http(self) -> httpx.Client:
        """A client to share between threads: one connection per request in flight."""
        return httpx.Client(base_url=self.url, timeout=30, limits=httpx.Limits(max_connections=100))


@pytest.fixture
def live_server(app: FastAPI) -> Iterator[LiveServer]:
    """The app under a real uvicorn in a background thread, on an ephemeral loopback port, its
    lifespan running as under `outbox serve` (POST /v1/usage on async connections)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    )
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="api-under-test", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the API server did not start")
        time.sleep(0.01)
    yield LiveServer(url=f"http://127.0.0.1:{port}", server=server, thread=thread)
    server.should_exit = True
    thread.join(10)
    sock.close()
