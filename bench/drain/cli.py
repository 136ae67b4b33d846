"""The drain benchmark's command line: its flags, and the report after the run."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.common import (
    add_run_flags,
    bench_parser,
    machine_facts,
    only_keys,
    print_report,
)
from bench.drain.config import BATCH, DEFAULT_REDIS_URL, DEFAULT_URL, PROBLEMS, Config
from bench.drain.report import format_table, goal_lines
from bench.drain.runner import Bench


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def parse_args(argv: list[str] | None = None) -> Config:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        _quick(args, parser)
    return _config(args)


def build_parser() -> argparse.ArgumentParser:
    """Every flag of the drain benchmark, with its default."""
    parser = bench_parser(
        "Drain benchmark (issue #4): the raw-SQL ceiling, our Celery workers and the"
        " in-process drainer against the Polar emulator, a naive one-request-per-event sender,"
        " the rate-limited run, commit-to-accepted latency and 10k vs 1M rows, in one table.",
        url_env="BENCH_DRAIN_DATABASE_URL",
        default_url=DEFAULT_URL,
    )
    parser.add_argument(
        "--redis-url", default=DEFAULT_REDIS_URL, help="a Redis db of its own (FLUSHED)"
    )
    parser.add_argument("--rows", type=int, default=200_000, help="pre-filled rows for a and b")
    parser.add_argument("--naive-rows", type=int, default=5_000, help="rows for c")
    parser.add_argument("--clients", type=int, default=4, help="pgbench clients (a)")
    parser.add_argument("--concurrency", default="2,4", help="Celery prefork children (b)")
    parser.add_argument("--threads", default="1,2,4", help="in-process drainer threads (b)")
    parser.add_argument("--naive-concurrency", type=int, default=4, help="Celery children (c)")
    parser.add_argument("--cliff-rows", type=int, default=10_000, help="pending rows (e)")
    parser.add_argument(
        "--cliff-background", type=int, default=1_000_000, help="delivered rows (e-1m)"
    )
    parser.add_argument("--limit", type=int, default=500, help="requests per window (d)")
    parser.add_argument("--window", type=int, default=60, help="rate window, seconds (d)")
    parser.add_argument("--windows", type=int, default=2, help="whole windows measured (d)")
    parser.add_argument("--limited-batch", type=int, default=BATCH, help="OUTBOX_BATCH_SIZE (d)")
    parser.add_argument(
        "--drain-interval", type=float, default=5.0, help="beat drain interval (d, lat)"
    )
    parser.add_argument("--latency-seconds", type=float, default=30.0, help="window (lat)")
    parser.add_argument("--latency-warmup", type=float, default=5.0, help="warm-up (lat)")
    parser.add_argument(
        "--latency-rate", type=float, default=None, help="usages/s (lat; default half of b)"
    )
    parser.add_argument(
        "--latency-lib-rate",
        type=float,
        default=100.0,
        help="of which record_usage + nudge (lat); pgbench adds the rest",
    )
    parser.add_argument(
        "--latency-rows-per-tx",
        type=int,
        default=20,
        help="outbox rows per pgbench transaction (lat; bench/drain/pgbench_outbox_batch.sql)",
    )
    parser.add_argument(
        "--latency-margin",
        type=float,
        default=0.5,
        help="OUTBOX_CLOCK_MARGIN_SECONDS in lat (0.5 is the production default)",
    )
    parser.add_argument(
        "--pace-limits", default="100,500", help="requests per window at Polar (pace, sat)"
    )
    parser.add_argument(
        "--pace-loads", default="25,50,90", help="offered load, %% of the capacity (pace)"
    )
    parser.add_argument(
        "--pace-batch",
        type=int,
        default=20,
        help="OUTBOX_BATCH_SIZE (pace, sat): scaled down from 500 so that the capacity fits"
        " this machine; the pacing over the window is what is measured",
    )
    parser.add_argument("--pace-window", type=int, default=60, help="Polar's window (pace, sat)")
    parser.add_argument(
        "--pace-windows", type=int, default=2, help="whole windows measured (pace, sat)"
    )
    parser.add_argument("--pace-warmup", type=float, default=10.0, help="warm-up (pace)")
    parser.add_argument(
        "--pace-concurrency", type=int, default=4, help="Celery prefork children (pace)"
    )
    add_run_flags(
        parser,
        only_help="comma-separated scenario keys or prefixes (default: all)",
        quick_help="smoke run: few rows, 5 s windows",
    )
    parser.add_argument(
        "--py-spy", type=Path, default=None, help="record every drainer with py-spy into DIR"
    )
    parser.add_argument(
        "--py-spy-idle", action="store_true", help="py-spy also records waiting frames (--idle)"
    )
    return parser


def _quick(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """--quick: few rows, 5 s windows (and 1,4 threads unless --threads was given)."""
    args.rows = min(args.rows, 20_000)
    args.naive_rows = min(args.naive_rows, 500)
    args.cliff_rows = min(args.cliff_rows, 2_000)
    args.cliff_background = min(args.cliff_background, 50_000)
    args.limit, args.window, args.windows, args.limited_batch = 50, 5, 2, 20
    args.drain_interval = 1.0
    args.latency_seconds, args.latency_warmup = 5.0, 1.0
    args.pace_window, args.pace_warmup = 5, 2.0
    if args.threads == parser.get_default("threads"):
        args.threads = "1,4"


def _config(args: argparse.Namespace) -> Config:
    return Config(
        url=args.url,
        redis_url=args.redis_url,
        rows=args.rows,
        naive_rows=args.naive_rows,
        clients=args.clients,
        concurrency=_ints(args.concurrency),
        threads=_ints(args.threads),
        naive_concurrency=args.naive_concurrency,
        cliff_rows=args.cliff_rows,
        cliff_background=args.cliff_background,
        limit=args.limit,
        window=args.window,
        windows=args.windows,
        limited_batch=args.limited_batch,
        drain_interval=args.drain_interval,
        latency_seconds=args.latency_seconds,
        latency_warmup=args.latency_warmup,
        latency_rate=args.latency_rate,
        latency_rows_per_tx=args.latency_rows_per_tx,
        latency_lib_rate=args.latency_lib_rate,
        latency_margin=args.latency_margin,
        pace_limits=_ints(args.pace_limits),
        pace_loads=_ints(args.pace_loads),
        pace_batch=args.pace_batch,
        pace_window=args.pace_window,
        pace_windows=args.pace_windows,
        pace_warmup=args.pace_warmup,
        pace_concurrency=args.pace_concurrency,
        only=only_keys(args.only),
        keep_db=args.keep_db,
        json_path=args.json,
        py_spy=args.py_spy,
        py_spy_idle=args.py_spy_idle,
    )


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    facts = machine_facts(cfg.url)
    results = Bench(cfg).run()
    print_report(
        results,
        facts,
        argv,
        table=format_table(results),
        cpu_line="CPU in cores (CPU-seconds per second) from the trigger until the outbox was"
        " empty (d, lat: the measured window); per row: CPU-seconds / rows delivered",
        goals=goal_lines(results, cfg),
        json_path=cfg.json_path,
    )
    bad = any(n.startswith(PROBLEMS) for r in results for n in r.notes)
    return 1 if bad else 0
