"""The benchmark database: drop, create and migrate it, empty and seed it, check the ledger.

The benchmarks never touch the test suite's database: `recreate_database` refuses any database
whose name does not contain "bench".
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/outbox_bench"
CUSTOMER_PREFIX = "bench_"
HOT_CUSTOMER = "bench_1"
# Big enough that no run of any length drains a customer by accident.
HUGE_BALANCE = 1_000_000_000_000


def connect(conninfo: str, **kwargs: Any) -> psycopg.Connection[Any]:
    """psycopg.connect, waiting up to a minute while PostgreSQL is out of connections (on a
    shared machine, other work may hold most of max_connections for a moment)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return psycopg.connect(conninfo, **kwargs)
        except psycopg.OperationalError as exc:
            if "too many clients" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def libpq_url(url: str) -> str:
    """The libpq form of a SQLAlchemy URL (`postgresql+psycopg://` -> `postgresql://`)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(scheme=parts.scheme.split("+", 1)[0]))


def database_name(url: str) -> str:
    """The database a URL points at."""
    return urlsplit(url).path.lstrip("/")


def maintenance_url(url: str) -> str:
    """The `postgres` database of the same server (to create or drop the benchmark's)."""
    return urlunsplit(urlsplit(libpq_url(url))._replace(path="/postgres"))


def recreate_database(url: str) -> None:
    """Drop and create the benchmark database, then migrate it to the newest schema.

    Refuses a name without "bench" so a typo can never wipe the test suite's database.
    """
    name = database_name(url)
    if "bench" not in name or not name.replace("_", "").isalnum():
        raise SystemExit(f"refusing to recreate {name!r}: benchmark databases contain 'bench'")
    with connect(maintenance_url(url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    from outbox.migrate import upgrade

    upgrade(url)


def drop_database(url: str) -> None:
    """Drop the benchmark database (end of run, unless asked to keep it)."""
    name = database_name(url)
    if "bench" not in name:
        raise SystemExit(f"refusing to drop {name!r}")
    with connect(maintenance_url(url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def reset_tables(url: str) -> None:
    """Empty every table of the schema (not `alembic_version`) and checkpoint, so each scenario
    starts from the same empty indexes and no checkpoint left by the last one lands in it."""
    with connect(libpq_url(url), autocommit=True) as conn:
        tables = [
            row[0]
            for row in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
                " AND tablename <> 'alembic_version'"
            )
        ]
        conn.execute("TRUNCATE " + ", ".join(f'"{t}"' for t in tables) + " RESTART IDENTITY")
        conn.execute("CHECKPOINT")


def seed_customers(url: str, count: int, balance: int) -> None:
    """`count` customers `bench_1..bench_<count>` with `balance` credits each, every one backed
    by a grant ledger entry so `balance == sum(delta)` holds as it would after `grant_credits`."""
    with connect(libpq_url(url), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO customers (id, balance, held, granted, used, created_at, updated_at)"
            " SELECT %s || g, %s, 0, %s, 0, now(), now() FROM generate_series(1, %s) g",
            (CUSTOMER_PREFIX, balance, balance, count),
        )
        conn.execute(
            "INSERT INTO ledger_entries (customer_id, kind, delta, balance_after, reason,"
            " created_at) SELECT %s || g, 'grant', %s, %s, 'benchmark seed', now()"
            " FROM generate_series(1, %s) g",
            (CUSTOMER_PREFIX, balance, balance, count),
        )
        # Only the seeded tables: ANALYZE of a table emptied by TRUNCATE records it as empty,
        # and the planner then scans it sequentially while a scenario fills it (the keyed
        # usage's lookup of idempotency_records slowed down within every round after the first).
        # Left unanalyzed, it is "unknown" and gets index scans, as a table in service does.
        conn.execute("ANALYZE customers, ledger_entries")


def customer_id(number: int) -> str:
    """The id of seeded customer `number` (1-based)."""
    return f"{CUSTOMER_PREFIX}{number}"


@dataclass(frozen=True)
class LedgerCheck:
    """What the database says after a scenario: the invariants a load must never break."""

    events: int
    usage_entries: int
    mismatched_customers: int  # balance != sum(ledger delta)
    negative_balances: int

    @property
    def consistent(self) -> bool:
        return (
            self.mismatched_customers == 0
            and self.negative_balances == 0
            and self.events == self.usage_entries
        )


def check_ledger(url: str) -> LedgerCheck:
    """Count outbox rows and usage entries, and look for broken balances."""
    with connect(libpq_url(url), autocommit=True) as conn:
        events = conn.execute("SELECT count(*) FROM outbox_events").fetchone()
        usage = conn.execute("SELECT count(*) FROM ledger_entries WHERE kind = 'usage'").fetchone()
        mismatched = conn.execute(
            "SELECT count(*) FROM customers c LEFT JOIN (SELECT customer_id, sum(delta) AS s"
            " FROM ledger_entries GROUP BY customer_id) l ON l.customer_id = c.id"
            " WHERE c.balance <> coalesce(l.s, 0)"
        ).fetchone()
        negative = conn.execute("SELECT count(*) FROM customers WHERE balance < 0").fetchone()
    assert events and usage and mismatched and negative
    return LedgerCheck(int(events[0]), int(usage[0]), int(mismatched[0]), int(negative[0]))


def create_usage_token(url: str) -> str:
    """A fresh `usage` token in the benchmark database."""
    from sqlalchemy.pool import NullPool

    from outbox.db import make_engine, session_scope
    from outbox.tokens import create_token

    engine = make_engine(url, poolclass=NullPool)
    deadline = time.monotonic() + 60
    try:
        while True:
            try:
                with session_scope(engine) as session:
                    token, _ = create_token(session, "usage", "bench")
                return token
            except Exception as exc:  # out of connections on a shared machine: wait
                if "too many clients" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
    finally:
        engine.dispose()
