"""Reconcile benchmark (issue #11): how many Polar requests, and how long, does `outbox reconcile`
need for 100,000 delivered events over 200 customers and 3 days?

Its own database (default `outbox_bench_reconcile`, dropped and re-created), seeded with SQL
(customers and grants four days back, then N usage ledger entries and their delivered outbox
rows spread evenly over the window); the Polar emulator in this process, loaded through its
internal API with the same events as delivery would have sent them. Then, one after the other:

  a   no drift: Polar holds exactly the delivered events
  b   K events deleted at Polar (missing): each must be named exactly
  c   K events with other credits at Polar (mismatched): each must be named exactly

Each scenario runs `outbox.reconcile.reconcile` (what `outbox reconcile` runs) over the whole
window, with POLAR_METER_ID set (no meter lookup) and a rate budget that never waits, and counts
the HTTP requests the emulator received. The old algorithm listed every event in the window,
100 per request: ceil(N / 100) requests (computed, not run: it did not finish 100k in 15 min).

    python bench/reconcile.py                                  # the issue's run
    python bench/reconcile.py --events 10000 --customers 800   # how it grows
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import polar_emulator
from bench.common import (
    DEFAULT_URL,
    describe_machine,
    drop_database,
    libpq_url,
    machine_facts,
    recreate_database,
)
from outbox.db import make_engine, session_scope
from outbox.ops.reconcile import reconcile
from outbox.polar.gateway import PolarGateway
from outbox.polar.ratelimit import LocalRateBudget
from outbox.settings import load_settings

URL = DEFAULT_URL.rsplit("/", 1)[0] + "/outbox_bench_reconcile"
OLD_PAGE_SIZE = 100


def seed(url: str, events: int, customers: int, days: float, start: datetime) -> None:
    """Customers with grants (four days before the window: this database is older than it),
    then `events` delivered usages spread evenly over `days`, each with its ledger entry."""
    step = days * 86400 / events
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO customers (id, balance, held, granted, used, created_at, updated_at)"
            " SELECT 'bench_' || g, 1000000000, 0, 1000000000, 0, %(born)s, %(born)s"
            " FROM generate_series(1, %(n)s) g",
            {"n": customers, "born": start - timedelta(days=4)},
        )
        conn.execute(
            "INSERT INTO ledger_entries (customer_id, kind, delta, balance_after, reason,"
            " created_at) SELECT 'bench_' || g, 'grant', 1000000000, 1000000000, 'seed',"
            " %(born)s FROM generate_series(1, %(n)s) g",
            {"n": customers, "born": start - timedelta(days=4)},
        )
        usage = (
            " FROM (SELECT i, 'bench_' || (1 + (i * 7919) %% %(customers)s) AS customer,"
            " 1 + i %% 5 AS credits, 'usage_' || md5('bench' || i) AS external_id,"
            " %(start)s::timestamptz + i * %(step)s * interval '1 second' AS at"
            " FROM generate_series(1, %(events)s) i) u"
        )
        params = {"customers": customers, "events": events, "start": start, "step": step}
        conn.execute(
            "INSERT INTO outbox_events (id, external_id, customer_id, name, credits,"
            " metadata, occurred_at, status, attempts, next_attempt_at, created_at,"
            " updated_at, delivered_at) SELECT i, external_id, customer, 'ai_generation',"
            " credits, '{}', at, 'delivered', 1, at, at, at, at" + usage,
            params,
        )
        conn.execute(
            "INSERT INTO ledger_entries (customer_id, kind, delta, balance_after, event_id,"
            " external_id, created_at) SELECT customer, 'usage', -credits, 1000000000, i,"
            " external_id, at" + usage,
            params,
        )
        conn.execute("ANALYZE")


def load_emulator(url: str, emulator: polar_emulator.RunningEmulator) -> int:
    """Put every delivered event into the emulator as delivery sends it (internal API)."""
    with psycopg.connect(libpq_url(url)) as conn:
        rows = conn.execute(
            "SELECT id, external_id, customer_id, credits, occurred_at FROM outbox_events"
        ).fetchall()
    events = [
        {
            "name": "ai_generation",
            "external_customer_id": customer,
            "external_id": external_id,
            "timestamp": at,
            "metadata": {
                "credits_used": credits,
                "usage_id": str(event_id),
                "usage_external_id": external_id,
            },
        }
        for event_id, external_id, customer, credits, at in rows
    ]
    with emulator.state.lock:
        inserted, _ = emulator.state.store(events)
    return inserted


def run_reconcile(
    url: str, emulator: polar_emulator.RunningEmulator, since: datetime, until: datetime
) -> tuple[dict[str, Any], float, int]:
    settings = load_settings(
        database_url=url,
        polar_access_token=emulator.token,
        polar_base_url=emulator.url,
        polar_meter_id=polar_emulator.METER_ID,
        polar_requests_per_minute=100_000,
    )
    gateway = PolarGateway(settings, budget=LocalRateBudget(100_000), budget_share=0.2)
    engine = make_engine(url)
    before = emulator.state.stats.requests
    started = time.perf_counter()
    try:
        with session_scope(engine) as session:
            report = reconcile(session, gateway, settings, since=since, until=until)
    finally:
        gateway.close()
        engine.dispose()
    return report.as_dict(), time.perf_counter() - started, emulator.state.stats.requests - before


def named(report: dict[str, Any], kind: str) -> set[int]:
    out: set[int] = set()
    for customer in report["customers"]:
        for item in customer[kind]:
            out.add(int(item["event_id"]) if isinstance(item, dict) else int(item))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=URL)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--customers", type=int, default=200)
    parser.add_argument("--days", type=float, default=3.0)
    parser.add_argument("--differences", type=int, default=5)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    args = parser.parse_args()

    now = datetime.now(UTC).replace(microsecond=0)
    start = now - timedelta(days=args.days, hours=1)
    until = start + timedelta(days=args.days, seconds=1)
    facts = machine_facts(args.url)
    recreate_database(args.url)
    t0 = time.perf_counter()
    seed(args.url, args.events, args.customers, args.days, start)
    emulator = polar_emulator.serve_in_thread()
    loaded = load_emulator(args.url, emulator)
    seeded_in = time.perf_counter() - t0
    rng = random.Random(args.seed)
    picked = rng.sample(range(1, args.events + 1), args.differences * 2)
    missing_ids, mismatched_ids = set(picked[: args.differences]), set(picked[args.differences :])
    by_usage_id = {int(e.metadata["usage_id"]): e for e in emulator.state.events}
    rows: list[dict[str, Any]] = []
    try:
        report, seconds, requests = run_reconcile(args.url, emulator, start, until)
        rows.append(
            {
                "key": "a",
                "what": "no drift",
                "seconds": seconds,
                "requests": requests,
                "found_exactly": not report["differs"],
                "report_requests": report["polar_requests"],
            }
        )
        baseline = requests

        removed = [by_usage_id[i] for i in sorted(missing_ids)]
        for event in removed:
            assert emulator.state.delete(str(event.external_id))
        report, seconds, requests = run_reconcile(args.url, emulator, start, until)
        rows.append(
            {
                "key": "b",
                "what": f"{args.differences} missing at Polar",
                "seconds": seconds,
                "requests": requests,
                "extra": requests - baseline,
                "found_exactly": named(report, "missing") == missing_ids
                and not named(report, "mismatched")
                and report["totals"]["unknown"] == 0,
                "report_requests": report["polar_requests"],
            }
        )
        with emulator.state.lock:
            emulator.state.events.extend(removed)
            emulator.state.by_external_id.update({str(e.external_id): e for e in removed})

        for i in mismatched_ids:
            by_usage_id[i].metadata["credits_used"] += 1
        report, seconds, requests = run_reconcile(args.url, emulator, start, until)
        rows.append(
            {
                "key": "c",
                "what": f"{args.differences} mismatched credits",
                "seconds": seconds,
                "requests": requests,
                "extra": requests - baseline,
                "found_exactly": named(report, "mismatched") == mismatched_ids
                and not named(report, "missing")
                and report["totals"]["unknown"] == 0,
                "report_requests": report["polar_requests"],
            }
        )
    finally:
        emulator.stop()
        if not args.keep:
            drop_database(args.url)

    old = math.ceil(args.events / OLD_PAGE_SIZE)
    print()
    print(
        f"{args.events:,} delivered events, {args.customers} customers, {args.days:g} days "
        f"(seeded and loaded into the emulator in {seeded_in:.1f} s; {loaded:,} stored)"
    )
    print()
    print(
        "| scenario | wall time | Polar requests | extra vs (a) | old full listing"
        " | named exactly |"
    )
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['key']}: {row['what']} | {row['seconds']:.2f} s | {row['requests']} "
            f"| {row.get('extra', '')} | {old:,} (computed) | "
            f"{'yes' if row['found_exactly'] else 'NO'} |"
        )
    print()
    print(describe_machine(facts) + " (shared with other jobs: times are noisy)")
    print(
        "command: python bench/reconcile.py "
        f"--events {args.events} --customers {args.customers} --days {args.days:g} "
        f"--differences {args.differences}"
    )
    goals = [
        f"goal (a) <= 10 requests and < 30 s: {rows[0]['requests']} requests, "
        f"{rows[0]['seconds']:.1f} s",
        f"goal (b), (c) found exactly with < 100 extra requests: "
        f"b {rows[1]['extra']} ({'found' if rows[1]['found_exactly'] else 'NOT found'}), "
        f"c {rows[2]['extra']} ({'found' if rows[2]['found_exactly'] else 'NOT found'})",
    ]
    print("\n".join(goals))
    if args.json:
        args.json.write_text(
            json.dumps({"machine": facts, "args": vars(args) | {"json": None}, "rows": rows}) + "\n"
        )
    if not all(row["found_exactly"] for row in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
