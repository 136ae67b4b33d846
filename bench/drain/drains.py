"""Drain a pre-filled outbox (a, a-1tx, b-celery-K, b-inproc-T, c, e-*): time it from the
trigger until nothing is pending, and check that every row reached the emulator exactly once."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from typing import TYPE_CHECKING

import psycopg

from bench.common import REPO, CeleryWorkers, libpq_url, send_tasks, start_pgbench
from bench.drain.children import InprocSpec, inproc_drainer
from bench.drain.config import BATCH
from bench.drain.result import DrainResult
from bench.drain.rows import delivery_times, prepare_outbox, status_counts, wait_drained

if TYPE_CHECKING:
    from bench.drain.runner import Bench
    from bench.drain.scenarios import Scenario

# Scenario a: the statements of outbox.leases.claim_batch and mark_delivered_if_claimed, with the
# claimed ids handed over through a pgbench variable. A client that finds nothing sleeps, so an
# idle pgbench costs nothing while the driver notices the outbox is empty.
PGBENCH_CLAIM_DELIVER = """\
-- bench/drain.py scenario a: claim a batch (-> inflight, leased), then mark it delivered.
\\set owner random(1, 1000000000)
WITH due AS (SELECT id FROM outbox_events WHERE status = 'pending' AND next_attempt_at <= now() AND occurred_at <= now() ORDER BY next_attempt_at, id LIMIT :batch FOR UPDATE SKIP LOCKED), claimed AS (UPDATE outbox_events SET status = 'inflight', lease_owner = 'pgbench:' || :owner, lease_expires_at = now() + interval '60 seconds', updated_at = now() WHERE id IN (SELECT id FROM due) RETURNING id, external_id, customer_id, name, credits, metadata, occurred_at, attempts, created_at) SELECT coalesce(array_agg(id), '{}') AS ids, count(*) AS n FROM claimed \\gset
\\if :n > 0
UPDATE outbox_events SET status = 'delivered', delivered_at = clock_timestamp(), lease_owner = NULL, lease_expires_at = NULL, last_error = NULL, updated_at = now() WHERE id = ANY (:ids::bigint[]) AND status = 'inflight' AND lease_owner = 'pgbench:' || :owner;
\\else
\\sleep 100 ms
\\endif
"""  # noqa: E501

PGBENCH_ONE_STATEMENT = """\
-- bench/drain.py scenario a-1tx: claim and deliver a batch in one statement.
WITH due AS (SELECT id FROM outbox_events WHERE status = 'pending' AND next_attempt_at <= now() AND occurred_at <= now() ORDER BY next_attempt_at, id LIMIT :batch FOR UPDATE SKIP LOCKED), done AS (UPDATE outbox_events e SET status = 'delivered', delivered_at = clock_timestamp(), updated_at = now() FROM due WHERE e.id = due.id RETURNING e.id) SELECT count(*) AS n FROM done \\gset
\\if :n = 0
\\sleep 100 ms
\\endif
"""  # noqa: E501


def finish(
    bench: Bench,
    scenario: Scenario,
    t0: float,
    drained: bool,
    cpu: tuple[dict[str, float], float],
    expected: int,
    *,
    emulator: bool = True,
) -> DrainResult:
    """Read the rows and the emulator, check that every row arrived exactly once."""
    times = delivery_times(bench.cfg.url, t0)
    stats = bench.emulator.stats()
    result = DrainResult(
        key=scenario.key,
        label=scenario.label,
        seconds=times.steady_seconds,
        count=times.steady_rows,
        rows=times.rows,
        cpu=cpu[0],
        elapsed=cpu[1],
        status_429=int(stats.get("status_429", 0)),
        requests=int(stats.get("ingest_requests", 0)),
    )
    if times.rows:
        whole = times.rows / max(times.last - t0, 1e-9)
        note = (
            f"whole drain: {times.rows:,} rows in {times.last - t0:.1f} s from the trigger"
            f" = {whole:,.0f} rows/s"
        )
        if emulator:
            note += (
                f"; {result.requests:,} ingest requests"
                f" ({times.rows / max(result.requests, 1):,.0f} events each)"
            )
        result.notes.append(note)
    counts = status_counts(bench.cfg.url)
    if not drained:
        result.notes.append(f"NOT DRAINED in time: {counts}")
    if counts.get("failed"):
        result.notes.append(f"FAILED ROWS: {counts['failed']:,}")
    inserted = int(stats.get("events_inserted", 0)) if emulator else expected
    if inserted != expected or times.rows != expected:
        result.notes.append(
            f"EMULATOR stored {inserted:,} events, {times.rows:,} rows delivered,"
            f" {expected:,} expected (duplicates {stats.get('duplicates', 0):,})"
        )
    return result


def run_pgbench(bench: Bench, scenario: Scenario) -> DrainResult:
    """a, a-1tx: pgbench claims and delivers the pre-filled rows with SQL alone."""
    cfg = bench.cfg
    prepare_outbox(cfg.url, cfg.rows)
    script = bench.log_dir / f"{scenario.key}.sql"
    script.write_text(scenario.options["script"])
    t0 = time.time()
    proc = start_pgbench(
        cfg.url,
        script,
        bench.log_dir,
        clients=cfg.clients,
        seconds=bench.timeout(cfg.rows),
        defines={"batch": BATCH},
    )
    meter = bench.meter(proc.pid)
    meter.start()
    drained = wait_drained(cfg.url, bench.timeout(cfg.rows))
    cpu = meter.stop()
    proc.terminate()
    proc.wait(30)
    return finish(bench, scenario, t0, drained, cpu, expected=cfg.rows, emulator=False)


def run_celery(bench: Bench, scenario: Scenario) -> DrainResult:
    """b-celery-K, e-10k, e-1m: real Celery workers, started by K `outbox.drain` tasks."""
    cfg = bench.cfg
    k = scenario.options.get("concurrency") or bench.best_concurrency()
    rows = scenario.options["rows"]
    background = scenario.options.get("background", 0)
    prepare_outbox(cfg.url, rows, delivered=background)
    workers = CeleryWorkers(bench.worker_env(), k, bench.log_dir / f"{scenario.key}.log")
    workers.start()
    try:
        meter, t0 = bench.start_measuring(scenario.key, "workers", workers.pid)
        send_tasks(cfg.redis_url, "outbox.drain", ([] for _ in range(k)), expires=30)
        drained = wait_drained(cfg.url, bench.timeout(rows))
        cpu = bench.stop_measuring(meter)
    finally:
        workers.stop()
    result = finish(bench, scenario, t0, drained, cpu, expected=rows)
    if not scenario.options.get("concurrency"):
        result.label = result.label.replace("best b-celery", f"celery --concurrency={k}")
    return result


def run_inproc(bench: Bench, scenario: Scenario) -> DrainResult:
    """b-inproc-T: `Deliverer` + `drain` in T threads of one spawned process."""
    cfg = bench.cfg
    prepare_outbox(cfg.url, cfg.rows)
    ctx = mp.get_context("spawn")
    ready, results = ctx.Queue(), ctx.Queue()
    go, done = ctx.Event(), ctx.Event()
    spec = InprocSpec(cfg.url, cfg.redis_url, bench.emulator.url, scenario.options["threads"])
    proc = ctx.Process(target=inproc_drainer, args=(spec, ready, go, done, results))
    proc.start()
    ready.get(timeout=120)
    assert proc.pid is not None
    meter, t0 = bench.start_measuring(scenario.key, "drainer", proc.pid)
    go.set()
    try:
        delivered, problem = results.get(timeout=bench.timeout(cfg.rows))
        drained = wait_drained(cfg.url, 30)
        cpu = bench.stop_measuring(meter)
    finally:
        done.set()
        proc.join(30)
    if problem:
        raise RuntimeError(f"{scenario.key}: the drainer failed:\n{problem}")
    result = finish(bench, scenario, t0, drained, cpu, expected=cfg.rows)
    result.notes.append(f"the drainer reports {delivered:,} rows delivered")
    return result


def run_naive(bench: Bench, scenario: Scenario) -> DrainResult:
    """c: one Celery task and one Polar request per event (naive_sender.py)."""
    cfg = bench.cfg
    rows = cfg.naive_rows
    prepare_outbox(cfg.url, rows)
    env = bench.worker_env()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH", "")])])
    workers = CeleryWorkers(
        env, cfg.naive_concurrency, bench.log_dir / "c.log", app="bench.drain.naive_sender"
    )
    workers.start()
    with psycopg.connect(libpq_url(cfg.url), autocommit=True) as conn:
        ids = [int(r[0]) for r in conn.execute("SELECT id FROM outbox_events ORDER BY id")]
    try:
        meter, t0 = bench.start_measuring(
            scenario.key, "workers", workers.pid, profile_emulator=False
        )
        send_tasks(cfg.redis_url, "bench.naive_send", ([i] for i in ids))
        enqueued = time.time() - t0
        drained = wait_drained(cfg.url, bench.timeout(rows) * 5)
        cpu = bench.stop_measuring(meter)
    finally:
        workers.stop()
    result = finish(bench, scenario, t0, drained, cpu, expected=rows)
    result.notes.append(f"{rows:,} tasks enqueued in {enqueued:.1f} s (inside the drain)")
    result.notes.append(
        "against Polar's real budget a sender of one event per request is capped at"
        f" {cfg.limit / cfg.window:.1f} events/s ({cfg.limit} requests per {cfg.window} s)"
    )
    return result
