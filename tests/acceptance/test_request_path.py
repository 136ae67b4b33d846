"""The request path against a real `outbox serve` process: no client can hang it.

A burst of requests on ONE customer used to hang the API for good: every threadpool thread ended
up waiting for the customer's row lock, held by a transaction that committed only after FastAPI
had validated the response model, which for a sync endpoint needs a free thread. These tests run
the real server (uvicorn, its threadpool, its pool, its signal handling) on PostgreSQL: a
cluster of this module's own (tests/services.py), so that a burst of a hundred connections never
meets a shared server's `max_connections` already taken by others (that was a `503
database_unavailable` flake on a busy machine).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy import Engine, func, select, text

from outbox.db import make_engine, session_scope
from outbox.holds import place_hold
from outbox.ledger import get_credits, ledger_balance
from outbox.models import Hold, OutboxEvent
from outbox.tokens import create_token
from tests.acceptance.conftest import ROOT, Served
from tests.factories import make_customer
from tests.services import PrivatePostgres, migrated_database

# A request that takes longer than this has hung (the healthy burst answers in a few seconds).
REQUEST_TIMEOUT = 25.0


@pytest.fixture(scope="module")
def pg_url(private_postgres: PrivatePostgres) -> Iterator[str]:
    with migrated_database(private_postgres, "outbox_request_path") as url:
        yield url


@pytest.fixture(scope="module")
def pg_engine(pg_url: str) -> Iterator[Engine]:
    engine = make_engine(pg_url, pool_size=20, max_overflow=20)
    yield engine
    engine.dispose()


class HealthProbe:
    """GET /healthz every 0.2 s in a thread; remembers every failure (error or non-200)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.failures: list[str] = []
        self.answers = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=5) as http:
            while not self._stop.wait(0.2):
                try:
                    response = http.get(f"{self.url}/healthz")
                    if response.status_code != 200:
                        self.failures.append(f"{response.status_code} {response.text[:100]}")
                    else:
                        self.answers += 1
                except httpx.HTTPError as exc:
                    self.failures.append(f"{type(exc).__name__}: {exc}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def test_128_concurrent_requests_on_one_customer_all_answer_and_conserve_credits(
    serve: Callable[..., Served], clean_tables: Engine
) -> None:
    granted = 1_000_000
    with session_scope(clean_tables) as session:
        customer = make_customer(session, credits=granted)
        usage_token, _ = create_token(session, "usage")
        admin_token, _ = create_token(session, "admin")
        holds = [place_hold(session, customer, 10).hold_id for _ in range(48)]
    # Lock waits of a few seconds are legitimate on a loaded CI machine (110 writers queue on
    # one row); a regression shows as 503 `locked` after 15 s or a timeout after 25 s.
    served = serve(OUTBOX_API_LOCK_TIMEOUT_SECONDS="15")

    usage = {"Authorization": f"Bearer {usage_token}"}
    admin = {"Authorization": f"Bearer {admin_token}"}
    # 128 requests on one customer: 40 holds (more than the threadpool's 40 threads: what used
    # to hang), 24 partial captures, 24 releases, 24 usages, 8 grants, 8 balance reads.
    calls: list[tuple[str, str, dict[str, object] | None, dict[str, str], int]] = []
    calls += [("POST", "/v1/holds", {"customer_id": customer, "credits": 3}, usage, 201)] * 40
    calls += [
        ("POST", f"/v1/holds/{hold}/capture", {"credits": 4}, usage, 201) for hold in holds[:24]
    ]
    calls += [("POST", f"/v1/holds/{hold}/release", None, usage, 200) for hold in holds[24:]]
    calls += [("POST", "/v1/usage", {"customer_id": customer, "credits": 2}, usage, 201)] * 24
    calls += [("POST", f"/v1/customers/{customer}/grants", {"credits": 5}, admin, 201)] * 8
    calls += [("GET", f"/v1/customers/{customer}/credits", None, usage, 200)] * 8
    assert len(calls) == 128
    # Interleave the kinds so that every kind is in flight at once.
    calls = [calls[i] for i in sorted(range(128), key=lambda i: (i * 37) % 128)]

    start = threading.Barrier(len(calls))
    probe = HealthProbe(served.url)
    with httpx.Client(
        base_url=served.url,
        timeout=REQUEST_TIMEOUT,
        limits=httpx.Limits(max_connections=len(calls), max_keepalive_connections=0),
    ) as http:

        def call(spec: tuple[str, str, dict[str, object] | None, dict[str, str], int]) -> str:
            method, path, body, headers, _ = spec
            start.wait()
            try:
                response = http.request(method, path, json=body, headers=headers)
            except httpx.HTTPError as exc:
                return f"{type(exc).__name__} after {REQUEST_TIMEOUT:.0f} s"
            return f"{response.status_code}" + (
                "" if response.status_code < 300 else f" {response.text[:120]}"
            )

        with ThreadPoolExecutor(len(calls)) as pool:
            answers = list(pool.map(call, calls))
    time.sleep(0.5)  # the probe keeps asking a moment after the burst
    probe.stop()

    wrong = [
        f"{method} {path}: {answer}"
        for (method, path, _, _, expected), answer in zip(calls, answers, strict=True)
        if answer != str(expected)
    ]
    assert wrong == [], f"{len(wrong)} unexpected answers\n{served.output()}"
    assert probe.failures == [] and probe.answers > 0

    with session_scope(clean_tables) as session:
        summary = get_credits(session, customer)
        used = session.scalar(select(func.sum(OutboxEvent.credits))) or 0
        open_held = session.scalar(select(func.sum(Hold.credits)).where(Hold.status == "open")) or 0
        assert used == 24 * 4 + 24 * 2
        assert summary.held == open_held == 40 * 3
        assert summary.balance + summary.held + used == granted + 8 * 5
        assert ledger_balance(session, customer) == summary.balance
    assert served.process.poll() is None


def test_sigterm_stops_serve_within_its_grace_period_with_requests_blocked(
    serve: Callable[..., Served], clean_tables: Engine
) -> None:
    """Requests blocked on a row lock held elsewhere (lock_timeout far longer than the grace)
    must not keep `outbox serve` alive past its grace period."""
    with session_scope(clean_tables) as session:
        customer = make_customer(session, credits=100)
        token, _ = create_token(session, "usage")
    served = serve(
        OUTBOX_API_LOCK_TIMEOUT_SECONDS="120",
        OUTBOX_API_STATEMENT_TIMEOUT_SECONDS="120",
        OUTBOX_API_SHUTDOWN_GRACE_SECONDS="2",
    )
    headers = {"Authorization": f"Bearer {token}"}
    answers: list[str] = []

    def blocked_hold() -> None:
        try:
            response = httpx.post(
                f"{served.url}/v1/holds",
                json={"customer_id": customer, "credits": 1},
                headers=headers,
                timeout=60,
            )
            answers.append(str(response.status_code))
        except httpx.HTTPError as exc:
            answers.append(type(exc).__name__)

    with clean_tables.connect() as locker:
        locker.execute(text("SELECT 1 FROM customers WHERE id = :id FOR UPDATE"), {"id": customer})
        threads = [threading.Thread(target=blocked_hold, daemon=True) for _ in range(8)]
        for thread in threads:
            thread.start()
        time.sleep(1.5)  # the requests are in flight, waiting for the lock
        assert answers == []
        sent = time.monotonic()
        os.killpg(served.process.pid, signal.SIGTERM)
        try:
            served.process.wait(2 + 8)
        except subprocess.TimeoutExpired:
            pytest.fail(f"outbox serve still running 10 s after SIGTERM\n{served.output()}")
        stopped_after = time.monotonic() - sent
        locker.rollback()
    for thread in threads:
        thread.join(10)
    assert stopped_after < 10
    with session_scope(clean_tables) as session:
        assert get_credits(session, customer).held == 0  # nothing half-done was committed


def test_outbox_token_revoke_is_obeyed_by_every_serve_process_within_a_second(
    serve: Callable[..., Served], clean_tables: Engine, pg_url: str
) -> None:
    with session_scope(clean_tables) as session:
        customer = make_customer(session, credits=10)
        token, info = create_token(session, "usage")
    servers = [serve(), serve()]
    headers = {"Authorization": f"Bearer {token}"}

    def status(served: Served) -> int:
        return httpx.get(
            f"{served.url}/v1/customers/{customer}/credits", headers=headers, timeout=5
        ).status_code

    for served in servers:
        assert [status(served) for _ in range(3)] == [200] * 3  # warm: served from the cache
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("OUTBOX_", "POLAR_"))}
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "token", "revoke", str(info.id)],
        cwd=ROOT,
        env={**environ, "DATABASE_URL": pg_url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    revoked_at = time.monotonic()
    for served in servers:
        while status(served) != 401:
            assert time.monotonic() - revoked_at < 1.0, "a revoked token still works after 1 s"
            time.sleep(0.01)
        assert [status(served) for _ in range(3)] == [401] * 3


def test_one_setting_bounds_the_database_connections_of_an_api_process(
    serve: Callable[..., Served], clean_tables: Engine
) -> None:
    """OUTBOX_API_DATABASE_CONNECTIONS=7 (3 for POST /v1/usage, 3 for the other routes, 1 for
    the token listener): 30 requests on both paths, all waiting for a row lock held here with
    their connection in hand, never make the process open an 8th. (Before the setting: 20 +
    20 overflow + 20 + 1.)"""
    bound = 7
    with session_scope(clean_tables) as session:
        customer = make_customer(session, credits=1000)
        token, _ = create_token(session, "usage")
    served = serve(
        OUTBOX_API_DATABASE_CONNECTIONS=str(bound),
        OUTBOX_API_LOCK_TIMEOUT_SECONDS="4",
        OUTBOX_API_POOL_TIMEOUT_SECONDS="4",
    )
    headers = {"Authorization": f"Bearer {token}"}
    body = {"customer_id": customer, "credits": 1}
    calls = ["/v1/usage", "/v1/holds"] * 15
    count = text(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name IN ('outbox-api', 'outbox-revocation-watcher')"
    )
    peak = 0
    with clean_tables.connect() as locker, clean_tables.connect() as watcher:
        locker.execute(text("SELECT 1 FROM customers WHERE id = :id FOR UPDATE"), {"id": customer})
        with httpx.Client(timeout=REQUEST_TIMEOUT, limits=httpx.Limits(max_connections=30)) as http:
            with ThreadPoolExecutor(len(calls)) as pool:
                futures = [
                    pool.submit(http.post, f"{served.url}{path}", json=body, headers=headers)
                    for path in calls
                ]
                deadline = time.monotonic() + 2.5  # the requests pile up on the lock
                while time.monotonic() < deadline:
                    peak = max(peak, int(watcher.execute(count).scalar_one()))
                    watcher.commit()
                    time.sleep(0.05)
                locker.rollback()  # the lock goes: whoever still waits goes through
                answers = [future.result() for future in futures]
    codes = [str(a.status_code) if a.status_code != 503 else a.json()["code"] for a in answers]
    assert set(codes) <= {"201", "locked", "overloaded"}, codes
    assert peak == bound, f"peak {peak} connections\n{served.output()}"
