"""CPU per `record_usage` call, in-process, one thread: where the library path spends its time.

One session and one transaction per call (`outbox.db.session_scope`), as an application would
use it; the CPU is this process's (`time.process_time`), so PostgreSQL's share and the network
wait are left out. `--profile` also prints the top of a cProfile run (CPU clock).

    python bench/profile_record_usage.py                # CPU ms per call
    python bench/profile_record_usage.py --profile      # and where it goes
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import drop_database, libpq_url, recreate_database, seed_customers

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/outbox_bench_profile"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=DEFAULT_URL, help="benchmark database (DROPPED)")
    parser.add_argument("--calls", type=int, default=2000, help="measured calls")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the calls")
    args = parser.parse_args()

    recreate_database(args.url)
    try:
        seed_customers(args.url, 100, 10**9)
        from outbox.db import make_engine, session_scope
        from outbox.ledger import record_usage
        from outbox.settings import load_settings

        settings = load_settings(database_url=args.url)
        engine = make_engine(args.url)
        with psycopg.connect(libpq_url(args.url)) as conn:
            customers = [row[0] for row in conn.execute("SELECT id FROM customers")]

        def run(calls: int) -> None:
            for i in range(calls):
                with session_scope(engine) as session:
                    record_usage(
                        session, customers[i % len(customers)], 1, {"plan": "x"}, settings=settings
                    )

        run(200)  # warm-up: connections, compiled statements
        cpu, wall = time.process_time(), time.perf_counter()
        run(args.calls)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        print(
            f"record_usage: {cpu / args.calls * 1000:.2f} ms CPU and"
            f" {wall / args.calls * 1000:.2f} ms wall per call ({args.calls} calls, one thread)"
        )
        if args.profile:
            profiler = cProfile.Profile(time.process_time)
            profiler.runcall(run, args.calls)
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(30)
        engine.dispose()
    finally:
        drop_database(args.url)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
