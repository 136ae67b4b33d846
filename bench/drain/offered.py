"""Usage offered at a steady rate while workers with beat deliver it (lat, pace-L-P):
`record_usage` with the API's nudge plus pgbench filling the rest, and commit -> accepted of
every row committed in the measured window."""

from __future__ import annotations

import multiprocessing as mp
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import CeleryWorkers, GroupCpuMeter, sleep_until, start_pgbench
from bench.drain.children import ProducerSpec, usage_producer
from bench.drain.config import CUSTOMERS
from bench.drain.limited import mean, spread_note
from bench.drain.result import DrainResult
from bench.drain.rows import Latencies, latencies, prepare_outbox, wait_drained

if TYPE_CHECKING:
    from bench.drain.runner import Bench
    from bench.drain.scenarios import Scenario

BATCH_INSERT_SCRIPT = Path(__file__).resolve().parent / "pgbench_outbox_batch.sql"


@dataclass
class OfferedLoad:
    """What `offer_load` measured."""

    lat: Latencies
    cpu: tuple[dict[str, float], float]
    window: tuple[float, float]
    drained: bool
    made: int
    late: float
    errors: list[str]
    problem: str | None
    lib_rate: float
    fill_rate: float


def offer_load(
    bench: Bench,
    key: str,
    target: float,
    env: dict[str, str],
    k: int,
    warmup: float,
    seconds: float,
) -> OfferedLoad:
    """Offer `target` usages/s (record_usage + nudge, pgbench adding what exceeds
    --latency-lib-rate) to K workers with beat for `warmup` + `seconds`; measure commit ->
    accepted of the rows created in the last `seconds`."""
    cfg = bench.cfg
    lib_rate = min(cfg.latency_lib_rate, target)
    fill_rate = max(0.0, target - lib_rate)
    margin = float(env.get("OUTBOX_CLOCK_MARGIN_SECONDS", cfg.latency_margin))
    prepare_outbox(cfg.url, 0, customers=CUSTOMERS)
    workers = CeleryWorkers(env, k, bench.log_dir / f"{key}.log", beat=True)
    workers.start()
    ctx = mp.get_context("spawn")
    ready, results = ctx.Queue(), ctx.Queue()
    go, start_at = ctx.Event(), ctx.Value("d", 0.0)
    run_seconds = warmup + seconds + 1.0
    spec = ProducerSpec(
        cfg.url,
        cfg.redis_url,
        lib_rate,
        threads=8,
        seconds=run_seconds,
        customers=CUSTOMERS,
        margin=margin,
    )
    producer = ctx.Process(target=usage_producer, args=(spec, ready, go, start_at, results))
    producer.start()
    try:
        ready.get(timeout=120)
        start = time.time() + 0.5
        start_at.value = start
        go.set()
        filler = _start_filler(bench, start, fill_rate, run_seconds)
        window = (start + warmup, start + warmup + seconds)
        assert producer.pid is not None
        roots = {
            "drainers": [workers.pid],
            "emulator": [bench.emulator.pid],
            "producers": [producer.pid] + ([filler.pid] if filler is not None else []),
        }
        meter = GroupCpuMeter(roots)
        sleep_until(window[0])
        meter.start()
        bench.profiler.record(key, "workers", workers.pid)
        sleep_until(window[1])
        cpu = meter.stop()
        bench.profiler.stop()
        made, late, errors, problem = results.get(timeout=run_seconds + 120)
        if filler is not None:
            filler.wait(run_seconds + 60)
        drained = wait_drained(cfg.url, 120)
    finally:
        workers.stop()
        producer.join(30)
    if problem:
        raise RuntimeError(f"{key}: the producer failed:\n{problem}")
    return OfferedLoad(
        lat=latencies(cfg.url, *window),
        cpu=cpu,
        window=window,
        drained=drained,
        made=made,
        late=late,
        errors=errors,
        problem=problem,
        lib_rate=lib_rate,
        fill_rate=fill_rate,
    )


def _start_filler(
    bench: Bench, start: float, fill_rate: float, run_seconds: float
) -> subprocess.Popen[bytes] | None:
    """From `start`, pgbench commits `fill_rate` outbox rows/s, --latency-rows-per-tx per
    transaction (None below one row per second)."""
    if fill_rate < 1:
        return None
    cfg = bench.cfg
    sleep_until(start)
    return start_pgbench(
        cfg.url,
        BATCH_INSERT_SCRIPT,
        bench.log_dir,
        clients=4,
        seconds=run_seconds,
        rate=fill_rate / cfg.latency_rows_per_tx,
        defines={"customers": CUSTOMERS, "rows": cfg.latency_rows_per_tx},
    )


def offered_row(
    scenario: Scenario, run: OfferedLoad, seconds: float, stats: dict[str, Any]
) -> DrainResult:
    """The row of an offered load: the rows committed in the window, commit -> accepted."""
    lat = run.lat
    return DrainResult(
        key=scenario.key,
        label=scenario.label,
        seconds=seconds,
        count=lat.rows,
        p50_ms=lat.p50 * 1000,
        p99_ms=lat.p99 * 1000,
        rows=lat.rows,
        cpu=run.cpu[0],
        elapsed=run.cpu[1],
        status_429=int(stats.get("status_429", 0)),
        requests=int(stats.get("ingest_requests", 0)),
    )


def note_undelivered(result: DrainResult, run: OfferedLoad) -> None:
    if not run.drained or run.lat.undelivered:
        result.notes.append(f"NOT DRAINED: {run.lat.undelivered:,} rows of the window undelivered")


def run_latency(bench: Bench, scenario: Scenario) -> DrainResult:
    """lat: commit -> accepted at about half of the best b-celery row's rate."""
    cfg = bench.cfg
    best = bench.best_b()
    capacity = best.throughput if best is not None else 0.0
    target = cfg.latency_rate or (capacity / 2 if capacity else 200.0)
    k = bench.best_concurrency()
    env = bench.worker_env(
        OUTBOX_CLOCK_MARGIN_SECONDS=f"{cfg.latency_margin:g}",
        OUTBOX_DRAIN_INTERVAL_SECONDS=f"{cfg.drain_interval:g}",
    )
    run = offer_load(bench, scenario.key, target, env, k, cfg.latency_warmup, cfg.latency_seconds)
    lat = run.lat
    result = offered_row(scenario, run, cfg.latency_seconds, bench.emulator.stats())
    share = f" = {result.throughput / capacity:.0%} of {best.key}" if best else ""
    result.notes.append(
        f"asked {target:,.0f} usages/s ({run.lib_rate:,.0f} record_usage + nudge,"
        f" {run.fill_rate:,.0f} outbox rows from pgbench, {cfg.latency_rows_per_tx} per"
        " transaction); committed"
        f" {result.throughput:,.0f}/s in the window{share}"
    )
    result.notes.append(
        f"commit -> accepted: p50 {lat.p50:.3f} s, p99 {lat.p99:.3f} s, max {lat.max:.3f} s;"
        f" record_usage rows only ({lat.lib_rows:,}): p99 {lat.lib_p99:.3f} s;"
        f" OUTBOX_CLOCK_MARGIN_SECONDS={cfg.latency_margin:g} (rows younger are held back),"
        f" beat every {cfg.drain_interval:g} s, --concurrency={k}"
    )
    result.notes.append(
        f"the record_usage producer made {run.made:,} usages, at most {run.late:.2f} s behind"
        " its schedule"
    )
    if run.errors:
        result.notes.append(f"producer errors: {run.errors}")
    note_undelivered(result, run)
    return result


def run_paced(bench: Bench, scenario: Scenario) -> DrainResult:
    """pace-L-P: usage offered at P% of what a Polar limit of L requests per window allows."""
    cfg = bench.cfg
    limit, load = scenario.options["limit"], scenario.options["load"]
    batch, window = cfg.pace_batch, cfg.pace_window
    capacity = limit * batch / window
    target = capacity * load / 100
    bench.emulator.reset(rate_limit_per_minute=limit, window_seconds=float(window))
    env = bench.limited_env(
        limit, window, batch, OUTBOX_CLOCK_MARGIN_SECONDS=f"{cfg.latency_margin:g}"
    )
    # Whole windows of the emulator: start measuring at a window boundary.
    seconds = cfg.pace_windows * window
    run = offer_load(
        bench, scenario.key, target, env, cfg.pace_concurrency, cfg.pace_warmup, seconds
    )
    stats = bench.emulator.stats()
    lat = run.lat
    result = offered_row(scenario, run, seconds, stats)
    result.mean_batch = mean(stats.get("accepted_batch_sizes") or [])
    result.notes.append(
        f"offered {target:,.1f} usages/s ({run.lib_rate:,.0f} record_usage + nudge,"
        f" {run.fill_rate:,.0f} from pgbench) = {load}% of {limit} x {batch} / {window} s"
        f" = {capacity:,.0f}/s; committed {result.throughput:,.1f}/s in {seconds:.0f} s;"
        f" mean batch {result.mean_batch:.1f} events over {result.requests:,} requests"
    )
    result.notes.append(
        f"commit -> accepted: p50 {lat.p50:.3f} s, p99 {lat.p99:.3f} s, max {lat.max:.3f} s"
        f" (OUTBOX_CLOCK_MARGIN_SECONDS={cfg.latency_margin:g} included);"
        f" --concurrency={cfg.pace_concurrency}, beat every {cfg.drain_interval:g} s"
    )
    result.notes.append(spread_note(stats.get("request_times") or [], *run.window, window, limit))
    note_undelivered(result, run)
    return result
