"""No overdraft under real concurrency on PostgreSQL, and crash safety of the transactional
outbox. The database refuses an overdraft even with the Python guard removed."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable

import pytest
from sqlalchemy import Engine, func, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from outbox import ledger
from outbox.db import session_scope
from outbox.errors import InsufficientCredits
from outbox.ledger import get_credits, ledger_balance, record_usage
from outbox.models import Customer, LedgerEntry, OutboxEvent
from tests.factories import make_customer

THREADS = 64
GRANTED = 100


def spend_concurrently(
    engine: Engine, customer: str, threads: int
) -> tuple[list[int], list[BaseException]]:
    """`threads` real threads, each with its own session and transaction, spend 1..7 credits
    at the same moment; returns the successful amounts and the refusals."""
    rng = random.Random(42)
    amounts = [rng.randint(1, 7) for _ in range(threads)]
    barrier = threading.Barrier(threads)
    lock = threading.Lock()
    spent: list[int] = []
    refused: list[BaseException] = []

    def spend(credits: int) -> None:
        barrier.wait()
        try:
            with session_scope(engine) as session:
                record_usage(session, customer, credits, {"plan": "x"})
        except (InsufficientCredits, IntegrityError) as exc:
            with lock:
                refused.append(exc)
        else:
            with lock:
                spent.append(credits)

    workers = [threading.Thread(target=spend, args=(a,)) for a in amounts]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len(spent) + len(refused) == threads, "every thread must end in a spend or a refusal"
    return spent, refused


def assert_books_balance(engine: Engine, customer: str, spent: list[int]) -> None:
    with session_scope(engine) as session:
        summary = get_credits(session, customer)
        assert summary.balance >= 0
        assert summary.balance == GRANTED - sum(spent) == ledger_balance(session, customer)
        assert summary.used == sum(spent)
        rows = session.execute(
            select(func.count(), func.coalesce(func.sum(OutboxEvent.credits), 0)).where(
                OutboxEvent.customer_id == customer
            )
        ).one()
        assert (rows[0], rows[1]) == (len(spent), sum(spent))  # one outbox row per deduction
        usage_entries = session.scalar(
            select(func.count()).where(
                LedgerEntry.customer_id == customer, LedgerEntry.kind == "usage"
            )
        )
        assert usage_entries == len(spent)


def test_64_threads_never_overdraw_one_customer(clean_tables: Engine) -> None:
    with session_scope(clean_tables) as session:
        customer = make_customer(session, credits=GRANTED)
    spent, refused = spend_concurrently(clean_tables, customer, THREADS)
    assert sum(spent) <= GRANTED
    assert refused, "64 spends of 1..7 credits cannot all fit in 100: some must be refused"
    assert all(isinstance(exc, InsufficientCredits) for exc in refused)
    assert_books_balance(clean_tables, customer, spent)


def _deduct_without_guard(session: Session, customer_id: str, credits: int, now: object) -> int:
    """The deduction with its Python guard removed: no `balance >= credits` condition."""
    balance = session.execute(
        update(Customer)
        .where(Customer.id == customer_id)
        .values(balance=Customer.balance - credits, used=Customer.used + credits)
        .returning(Customer.balance)
    ).scalar_one()
    return int(balance)


def test_without_the_python_guard_the_database_still_refuses_the_overdraft(
    clean_tables: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ledger, "_deduct_if_covered", _deduct_without_guard)
    with session_scope(clean_tables) as session:
        customer = make_customer(session, credits=GRANTED)
    spent, refused = spend_concurrently(clean_tables, customer, THREADS)
    assert refused and all(isinstance(exc, IntegrityError) for exc in refused)
    assert all("ck_customers_balance_non_negative" in str(exc) for exc in refused)
    assert sum(spent) <= GRANTED
    assert_books_balance(clean_tables, customer, spent)


def test_concurrent_spends_on_sqlite_keep_the_books(sqlite_engine: Engine) -> None:
    with session_scope(sqlite_engine) as session:
        customer = make_customer(session, credits=GRANTED)
    spent, refused = spend_concurrently(sqlite_engine, customer, 16)
    assert sum(spent) <= GRANTED
    assert_books_balance(sqlite_engine, customer, spent)
    del refused


class Boom(Exception):
    pass


@pytest.mark.parametrize("engine_name", ["clean_tables", "sqlite_engine"])
def test_a_crash_after_record_usage_leaves_no_deduction_and_no_outbox_row(
    engine_name: str, request: pytest.FixtureRequest
) -> None:
    engine: Engine = request.getfixturevalue(engine_name)
    with session_scope(engine) as session:
        customer = make_customer(session, credits=10)
    with pytest.raises(Boom), session_scope(engine) as session:
        record_usage(session, customer, 4)
        raise Boom  # e.g. the generation failed after the credits were taken
    with session_scope(engine) as session:
        assert get_credits(session, customer).balance == 10
        assert session.scalar(select(func.count()).select_from(OutboxEvent)) == 0
        assert ledger_balance(session, customer) == 10


def test_record_usage_commits_with_the_callers_own_rows_or_not_at_all(
    clean_tables: Engine,
) -> None:
    with clean_tables.begin() as conn:
        conn.execute(text("CREATE TABLE IF NOT EXISTS floor_plans (id serial, customer text)"))
    try:
        with session_scope(clean_tables) as session:
            customer = make_customer(session, credits=5)

        def generate(fail: bool) -> Callable[[Session], None]:
            def run(session: Session) -> None:
                session.execute(
                    text("INSERT INTO floor_plans (customer) VALUES (:c)"), {"c": customer}
                )
                record_usage(session, customer, 1)
                if fail:
                    raise Boom

            return run

        with session_scope(clean_tables) as session:
            generate(False)(session)
        with pytest.raises(Boom), session_scope(clean_tables) as session:
            generate(True)(session)
        with session_scope(clean_tables) as session:
            plans = session.scalar(text("SELECT count(*) FROM floor_plans"))
            events = session.scalar(select(func.count()).select_from(OutboxEvent))
            assert (plans, events) == (1, 1)
            assert get_credits(session, customer).balance == 4
    finally:
        with clean_tables.begin() as conn:
            conn.execute(text("DROP TABLE IF EXISTS floor_plans"))


def test_the_same_idempotency_key_from_16_threads_deducts_once(clean_tables: Engine) -> None:
    with session_scope(clean_tables) as session:
        customer = make_customer(session, credits=50)
    barrier = threading.Barrier(16)
    results = []
    lock = threading.Lock()

    def spend() -> None:
        barrier.wait()
        with session_scope(clean_tables) as session:
            result = record_usage(session, customer, 3, idempotency_key="gen-1")
        with lock:
            results.append(result)

    threads = [threading.Thread(target=spend) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({r.event_id for r in results}) == 1
    assert sum(not r.replayed for r in results) == 1
    with session_scope(clean_tables) as session:
        assert get_credits(session, customer).balance == 47
        assert session.scalar(select(func.count()).select_from(OutboxEvent)) == 1
