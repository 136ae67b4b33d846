"""The database guards itself: each invariant is refused by PostgreSQL (and SQLite) even when
written by raw SQL, with every Python guard bypassed.

Each test first writes a VALID row the same way, so a refusal proves the constraint, not a typo.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError, IntegrityError

WHEN = "2026-11-25 12:00:00+00:00"


@pytest.fixture(params=["postgresql", "sqlite"])
def conn(request: pytest.FixtureRequest) -> Iterator[Connection]:
    """A connection inside a transaction that is rolled back at the end."""
    fixture = "pg_engine" if request.param == "postgresql" else "sqlite_engine"
    engine: Engine = request.getfixturevalue(fixture)
    with engine.connect() as connection:
        transaction = connection.begin()
        try:
            yield connection
        finally:
            transaction.rollback()


def attempt(conn: Connection, sql: str, **params: Any) -> None:
    """Run one statement in a savepoint, so a refusal leaves the test's transaction usable."""
    with conn.begin_nested():
        conn.execute(text(sql), params)


def insert_customer(conn: Connection, customer: str = "c1", balance: int = 10) -> None:
    attempt(
        conn,
        "INSERT INTO customers (id, balance, held, granted, used, created_at, updated_at)"
        " VALUES (:id, :balance, 0, :balance, 0, :when, :when)",
        id=customer,
        balance=balance,
        when=WHEN,
    )


EVENT_DEFAULTS: dict[str, Any] = {
    "external_id": "usage_1",
    "customer_id": "c1",
    "name": "ai_generation",
    "credits": 1,
    "metadata": "{}",
    "occurred_at": WHEN,
    "status": "pending",
    "attempts": 0,
    "next_attempt_at": WHEN,
    "lease_owner": None,
    "lease_expires_at": None,
    "created_at": WHEN,
    "updated_at": WHEN,
    "delivered_at": None,
}


def insert_event(conn: Connection, **overrides: Any) -> None:
    values = {**EVENT_DEFAULTS, **overrides}
    columns = ", ".join(values)
    placeholders = ", ".join(f":{name}" for name in values)
    attempt(conn, f"INSERT INTO outbox_events ({columns}) VALUES ({placeholders})", **values)


ENTRY_DEFAULTS: dict[str, Any] = {
    "customer_id": "c1",
    "kind": "usage",
    "delta": -1,
    "balance_after": 9,
    "event_id": 1,
    "external_id": "usage_1",
    "created_at": WHEN,
}


def insert_entry(conn: Connection, **overrides: Any) -> None:
    values = {**ENTRY_DEFAULTS, **overrides}
    columns = ", ".join(values)
    placeholders = ", ".join(f":{name}" for name in values)
    attempt(conn, f"INSERT INTO ledger_entries ({columns}) VALUES ({placeholders})", **values)


def count(conn: Connection, table: str) -> int:
    return int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())


def test_balance_below_zero_is_refused(conn: Connection) -> None:
    insert_customer(conn, balance=3)
    attempt(conn, "UPDATE customers SET balance = balance - 3 WHERE id = 'c1'")  # to 0: fine
    with pytest.raises(IntegrityError, match="ck_customers_balance_non_negative"):
        attempt(conn, "UPDATE customers SET balance = balance - 1 WHERE id = 'c1'")
    with pytest.raises(IntegrityError, match="ck_customers_balance_non_negative"):
        insert_customer(conn, "c2", balance=-1)
    assert conn.execute(text("SELECT balance FROM customers WHERE id = 'c1'")).scalar_one() == 0


@pytest.mark.parametrize("column", ["held", "granted", "used"])
def test_negative_totals_are_refused(conn: Connection, column: str) -> None:
    insert_customer(conn)
    with pytest.raises(IntegrityError, match="ck_customers_"):
        attempt(conn, f"UPDATE customers SET {column} = -1 WHERE id = 'c1'")


def test_the_ledger_is_append_only(conn: Connection) -> None:
    insert_customer(conn)
    insert_entry(conn)
    # PostgreSQL raises from a trigger (InternalError), SQLite aborts (IntegrityError).
    with pytest.raises(DBAPIError, match="append-only"):
        attempt(conn, "UPDATE ledger_entries SET delta = -100")
    with pytest.raises(DBAPIError, match="append-only"):
        attempt(conn, "UPDATE ledger_entries SET reason = 'harmless?'")
    with pytest.raises(DBAPIError, match="append-only"):
        attempt(conn, "DELETE FROM ledger_entries")
    row = conn.execute(text("SELECT delta, reason FROM ledger_entries")).one()
    assert (row.delta, row.reason) == (-1, None)


def test_duplicate_external_id_is_refused(conn: Connection) -> None:
    insert_customer(conn)
    insert_event(conn, external_id="usage_a")
    insert_event(conn, external_id="usage_b")
    with pytest.raises(
        IntegrityError,
        match=r"uq_outbox_events_external_id|UNIQUE constraint failed: outbox_events.external_id",
    ):
        insert_event(conn, external_id="usage_a")
    assert count(conn, "outbox_events") == 2


@pytest.mark.parametrize("credits", [0, -1])
def test_outbox_credits_below_one_are_refused(conn: Connection, credits: int) -> None:
    with pytest.raises(IntegrityError, match="ck_outbox_events_credits_sign_matches_kind"):
        insert_event(conn, credits=credits)


def test_only_a_compensating_event_pointing_at_its_usage_carries_negative_credits(
    conn: Connection,
) -> None:
    insert_event(conn, external_id="usage_1", credits=3)
    insert_event(conn, external_id="refund_1", credits=-2, refund_of=1)  # valid
    for values in (
        {"credits": 0, "refund_of": 1},  # a compensation gives back at least one credit
        {"credits": 2, "refund_of": 1},  # ... never adds credits
        {"credits": -2, "refund_of": None},  # negative credits without a usage
    ):
        with pytest.raises(IntegrityError, match="ck_outbox_events_credits_sign_matches_kind"):
            insert_event(conn, external_id="refund_x", **values)
    assert count(conn, "outbox_events") == 2


def test_a_usage_may_be_cancelled_but_a_compensating_event_may_not(conn: Connection) -> None:
    insert_event(conn, external_id="usage_1", status="cancelled")  # valid
    with pytest.raises(IntegrityError, match="ck_outbox_events_only_a_usage_is_cancelled"):
        insert_event(conn, external_id="refund_1", credits=-1, refund_of=1, status="cancelled")


def test_refund_and_debit_entries_are_checked(conn: Connection) -> None:
    insert_customer(conn)
    insert_entry(conn)  # the usage
    insert_entry(conn, kind="refund", delta=1, balance_after=10, refund_of=1)  # cancelled
    insert_entry(
        conn,
        kind="refund",
        delta=1,
        balance_after=10,
        refund_of=1,
        event_id=2,
        external_id="refund_1",
    )  # compensated
    insert_entry(conn, kind="debit", delta=-1, balance_after=9, event_id=None, external_id=None)
    bad: list[tuple[dict[str, Any], str]] = [
        ({"kind": "refund", "delta": -1, "refund_of": 1}, "delta_sign_matches_kind"),
        ({"kind": "refund", "delta": 1, "refund_of": None}, "refund_has_usage"),
        ({"kind": "usage", "delta": -1, "refund_of": 1}, "refund_has_usage"),
        ({"kind": "refund", "delta": 1, "refund_of": 1, "external_id": None}, "event_complete"),
        ({"kind": "debit", "delta": 1}, "delta_sign_matches_kind"),
    ]
    for values, constraint in bad:
        with pytest.raises(IntegrityError, match=constraint):
            insert_entry(conn, **values)
    assert count(conn, "ledger_entries") == 4


def test_a_usage_is_never_refunded_beyond_its_credits(conn: Connection) -> None:
    """The database's own guard of refund_usage: with no Python check and no WHERE clause,
    refunded can reach the usage's credits and never pass them."""
    attempt(
        conn,
        "INSERT INTO usage_refunds (event_id, customer_id, credits, refunded, created_at,"
        " updated_at) VALUES (1, 'c1', 3, 1, :when, :when)",
        when=WHEN,
    )
    attempt(conn, "UPDATE usage_refunds SET refunded = refunded + 2 WHERE event_id = 1")  # = 3
    with pytest.raises(IntegrityError, match="ck_usage_refunds_refunded_within_usage"):
        attempt(conn, "UPDATE usage_refunds SET refunded = refunded + 1 WHERE event_id = 1")
    with pytest.raises(IntegrityError, match="ck_usage_refunds_refunded_within_usage"):
        attempt(
            conn,
            "INSERT INTO usage_refunds (event_id, customer_id, credits, refunded, created_at,"
            " updated_at) VALUES (2, 'c1', 3, 4, :when, :when)",
            when=WHEN,
        )
    assert count(conn, "outbox_events") == 0


@pytest.mark.parametrize("status", ["sent", "PENDING", "", "done"])
def test_status_outside_the_state_machine_is_refused(conn: Connection, status: str) -> None:
    with pytest.raises(IntegrityError, match="ck_outbox_events_status_known"):
        insert_event(conn, status=status)


def test_inflight_needs_a_lease_and_only_inflight_has_one(conn: Connection) -> None:
    insert_event(conn, external_id="ok", status="inflight", lease_owner="w1", lease_expires_at=WHEN)
    for lease in ({}, {"lease_owner": "w1"}, {"lease_expires_at": WHEN}):
        with pytest.raises(IntegrityError, match="ck_outbox_events_lease_iff_inflight"):
            insert_event(conn, status="inflight", **lease)
    with pytest.raises(IntegrityError, match="ck_outbox_events_lease_iff_inflight"):
        insert_event(conn, status="pending", lease_owner="w1", lease_expires_at=WHEN)
    # A worker losing its lease without settling the row is refused too.
    with pytest.raises(IntegrityError, match="ck_outbox_events_lease_iff_inflight"):
        attempt(conn, "UPDATE outbox_events SET lease_owner = NULL WHERE external_id = 'ok'")


def test_delivered_needs_delivered_at_and_only_delivered_has_it(conn: Connection) -> None:
    insert_event(conn, external_id="ok", status="delivered", delivered_at=WHEN)
    with pytest.raises(IntegrityError, match="ck_outbox_events_delivered_at_iff_delivered"):
        insert_event(conn, status="delivered")
    with pytest.raises(IntegrityError, match="ck_outbox_events_delivered_at_iff_delivered"):
        insert_event(conn, status="failed", delivered_at=WHEN)


def test_negative_attempts_are_refused(conn: Connection) -> None:
    with pytest.raises(IntegrityError, match="ck_outbox_events_attempts_non_negative"):
        insert_event(conn, attempts=-1)


@pytest.mark.parametrize(
    ("kind", "delta"),
    [("usage", 1), ("usage", 0), ("hold", 5), ("grant", -5), ("grant", 0), ("revoke", 3)],
)
def test_a_ledger_entry_whose_sign_contradicts_its_kind_is_refused(
    conn: Connection, kind: str, delta: int
) -> None:
    insert_customer(conn)
    with pytest.raises(IntegrityError, match="ck_ledger_entries_delta_sign_matches_kind"):
        insert_entry(conn, kind=kind, delta=delta)
    assert count(conn, "ledger_entries") == 0


def test_ledger_entries_are_checked_for_kind_balance_and_event(conn: Connection) -> None:
    insert_customer(conn)
    # An unknown kind is refused twice over: by its name and by its sign rule.
    unknown_kind = r"ck_ledger_entries_(kind_known|delta_sign_matches_kind)"
    with pytest.raises(IntegrityError, match=unknown_kind):
        insert_entry(conn, kind="bonus", delta=1)
    with pytest.raises(IntegrityError, match="ck_ledger_entries_balance_after_non_negative"):
        insert_entry(conn, balance_after=-1)
    with pytest.raises(IntegrityError, match="ck_ledger_entries_usage_has_event"):
        insert_entry(conn, event_id=None)
    with pytest.raises(IntegrityError, match="ck_ledger_entries_usage_has_event"):
        insert_entry(conn, external_id=None)
    with pytest.raises(IntegrityError):  # foreign key: no ledger for a customer never granted
        insert_entry(conn, customer_id="ghost")
    assert count(conn, "ledger_entries") == 0


def test_an_idempotency_key_is_used_once_per_customer_and_kind(conn: Connection) -> None:
    insert_customer(conn)
    insert_customer(conn, "c2")
    insert_entry(conn, idempotency_key="k1")
    insert_entry(conn, idempotency_key="k1", customer_id="c2", external_id="usage_2")
    insert_entry(conn, idempotency_key="k1", kind="grant", delta=5, event_id=None)
    insert_entry(conn, idempotency_key=None, external_id="usage_3")
    insert_entry(conn, idempotency_key=None, external_id="usage_4")
    unique = r"uq_ledger_entries_customer_kind_idempotency_key|UNIQUE constraint failed: ledger"
    with pytest.raises(IntegrityError, match=unique):
        insert_entry(conn, idempotency_key="k1", external_id="usage_5")
    assert count(conn, "ledger_entries") == 5


def test_an_http_idempotency_key_is_stored_once_per_token(conn: Connection) -> None:
    for token_id, token_hash in ((1, "h1"), (2, "h2")):
        attempt(
            conn,
            "INSERT INTO api_tokens (id, scope, token_hash, created_at)"
            " VALUES (:id, 'usage', :hash, :when)",
            id=token_id,
            hash=token_hash,
            when=WHEN,
        )
    insert = (
        "INSERT INTO idempotency_records (token_id, key, request_hash, created_at)"
        " VALUES (:token, 'k', 'x', :when)"
    )
    attempt(conn, insert, token=1, when=WHEN)
    attempt(conn, insert, token=2, when=WHEN)
    with pytest.raises(IntegrityError, match=r"uq_idempotency_records_token_id_key|UNIQUE"):
        attempt(conn, insert, token=1, when=WHEN)
    assert count(conn, "idempotency_records") == 2


def insert_hold(conn: Connection, **overrides: Any) -> None:
    values: dict[str, Any] = {
        "customer_id": "c1",
        "credits": 5,
        "revoked_credits": 0,
        "status": "open",
        "expires_at": WHEN,
        "created_at": WHEN,
    } | overrides
    columns = ", ".join(values)
    attempt(
        conn,
        f"INSERT INTO holds ({columns}) VALUES ({', '.join(':' + c for c in values)})",
        **values,
    )


@pytest.mark.parametrize(
    ("hold", "constraint"),
    [
        ({"credits": -1, "revoked_credits": 6}, "ck_holds_credits_non_negative"),
        ({"credits": 0, "revoked_credits": 0, "status": "revoked"}, "ck_holds_revoked_within"),
        ({"credits": 5, "revoked_credits": -1}, "ck_holds_revoked_within_hold"),
        ({"credits": 0, "revoked_credits": 5, "status": "open"}, "ck_holds_revoked_iff_emptied"),
        ({"credits": 2, "revoked_credits": 3, "status": "revoked"}, "ck_holds_revoked_iff_emptied"),
        ({"status": "cancelled"}, "ck_holds_status_known"),
    ],
)
def test_a_hold_holds_what_a_revoke_left_and_is_revoked_only_when_emptied(
    conn: Connection, hold: dict[str, Any], constraint: str
) -> None:
    insert_customer(conn)
    insert_hold(conn)
    insert_hold(conn, credits=2, revoked_credits=3)  # shrunk by a revoke, still open
    insert_hold(conn, credits=0, revoked_credits=5, status="revoked", closed_at=WHEN)
    with pytest.raises(IntegrityError, match=constraint):
        insert_hold(conn, **hold)
    assert count(conn, "holds") == 3
