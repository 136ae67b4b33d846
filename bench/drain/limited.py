"""Against a rate-limited Polar (d, sat-L): events/s over whole windows of the emulator next to
the ceiling limit x batch / window, its 429s, and how the requests spread over each window."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from bench.common import CeleryWorkers, sleep_until
from bench.drain.result import DrainResult
from bench.drain.rows import delivered_between, prepare_outbox, status_counts

if TYPE_CHECKING:
    from bench.drain.runner import Bench
    from bench.drain.scenarios import Scenario


def run_limited(bench: Bench, scenario: Scenario) -> DrainResult:
    """d, sat-L: a backlog that never runs dry against an emulator limited to L requests
    per window, measured over whole windows."""
    from outbox.policy import window_allowance

    cfg = bench.cfg
    limit = scenario.options.get("limit", cfg.limit)
    batch = scenario.options.get("batch", cfg.limited_batch)
    window = scenario.options.get("window", cfg.window)
    windows = cfg.pace_windows if "window" in scenario.options else cfg.windows
    allowance = window_allowance(limit)
    ceiling = limit * batch / window
    best_possible = allowance * batch / window
    settle = 5.0
    span = settle + window + windows * window + 2  # worst case to the end
    best = bench.best_b()
    pace = min(best_possible, best.throughput) if best is not None else best_possible
    rows = int(max(pace, best_possible * 0.5) * span * 1.2) + batch
    prepare_outbox(cfg.url, rows)
    bench.emulator.reset(rate_limit_per_minute=limit, window_seconds=float(window))
    workers = CeleryWorkers(
        bench.limited_env(limit, window, batch),
        bench.best_concurrency(),
        bench.log_dir / f"{scenario.key}.log",
        beat=True,
    )
    workers.start()
    try:
        started = time.time()
        w0 = (math.floor((started + settle) / window) + 1) * window
        w1 = w0 + windows * window
        meter = bench.meter(workers.pid)
        sleep_until(w0)
        meter.start()
        bench.profiler.record(scenario.key, "workers", workers.pid)
        sleep_until(w1)
        cpu = meter.stop()
        bench.profiler.stop()
        sleep_until(w1 + 1.0)
    finally:
        workers.stop(kill=True)
    stats = bench.emulator.stats()
    delivered = delivered_between(cfg.url, w0, w1)
    left = status_counts(cfg.url).get("pending", 0)
    result = DrainResult(
        key=scenario.key,
        label=scenario.label,
        seconds=w1 - w0,
        count=delivered,
        rows=delivered,
        cpu=cpu[0],
        elapsed=cpu[1],
        status_429=int(stats.get("status_429", 0)),
        requests=int(stats.get("ingest_requests", 0)),
        mean_batch=mean(stats.get("accepted_batch_sizes") or []),
    )
    result.notes.append(
        f"{result.throughput:,.0f} events/s over {windows} whole {window} s windows"
        f" = {result.throughput / ceiling:.1%} of the ceiling {limit} x {batch} /"
        f" {window} s = {ceiling:,.0f}/s (our margin allows {allowance} requests per"
        f" window: at best {best_possible:,.0f}/s = {allowance / limit:.0%})"
    )
    result.notes.append(
        f"emulator: {result.status_429} x 429, at most"
        f" {stats.get('max_requests_in_a_window', 0)} requests in one window,"
        f" {result.requests:,} ingest requests in the whole run (warm-up included);"
        f" {left:,} rows still pending at the end (the backlog never ran dry: {left > 0})"
    )
    result.notes.append(spread_note(stats.get("request_times") or [], w0, w1, window, limit))
    return result


def mean(values: list[int]) -> float:
    """The mean, NaN when there is nothing."""
    return sum(values) / len(values) if values else math.nan


def spread_note(times: list[float], start: float, end: float, window: int, limit: int) -> str:
    """How the requests spread over each whole emulator window in [start, end): the most in
    one window, and the most in a window's first fifth (a fifth of the limit if even)."""
    first = math.ceil(start / window) * window
    starts = range(int(first), int(end) - window + 1, window)
    per_window = [sum(1 for t in times if w <= t < w + window) for w in starts]
    fifths = [sum(1 for t in times if w <= t < w + window / 5) for w in starts]
    if not per_window:
        return "spread: no whole window measured"
    return (
        f"spread over {len(per_window)} whole windows: {min(per_window)}-{max(per_window)}"
        f" requests per window (limit {limit}); first fifth of a window: at most {max(fifths)}"
        f" (a fifth of the limit: {limit / 5:g})"
    )
