"""Console benchmark: what each console page costs with 1,000,000 delivered and 10,000 failed
rows, and what an overview refresh costs PostgreSQL.

Its own database (default `outbox_bench_console`, dropped and re-created), seeded with
generate_series SQL: customers, 1,000,000 delivered usages over the last 30 days (with their
ledger entries and one attempt each), 10,000 failed ones over the last 2 days (25 distinct
Polar messages, one failed attempt each) and 500 pending. Then:

  1. the overview's queries, each under EXPLAIN (ANALYZE, BUFFERS): the plan's indexes;
  2. PostgreSQL CPU per overview refresh: the backend's utime+stime (/proc/<pid>/stat, the
     server must be on this machine) over --refreshes calls of `outbox.ops.overview.overview`;
  3. each page over HTTP (uvicorn in this process, signed in with an admin token): --requests
     sequential requests after a warm-up; p50 and p99 as the client sees them.

    python bench/console.py                     # the issue's run (seeding ~1-2 min)
    python bench/console.py --delivered 100000  # smaller
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from sqlalchemy import event, text
from sqlalchemy.orm import Session

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import connect, libpq_url, recreate_database

DEFAULT_CONSOLE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/outbox_bench_console"
MESSAGES = 25
PENDING = 500


def seed(url: str, delivered: int, failed: int, customers: int) -> None:
    with connect(libpq_url(url), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO customers (id, balance, held, granted, used, created_at, updated_at)"
            " SELECT 'bench_' || g, 1000000000, 0, 1000000000, 0, now() - interval '40 days',"
            " now() - interval '40 days' FROM generate_series(1, %(n)s) g",
            {"n": customers},
        )
        conn.execute(
            "INSERT INTO ledger_entries (customer_id, kind, delta, balance_after, reason,"
            " created_at) SELECT 'bench_' || g, 'grant', 1000000000, 1000000000, 'seed',"
            " now() - interval '40 days' FROM generate_series(1, %(n)s) g",
            {"n": customers},
        )
        total = delivered + failed + PENDING
        rows = (
            " FROM (SELECT i, 'bench_' || (1 + (i * 7919) %% %(customers)s) AS customer,"
            " 1 + i %% 5 AS credits, 'usage_' || md5('bench' || i) AS external_id,"
            " CASE WHEN i <= %(delivered)s"
            "   THEN now() - interval '30 days' + (i::float8 / %(delivered)s) * interval '30 days'"
            "   WHEN i <= %(delivered)s + %(failed)s"
            "   THEN now() - interval '2 days' + ((i - %(delivered)s)::float8 / %(failed)s)"
            "     * interval '2 days'"
            "   ELSE now() - interval '1 second' * (i %% 60) END AS at,"
            " CASE WHEN i <= %(delivered)s THEN 'delivered'"
            "   WHEN i <= %(delivered)s + %(failed)s THEN 'failed' ELSE 'pending' END AS status"
            " FROM generate_series(1, %(total)s::bigint) i) u"
        )
        params = {
            "customers": customers,
            "delivered": delivered,
            "failed": failed,
            "total": total,
            "messages": MESSAGES,
        }
        conn.execute(
            "INSERT INTO outbox_events (id, external_id, customer_id, name, credits, metadata,"
            " occurred_at, status, attempts, next_attempt_at, created_at, updated_at,"
            " delivered_at, last_error) SELECT i, external_id, customer, 'ai_generation',"
            " credits, jsonb_build_object('model', 'm' || (i %% 3)), at, status,"
            " CASE status WHEN 'pending' THEN 0 ELSE 1 END, at, at,"
            " at + interval '1.2 seconds',"
            " CASE status WHEN 'delivered' THEN at + interval '1.2 seconds' END,"
            " CASE status WHEN 'failed' THEN '422: external_customer_id: Customer bench_'"
            "   || (i %% %(messages)s) || ' is not accepted' END" + rows,
            params,
        )
        conn.execute(
            "SELECT setval(pg_get_serial_sequence('outbox_events', 'id'), %(total)s)",
            {"total": total},
        )
        conn.execute(
            "INSERT INTO ledger_entries (customer_id, kind, delta, balance_after, event_id,"
            " external_id, created_at) SELECT customer, 'usage', -credits, 1000000000, i,"
            " external_id, at" + rows,
            params,
        )
        conn.execute(
            "INSERT INTO delivery_attempts (event_id, attempted_at, decision, claim_token,"
            " attempt, polar_status, message) SELECT i, at + interval '1.2 seconds',"
            " CASE status WHEN 'delivered' THEN 'delivered' ELSE 'failed' END,"
            " 'bench-worker:1:' || (i / 500), 1,"
            " CASE status WHEN 'delivered' THEN 200 ELSE 422 END,"
            " CASE status WHEN 'failed' THEN '422: external_customer_id: Customer bench_'"
            "   || (i %% %(messages)s) || ' is not accepted' END"
            + rows
            + " WHERE status <> 'pending'",
            params,
        )
        conn.execute(
            "INSERT INTO service_state (key, value, detail, updated_at) VALUES"
            " ('delivery_last_drain', '500', 'bench-worker:1', now()),"
            " ('worker:bench-worker:1', 'alive', 'bench-worker:1', now())"
        )
        conn.execute("VACUUM ANALYZE")


def captured_overview_statements(session: Session) -> list[tuple[str, Any]]:
    from outbox.ops.overview import overview

    seen: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        seen.append((statement, parameters))

    engine = session.get_bind()
    event.listen(engine, "before_cursor_execute", capture)
    try:
        overview(session)
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    return seen


def explain(session: Session, statements: list[tuple[str, Any]]) -> list[str]:
    out = []
    raw = session.connection().connection.driver_connection
    assert raw is not None
    for statement, parameters in statements:
        plan = [
            row[0]
            for row in raw.execute(
                "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + statement, parameters
            ).fetchall()
        ]
        first = " ".join(statement.split())[:160]
        out.append(f"-- {first}\n" + "\n".join(plan))
    return out


def backend_cpu_seconds(session: Session) -> float:
    pid = session.execute(text("SELECT pg_backend_pid()")).scalar_one()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def overview_cpu(url: str, refreshes: int) -> tuple[float, float]:
    """PostgreSQL CPU and wall time per overview refresh (ms)."""
    from outbox.db import make_engine
    from outbox.ops.overview import overview

    engine = make_engine(url)
    with Session(engine) as session:
        for _ in range(5):
            overview(session)
            session.rollback()
        before = backend_cpu_seconds(session)
        started = time.perf_counter()
        for _ in range(refreshes):
            overview(session)
            session.rollback()
        wall = time.perf_counter() - started
        after = backend_cpu_seconds(session)
    engine.dispose()
    return (after - before) * 1000 / refreshes, wall * 1000 / refreshes


def serve(url: str) -> tuple[str, uvicorn.Server, threading.Thread, str]:
    from api.app import create_app
    from outbox.db import make_engine, session_scope
    from outbox.settings import load_settings
    from outbox.tokens import create_token

    settings = load_settings(
        database_url=url, redis_url=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/7")
    )
    engine = make_engine(url)
    with session_scope(engine) as session:
        token, _ = create_token(session, "admin", name="bench")
    app = create_app(settings)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    engine.dispose()
    return f"http://127.0.0.1:{sock.getsockname()[1]}", server, thread, token


def pages(delivered: int, failed: int) -> dict[str, str]:
    failed_id = delivered + failed // 2
    group = "422: external_customer_id: Customer bench_7 is not accepted"
    return {
        "overview": "/console",
        "failed": "/console/failed",
        "events": "/console/events",
        "events, older page": "/console/events?cursor=" + str(delivered // 2),
        "events ?status=failed": "/console/events?status=failed",
        "events ?status=pending": "/console/events?status=pending",
        "events ?status=delivered": "/console/events?status=delivered",
        "events ?error=bench_7": "/console/events?error=bench_7",
        "events ?customer=bench_42": "/console/events?customer=bench_42",
        "events ?since=..&until=.. (a day, 10 days ago)": (
            "/console/events?since=" + _days_ago(10) + "&until=" + _days_ago(9)
        ),
        "event (failed)": f"/console/events/{failed_id}",
        "event (delivered)": f"/console/events/{delivered // 3}",
        "customers ?q=bench_4": "/console/customers?q=bench_4",
        "customer bench_42": "/console/customers/bench_42",
        "replay preview (a group, 400 rows)": "/console/replay/preview?message=" + group,
        "replay preview (all 10,000 failed)": "/console/replay/preview?all=true",
        "reconcile": "/console/reconcile",
        "webhooks": "/console/webhooks",
        "audit": "/console/audit",
    }


def _days_ago(days: int) -> str:
    from datetime import UTC, datetime, timedelta

    return (datetime.now(UTC) - timedelta(days=days)).strftime("%Y-%m-%dT%H:%M")


def measure_pages(base: str, token: str, paths: dict[str, str], requests: int) -> list[str]:
    with httpx.Client(base_url=base, timeout=60) as client:
        login = client.get("/console/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', login.text)
        assert csrf is not None
        client.post("/console/login", data={"token": token, "csrf": csrf.group(1)})
        rows = []
        for name, path in paths.items():
            for _ in range(3):
                answer = client.get(path)
                assert answer.status_code == 200, (name, answer.status_code, answer.text[:300])
            samples = []
            for _ in range(requests):
                started = time.perf_counter()
                answer = client.get(path)
                samples.append((time.perf_counter() - started) * 1000)
                assert answer.status_code == 200
            samples.sort()
            p99 = samples[min(len(samples) - 1, int(0.99 * len(samples)))]
            rows.append(
                f"| {name} | {statistics.median(samples):.1f} | {p99:.1f} | "
                f"{len(answer.content) // 1024} |"
            )
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("BENCH_DATABASE_URL", DEFAULT_CONSOLE_URL))
    parser.add_argument("--delivered", type=int, default=1_000_000)
    parser.add_argument("--failed", type=int, default=10_000)
    parser.add_argument("--customers", type=int, default=2_000)
    parser.add_argument("--refreshes", type=int, default=200)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--no-seed", action="store_true", help="reuse the seeded database")
    args = parser.parse_args()

    if not args.no_seed:
        recreate_database(args.url)
        started = time.perf_counter()
        seed(args.url, args.delivered, args.failed, args.customers)
        print(f"seeded in {time.perf_counter() - started:.0f} s", flush=True)

    from outbox.db import make_engine

    engine = make_engine(args.url)
    with Session(engine) as session:
        plans = explain(session, captured_overview_statements(session))
    engine.dispose()
    print("\n## EXPLAIN of the overview's queries\n")
    for plan in plans:
        print(plan + "\n")

    cpu, wall = overview_cpu(args.url, args.refreshes)
    print(
        f"overview refresh: PostgreSQL CPU {cpu:.2f} ms, wall {wall:.2f} ms (mean of "
        f"{args.refreshes})\n",
        flush=True,
    )

    base, server, thread, token = serve(args.url)
    print("| page | p50 ms | p99 ms | KiB |\n|---|---|---|---|")
    try:
        measure_pages(base, token, pages(args.delivered, args.failed), args.requests)
    finally:
        server.should_exit = True
        thread.join(10)


if __name__ == "__main__":
    main()
