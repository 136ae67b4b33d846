"""Migrations that convert data, on PostgreSQL and SQLite, with rows the old schema wrote."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy.engine import make_url

from outbox.db import make_engine, session_scope
from outbox.ledger import get_credits, ledger_balance, record_usage
from outbox.migrate import alembic_config, upgrade
from outbox.settings import load_settings
from outbox.webhooks import receive_webhook
from tests.conftest import service_missing
from tests.polar_webhooks import CYCLE_1, CYCLE_2, credited, encode, revoked

BEFORE_WEBHOOK_BODIES = "c499b4e2ea0e"


@pytest.fixture(params=["postgresql", "sqlite"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database with no schema at all."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/migrate.db"
        return
    base = make_url(request.getfixturevalue("pg_server"))
    name = f"outbox_migrate_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except sa.exc.OperationalError as exc:
        service_missing("PostgreSQL", exc)
    yield base.set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


def test_stored_webhooks_keep_their_payload_as_body_and_get_their_id_hash(empty_url: str) -> None:
    upgrade(empty_url, BEFORE_WEBHOOK_BODIES)
    engine = sa.create_engine(empty_url, poolclass=sa.pool.NullPool)
    payload = {"type": "benefit_grant.created", "data": {"n": 1}}
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO webhook_events (webhook_id, type, payload, received_at, outcome)"
                " VALUES ('wh_old', 'benefit_grant.created', :payload, :now, 'granted')"
            ),
            {"payload": json.dumps(payload), "now": "2026-11-30 00:00:00+00"},
        )
    upgrade(empty_url)
    with engine.connect() as conn:
        row = conn.execute(
            sa.text("SELECT webhook_id, webhook_id_sha256, body, outcome FROM webhook_events")
        ).one()
    assert row.webhook_id == "wh_old" and row.outcome == "granted"
    assert row.webhook_id_sha256 == hashlib.sha256(b"wh_old").hexdigest()
    assert json.loads(bytes(row.body)) == payload

    command.downgrade(alembic_config(empty_url), BEFORE_WEBHOOK_BODIES)
    with engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT webhook_id, payload FROM webhook_events")).one()
    assert stored.webhook_id == "wh_old"
    assert (json.loads(stored.payload) if isinstance(stored.payload, str) else stored.payload) == (
        payload
    )
    engine.dispose()


OLD_NOW = "2026-11-30 00:00:00+00"


def apply_as_old_code(conn: sa.Connection, webhook_id: str, payload: dict[str, Any]) -> None:
    """What the code before 5d0e7c1f9a42 wrote for an applied Meter Credits webhook
    (`git show 28f92c6:outbox/webhooks.py`): the webhook row, and a ledger entry under
    `polar-webhook:{webhook-id}` that moved the customer's balance; no grant cycle."""
    units = payload["data"]["properties"]["last_credited_units"]
    customer = payload["data"]["customer"]["external_id"]
    revoke = payload["type"] == "benefit_grant.revoked"
    if revoke:
        delta = -abs(units)
        outcome = f"revoked up to {abs(units)} credits of {customer}: balance "
    else:
        delta = units
        outcome = f"granted {units} credits to {customer}: balance "
    conn.execute(
        sa.text(
            "INSERT INTO customers (id, balance, held, granted, used, created_at, updated_at)"
            " VALUES (:id, 0, 0, 0, 0, :now, :now) ON CONFLICT (id) DO NOTHING"
        ),
        {"id": customer, "now": OLD_NOW},
    )
    conn.execute(
        sa.text(
            "UPDATE customers SET balance = balance + :delta, granted = granted + :delta"
            " WHERE id = :id"
        ),
        {"id": customer, "delta": delta},
    )
    balance = conn.execute(
        sa.text("SELECT balance FROM customers WHERE id = :id"), {"id": customer}
    ).scalar_one()
    conn.execute(
        sa.text(
            "INSERT INTO ledger_entries"
            " (customer_id, kind, delta, balance_after, reason, idempotency_key, created_at)"
            " VALUES (:customer, :kind, :delta, :balance, :reason, :key, :now)"
        ),
        {
            "customer": customer,
            "kind": "revoke" if revoke else "grant",
            "delta": delta,
            "balance": balance,
            "reason": f"Polar {payload['type']} (webhook {webhook_id})",
            "key": f"polar-webhook:{webhook_id}",
            "now": OLD_NOW,
        },
    )
    store_as_old_code(conn, webhook_id, payload, outcome + str(balance))


def store_as_old_code(
    conn: sa.Connection, webhook_id: str, payload: dict[str, Any], outcome: str
) -> None:
    conn.execute(
        sa.text(
            "INSERT INTO webhook_events"
            " (webhook_id, type, payload, received_at, processed_at, outcome)"
            " VALUES (:id, :type, :payload, :now, :now, :outcome)"
        ),
        {
            "id": webhook_id,
            "type": payload["type"],
            "payload": json.dumps(payload),
            "now": OLD_NOW,
            "outcome": outcome,
        },
    )


def deliver(engine: sa.Engine, payload: dict[str, Any], webhook_id: str) -> str:
    settings = load_settings(polar_meter_id="meter_1")
    with session_scope(engine) as session:
        result = receive_webhook(
            session, webhook_id=webhook_id.encode(), body=encode(payload), settings=settings
        )
    return result.outcome


def balances(engine: sa.Engine, customer: str) -> tuple[int, int]:
    with session_scope(engine) as session:
        return get_credits(session, customer).balance, ledger_balance(session, customer)


def test_credits_granted_before_the_upgrade_are_revoked_after_it(empty_url: str) -> None:
    upgrade(empty_url, BEFORE_WEBHOOK_BODIES)
    engine = sa.create_engine(empty_url, poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        apply_as_old_code(conn, "wh_old_1", credited(units=20))
        apply_as_old_code(conn, "wh_old_2", credited("benefit_grant.cycled", cycle=CYCLE_2))
        # Not applied by the old code (no ledger entry): no cycle row either.
        store_as_old_code(conn, "wh_old_3", credited(grant="grant_9"), "ignored: ...")
    upgrade(empty_url)
    with engine.connect() as conn:
        cycles = conn.execute(
            sa.text("SELECT grant_id, cycle, customer_id, state, units FROM polar_grant_cycles")
        ).all()
    assert sorted(tuple(row) for row in cycles) == [
        ("grant_1", CYCLE_1, "user_1", "credited", 20),
        ("grant_1", CYCLE_2, "user_1", "credited", 20),
    ]
    assert balances(engine, "user_1") == (40, 40)

    # Polar redelivers under a new webhook id: credited once, as after the upgrade.
    assert "already credited" in deliver(engine, credited(units=20), "wh_new_1")
    assert balances(engine, "user_1") == (40, 40)
    # Each revoke takes back its cycle's credit: net zero.
    assert "revoked 20 of 20 credits" in deliver(engine, revoked(units=20), "wh_new_2")
    assert "revoked 20 of 20 credits" in deliver(engine, revoked(of_cycle=CYCLE_2), "wh_new_3")
    assert balances(engine, "user_1") == (0, 0)
    engine.dispose()


def test_a_revoke_applied_before_the_upgrade_is_not_applied_again(empty_url: str) -> None:
    upgrade(empty_url, BEFORE_WEBHOOK_BODIES)
    engine = sa.create_engine(empty_url, poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        apply_as_old_code(conn, "wh_old_0", credited(grant="grant_other", units=50))
        apply_as_old_code(conn, "wh_old_1", credited(units=20))
        apply_as_old_code(conn, "wh_old_2", revoked(units=20))
    upgrade(empty_url)
    assert balances(engine, "user_1") == (50, 50)
    # Redeliveries of the revoke and of the credit under new webhook ids change nothing.
    assert "already revoked" in deliver(engine, revoked(units=20), "wh_new_1")
    assert "already revoked" in deliver(engine, credited(units=20), "wh_new_2")
    assert balances(engine, "user_1") == (50, 50)
    engine.dispose()


BEFORE_AUTOINCREMENT = "8b2f4d6a1c3e"


def test_sqlite_event_ids_pruned_before_the_upgrade_are_not_given_again(tmp_path: Path) -> None:
    """A dev database from before AUTOINCREMENT, its newest rows already pruned: after the
    upgrade the next event's id is past every id the ledger holds, and the table keeps its
    checks and partial indexes."""
    url = f"sqlite:///{tmp_path}/dev.db"
    upgrade(url, BEFORE_AUTOINCREMENT)
    engine = make_engine(url)
    # Rows as that schema has them (today's models have columns it lacks): three usages.
    customer, when = "cust_dev", "2026-12-01 00:00:00+00:00"
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO customers (id, balance, held, granted, used, created_at, updated_at)"
                " VALUES (:c, 7, 0, 10, 3, :when, :when)"
            ),
            {"c": customer, "when": when},
        )
        ids = []
        for n in range(3):
            ids.append(
                conn.execute(
                    sa.text(
                        "INSERT INTO outbox_events (external_id, customer_id, name, credits,"
                        " metadata, occurred_at, status, attempts, next_attempt_at, created_at,"
                        " updated_at) VALUES (:x, :c, 'ai_generation', 1, '{}', :when,"
                        " 'pending', 0, :when, :when, :when) RETURNING id"
                    ),
                    {"x": f"ext_{n}", "c": customer, "when": when},
                ).scalar_one()
            )
            conn.execute(
                sa.text(
                    "INSERT INTO ledger_entries (customer_id, kind, delta, balance_after,"
                    " event_id, external_id, created_at) VALUES (:c, 'usage', -1, :b, :e, :x,"
                    " :when)"
                ),
                {"c": customer, "b": 9 - n, "e": ids[-1], "x": f"ext_{n}", "when": when},
            )
        conn.exec_driver_sql(f"DELETE FROM outbox_events WHERE id >= {ids[1]}")  # pruned
    engine.dispose()
    upgrade(url)
    engine = make_engine(url)
    with session_scope(engine) as session:
        assert record_usage(session, customer, 1).event_id == ids[2] + 1
    fresh_url = f"sqlite:///{tmp_path}/fresh.db"
    upgrade(fresh_url)
    fresh = make_engine(fresh_url)

    def schema(e: sa.Engine) -> list[tuple[str, str]]:
        with e.connect() as conn:
            rows = conn.exec_driver_sql(
                "SELECT name, sql FROM sqlite_master WHERE tbl_name = 'outbox_events'"
                " AND type = 'index' AND sql IS NOT NULL ORDER BY name"
            )
            return [(r[0], r[1]) for r in rows]

    assert schema(engine) == schema(fresh) and len(schema(fresh)) >= 5
    with engine.connect() as conn:
        table = conn.exec_driver_sql(
            "SELECT sql FROM sqlite_master WHERE name = 'outbox_events'"
        ).scalar()
    assert "AUTOINCREMENT" in table and "ck_outbox_events_lease_iff_inflight" in table
    engine.dispose()
    fresh.dispose()


BEFORE_REFUNDS = "3f6a9c2e7b15"


def test_rows_that_may_be_at_polar_before_the_refunds_revision_are_never_cancelled(
    empty_url: str,
) -> None:
    """Rows written before the refunds revision: those a send may have put at Polar (retried,
    leased, delivered, replayed) are marked, so a refund compensates them; the ledger's append
    only guard survives SQLite's table copy."""
    upgrade(empty_url, BEFORE_REFUNDS)
    engine = sa.create_engine(empty_url, poolclass=sa.pool.NullPool)
    when = "2026-12-01 00:00:00+00:00"
    rows = {  # external_id: (status, attempts, lease, delivered_at, last_replay_id)
        "never_sent": ("pending", 0, None, None, None),
        "retried": ("pending", 2, None, None, None),
        "leased": ("inflight", 0, when, None, None),
        "delivered": ("delivered", 0, None, when, None),
        "replayed": ("pending", 0, None, None, 7),
        "refused": ("failed", 1, None, None, None),
    }
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO customers (id, balance, held, granted, used, created_at, updated_at)"
                " VALUES ('c1', 0, 0, 0, 0, :when, :when)"
            ),
            {"when": when},
        )
        for n, (external_id, (status, attempts, lease, delivered, replay)) in enumerate(
            rows.items(), 1
        ):
            conn.execute(
                sa.text(
                    "INSERT INTO outbox_events (id, external_id, customer_id, name, credits,"
                    " metadata, occurred_at, status, attempts, next_attempt_at, lease_owner,"
                    " lease_expires_at, created_at, updated_at, delivered_at, last_replay_id)"
                    " VALUES (:id, :external_id, 'c1', 'ai_generation', 1, '{}', :when, :status,"
                    " :attempts, :when, :owner, :lease, :when, :when, :delivered, :replay)"
                ),
                {
                    "id": n,
                    "external_id": external_id,
                    "when": when,
                    "status": status,
                    "attempts": attempts,
                    "owner": "w" if lease else None,
                    "lease": lease,
                    "delivered": delivered,
                    "replay": replay,
                },
            )
    upgrade(empty_url)
    with engine.begin() as conn:
        marked = dict(
            conn.execute(sa.text("SELECT external_id, maybe_at_polar FROM outbox_events")).all()
        )
    assert {k: bool(v) for k, v in marked.items()} == {
        "never_sent": False,
        "retried": True,
        "leased": True,
        "delivered": True,
        "replayed": True,
        "refused": True,  # attempts spent: a 422 or exhausted retries, unknown here
    }
    with pytest.raises(sa.exc.DBAPIError, match="append-only"), engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO ledger_entries (customer_id, kind, delta, balance_after, created_at)"
                " VALUES ('c1', 'grant', 1, 1, :when)"
            ),
            {"when": when},
        )
        conn.execute(sa.text("DELETE FROM ledger_entries"))
    engine.dispose()
