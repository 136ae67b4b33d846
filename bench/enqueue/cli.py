"""The enqueue benchmark's command line: its flags, and the report after the run."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.common import (
    DEFAULT_URL,
    add_run_flags,
    bench_parser,
    drop_database,
    machine_facts,
    only_keys,
    print_report,
    recreate_database,
)
from bench.enqueue.config import Config
from bench.enqueue.report import format_table, goal_lines
from bench.enqueue.runner import Bench
from bench.enqueue.trace import trace_round_trips


def parse_layouts(text: str) -> tuple[tuple[int, int], ...]:
    """ "1x16,2x8" -> ((1, 16), (2, 8))."""
    layouts = []
    for part in text.split(","):
        procs, _, threads = part.strip().partition("x")
        layouts.append((int(procs), int(threads)))
    return tuple(layouts)


def parse_args(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    parser = bench_parser(
        "Enqueue benchmark (issue #3): the raw-SQL ceiling, record_usage in-process,"
        " POST /v1/usage over HTTP and one hot customer, side by side in one table.",
        url_env="BENCH_DATABASE_URL",
        default_url=DEFAULT_URL,
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up before the window")
    parser.add_argument("--clients", type=int, default=16, help="pgbench clients (a, a-hot)")
    parser.add_argument("--customers", type=int, default=10_000, help="customers, random pick")
    parser.add_argument(
        "--layouts",
        default="1x16,2x8,4x4",
        help="process x thread layouts for a-py and b (d-lib uses the one with most processes)",
    )
    parser.add_argument("--http-workers", type=int, default=2, help="uvicorn workers (c, d)")
    parser.add_argument("--http-clients", type=int, default=16, help="HTTP requests in flight")
    parser.add_argument("--gen-procs", type=int, default=1, help="load generator processes")
    parser.add_argument(
        "--app",
        default="api.app:create_app",
        help="the uvicorn factory; api.app:create_served_app adds the Celery nudge (needs Redis)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run each scenario N times (odd N), report the median run by throughput",
    )
    add_run_flags(
        parser,
        only_help="comma-separated scenario keys or prefixes, e.g. 'a,b-4x4,c'; '=a' is the key"
        " alone (default: all)",
        quick_help="smoke run: 2 s windows, fewer rows",
    )
    parser.add_argument(
        "--base",
        type=Path,
        default=None,
        help="another checkout (e.g. `git archive <commit> | tar -x -C DIR`): adds c-base,"
        " c-idem-base and c-replay-base, served from it, next to c, c-idem and c-replay",
    )
    parser.add_argument(
        "--trace",
        action="store_true",
        help="print the round trips of one usage (libpq trace) and exit",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.warmup = 2.0, 0.5
        args.customers = min(args.customers, 1000)
        if args.layouts == parser.get_default("layouts"):
            args.layouts = "1x16,4x4"
    cfg = Config(
        url=args.url,
        seconds=args.seconds,
        warmup=args.warmup,
        clients=args.clients,
        customers=args.customers,
        layouts=parse_layouts(args.layouts),
        http_workers=args.http_workers,
        http_clients=args.http_clients,
        app=args.app,
        repeat=max(1, args.repeat),
        gen_procs=args.gen_procs,
        only=only_keys(args.only),
        keep_db=args.keep_db,
        json_path=args.json,
        base_dir=args.base.resolve() if args.base else None,
    )
    return cfg, args


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_args(argv)
    if args.trace:
        recreate_database(cfg.url)
        try:
            print(trace_round_trips(cfg.url))
        finally:
            if not cfg.keep_db:
                drop_database(cfg.url)
        return 0
    facts = machine_facts(cfg.url)
    bench = Bench(cfg)
    results = bench.run()
    print_report(
        results,
        facts,
        argv,
        table=format_table(results),
        cpu_line=f"window {cfg.seconds:g} s after {cfg.warmup:g} s warm-up; CPU in cores"
        " (CPU-seconds per second) during the window",
        goals=goal_lines(results, bench),
        json_path=cfg.json_path,
    )
    failed = any(r.failed or (r.ledger is not None and not r.ledger.consistent) for r in results)
    return 1 if failed else 0
