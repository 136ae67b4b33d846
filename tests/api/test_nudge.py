"""The after-commit nudge is best effort: a broker that hangs or fails never delays or fails a
201, and the usage is recorded all the same (the periodic drain delivers it).

No Redis needed: the Nudger is given a `send` that blocks or raises, as celery's send_task does
when the broker hangs or is down (tests/chaos/test_services_down.py does it with Redis itself,
where Redis can be stopped)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select

from api.app import create_app
from api.nudge import Nudger
from outbox.db import session_scope
from outbox.models import OutboxEvent
from outbox.settings import load_settings

Fund = Callable[[str, int], None]


def _events(engine: Engine) -> int:
    with session_scope(engine) as session:
        return int(session.scalar(select(func.count()).select_from(OutboxEvent)) or 0)


def _app(engine: Engine, pg_url: str, nudge: Callable[[], None]) -> FastAPI:
    return create_app(load_settings(database_url=pg_url), engine=engine, nudge=nudge)


def _spend(client: TestClient, headers: dict[str, str], times: int) -> list[int]:
    return [
        client.post(
            "/v1/usage", json={"customer_id": "user_1", "credits": 1}, headers=headers
        ).status_code
        for _ in range(times)
    ]


@pytest.fixture
def hung_broker() -> Iterator[tuple[threading.Event, list[float]]]:
    """A `send` that hangs until released (a broker that accepts the connection and never
    answers); it records when each call started."""
    release = threading.Event()
    calls: list[float] = []
    yield release, calls
    release.set()


def test_a_hung_broker_does_not_delay_the_201(
    clean_tables: Engine,
    pg_url: str,
    usage_headers: dict[str, str],
    fund: Fund,
    hung_broker: tuple[threading.Event, list[float]],
) -> None:
    fund("user_1", 10)
    release, calls = hung_broker

    def send() -> None:
        calls.append(time.monotonic())
        release.wait(20)

    nudger = Nudger(send, min_interval=0)
    client = TestClient(_app(clean_tables, pg_url, nudger))
    started = time.monotonic()
    statuses = _spend(client, usage_headers, 3)
    took = time.monotonic() - started
    assert statuses == [201, 201, 201]
    assert _events(clean_tables) == 3
    # Generous: a synchronous nudge would take 3 x 20 s here.
    assert took < 10, f"three usages took {took:.1f} s behind a hung broker"
    deadline = time.monotonic() + 5
    while not calls and time.monotonic() < deadline:
        time.sleep(0.01)
    assert calls, "the nudge was never sent at all"
    release.set()
    nudger.stop()


def test_a_broker_that_fails_does_not_fail_the_201(
    clean_tables: Engine, pg_url: str, usage_headers: dict[str, str], fund: Fund
) -> None:
    fund("user_1", 10)

    def send() -> None:
        raise ConnectionError("Error 111 connecting to redis:6379. Connection refused.")

    nudger = Nudger(send, min_interval=0)
    client = TestClient(_app(clean_tables, pg_url, nudger), raise_server_exceptions=False)
    assert _spend(client, usage_headers, 3) == [201, 201, 201]
    assert _events(clean_tables) == 3
    deadline = time.monotonic() + 5
    while nudger.dropped == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert nudger.dropped >= 1  # tried, failed, dropped: beat's drain catches up
    nudger.stop()


def test_an_after_commit_hook_that_raises_does_not_turn_a_201_into_a_500(
    clean_tables: Engine, pg_url: str, usage_headers: dict[str, str], fund: Fund
) -> None:
    """Whatever the nudge is (a plain callable here), once the usage is committed the answer
    is 201: a failing side effect after the commit must not tell the client otherwise."""
    fund("user_1", 10)

    def nudge() -> None:
        raise RuntimeError("broker exploded")

    client = TestClient(_app(clean_tables, pg_url, nudge), raise_server_exceptions=False)
    assert _spend(client, usage_headers, 2) == [201, 201]
    assert _events(clean_tables) == 2
