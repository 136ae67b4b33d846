"""outbox/idempotency.py, in the domain (both drivers: the one-statement steps on PostgreSQL,
the savepoint on SQLite): the same key with the same body replays the stored response and
spends once; the same key with another body is `IdempotencyConflict` and changes nothing; a
domain refusal (402, 404) is stored and replayed, even after a top-up; keys belong to one
token; a concurrent request with the key undoes its own spend and replays the first.

The same over HTTP, with twenty concurrent requests on one key: tests/api/test_usage.py and
tests/api/test_usage_keyed_spend.py.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session

from outbox.db import session_scope
from outbox.errors import CustomerNotFound, IdempotencyConflict, InsufficientCredits, OutboxError
from outbox.idempotency import (
    StoredResponse,
    request_fingerprint,
    run_idempotent,
    run_idempotent_usage,
)
from outbox.ledger import get_credits, grant_credits, ledger_balance, record_usage
from outbox.models import IdempotencyRecord, OutboxEvent
from outbox.settings import load_settings
from outbox.tokens import create_token
from tests.factories import wait_for_a_lock_wait

SETTINGS = load_settings()


def error_response(exc: OutboxError) -> StoredResponse:
    status = {InsufficientCredits: 402, CustomerNotFound: 404}[type(exc)]
    return StoredResponse(status, {"code": exc.code, "detail": exc.detail})


def new_token(engine: Engine) -> int:
    with session_scope(engine) as session:
        return create_token(session, "usage", name="app")[1].id


def fund(engine: Engine, customer: str, credits: int) -> None:
    with session_scope(engine) as session:
        grant_credits(session, customer, credits, reason="test")


def usage(
    engine: Engine, token_id: int, key: str | None, credits: int, customer: str = "user_1"
) -> StoredResponse:
    body = {"customer_id": customer, "credits": credits}
    with session_scope(engine) as session:
        return run_idempotent_usage(
            session,
            token_id=token_id,
            key=key,
            fingerprint=request_fingerprint("POST", "/v1/usage", body),
            customer_id=customer,
            credits=credits,
            metadata=None,
            settings=SETTINGS,
            error_response=error_response,
        )


def written(engine: Engine) -> tuple[int, int, int]:
    """user_1's balance (checked against the ledger), outbox rows, idempotency records."""
    with session_scope(engine) as session:
        balance = get_credits(session, "user_1").balance
        assert ledger_balance(session, "user_1") == balance
        events = session.scalar(select(func.count()).select_from(OutboxEvent))
        records = session.scalar(select(func.count()).select_from(IdempotencyRecord))
    return balance, int(events or 0), int(records or 0)


def test_the_same_key_and_body_replays_the_first_response_and_spends_once(
    any_engine: Engine,
) -> None:
    token = new_token(any_engine)
    fund(any_engine, "user_1", 10)
    first = usage(any_engine, token, "key-1", 3)
    assert first.status_code == 201 and first.body["balance"] == 7
    assert usage(any_engine, token, "key-1", 3) == first
    assert written(any_engine) == (7, 1, 1)


def test_the_same_key_with_another_body_is_a_conflict_and_changes_nothing(
    any_engine: Engine,
) -> None:
    token = new_token(any_engine)
    fund(any_engine, "user_1", 10)
    usage(any_engine, token, "key-1", 3)
    with pytest.raises(IdempotencyConflict) as conflict:
        usage(any_engine, token, "key-1", 4)
    assert conflict.value.context == {"idempotency_key": "key-1"}
    assert written(any_engine) == (7, 1, 1)


def test_a_refusal_is_stored_and_replayed_even_after_a_top_up(any_engine: Engine) -> None:
    token = new_token(any_engine)
    fund(any_engine, "user_1", 2)
    refused = usage(any_engine, token, "key-402", 5)
    assert refused.status_code == 402 and refused.body["code"] == "insufficient_credits"
    fund(any_engine, "user_1", 100)
    assert usage(any_engine, token, "key-402", 5) == refused
    assert written(any_engine) == (102, 0, 1)
    # Without the key the same request is a new one, and now it is paid for.
    assert usage(any_engine, token, None, 5).status_code == 201
    assert written(any_engine) == (97, 1, 1)


def test_an_unknown_customer_is_stored_and_replayed_and_creates_nothing(
    any_engine: Engine,
) -> None:
    token = new_token(any_engine)
    unknown = usage(any_engine, token, "key-404", 1, customer="nobody")
    assert unknown.status_code == 404 and unknown.body["code"] == "customer_not_found"
    fund(any_engine, "nobody", 10)
    assert usage(any_engine, token, "key-404", 1, customer="nobody") == unknown
    with session_scope(any_engine) as session:
        assert get_credits(session, "nobody").balance == 10


def test_without_a_key_each_request_spends(any_engine: Engine) -> None:
    token = new_token(any_engine)
    fund(any_engine, "user_1", 10)
    answers = [usage(any_engine, token, None, 2) for _ in range(3)]
    assert [a.body["balance"] for a in answers] == [8, 6, 4]
    assert written(any_engine) == (4, 3, 0)


def test_a_key_belongs_to_its_token(any_engine: Engine) -> None:
    first, second = new_token(any_engine), new_token(any_engine)
    fund(any_engine, "user_1", 10)
    assert usage(any_engine, first, "shared-key", 3).body["balance"] == 7
    assert usage(any_engine, second, "shared-key", 3).body["balance"] == 4
    assert written(any_engine) == (4, 2, 2)


def test_run_idempotent_undoes_a_refused_actions_writes_and_stores_the_refusal(
    any_engine: Engine,
) -> None:
    """The action runs in a savepoint: its grant is undone with its refusal, which is kept as
    the key's answer; a repeat does not run the action again."""
    token = new_token(any_engine)
    fund(any_engine, "user_1", 1)
    runs = []

    def action(session: Session) -> StoredResponse:
        runs.append(1)
        grant_credits(session, "user_1", 5, reason="top-up before the spend")
        record_usage(session, "user_1", 100)
        raise AssertionError("unreachable: 100 credits are more than 6")

    def call(fingerprint: str) -> StoredResponse:
        with session_scope(any_engine) as session:
            return run_idempotent(
                session,
                token_id=token,
                key="grant-then-spend",
                fingerprint=fingerprint,
                action=lambda: action(session),
                error_response=error_response,
            )

    first = call("f1")
    assert first.status_code == 402
    assert call("f1") == first and len(runs) == 1
    with pytest.raises(IdempotencyConflict):
        call("f2")
    assert written(any_engine) == (1, 0, 1)


def test_the_fingerprint_is_of_what_is_asked_not_how_it_is_written() -> None:
    body = {"customer_id": "user_1", "credits": 3, "metadata": {"a": 1, "b": "x"}}
    reordered = {"metadata": {"b": "x", "a": 1}, "credits": 3, "customer_id": "user_1"}
    fingerprint = request_fingerprint("POST", "/v1/usage", body)
    assert request_fingerprint("POST", "/v1/usage", reordered) == fingerprint
    assert (
        len(
            {
                fingerprint,
                request_fingerprint("POST", "/v1/usage", {**body, "credits": 4}),
                request_fingerprint("POST", "/v1/customers/user_1/grants", body),
                request_fingerprint("PUT", "/v1/usage", body),
            }
        )
        == 4
    )


def test_the_sync_driver_undoes_a_spend_whose_key_was_taken_and_replays_the_first(
    clean_tables: Engine, pg_url: str
) -> None:
    """The forced race of tests/api/test_usage_keyed_spend.py, both requests on Sessions
    (`run_steps`): the second one's statement raises KEY_TAKEN inside the steps, which roll
    back and replay the first answer."""
    from api.errors import response_for
    from outbox.tokens import authenticate

    with session_scope(clean_tables) as session:
        usage_token, _ = create_token(session, "usage", name="test usage")
        grant_credits(session, "user_1", 100, reason="test")
    settings = load_settings(database_url=pg_url)
    with Session(clean_tables) as session:
        token = authenticate(session, usage_token)
    assert token is not None
    fingerprint = request_fingerprint("POST", "/v1/usage", {"customer_id": "user_1"})

    def usage(session: Session) -> Any:
        return run_idempotent_usage(
            session,
            token_id=token.id,
            key="sync-race",
            fingerprint=fingerprint,
            customer_id="user_1",
            credits=4,
            metadata=None,
            settings=settings,
            error_response=response_for,
        )

    answers: list[Any] = []

    def second() -> None:
        with session_scope(clean_tables) as session:
            answers.append(usage(session))

    with Session(clean_tables) as first:
        response = usage(first)
        thread = threading.Thread(target=second)
        thread.start()
        wait_for_a_lock_wait(clean_tables)
        first.commit()
    thread.join(timeout=30)
    [answer] = answers
    assert (answer.status_code, answer.body) == (response.status_code, response.body)
    with session_scope(clean_tables) as session:
        balance = session.execute(text("SELECT balance FROM customers")).scalar_one()
    assert balance == 96 and _events(clean_tables) == 1


def _events(engine: Engine) -> int:
    with session_scope(engine) as session:
        return int(session.scalar(select(func.count()).select_from(OutboxEvent)) or 0)
