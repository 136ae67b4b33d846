"""outbox/service_state.py: one shared fact per key, on PostgreSQL and SQLite: nothing before it
is set, the last value and detail after, one row per key however often and however
concurrently it is set.

What the API and the metrics make of these facts: tests/api/test_health.py,
tests/outbox/ops/test_collector.py.
"""

from __future__ import annotations

import threading

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from outbox.db import session_scope
from outbox.models import ServiceState
from outbox.service_state import (
    CREDENTIALS_OK,
    CREDENTIALS_REJECTED,
    INGEST_OK,
    POLAR_CREDENTIALS,
    POLAR_INGEST,
    StateValue,
    get_state,
    set_state,
)
from tests.factories import wait_for_a_lock_wait


def read(engine: Engine, key: str) -> StateValue | None:
    with session_scope(engine) as session:
        return get_state(session, key)


def rows(engine: Engine) -> int:
    with session_scope(engine) as session:
        return int(session.scalar(select(func.count()).select_from(ServiceState)) or 0)


def test_a_fact_never_set_is_none(any_engine: Engine) -> None:
    assert read(any_engine, POLAR_CREDENTIALS) is None


def test_setting_again_replaces_value_and_detail_in_one_row(any_engine: Engine) -> None:
    with session_scope(any_engine) as session:
        set_state(session, POLAR_CREDENTIALS, CREDENTIALS_REJECTED, "401 invalid_token")
    first = read(any_engine, POLAR_CREDENTIALS)
    assert first is not None
    assert (first.value, first.detail) == (CREDENTIALS_REJECTED, "401 invalid_token")
    assert first.updated_at.utcoffset() is not None  # timezone-aware on both dialects

    with session_scope(any_engine) as session:
        set_state(session, POLAR_CREDENTIALS, CREDENTIALS_OK)
    second = read(any_engine, POLAR_CREDENTIALS)
    assert second is not None
    assert (second.value, second.detail) == (CREDENTIALS_OK, None)
    assert second.updated_at >= first.updated_at
    assert rows(any_engine) == 1


def test_each_key_is_its_own_fact(any_engine: Engine) -> None:
    with session_scope(any_engine) as session:
        set_state(session, POLAR_CREDENTIALS, CREDENTIALS_REJECTED)
        set_state(session, POLAR_INGEST, INGEST_OK, "batch accepted")
    credentials, ingest = read(any_engine, POLAR_CREDENTIALS), read(any_engine, POLAR_INGEST)
    assert credentials is not None and credentials.value == CREDENTIALS_REJECTED
    assert ingest is not None and (ingest.value, ingest.detail) == (INGEST_OK, "batch accepted")
    assert rows(any_engine) == 2


def test_two_workers_setting_a_new_fact_at_once_both_succeed(clean_tables: Engine) -> None:
    """Two workers learn the same fact at once (PostgreSQL): the second waits for the first's
    row, then updates it; neither fails with a duplicate key."""
    errors: list[BaseException] = []

    def second_worker() -> None:
        try:
            with session_scope(clean_tables) as session:
                set_state(session, POLAR_CREDENTIALS, CREDENTIALS_OK, "second")
        except BaseException as exc:
            errors.append(exc)

    with Session(clean_tables) as first:
        set_state(first, POLAR_CREDENTIALS, CREDENTIALS_REJECTED, "first")
        thread = threading.Thread(target=second_worker)
        thread.start()
        wait_for_a_lock_wait(clean_tables)
        first.commit()
    thread.join(timeout=30)
    assert errors == []
    last = read(clean_tables, POLAR_CREDENTIALS)
    assert last is not None and (last.value, last.detail) == (CREDENTIALS_OK, "second")
    assert rows(clean_tables) == 1
