"""The ledger's guarantees (issue #3), with real commits on PostgreSQL and on SQLite.

- No overdraft under concurrency, and the balance always equals the sum of the ledger;
  exactly one outbox row per committed deduction. Also with the Python guard REMOVED: the
  database's CHECK (balance >= 0) still refuses the overdraft.
- Crash safety: `record_usage` runs in the caller's transaction, so a rollback (an exception
  after it, or in the application's own work) leaves no deduction, no entry, no outbox row.
- Library idempotency: the same key deducts once, even from 16 threads at once.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
from sqlalchemy import Engine, delete, event, func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

import outbox.ledger
import outbox.models
from outbox.db import session_scope
from outbox.errors import CustomerNotFound, IdempotencyConflict, InsufficientCredits
from outbox.ledger import (
    UsageResult,
    get_credits,
    grant_credits,
    ledger_balance,
    record_usage,
    revoke_credits,
)
from outbox.models import Customer, LedgerEntry, OutboxEvent
from outbox.states import EventStatus, LedgerKind
from tests.factories import new_customer_id


@dataclass(frozen=True)
class Books:
    """Everything a user or an auditor can see about one customer's credits."""

    balance: int
    granted: int
    used: int
    ledger_sum: int
    usage_entries: int
    usage_entry_credits: int
    outbox_rows: int
    outbox_credits: int
    outbox_pending: int


def books(engine: Engine, customer: str) -> Books:
    with session_scope(engine) as session:
        summary = get_credits(session, customer)
        usage = session.execute(
            select(func.count(), func.coalesce(-func.sum(LedgerEntry.delta), 0)).where(
                LedgerEntry.customer_id == customer, LedgerEntry.kind == LedgerKind.USAGE
            )
        ).one()
        outbox = session.execute(
            select(func.count(), func.coalesce(func.sum(OutboxEvent.credits), 0)).where(
                OutboxEvent.customer_id == customer
            )
        ).one()
        pending = session.scalar(
            select(func.count()).where(
                OutboxEvent.customer_id == customer, OutboxEvent.status == EventStatus.PENDING
            )
        )
        return Books(
            balance=summary.balance,
            granted=summary.granted,
            used=summary.used,
            ledger_sum=ledger_balance(session, customer),
            usage_entries=int(usage[0]),
            usage_entry_credits=int(usage[1]),
            outbox_rows=int(outbox[0]),
            outbox_credits=int(outbox[1]),
            outbox_pending=int(pending or 0),
        )


def table_counts(engine: Engine) -> tuple[int, int, int]:
    """Rows in customers, ledger_entries and outbox_events (all customers)."""
    with session_scope(engine) as session:
        return (
            int(session.scalar(select(func.count()).select_from(Customer)) or 0),
            int(session.scalar(select(func.count()).select_from(LedgerEntry)) or 0),
            int(session.scalar(select(func.count()).select_from(OutboxEvent)) or 0),
        )


def funded_customer(engine: Engine, credits: int) -> str:
    customer = new_customer_id()
    with session_scope(engine) as session:
        grant_credits(session, customer, credits, reason="test")
    return customer


def threads_for(engine: Engine) -> int:
    # SQLite has one writer; fewer threads prove the same thing there, faster.
    return 64 if engine.dialect.name == "postgresql" else 32


Outcome = tuple[int, UsageResult | BaseException]


def spend_at_once(engine: Engine, customer: str, amounts: list[int]) -> list[Outcome]:
    """One real thread per amount, each with its own session and commit, released together."""
    barrier = threading.Barrier(len(amounts))
    # On PostgreSQL each session connects before the barrier, so the spends race, not the
    # handshakes. (SQLite takes its write lock at BEGIN: there, connecting IS the race.)
    connect_first = engine.dialect.name == "postgresql"

    def spend(index: int) -> Outcome:
        try:
            with session_scope(engine) as session:
                try:
                    if connect_first:
                        session.connection()
                finally:
                    barrier.wait(timeout=30)
                return amounts[index], record_usage(session, customer, amounts[index], {"n": index})
        except Exception as exc:
            return amounts[index], exc

    with ThreadPoolExecutor(max_workers=len(amounts)) as pool:
        return list(pool.map(spend, range(len(amounts))))


def assert_books_balance(
    engine: Engine, customer: str, granted: int, outcomes: list[Outcome]
) -> list[Outcome]:
    """No overdraft; balance == granted - spent == sum(ledger); one outbox row per deduction;
    every refusal was for lack of credits. Returns the refused outcomes."""
    succeeded = [(amount, r) for amount, r in outcomes if isinstance(r, UsageResult)]
    refused = [(amount, r) for amount, r in outcomes if not isinstance(r, UsageResult)]
    spent = sum(amount for amount, _ in succeeded)
    state = books(engine, customer)

    assert state.balance >= 0
    assert state.balance == granted - spent == state.ledger_sum
    assert state.used == spent and state.granted == granted
    assert state.usage_entries == state.outbox_rows == state.outbox_pending == len(succeeded)
    assert state.usage_entry_credits == state.outbox_credits == spent
    # Each success saw a balance that the others' deductions explain, and got its own row.
    assert len({r.event_id for _, r in succeeded}) == len(succeeded)
    assert len({r.external_id for _, r in succeeded}) == len(succeeded)
    assert all(0 <= r.balance < granted for _, r in succeeded)
    # A refused spend was refused because the credits really were not there at the end either.
    assert all(amount > state.balance for amount, _ in refused)
    return refused


def test_concurrent_spends_never_overdraw_and_every_deduction_has_one_outbox_row(
    any_engine: Engine,
) -> None:
    granted = 100
    customer = funded_customer(any_engine, granted)
    rng = random.Random(3)
    amounts = [rng.randint(1, 7) for _ in range(threads_for(any_engine))]
    assert sum(amounts) > granted  # demand exceeds supply: some spends must be refused

    outcomes = spend_at_once(any_engine, customer, amounts)

    refused = assert_books_balance(any_engine, customer, granted, outcomes)
    assert refused, "demand exceeded the grant, yet nothing was refused"
    assert all(isinstance(exc, InsufficientCredits) for _, exc in refused)


@pytest.fixture
def python_guard_removed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The conditional deduction without its `balance >= credits` guard, on both paths (the
    single PostgreSQL statement and the SQLite three-statement one)."""
    unguarded = outbox.ledger.build_deduct_statement(guarded=False)
    monkeypatch.setattr(outbox.ledger, "_DEDUCT", unguarded)
    monkeypatch.setattr(outbox.ledger, "_SPEND", outbox.ledger.build_spend_statement(unguarded))


@pytest.mark.usefixtures("python_guard_removed")
def test_without_the_python_guard_the_database_refuses_the_overdraft(any_engine: Engine) -> None:
    customer = funded_customer(any_engine, 5)
    with pytest.raises(IntegrityError, match="ck_customers_balance_non_negative"):
        with session_scope(any_engine) as session:
            record_usage(session, customer, 6)
    state = books(any_engine, customer)
    assert (state.balance, state.ledger_sum, state.outbox_rows) == (5, 5, 0)


@pytest.mark.usefixtures("python_guard_removed")
def test_without_the_python_guard_concurrent_spends_still_never_overdraw(
    any_engine: Engine,
) -> None:
    granted = 100
    customer = funded_customer(any_engine, granted)
    rng = random.Random(4)
    amounts = [rng.randint(1, 7) for _ in range(threads_for(any_engine))]
    assert sum(amounts) > granted

    outcomes = spend_at_once(any_engine, customer, amounts)

    refused = assert_books_balance(any_engine, customer, granted, outcomes)
    assert refused
    for _, exc in refused:
        assert isinstance(exc, IntegrityError), repr(exc)
        assert "ck_customers_balance_non_negative" in str(exc)


def test_spending_exactly_the_balance_leaves_zero_and_one_more_credit_is_refused(
    any_engine: Engine,
) -> None:
    customer = funded_customer(any_engine, 7)
    with session_scope(any_engine) as session:
        assert record_usage(session, customer, 7).balance == 0
    with pytest.raises(InsufficientCredits), session_scope(any_engine) as session:
        record_usage(session, customer, 1)
    state = books(any_engine, customer)
    assert (state.balance, state.ledger_sum, state.outbox_rows, state.outbox_credits) == (
        0,
        0,
        1,
        7,
    )


def test_unknown_customer_is_refused_and_nothing_is_written(any_engine: Engine) -> None:
    before = table_counts(any_engine)
    with pytest.raises(CustomerNotFound), session_scope(any_engine) as session:
        record_usage(session, "nobody", 1)
    with pytest.raises(CustomerNotFound), session_scope(any_engine) as session:
        record_usage(session, "nobody", 1, idempotency_key="k1")
    assert table_counts(any_engine) == before


def test_the_outbox_row_carries_what_polar_will_bill(any_engine: Engine) -> None:
    """Every column of the three writes: PostgreSQL makes them in one statement, SQLite in
    three, and both must leave the same rows."""
    customer = funded_customer(any_engine, 10)
    with session_scope(any_engine) as session:
        result = record_usage(
            session, customer, 3, {"plan_id": "fp_42", "rooms": 3}, idempotency_key="plan-42"
        )
    with session_scope(any_engine) as session:
        event = session.get(OutboxEvent, result.event_id)
        entry = session.scalars(
            select(LedgerEntry).where(LedgerEntry.event_id == result.event_id)
        ).one()
        account = session.get(Customer, customer)
    assert event is not None and account is not None
    assert (event.customer_id, event.credits, event.status) == (customer, 3, "pending")
    assert event.name == "ai_generation"
    assert event.event_metadata == {"plan_id": "fp_42", "rooms": 3}
    assert event.external_id == result.external_id == entry.external_id
    assert (event.attempts, event.last_error, event.delivered_at) == (0, None, None)
    assert event.occurred_at == event.created_at == event.updated_at == event.next_attempt_at
    assert event.occurred_at == entry.created_at == account.updated_at
    assert (entry.customer_id, entry.kind, entry.delta, entry.balance_after) == (
        customer,
        "usage",
        -3,
        7,
    )
    assert (entry.idempotency_key, entry.hold_id, entry.reason) == ("plan-42", None, None)
    assert (account.balance, account.used, result.balance) == (7, 3, 7)


def test_balance_equals_the_ledger_after_grants_spends_and_revokes(any_engine: Engine) -> None:
    customer = funded_customer(any_engine, 10)
    with session_scope(any_engine) as session:
        record_usage(session, customer, 4)
        grant_credits(session, customer, 5)
        record_usage(session, customer, 2)
        revoke_credits(session, customer, 100, reason="refund")  # only 9 are left to take
        grant_credits(session, customer, 1)
    state = books(any_engine, customer)
    assert state.balance == state.ledger_sum == 1
    assert state.outbox_credits == state.used == 6


# --- crash safety: the caller's transaction decides -------------------------------------------


class AppCrashed(Exception):
    pass


def test_an_exception_after_record_usage_leaves_no_trace(any_engine: Engine) -> None:
    customer = funded_customer(any_engine, 10)
    before = table_counts(any_engine)
    with pytest.raises(AppCrashed), session_scope(any_engine) as session:
        result = record_usage(session, customer, 4, {"plan_id": "fp_1"})
        assert result.balance == 6  # the deduction happened inside the transaction...
        raise AppCrashed  # ...and the generation failed before commit
    assert table_counts(any_engine) == before
    state = books(any_engine, customer)
    assert (state.balance, state.used, state.ledger_sum, state.outbox_rows) == (10, 0, 10, 0)


@pytest.fixture
def floor_plans(any_engine: Engine) -> Iterator[Engine]:
    """The application's own table, beside ours in the same database."""
    with any_engine.begin() as conn:
        conn.execute(
            text(
                "CREATE TABLE IF NOT EXISTS floor_plans ("
                " id VARCHAR(64) PRIMARY KEY, customer_id VARCHAR(128) NOT NULL,"
                " usage_event_id BIGINT NOT NULL)"
            )
        )
        conn.execute(text("DELETE FROM floor_plans"))
    yield any_engine
    with any_engine.begin() as conn:
        conn.execute(text("DROP TABLE floor_plans"))


def save_floor_plan(session: Session, plan_id: str, customer: str, event_id: int) -> None:
    session.execute(
        text("INSERT INTO floor_plans (id, customer_id, usage_event_id) VALUES (:i, :c, :e)"),
        {"i": plan_id, "c": customer, "e": event_id},
    )


def floor_plan_ids(engine: Engine) -> list[str]:
    with session_scope(engine) as session:
        return list(session.scalars(text("SELECT id FROM floor_plans ORDER BY id")))


def test_usage_and_the_apps_own_row_commit_together(floor_plans: Engine) -> None:
    engine = floor_plans
    customer = funded_customer(engine, 10)
    with session_scope(engine) as session:
        usage = record_usage(session, customer, 3, {"plan_id": "fp_1"})
        save_floor_plan(session, "fp_1", customer, usage.event_id)
    assert floor_plan_ids(engine) == ["fp_1"]
    state = books(engine, customer)
    assert (state.balance, state.ledger_sum, state.outbox_rows) == (7, 7, 1)


@pytest.mark.parametrize("failure", ["app_row_fails", "app_raises", "usage_refused"])
def test_usage_and_the_apps_own_row_roll_back_together(floor_plans: Engine, failure: str) -> None:
    engine = floor_plans
    customer = funded_customer(engine, 10)
    with session_scope(engine) as session:
        first = record_usage(session, customer, 1)
        save_floor_plan(session, "fp_taken", customer, first.event_id)
    before = table_counts(engine)

    errors: dict[str, type[Exception]] = {
        "app_row_fails": IntegrityError,  # the app's INSERT hits its own primary key
        "app_raises": AppCrashed,
        "usage_refused": InsufficientCredits,
    }
    with pytest.raises(errors[failure]), session_scope(engine) as session:
        if failure == "usage_refused":
            save_floor_plan(session, "fp_2", customer, 0)
            record_usage(session, customer, 50)
        usage = record_usage(session, customer, 4)
        if failure == "app_row_fails":
            save_floor_plan(session, "fp_taken", customer, usage.event_id)
        save_floor_plan(session, "fp_2", customer, usage.event_id)
        raise AppCrashed

    assert floor_plan_ids(engine) == ["fp_taken"]
    assert table_counts(engine) == before
    state = books(engine, customer)
    assert (state.balance, state.ledger_sum, state.outbox_rows) == (9, 9, 1)


# --- library idempotency -----------------------------------------------------------------------


def test_same_idempotency_key_records_once_and_replays_the_first_result(
    any_engine: Engine,
) -> None:
    customer = funded_customer(any_engine, 10)
    with session_scope(any_engine) as session:
        first = record_usage(session, customer, 3, idempotency_key="gen-1")
    with session_scope(any_engine) as session:
        again = record_usage(session, customer, 3, idempotency_key="gen-1")
    assert not first.replayed and again.replayed
    assert (again.event_id, again.external_id, again.balance) == (
        first.event_id,
        first.external_id,
        first.balance,
    )
    state = books(any_engine, customer)
    assert (state.balance, state.ledger_sum, state.outbox_rows, state.usage_entries) == (7, 7, 1, 1)


def test_a_replay_returns_the_first_results_balance(any_engine: Engine) -> None:
    customer = funded_customer(any_engine, 10)
    with session_scope(any_engine) as session:
        first = record_usage(session, customer, 3, idempotency_key="gen-1")
        record_usage(session, customer, 2)  # another generation in between
    with session_scope(any_engine) as session:
        again = record_usage(session, customer, 3, idempotency_key="gen-1")
    assert again.replayed
    assert again.balance == first.balance == 7


def test_same_idempotency_key_with_another_amount_is_a_conflict(any_engine: Engine) -> None:
    customer = funded_customer(any_engine, 10)
    with session_scope(any_engine) as session:
        record_usage(session, customer, 3, idempotency_key="gen-1")
    before = table_counts(any_engine)
    with pytest.raises(IdempotencyConflict), session_scope(any_engine) as session:
        record_usage(session, customer, 4, idempotency_key="gen-1")
    assert table_counts(any_engine) == before
    assert books(any_engine, customer).balance == 7


def test_same_idempotency_key_with_other_metadata_is_a_conflict(any_engine: Engine) -> None:
    customer = funded_customer(any_engine, 10)
    with session_scope(any_engine) as session:
        record_usage(session, customer, 3, {"plan_id": "fp_1"}, idempotency_key="gen-1")
    before = table_counts(any_engine)
    for other in ({"plan_id": "fp_2"}, None):
        with pytest.raises(IdempotencyConflict), session_scope(any_engine) as session:
            record_usage(session, customer, 3, other, idempotency_key="gen-1")
    assert table_counts(any_engine) == before
    with session_scope(any_engine) as session:  # the same call again is a replay
        assert record_usage(session, customer, 3, {"plan_id": "fp_1"}, "gen-1").replayed


def test_after_prune_a_reused_key_is_compared_by_amount_only(any_engine: Engine) -> None:
    customer = funded_customer(any_engine, 10)
    with session_scope(any_engine) as session:
        first = record_usage(session, customer, 3, {"plan_id": "fp_1"}, idempotency_key="gen-1")
    with session_scope(any_engine) as session:  # as `outbox prune` leaves it: the entry stays
        session.execute(delete(OutboxEvent).where(OutboxEvent.id == first.event_id))
    with session_scope(any_engine) as session:
        again = record_usage(session, customer, 3, {"plan_id": "fp_2"}, idempotency_key="gen-1")
    assert again.replayed and again.event_id == first.event_id


def test_idempotency_keys_are_per_customer(any_engine: Engine) -> None:
    alice = funded_customer(any_engine, 10)
    bob = funded_customer(any_engine, 10)
    with session_scope(any_engine) as session:
        a = record_usage(session, alice, 2, idempotency_key="gen-1")
        b = record_usage(session, bob, 2, idempotency_key="gen-1")
    assert a.event_id != b.event_id and not b.replayed
    assert books(any_engine, alice).balance == books(any_engine, bob).balance == 8


def test_a_refused_spend_does_not_burn_its_idempotency_key(any_engine: Engine) -> None:
    customer = funded_customer(any_engine, 2)
    with pytest.raises(InsufficientCredits), session_scope(any_engine) as session:
        record_usage(session, customer, 3, idempotency_key="gen-1")
    with session_scope(any_engine) as session:
        grant_credits(session, customer, 1)
    with session_scope(any_engine) as session:
        result = record_usage(session, customer, 3, idempotency_key="gen-1")
    assert not result.replayed and result.balance == 0


def test_concurrent_calls_with_the_same_key_deduct_once(any_engine: Engine) -> None:
    customer = funded_customer(any_engine, 100)
    barrier = threading.Barrier(16)

    def call(_: int) -> UsageResult:
        barrier.wait(timeout=30)
        with session_scope(any_engine) as session:
            return record_usage(session, customer, 5, {"plan": "fp"}, idempotency_key="gen-42")

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(call, range(16)))

    assert len({(r.event_id, r.external_id) for r in results}) == 1
    assert sum(not r.replayed for r in results) == 1
    state = books(any_engine, customer)
    assert (state.balance, state.ledger_sum, state.outbox_rows, state.outbox_credits) == (
        95,
        95,
        1,
        5,
    )


def test_concurrent_grants_with_the_same_key_add_once(any_engine: Engine) -> None:
    customer = new_customer_id()  # the first grant creates it, concurrently
    barrier = threading.Barrier(16)

    def call(_: int) -> int:
        barrier.wait(timeout=30)
        with session_scope(any_engine) as session:
            return grant_credits(session, customer, 25, idempotency_key="invoice-1").grant_id

    with ThreadPoolExecutor(max_workers=16) as pool:
        grant_ids = set(pool.map(call, range(16)))

    assert len(grant_ids) == 1
    state = books(any_engine, customer)
    assert (state.balance, state.granted, state.ledger_sum) == (25, 25, 25)


# --- the library path on PostgreSQL: raw on the caller's connection -----------------------------


@pytest.mark.parametrize("key", [None, "gen-1"])
def test_record_usage_sees_a_customer_the_caller_added_but_did_not_flush(
    any_engine: Engine, key: str | None
) -> None:
    """The caller's unflushed ORM rows are flushed before the spend (as session.execute's
    autoflush did), with or without an idempotency key, on both databases."""
    customer = new_customer_id()
    now = outbox.models.utcnow()
    with session_scope(any_engine) as session:
        session.add(
            Customer(
                id=customer, balance=5, held=0, granted=5, used=0, created_at=now, updated_at=now
            )
        )
        session.add(
            LedgerEntry(
                customer_id=customer,
                kind=LedgerKind.GRANT,
                delta=5,
                balance_after=5,
                created_at=now,
            )
        )
        assert record_usage(session, customer, 2, idempotency_key=key).balance == 3
    state = books(any_engine, customer)
    assert (state.balance, state.ledger_sum, state.outbox_rows) == (3, 3, 1)


def test_on_postgresql_record_usage_runs_no_statement_through_sqlalchemy(
    clean_tables: Engine,
) -> None:
    """record_usage, keyed or not, a replay and a refusal: every statement raw on the
    Session's psycopg connection (`outbox.steps.run_steps`), none through SQLAlchemy's
    execute; the caller's transaction is still the Session's."""
    customer = funded_customer(clean_tables, 5)
    seen: list[str] = []

    def count(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        seen.append(statement)

    event.listen(clean_tables, "before_cursor_execute", count)
    try:
        with session_scope(clean_tables) as session:
            record_usage(session, customer, 1)
            first = record_usage(session, customer, 2, {"plan": "a"}, idempotency_key="gen-1")
            again = record_usage(session, customer, 2, {"plan": "a"}, idempotency_key="gen-1")
            with pytest.raises(InsufficientCredits):
                record_usage(session, customer, 50)
    finally:
        event.remove(clean_tables, "before_cursor_execute", count)
    assert seen == []
    assert again == UsageResult(first.event_id, first.external_id, first.balance, replayed=True)
    state = books(clean_tables, customer)
    assert (state.balance, state.ledger_sum, state.outbox_rows) == (2, 2, 2)
