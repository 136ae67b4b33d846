"""POST /v1/usage with an Idempotency-Key on PostgreSQL is one statement (issue 13): the races it
must still win, made deterministic (the first request's transaction held open on purpose)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from api.errors import response_for
from api.schemas import UsageIn
from outbox.db import session_scope
from outbox.idempotency import request_fingerprint, run_idempotent_usage
from outbox.ledger import get_credits, ledger_balance
from outbox.models import IdempotencyRecord, OutboxEvent
from outbox.settings import load_settings
from outbox.tokens import authenticate
from tests.api.conftest import bearer
from tests.factories import wait_for_a_lock_wait

Fund = Callable[[str, int], None]


def test_a_same_key_request_that_spent_while_the_first_was_open_is_undone_and_replays_it(
    app: FastAPI, clean_tables: Engine, usage_token: str, fund: Fund, pg_url: str
) -> None:
    """The second request's statement starts before the first commits, so it sees no record,
    waits for the customer's row, then spends; its record insert finds the first one's key
    committed. Its spend must be rolled back and the first response replayed: billed once."""
    fund("user_1", 100)
    body = {"customer_id": "user_1", "credits": 7, "metadata": {"plan_id": "fp_race"}}
    fingerprint = request_fingerprint(
        "POST", "/v1/usage", UsageIn.model_validate(body).model_dump(mode="json")
    )
    settings = load_settings(database_url=pg_url)
    with Session(clean_tables) as session:
        token = authenticate(session, usage_token)
    assert token is not None
    answers: list[Any] = []
    with TestClient(app) as client:
        first = Session(clean_tables, expire_on_commit=False)
        try:
            response = run_idempotent_usage(
                first,
                token_id=token.id,
                key="race-key",
                fingerprint=fingerprint,
                customer_id="user_1",
                credits=7,
                metadata=body["metadata"],
                settings=settings,
                error_response=response_for,
            )
            assert response.status_code == 201
            second = threading.Thread(
                target=lambda: answers.append(
                    client.post(
                        "/v1/usage",
                        json=body,
                        headers={**bearer(usage_token), "Idempotency-Key": "race-key"},
                    )
                )
            )
            second.start()
            wait_for_a_lock_wait(clean_tables)
            first.commit()
        finally:
            first.close()
        second.join(timeout=30)
    [answer] = answers
    assert answer.status_code == 201, answer.text
    assert answer.json() == response.body
    with session_scope(clean_tables) as session:
        assert get_credits(session, "user_1").balance == ledger_balance(session, "user_1") == 93
        assert session.scalar(select(func.count()).select_from(OutboxEvent)) == 1
        assert session.scalar(select(func.count()).select_from(IdempotencyRecord)) == 1


def test_a_refusal_with_a_key_is_stored_and_replayed_even_after_a_top_up(
    client: TestClient, usage_headers: dict[str, str], fund: Fund, clean_tables: Engine
) -> None:
    """The keyed statement spends nothing on a refusal; the refusal is stored by the second
    statement and replayed by the keyed statement (which must not spend then either)."""
    fund("user_1", 1)
    headers = {**usage_headers, "Idempotency-Key": "refused-once"}
    body = {"customer_id": "user_1", "credits": 5}
    first = client.post("/v1/usage", json=body, headers=headers)
    assert first.status_code == 402
    fund("user_1", 100)
    again = client.post("/v1/usage", json=body, headers=headers)
    assert again.status_code == 402
    assert again.json() == first.json()
    other = client.post("/v1/usage", json={**body, "credits": 6}, headers=headers)
    assert other.status_code == 409
    assert other.json()["code"] == "idempotency_key_reused"
    with session_scope(clean_tables) as session:
        assert get_credits(session, "user_1").balance == 101
        assert session.scalar(select(func.count()).select_from(OutboxEvent)) == 0
