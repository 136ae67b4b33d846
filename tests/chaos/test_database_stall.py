"""A network in front of PostgreSQL that stops forwarding while every socket stays open: the API
answers every request within its documented bound, and no usage is recorded without its client
being told 201 or 503 `outcome_unknown` (docs/explanation/guarantees.md).

PostgreSQL's own timeouts cannot end this wait (their answer cannot reach us), nor can TCP
keepalives (the proxy, like a stuck pooler, acknowledges every byte). The application's
per-request deadline (api/deadline.py) must. The proxy is a few threads in this process, on a
free port, in front of the test's real PostgreSQL.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import uvicorn
from sqlalchemy import Engine, text
from sqlalchemy import select as sql_select
from sqlalchemy.engine import make_url

from api.app import create_app
from outbox.db import api_connect_timeout, session_scope
from outbox.ledger import get_credits, ledger_balance
from outbox.models import OutboxEvent
from outbox.settings import Settings, load_settings
from outbox.tokens import create_token
from tests.factories import make_customer

DEADLINE = 2.0
POOL_TIMEOUT = 1.0


class StallingProxy:
    """TCP proxy to PostgreSQL. `stall(answers_only=...)` stops forwarding (PostgreSQL's
    answers only, or both directions) and keeps every socket open, new ones included: the
    kernel still acknowledges what is sent. `heal()` forwards again, what was held back too."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.held = {"up": threading.Event(), "down": threading.Event()}
        self.closed = threading.Event()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def stall(self, *, answers_only: bool) -> None:
        self.held["down"].set()
        if not answers_only:
            self.held["up"].set()

    def heal(self) -> None:
        for held in self.held.values():
            held.clear()

    def close(self) -> None:
        self.closed.set()
        self.heal()
        self.listener.close()
        for sock in self.sockets:
            sock.close()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            self.sockets += [client, server]
            for source, target, direction in ((client, server, "up"), (server, client, "down")):
                threading.Thread(
                    target=self._pump, args=(source, target, direction), daemon=True
                ).start()

    def _pump(self, source: socket.socket, target: socket.socket, direction: str) -> None:
        held = self.held[direction]
        try:
            while not self.closed.is_set():
                if held.is_set():  # stalled: read nothing, send nothing, close nothing
                    time.sleep(0.02)
                    continue
                if not select.select([source], [], [], 0.05)[0]:
                    continue
                data = source.recv(65536)
                if not data:
                    target.shutdown(socket.SHUT_WR)
                    return
                target.sendall(data)
        except OSError:
            return


@pytest.fixture
def proxy(pg_url: str) -> Iterator[StallingProxy]:
    url = make_url(pg_url)
    running = StallingProxy((url.host or "127.0.0.1", url.port or 5432))
    yield running
    running.close()


class Served:
    """The API under uvicorn in a thread (its lifespan runs: POST /v1/usage on async
    connections)."""

    def __init__(self, settings: Settings) -> None:
        app = create_app(settings)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        """Stop serving; the lifespan closes every database connection."""
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


@pytest.fixture
def api(proxy: StallingProxy, pg_url: str, clean_tables: Engine) -> Iterator[Served]:
    """The API, reaching PostgreSQL only through the proxy; database timeouts far longer than
    the deadline."""
    settings = load_settings(
        database_url=make_url(pg_url).set(port=proxy.port).render_as_string(False),
        outbox_api_request_deadline_seconds=DEADLINE,
        outbox_api_pool_timeout_seconds=POOL_TIMEOUT,
        outbox_api_lock_timeout_seconds=60,
        outbox_api_statement_timeout_seconds=60,
        outbox_api_database_connections=21,
    )
    served = Served(settings)
    yield served
    served.stop()


# What the documentation promises (guarantees.md): a free connection within the pool timeout,
# a new one within its connect timeout, then the request's deadline.
BOUND = (
    POOL_TIMEOUT + api_connect_timeout(load_settings(outbox_api_pool_timeout_seconds=1)) + DEADLINE
)
# A request still unanswered this long after it was sent has waited past the bound.
CLIENT_TIMEOUT = BOUND + 5


@pytest.mark.parametrize("answers_only", [True, False], ids=["answers lost", "both ways"])
def test_a_stalled_database_network_never_hangs_a_request_nor_hides_a_usage(
    api: Served, proxy: StallingProxy, clean_tables: Engine, answers_only: bool
) -> None:
    with session_scope(clean_tables) as session:
        customer = make_customer(session, credits=1000)
        token, _ = create_token(session, "usage")
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=api.url, timeout=CLIENT_TIMEOUT) as http:
        warm = http.post("/v1/usage", json={"customer_id": customer}, headers=headers)
        assert warm.status_code == 201, warm.text

        requests: list[tuple[str, str, dict[str, object] | None, dict[str, str]]] = []
        for n in range(6):
            usage = {"customer_id": customer, "credits": 1, "metadata": {"req": n}}
            requests.append(("POST", "/v1/usage", usage, headers))
        for n in range(6, 12):
            usage = {"customer_id": customer, "credits": 1, "metadata": {"req": n}}
            requests.append(("POST", "/v1/usage", usage, headers | {"Idempotency-Key": f"k{n}"}))
        hold = {"customer_id": customer, "credits": 1}
        requests += [("POST", "/v1/holds", hold, headers)] * 3
        requests += [("GET", f"/v1/customers/{customer}/credits", None, headers)] * 3
        requests += [("GET", "/readyz", None, {})]

        def send(request: tuple[str, str, dict[str, object] | None, dict[str, str]]) -> str:
            method, path, body, request_headers = request
            try:
                response = http.request(method, path, json=body, headers=request_headers)
            except httpx.TimeoutException:
                return f"no answer within {CLIENT_TIMEOUT:.0f} s"
            if response.status_code == 503 and path != "/readyz":
                return str(response.json()["code"])
            return str(response.status_code)

        with ThreadPoolExecutor(len(requests)) as pool:
            # Both pools warm (connections open, idle), as in a process that has been serving.
            plain = {"Authorization": headers["Authorization"]}
            warm_up = [
                (method, path, None if body is None else hold, plain if h else h)
                for method, path, body, h in requests
            ]
            warmed = list(pool.map(send, warm_up))
            assert set(warmed) <= {"200", "201"}, warmed
            proxy.stall(answers_only=answers_only)
            answers = list(pool.map(send, requests))
        # Longer than every timeout: the last answers came while still stalled.
        proxy.heal()

    hung = [a for a in answers if a.startswith("no answer")]
    assert hung == [], answers
    # Held-back statements reach PostgreSQL on healing: let every connection of the API end
    # (PostgreSQL runs what it received before it sees the end), then count, in one snapshot.
    api.stop()
    _wait_for_no_api_backends(clean_tables)
    with session_scope(clean_tables) as session:
        session.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
        recorded = {
            int(m["req"])
            for m in session.scalars(sql_select(OutboxEvent.event_metadata))
            if "req" in m
        }
        summary = get_credits(session, customer)
        assert ledger_balance(session, customer) == summary.balance
        assert summary.balance + summary.held + summary.used == summary.granted
    usage_answers = dict(enumerate(answers[:12]))
    hidden = {n for n in recorded if usage_answers[n] not in ("201", "outcome_unknown")}
    assert hidden == set(), (answers, recorded)
    told_201 = {n for n, a in usage_answers.items() if a == "201"}
    assert told_201 <= recorded
    # Every answer is one the documentation lists for a stalled database.
    assert set(answers) <= {
        "201",
        "200",
        "503",  # /readyz: not ready
        "outcome_unknown",
        "database_timeout",
        "database_unavailable",
        "overloaded",
    }, answers
    if answers_only:
        # The statements reached PostgreSQL and were committed; their answers were lost.
        assert "outcome_unknown" in answers, answers


def _wait_for_no_api_backends(engine: Engine) -> None:
    """Until PostgreSQL has no backend of the API left (at most 30 s)."""
    left = text(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name IN ('outbox-api', 'outbox-revocation-watcher')"
    )
    deadline = time.monotonic() + 30
    with engine.connect() as connection:
        while connection.execute(left).scalar_one():
            assert time.monotonic() < deadline, "the API's connections did not end"
            connection.commit()
            time.sleep(0.1)
