"""The outbox rows of a drain: pre-filled with SQL, waited on until drained, and timed from
their own `delivered_at` and `created_at`."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg

from bench.common import HUGE_BALANCE, libpq_url, reset_tables, seed_customers
from bench.drain.config import CUSTOMERS

# Pre-filled rows: due a minute ago (past any clock margin), 1000 customers, unique external ids.
SEED_SQL = (
    "INSERT INTO outbox_events (external_id, customer_id, name, credits, metadata, occurred_at,"
    " status, attempts, next_attempt_at, created_at, updated_at, delivered_at)"
    " SELECT %(prefix)s || g, 'bench_' || (1 + g %% %(customers)s), 'ai_generation', 1,"
    " %(metadata)s::jsonb, t, %(status)s, 0, t, t, t, CASE WHEN %(delivered)s THEN t END"
    " FROM generate_series(1, %(rows)s) g, (SELECT now() - %(age)s::interval AS t) n"
)


def seed_rows(url: str, rows: int, *, status: str = "pending", age: str = "1 minute") -> None:
    """`rows` outbox rows in `status` ('pending' or 'delivered'), inserted by one SQL statement."""
    prefix = "usage_p" if status == "pending" else "usage_d"
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        conn.execute(
            SEED_SQL,
            {
                "prefix": prefix,
                "status": status,
                "delivered": status == "delivered",
                "rows": rows,
                "age": age,
                "customers": CUSTOMERS,
                "metadata": '{"model": "bench"}',
            },
        )


def prepare_outbox(url: str, pending: int, *, delivered: int = 0, customers: int = 0) -> None:
    """Empty every table, pre-fill the outbox, VACUUM (ANALYZE) and CHECKPOINT: each scenario
    starts from the same clean heap and fresh statistics (autovacuum may be off, as here)."""
    reset_tables(url)
    if customers:
        seed_customers(url, customers, HUGE_BALANCE)
    if delivered:
        seed_rows(url, delivered, status="delivered", age="1 day")
    if pending:
        seed_rows(url, pending)
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE)")
        conn.execute("CHECKPOINT")


def outbox_busy(conn: psycopg.Connection[Any]) -> bool:
    """Any pending or inflight row left? (Both partial indexes answer it without a scan.)"""
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM outbox_events WHERE status = 'pending')"
        " OR EXISTS (SELECT 1 FROM outbox_events WHERE status = 'inflight')"
    ).fetchone()
    return bool(row and row[0])


def wait_drained(url: str, timeout: float, *, poll: float = 0.2) -> bool:
    """Block until the outbox has nothing pending or inflight (True) or `timeout` passes."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        while time.monotonic() < deadline:
            if not outbox_busy(conn):
                return True
            time.sleep(poll)
    return False


def status_counts(url: str) -> dict[str, int]:
    """Outbox rows by status."""
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        return {
            str(status): int(n)
            for status, n in conn.execute(
                "SELECT status, count(*) FROM outbox_events GROUP BY status"
            )
        }


@dataclass(frozen=True)
class DrainTimes:
    """When the rows of one drain were delivered (epoch seconds)."""

    rows: int
    first: float
    last: float
    steady_rows: int  # delivered after the 10th and up to the 90th percentile
    steady_seconds: float


def delivery_times(url: str, since: float) -> DrainTimes:
    """The steady window of the rows delivered after `since`, from their `delivered_at`."""
    since_ts = datetime.fromtimestamp(since, UTC)
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*), min(delivered_at), max(delivered_at),"
            " percentile_disc(0.1) WITHIN GROUP (ORDER BY delivered_at),"
            " percentile_disc(0.9) WITHIN GROUP (ORDER BY delivered_at)"
            " FROM outbox_events WHERE status = 'delivered' AND delivered_at >= %s",
            (since_ts,),
        ).fetchone()
        assert row is not None
        count, first, last, p10, p90 = row
        if not count:
            return DrainTimes(0, since, since, 0, 0.0)
        steady = conn.execute(
            "SELECT count(*) FROM outbox_events WHERE status = 'delivered'"
            " AND delivered_at > %s AND delivered_at <= %s",
            (p10, p90),
        ).fetchone()
    assert steady is not None
    return DrainTimes(
        rows=int(count),
        first=first.timestamp(),
        last=last.timestamp(),
        steady_rows=int(steady[0]),
        steady_seconds=(p90 - p10).total_seconds(),
    )


def delivered_between(url: str, start: float, end: float) -> int:
    """Rows whose `delivered_at` falls in [start, end)."""
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM outbox_events WHERE status = 'delivered'"
            " AND delivered_at >= %s AND delivered_at < %s",
            (datetime.fromtimestamp(start, UTC), datetime.fromtimestamp(end, UTC)),
        ).fetchone()
    return int(row[0]) if row else 0


@dataclass(frozen=True)
class Latencies:
    """Commit -> accepted (delivered_at - created_at) of the rows created in a window."""

    rows: int
    p50: float
    p99: float
    max: float
    lib_rows: int
    lib_p99: float
    undelivered: int


def latencies(url: str, start: float, end: float) -> Latencies:
    """Percentiles (nearest rank) of delivered_at - created_at for rows created in [start, end);
    `lib_*` for the rows `record_usage` wrote (metadata source=lib)."""
    window = (datetime.fromtimestamp(start, UTC), datetime.fromtimestamp(end, UTC))
    lag = "extract(epoch FROM delivered_at - created_at)"
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        row = conn.execute(
            f"SELECT count(*), percentile_disc(0.5) WITHIN GROUP (ORDER BY {lag}),"
            f" percentile_disc(0.99) WITHIN GROUP (ORDER BY {lag}), max({lag}),"
            " count(*) FILTER (WHERE metadata->>'source' = 'lib'),"
            f" percentile_disc(0.99) WITHIN GROUP (ORDER BY {lag})"
            "   FILTER (WHERE metadata->>'source' = 'lib'),"
            " count(*) FILTER (WHERE status <> 'delivered')"
            " FROM outbox_events WHERE created_at >= %s AND created_at < %s",
            window,
        ).fetchone()
    assert row is not None

    def num(value: Any) -> float:
        return math.nan if value is None else float(value)

    return Latencies(
        rows=int(row[0]),
        p50=num(row[1]),
        p99=num(row[2]),
        max=num(row[3]),
        lib_rows=int(row[4]),
        lib_p99=num(row[5]),
        undelivered=int(row[6]),
    )
