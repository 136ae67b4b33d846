"""outbox/polar/gateway.py: every answer Polar (or the network) can give to an ingest is sorted
into one outcome, and `ingest` never raises: what the deliverer then does with the rows
depends on nothing else. Polar is faked at the network edge: an httpx transport under the SDK
for exact answers, the emulator for a real round trip. The token never shows in a message.

What delivery makes of each outcome (rows retried, failed, paused): tests/outbox/delivery/.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from polar.base import PolarServerError

import polar_emulator
from outbox.polar.gateway import (
    IN_CALL_ATTEMPTS,
    USAGE_KEY_FIELD,
    Outcome,
    PolarGateway,
    build_event,
    describe_failure,
)
from outbox.polar.ratelimit import LocalRateBudget
from outbox.settings import load_settings

TOKEN = "polar_oat_Sup3rS3cretT0ken"
Handler = Callable[[httpx.Request], httpx.Response]


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def gateway_answering(handler: Handler) -> PolarGateway:
    """A gateway whose SDK client sends every request to `handler` (Polar at the edge)."""
    settings = load_settings(polar_access_token=TOKEN, polar_base_url="https://polar.test")
    gateway = PolarGateway(settings, budget=LocalRateBudget(100_000, clock=Clock()))
    sdk = gateway.client._client  # polar-sdk's SyncClientBase: swap its httpx client's transport
    sdk._client = httpx.Client(
        base_url=sdk._client.base_url,
        headers=sdk._client.headers,
        transport=httpx.MockTransport(handler),
    )
    return gateway


def always(status: int, body: object = None, headers: dict[str, str] | None = None) -> Handler:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return lambda request: httpx.Response(status, content=content, headers=headers)


def sequence(*handlers: Handler) -> Handler:
    """The first answer to the first request, and so on (the last one repeated)."""
    queue = list(handlers)
    return lambda request: (queue.pop(0) if len(queue) > 1 else queue[0])(request)


def events(n: int = 3) -> list[dict[str, object]]:
    return [
        {
            "name": "ai_usage",
            "external_customer_id": "user_1",
            "external_id": f"ev_{i}",
            "metadata": {"credits_used": 1},
        }
        for i in range(n)
    ]


def connection_refused(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("[Errno 111] Connection refused", request=request)


CUSTOMER_NOT_FOUND = {
    "detail": [
        {
            "type": "customer_id",
            "loc": ["body", "events", 1, "customer_id"],
            "msg": "Customer not found.",
            "input": "8fbb14ec-1c84-4ad9-9411-04df40b93f37",
        }
    ]
}


@pytest.mark.parametrize(
    ("handler", "outcome", "status", "message", "requests"),
    [
        pytest.param(
            always(200, {"inserted": 3, "duplicates": 0}), Outcome.OK, 200, "", 1, id="200"
        ),
        pytest.param(
            always(429, {"detail": "slow down"}, {"Retry-After": "7"}),
            Outcome.RATE_LIMITED,
            429,
            "429 rate limited by Polar",
            1,
            id="429",
        ),
        pytest.param(
            always(401, {"detail": "invalid_token"}),
            Outcome.AUTH,
            401,
            "401: Polar refused the token",
            1,
            id="401",
        ),
        pytest.param(
            always(403, {"detail": "insufficient_scope"}),
            Outcome.AUTH,
            403,
            "403: Polar refused the token",
            1,
            id="403",
        ),
        pytest.param(
            always(413, b"<html>Request Entity Too Large</html>"),
            Outcome.TRANSIENT,
            413,
            "413 (body over Polar's 10 MiB): ",
            1,
            id="413",
        ),
        pytest.param(always(422, CUSTOMER_NOT_FOUND), Outcome.REJECTED, 422, "422: ", 1, id="422"),
        pytest.param(
            always(503, b"upstream connect error"),
            Outcome.TRANSIENT,
            503,
            "503: Polar API returned a server error: 503 - upstream connect error",
            IN_CALL_ATTEMPTS,
            id="503, retried in the call",
        ),
        pytest.param(
            sequence(always(502, b"bad gateway"), always(200, {"inserted": 3, "duplicates": 0})),
            Outcome.OK,
            200,
            "",
            2,
            id="502 then 200",
        ),
        pytest.param(
            connection_refused,
            Outcome.TRANSIENT,
            None,
            "network error: Polar API network error: [Errno 111] Connection refused",
            IN_CALL_ATTEMPTS,
            id="no answer, retried in the call",
        ),
        pytest.param(
            always(200, {"accepted": "yes"}),
            Outcome.TRANSIENT,
            None,
            "unreadable answer from Polar: ",
            1,
            id="200 of another shape",
        ),
        pytest.param(
            always(200, b"<html>maintenance</html>"),
            Outcome.TRANSIENT,
            None,
            "JSONDecodeError: ",
            1,
            id="200 that is not JSON",
        ),
    ],
)
def test_every_answer_is_sorted_into_one_outcome_without_raising(
    handler: Handler, outcome: Outcome, status: int | None, message: str, requests: int
) -> None:
    gateway = gateway_answering(handler)
    result = gateway.ingest(events())
    assert (result.outcome, result.status_code) == (outcome, status)
    assert result.message.startswith(message), result.message
    assert gateway.requests == requests


def test_a_422_names_the_poison_event_by_its_place_in_the_batch() -> None:
    result = gateway_answering(always(422, CUSTOMER_NOT_FOUND)).ingest(events())
    assert result.rejections is not None
    assert result.rejections.poison == {1: "customer_id: Customer not found."}
    assert result.rejections.unattributed == ()


def test_a_429_pauses_the_whole_budget_for_its_retry_after() -> None:
    gateway = gateway_answering(always(429, {}, {"Retry-After": "7"}))
    assert gateway.ingest(events()).retry_after == 7.0
    assert gateway.budget.acquire(timeout=0) == pytest.approx(7.0)  # every caller waits 7 s
    without_header = gateway_answering(always(429, {})).ingest(events())
    assert without_header.retry_after == 60.0


def test_a_spent_budget_sends_nothing_and_says_when_to_come_back() -> None:
    gateway = gateway_answering(always(200, {"inserted": 3, "duplicates": 0}))
    gateway.budget.pause(30)
    result = gateway.ingest(events())
    assert result.outcome is Outcome.RATE_LIMITED and result.retry_after == pytest.approx(30)
    assert gateway.requests == 0


def test_the_gateway_remembers_whether_polar_takes_the_token() -> None:
    gateway = gateway_answering(
        sequence(always(401, {}), always(200, {"inserted": 3, "duplicates": 0}))
    )
    assert gateway.credentials_ok is None
    gateway.ingest(events())
    assert gateway.credentials_ok is False
    gateway.ingest(events())
    assert gateway.credentials_ok is True


def echo_token(request: httpx.Request) -> httpx.Response:
    return httpx.Response(400, text=f"bad request from {request.headers['Authorization']}")


def test_the_token_never_shows_in_a_message() -> None:
    result = gateway_answering(echo_token).ingest(events())
    assert result.outcome is Outcome.TRANSIENT and result.status_code == 400
    assert TOKEN not in result.message and "Bearer ***" in result.message


def test_describe_failure_is_one_short_line_without_the_token() -> None:
    text = f"<html>\n<body>gateway timeout for {TOKEN}</body>\n" + "x" * 500
    line = describe_failure(PolarServerError(504, text), TOKEN)
    assert line.startswith("Polar answered 504: <html> <body>gateway timeout for ***")
    assert "\n" not in line and TOKEN not in line and len(line) <= 220


@pytest.fixture
def emulator() -> Iterator[polar_emulator.RunningEmulator]:
    running = polar_emulator.serve_in_thread()
    yield running
    running.stop()


def test_a_batch_sent_twice_is_counted_once_by_polar(
    emulator: polar_emulator.RunningEmulator,
) -> None:
    settings = load_settings(polar_access_token=emulator.token, polar_base_url=emulator.url)
    gateway = PolarGateway(settings, budget=LocalRateBudget(100_000))
    now = datetime.now(UTC) - timedelta(seconds=5)
    batch = [
        build_event(
            name=settings.usage_event_name,
            customer_id="user_1",
            external_id=f"ev_{i}",
            occurred_at=now,
            metadata={"plan_id": "fp_1"},
            credits_field="credits_used",
            credits=2,
            usage_id=str(i),
        )
        for i in range(3)
    ]
    first, again = gateway.ingest(batch), gateway.ingest(batch)
    gateway.close()
    assert (first.outcome, first.inserted, first.duplicates) == (Outcome.OK, 3, 0)
    assert (again.outcome, again.inserted, again.duplicates) == (Outcome.OK, 0, 3)
    assert emulator.state.totals() == {"user_1": 6}


def test_an_event_carries_credits_as_an_integer_and_its_ids_for_reconcile() -> None:
    sent_at = datetime(2026, 12, 1, 13, 0, tzinfo=timezone(timedelta(hours=1)))
    fields: dict[str, Any] = {
        "name": "ai_generation",
        "customer_id": "user_1",
        "external_id": "ext_1",
        "metadata": {"plan_id": "fp_1"},
        "credits_field": "credits_used",
        "credits": 5,
        "usage_id": 42,
    }
    assert build_event(occurred_at=sent_at, **fields) == {
        "name": "ai_generation",
        "external_customer_id": "user_1",
        "external_id": "ext_1",
        "timestamp": "2026-12-01T12:00:00+00:00",
        "metadata": {
            "plan_id": "fp_1",
            "credits_used": 5,
            "usage_id": "42",
            USAGE_KEY_FIELD: "ext_1",
        },
    }
    with pytest.raises(ValueError, match="timezone-aware"):
        build_event(occurred_at=datetime(2026, 12, 1), **fields)
