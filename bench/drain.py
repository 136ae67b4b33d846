"""Drain benchmark (issue #4): how fast does the outbox reach Polar, next to the raw-SQL ceiling?

One run, one machine, one PostgreSQL, its own database (default `outbox_bench_drain`, dropped
and re-created; the outbox is emptied, pre-filled with SQL and VACUUMed before every scenario),
the Polar emulator in its own process, one table with ratios to (a):

  a            raw-SQL ceiling: pgbench, N clients, each loop claims 500 due rows (FOR UPDATE
               SKIP LOCKED, -> inflight with a lease, RETURNING what a worker sends) and marks
               them delivered in a second statement: our protocol with no Python and no HTTP
  a-1tx        the same in ONE statement (claim and deliver at once): the floor of the work
  b-celery-K   our delivery: real `celery -A worker worker --concurrency=K` processes, started
               by K `outbox.drain` tasks, against an instant emulator; until the outbox is empty
  b-inproc-T   `outbox.delivery.Deliverer` + `drain` in T threads of one process (no Celery):
               the delivery cost without Celery's
  c            a naive sender (bench/naive_sender.py): one Celery task per event, one HTTP
               request per event, then mark that row delivered (a smaller sample)
  e-10k        10k pending rows alone, drained by b's best K
  e-1m         10k pending rows next to 1M delivered rows (no cliff?)
  lat          commit -> accepted by Polar at about half of b's capacity: a producer calls
               `record_usage` (and nudges a drain after each commit, as the API does) while
               pgbench adds the rest of the rate as outbox rows, 20 per transaction (one
               usage transaction per row could not offer half of b on two cores); workers run
               with beat; latency is delivered_at - created_at of every row committed in the
               window
  d            workers against an emulator limited to 500 requests per fixed 60 s window, our
               POLAR_REQUESTS_PER_MINUTE=500, for whole windows (>= 2 minutes): events/s vs the
               ceiling 500 x batch / 60, and the emulator's 429 count
  pace-L-P     the paced budget (issue 15): an emulator limited to L requests per 60 s window,
               POLAR_REQUESTS_PER_MINUTE=L, usage offered (as in lat) at P% of the capacity
               L x --pace-batch / 60 for --pace-windows whole windows: p50/p99 commit ->
               accepted, mean batch, 429s, how requests spread over each window
  sat-L        the same emulator with a backlog that never runs dry: events/s vs the ceiling
               L x --pace-batch / 60 (>= 97% with zero 429)

Rates come from the rows themselves: `delivered_at` of every delivered row. A drain's rows/s is
the steady rate between the 10th and the 90th percentile of `delivered_at` (start-up and the
last stragglers excluded); the whole-drain figure is in the notes. After each drain the outbox
is checked (every row delivered, none failed) and so is the emulator (it stored each row once).

    python bench/drain.py                     # the full run (~20 minutes: d alone is 3)
    python bench/drain.py --quick             # a smoke run (short windows, few rows)
    python bench/drain.py --only a,b-celery   # some scenarios (a key or a prefix)
    python bench/drain.py --only pace,sat     # the pacing scenarios (~25 minutes)
    python bench/drain.py --py-spy /tmp/prof  # also profile every drainer with py-spy
"""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing as mp
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import redis
from common import (
    HUGE_BALANCE,
    GroupCpuMeter,
    ScenarioResult,
    cpu_reference_ms,
    database_name,
    drop_database,
    free_port,
    libpq_url,
    machine_facts,
    print_report,
    recreate_database,
    reset_tables,
    seed_customers,
)

REPO = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
USAGE_SCRIPT = BENCH / "pgbench_usage.sql"  # the enqueue benchmark's usage transaction
BATCH_INSERT_SCRIPT = BENCH / "pgbench_outbox_batch.sql"  # N outbox rows per transaction (lat)
DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/outbox_bench_drain"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/14"
EMULATOR_TOKEN = "polar_emulator_token"  # polar_emulator.DEFAULT_TOKEN
BATCH = 500
CUSTOMERS = 1000
# The highest POLAR_REQUESTS_PER_MINUTE the settings accept: the budget is never the limit.
UNLIMITED_RPM = 100_000
OUR_PREFIXES = ("OUTBOX_", "POLAR_", "USAGE_", "HOLD_")
# Notes that report a problem.
PROBLEMS = ("NOT DRAINED", "FAILED ROWS", "EMULATOR", "pgbench exited", "producer")

# -- SQL ----------------------------------------------------------------------------------------

# Pre-filled rows: due a minute ago (past any clock margin), 1000 customers, unique external ids.
SEED_SQL = (
    "INSERT INTO outbox_events (external_id, customer_id, name, credits, metadata, occurred_at,"
    " status, attempts, next_attempt_at, created_at, updated_at, delivered_at)"
    " SELECT %(prefix)s || g, 'bench_' || (1 + g %% %(customers)s), 'ai_generation', 1,"
    " %(metadata)s::jsonb, t, %(status)s, 0, t, t, t, CASE WHEN %(delivered)s THEN t END"
    " FROM generate_series(1, %(rows)s) g, (SELECT now() - %(age)s::interval AS t) n"
)

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


@dataclass(frozen=True)
class Config:
    """What the command line asked for."""

    url: str
    redis_url: str
    rows: int
    naive_rows: int
    clients: int
    concurrency: tuple[int, ...]
    threads: tuple[int, ...]
    naive_concurrency: int
    cliff_rows: int
    cliff_background: int
    limit: int
    window: int
    windows: int
    limited_batch: int
    drain_interval: float
    latency_seconds: float
    latency_warmup: float
    latency_rate: float | None
    latency_lib_rate: float
    latency_rows_per_tx: int
    latency_margin: float
    pace_limits: tuple[int, ...]
    pace_loads: tuple[int, ...]
    pace_batch: int
    pace_window: int
    pace_windows: int
    pace_warmup: float
    pace_concurrency: int
    only: tuple[str, ...]
    keep_db: bool
    json_path: Path | None
    py_spy: Path | None
    py_spy_idle: bool


@dataclass
class DrainResult(ScenarioResult):
    """One row of the table: `count` rows in the steady window of `seconds`."""

    rows: int = 0  # delivered in the whole run
    elapsed: float = 0.0  # trigger -> drained: the CPU window
    status_429: int = 0
    requests: int = 0  # ingest requests the emulator answered
    mean_batch: float = math.nan  # events per accepted ingest request (pace-*, sat-*)

    def cpu_us_per_row(self, group: str) -> float:
        """CPU microseconds per delivered row spent by `group` over the whole drain."""
        if not self.cpu or not self.rows:
            return math.nan
        return 1e6 * self.cpu.get(group, 0.0) * self.elapsed / self.rows

    def as_dict(self) -> dict[str, Any]:
        data = super().as_dict()
        data.update(
            rows_per_s=round(self.throughput, 1),
            rows=self.rows,
            elapsed=round(self.elapsed, 2),
            status_429=self.status_429,
            requests=self.requests,
            mean_batch=None if math.isnan(self.mean_batch) else round(self.mean_batch, 1),
        )
        return data


# -- the database -------------------------------------------------------------------------------


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


# -- processes: emulator, Celery workers, pgbench, py-spy ---------------------------------------


class Emulator:
    """`outbox polar-emulator --port P` in its own process, driven over its control API."""

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / "emulator.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.client: Any = None

    def start(self) -> None:
        from polar_emulator import EmulatorClient

        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cli.main", "polar-emulator", "--port", str(self.port)],
                cwd=REPO,
                env=clean_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.client = EmulatorClient(self.url)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the emulator exited: {self.log_path.read_text()[-500:]}")
            with contextlib.suppress(Exception):
                self.client.stats()
                return
            time.sleep(0.2)
        raise RuntimeError("the emulator did not answer within 60 s")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def reset(self, **config: Any) -> None:
        """Forget every event and counter; no latency, no limit unless `config` says so."""
        self.client.reset()
        self.client.configure(
            **{"rate_limit_per_minute": None, "window_seconds": 60.0, "latency_ms": 0.0, **config}
        )

    def stats(self) -> dict[str, Any]:
        return dict(self.client.stats())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def clean_env(**overrides: str) -> dict[str, str]:
    """This environment without any of our settings, plus `overrides`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(OUR_PREFIXES)}
    env.pop("DATABASE_URL", None)
    env.pop("REDIS_URL", None)
    env.update(overrides)
    return env


def worker_env(cfg: Config, emulator_url: str, **overrides: str) -> dict[str, str]:
    """A worker pointed at the benchmark database, Redis db and emulator; the budget never
    binds and no clock margin holds rows back unless `overrides` say otherwise."""
    env = clean_env(
        DATABASE_URL=cfg.url,
        REDIS_URL=cfg.redis_url,
        POLAR_ACCESS_TOKEN=EMULATOR_TOKEN,
        POLAR_BASE_URL=emulator_url,
        OUTBOX_CLOCK_MARGIN_SECONDS="0",
        OUTBOX_BATCH_SIZE=str(BATCH),
        POLAR_REQUESTS_PER_MINUTE=str(UNLIMITED_RPM),
        PYTHONUNBUFFERED="1",
    )
    env.update(overrides)
    return env


class CeleryWorkers:
    """A real `celery -A <app> worker` (its own process group) logging to a file."""

    def __init__(
        self,
        env: dict[str, str],
        concurrency: int,
        log_path: Path,
        *,
        app: str = "worker",
        beat: bool = False,
    ) -> None:
        self.env = env
        self.concurrency = concurrency
        self.log_path = log_path
        self.app = app
        self.beat = beat
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            self.app,
            "worker",
            f"--concurrency={self.concurrency}",
            "--loglevel=INFO",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
        if self.beat:
            cmd += ["-B", f"--schedule={self.log_path.with_suffix('.beat')}"]
        return cmd

    def start(self, timeout: float = 90.0) -> None:
        """Start and wait until the worker says it is ready."""
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"celery exited: {self.output(offset)[-2000:]}")
            if re.search(r"celery@\S+ ready", self.output(offset)):
                return
            time.sleep(0.2)
        raise RuntimeError(f"celery was not ready within {timeout:.0f} s")

    def output(self, offset: int = 0) -> str:
        with self.log_path.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, *, kill: bool = False) -> None:
        """Warm shutdown (running tasks finish), or SIGKILL of the whole group."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def send_tasks(redis_url: str, name: str, args: Iterable[list[Any]], **options: Any) -> int:
    """Publish one `name` task per argument list over one broker connection."""
    from celery import Celery

    app = Celery("bench_drain", broker=redis_url)
    sent = 0
    with app.producer_or_acquire() as producer:
        for task_args in args:
            app.send_task(name, args=task_args, producer=producer, **options)
            sent += 1
    return sent


def queue_idle(redis_url: str) -> bool:
    """No Celery message waiting or unacknowledged."""
    client = redis.Redis.from_url(redis_url)
    try:
        return int(client.llen("celery")) == 0 and int(client.hlen("unacked")) == 0
    finally:
        client.close()


def flush_redis(redis_url: str) -> None:
    """Empty the benchmark's Redis db (queue, rate budget); only while no worker runs: Celery
    keeps its queue bindings there."""
    client = redis.Redis.from_url(redis_url)
    try:
        client.flushdb()
    finally:
        client.close()


def find_pgbench() -> str:
    """pgbench on PATH, or in a PostgreSQL installation's bin directory."""
    found = shutil.which("pgbench")
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pgbench"), reverse=True)
    if not candidates:
        raise RuntimeError("pgbench not found (it ships with PostgreSQL)")
    return str(candidates[0])


def start_pgbench(
    url: str,
    script: Path,
    log_dir: Path,
    *,
    clients: int,
    seconds: float,
    rate: float | None = None,
    defines: Mapping[str, object] | None = None,
) -> subprocess.Popen[bytes]:
    """pgbench -M prepared with `script` for up to `seconds` (throttled to `rate` tx/s)."""
    parts = urlsplit(libpq_url(url))
    cmd = [
        find_pgbench(),
        "-h",
        parts.hostname or "127.0.0.1",
        "-p",
        str(parts.port or 5432),
        "-U",
        parts.username or "postgres",
        "-n",
        "-M",
        "prepared",
        "-c",
        str(clients),
        "-j",
        str(min(clients, os.cpu_count() or 1)),
        "-T",
        str(max(1, math.ceil(seconds))),
        "-f",
        str(script),
    ]
    for name, value in (defines or {}).items():
        cmd += ["-D", f"{name}={value}"]
    if rate is not None:
        cmd += ["-R", f"{rate:.1f}"]
    cmd.append(database_name(url))
    env = dict(os.environ)
    if parts.password:
        env["PGPASSWORD"] = parts.password
    with (log_dir / f"pgbench-{script.stem}.log").open("ab") as log:
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


class Profiler:
    """py-spy record on a process tree, from now until `stop()`, as raw collapsed stacks: CPU
    only, or with `idle` also the frames waiting (on PostgreSQL, Polar, the broker)."""

    def __init__(self, directory: Path | None, *, idle: bool = False) -> None:
        self.directory = directory
        self.idle = idle
        self.procs: list[subprocess.Popen[bytes]] = []
        self.exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

    def record(self, key: str, name: str, pid: int) -> None:
        if self.directory is None:
            return
        out = self.directory / f"{key}-{name}.txt"
        self.procs.append(
            subprocess.Popen(
                [
                    self.exe,
                    "record",
                    *(["--idle"] if self.idle else []),
                    "--subprocesses",
                    "--nonblocking",
                    "-r",
                    "100",
                    "-f",
                    "raw",
                    "-o",
                    str(out),
                    "-p",
                    str(pid),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )

    def stop(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGINT)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs.clear()


# -- child processes: the in-process drainer and the latency producer ---------------------------


@dataclass(frozen=True)
class InprocSpec:
    """What the in-process drainer does (pickled to a spawned process)."""

    url: str
    redis_url: str
    polar_url: str
    threads: int


def _inproc_drainer(
    spec: InprocSpec, ready: Any, go: Any, done: Any, results: Any
) -> None:  # pragma: no cover - runs in a spawned process
    """`Deliverer` + `drain` in `spec.threads` threads until nothing is claimable; then stay
    alive (connections open) until the driver has read the CPU meter."""
    try:
        for name in [n for n in os.environ if n.startswith(OUR_PREFIXES)]:
            del os.environ[name]
        from outbox.db import make_engine, session_factory
        from outbox.delivery.deliverer import Deliverer, DrainReport, drain
        from outbox.polar.gateway import PolarGateway
        from outbox.settings import load_settings

        settings = load_settings(
            database_url=spec.url,
            redis_url=spec.redis_url,
            polar_access_token=EMULATOR_TOKEN,
            polar_base_url=spec.polar_url,
            outbox_clock_margin_seconds=0,
            outbox_batch_size=BATCH,
            polar_requests_per_minute=UNLIMITED_RPM,
        )
        engine = make_engine(spec.url)
        deliverer = Deliverer(
            session_factory(engine),
            PolarGateway(settings),
            settings,
            worker_id=f"bench-inproc:{os.getpid()}",
        )
        reports: list[DrainReport] = []

        def run() -> None:
            reports.append(drain(deliverer, max_seconds=3600))

        ready.put(os.getpid())
        go.wait()
        threads = [threading.Thread(target=run) for _ in range(spec.threads)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        results.put((sum(r.delivered for r in reports), None))
    except BaseException:
        ready.put(os.getpid())
        results.put((0, traceback.format_exc()))
    done.wait(600)


@dataclass(frozen=True)
class ProducerSpec:
    """The latency producer: `record_usage` at a steady rate, a nudge after each commit."""

    url: str
    redis_url: str
    rate: float
    threads: int
    seconds: float
    customers: int
    margin: float  # the workers' OUTBOX_CLOCK_MARGIN_SECONDS: the nudge waits that long


def _producer(
    spec: ProducerSpec, ready: Any, go: Any, start_at: Any, results: Any
) -> None:  # pragma: no cover - runs in a spawned process
    """Open loop: usage k is due at start + k / rate (thread i takes k = i, i + T, ...), so a
    slow commit makes the next ones late, never fewer."""
    try:
        for name in [n for n in os.environ if n.startswith(OUR_PREFIXES)]:
            del os.environ[name]
        os.environ.update(DATABASE_URL=spec.url, REDIS_URL=spec.redis_url)
        import random

        from api.nudge import celery_nudger
        from outbox.db import get_engine, session_scope
        from outbox.ledger import record_usage
        from outbox.settings import load_settings

        settings = load_settings()
        engine = get_engine(spec.url)
        nudge = celery_nudger(delay=spec.margin)
        total = int(spec.rate * spec.seconds)
        done = [0] * spec.threads
        late = [0.0] * spec.threads
        errors: list[str] = []
        ready.put(os.getpid())
        go.wait()
        start = float(start_at.value)

        def loop(index: int) -> None:
            rng = random.Random(index)
            for k in range(index, total, spec.threads):
                delay = start + k / spec.rate - time.time()
                if delay > 0:
                    time.sleep(delay)
                else:
                    late[index] = max(late[index], -delay)
                try:
                    with session_scope(engine) as session:
                        record_usage(
                            session,
                            f"bench_{rng.randint(1, spec.customers)}",
                            1,
                            {"source": "lib"},
                            settings=settings,
                        )
                    nudge()
                    done[index] += 1
                except Exception as exc:
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])

        threads = [threading.Thread(target=loop, args=(i,)) for i in range(spec.threads)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        nudge.stop()
        results.put((sum(done), max(late), errors[:5], None))
    except BaseException:
        ready.put(os.getpid())
        results.put((0, 0.0, [], traceback.format_exc()))


# -- scenarios ----------------------------------------------------------------------------------


@dataclass
class OfferedLoad:
    """What `Bench._offer_load` measured."""

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


@dataclass
class Scenario:
    key: str
    label: str
    run: Callable[[Scenario], DrainResult]
    options: dict[str, Any] = field(default_factory=dict)


class Bench:
    """Runs the selected scenarios in order; the emulator lives for the whole run."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.log_dir = Path(tempfile.mkdtemp(prefix="bench-drain-"))
        self.emulator = Emulator(self.log_dir)
        self.profiler = Profiler(cfg.py_spy, idle=cfg.py_spy_idle)
        self.results: dict[str, DrainResult] = {}

    # -- the list --

    def scenarios(self) -> list[Scenario]:
        cfg = self.cfg
        out = [
            Scenario(
                "a",
                f"pgbench, {cfg.clients} clients: claim {BATCH} (SKIP LOCKED) + mark delivered",
                self._pgbench,
                {"script": PGBENCH_CLAIM_DELIVER},
            ),
            Scenario(
                "a-1tx",
                f"pgbench, {cfg.clients} clients: claim + deliver in ONE statement",
                self._pgbench,
                {"script": PGBENCH_ONE_STATEMENT},
            ),
        ]
        for k in cfg.concurrency:
            out.append(
                Scenario(
                    f"b-celery-{k}",
                    f"celery worker --concurrency={k}, {k} outbox.drain tasks",
                    self._celery,
                    {"concurrency": k, "rows": cfg.rows},
                )
            )
        for t in cfg.threads:
            out.append(
                Scenario(
                    f"b-inproc-{t}",
                    f"Deliverer + drain, {t} thread{'s' if t > 1 else ''}, one process",
                    self._inproc,
                    {"threads": t},
                )
            )
        out += [
            Scenario(
                "c",
                f"naive: 1 task + 1 request per event, --concurrency={cfg.naive_concurrency}",
                self._naive,
            ),
            Scenario(
                "e-10k",
                f"{cfg.cliff_rows:,} pending alone, best b-celery",
                self._celery,
                {"rows": cfg.cliff_rows},
            ),
            Scenario(
                "e-1m",
                f"{cfg.cliff_rows:,} pending + {cfg.cliff_background:,} delivered, best b-celery",
                self._celery,
                {"rows": cfg.cliff_rows, "background": cfg.cliff_background},
            ),
            Scenario("lat", "commit -> accepted, ~half of best b, beat + nudge", self._latency),
            Scenario(
                "d",
                f"emulator {cfg.limit}/{cfg.window} s, POLAR_REQUESTS_PER_MINUTE={cfg.limit},"
                f" batch {cfg.limited_batch}",
                self._limited,
            ),
        ]
        for limit in cfg.pace_limits:
            capacity = limit * cfg.pace_batch / cfg.pace_window
            for load in cfg.pace_loads:
                out.append(
                    Scenario(
                        f"pace-{limit}-{load}",
                        f"{load}% of {limit} req/{cfg.pace_window} s x batch {cfg.pace_batch}"
                        f" = {capacity * load / 100:,.0f} usages/s, nudge + beat",
                        self._paced,
                        {"limit": limit, "load": load},
                    )
                )
            out.append(
                Scenario(
                    f"sat-{limit}",
                    f"saturated: backlog, emulator {limit}/{cfg.pace_window} s,"
                    f" batch {cfg.pace_batch}",
                    self._limited,
                    {"limit": limit, "batch": cfg.pace_batch, "window": cfg.pace_window},
                )
            )
        return [s for s in out if self._selected(s.key)]

    def _selected(self, key: str) -> bool:
        if not self.cfg.only:
            return True
        return any(key == sel or key.startswith(sel + "-") for sel in self.cfg.only)

    def best_concurrency(self) -> int:
        """The K of the fastest b-celery row measured so far (else the largest asked)."""
        measured = [
            (r.throughput, int(k.rsplit("-", 1)[1]))
            for k, r in self.results.items()
            if k.startswith("b-celery-")
        ]
        return max(measured)[1] if measured else max(self.cfg.concurrency)

    def best_b(self) -> DrainResult | None:
        bs = [r for k, r in self.results.items() if k.startswith("b-celery-")]
        return max(bs, key=lambda r: r.throughput) if bs else None

    # -- the run --

    def run(self) -> list[DrainResult]:
        cfg = self.cfg
        recreate_database(cfg.url)
        self.emulator.start()
        try:
            for scenario in self.scenarios():
                print(f"running {scenario.key}: {scenario.label} ...", file=sys.stderr, flush=True)
                reference = cpu_reference_ms()
                self.emulator.reset()
                flush_redis(cfg.redis_url)
                result = scenario.run(scenario)
                result.cpu_reference_ms = reference
                self.results[scenario.key] = result
                print(format_table([result]).splitlines()[-1], file=sys.stderr, flush=True)
        finally:
            self.profiler.stop()
            self.emulator.stop()
            if not cfg.keep_db:
                drop_database(cfg.url)
        print(f"logs: {self.log_dir}", file=sys.stderr)
        return list(self.results.values())

    def _timeout(self, rows: int) -> float:
        return max(120.0, rows / 100)

    def _finish(
        self,
        scenario: Scenario,
        t0: float,
        drained: bool,
        cpu: tuple[dict[str, float], float],
        expected: int,
        *,
        emulator: bool = True,
    ) -> DrainResult:
        """Read the rows and the emulator, check that every row arrived exactly once."""
        times = delivery_times(self.cfg.url, t0)
        stats = self.emulator.stats()
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
        counts = status_counts(self.cfg.url)
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

    # a, a-1tx

    def _pgbench(self, scenario: Scenario) -> DrainResult:
        cfg = self.cfg
        prepare_outbox(cfg.url, cfg.rows)
        script = self.log_dir / f"{scenario.key}.sql"
        script.write_text(scenario.options["script"])
        t0 = time.time()
        proc = start_pgbench(
            cfg.url,
            script,
            self.log_dir,
            clients=cfg.clients,
            seconds=self._timeout(cfg.rows),
            defines={"batch": BATCH},
        )
        meter = GroupCpuMeter({"drainers": [proc.pid], "emulator": [self.emulator.pid]})
        meter.start()
        drained = wait_drained(cfg.url, self._timeout(cfg.rows))
        cpu = meter.stop()
        proc.terminate()
        proc.wait(30)
        return self._finish(scenario, t0, drained, cpu, expected=cfg.rows, emulator=False)

    # b-celery-K, e-10k, e-1m

    def _celery(self, scenario: Scenario) -> DrainResult:
        cfg = self.cfg
        k = scenario.options.get("concurrency") or self.best_concurrency()
        rows = scenario.options["rows"]
        background = scenario.options.get("background", 0)
        prepare_outbox(cfg.url, rows, delivered=background)
        workers = CeleryWorkers(
            worker_env(cfg, self.emulator.url), k, self.log_dir / f"{scenario.key}.log"
        )
        workers.start()
        try:
            meter = GroupCpuMeter({"drainers": [workers.pid], "emulator": [self.emulator.pid]})
            t0 = time.time()
            meter.start()
            self.profiler.record(scenario.key, "workers", workers.pid)
            self.profiler.record(scenario.key, "emulator", self.emulator.pid)
            send_tasks(cfg.redis_url, "outbox.drain", ([] for _ in range(k)), expires=30)
            drained = wait_drained(cfg.url, self._timeout(rows))
            cpu = meter.stop()
            self.profiler.stop()
        finally:
            workers.stop()
        result = self._finish(scenario, t0, drained, cpu, expected=rows)
        if not scenario.options.get("concurrency"):
            result.label = result.label.replace("best b-celery", f"celery --concurrency={k}")
        return result

    # b-inproc-T

    def _inproc(self, scenario: Scenario) -> DrainResult:
        cfg = self.cfg
        prepare_outbox(cfg.url, cfg.rows)
        ctx = mp.get_context("spawn")
        ready, results = ctx.Queue(), ctx.Queue()
        go, done = ctx.Event(), ctx.Event()
        spec = InprocSpec(cfg.url, cfg.redis_url, self.emulator.url, scenario.options["threads"])
        proc = ctx.Process(target=_inproc_drainer, args=(spec, ready, go, done, results))
        proc.start()
        ready.get(timeout=120)
        assert proc.pid is not None
        meter = GroupCpuMeter({"drainers": [proc.pid], "emulator": [self.emulator.pid]})
        t0 = time.time()
        meter.start()
        self.profiler.record(scenario.key, "drainer", proc.pid)
        self.profiler.record(scenario.key, "emulator", self.emulator.pid)
        go.set()
        try:
            delivered, problem = results.get(timeout=self._timeout(cfg.rows))
            drained = wait_drained(cfg.url, 30)
            cpu = meter.stop()
            self.profiler.stop()
        finally:
            done.set()
            proc.join(30)
        if problem:
            raise RuntimeError(f"{scenario.key}: the drainer failed:\n{problem}")
        result = self._finish(scenario, t0, drained, cpu, expected=cfg.rows)
        result.notes.append(f"the drainer reports {delivered:,} rows delivered")
        return result

    # c

    def _naive(self, scenario: Scenario) -> DrainResult:
        cfg = self.cfg
        rows = cfg.naive_rows
        prepare_outbox(cfg.url, rows)
        env = worker_env(cfg, self.emulator.url)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(BENCH), *filter(None, [env.get("PYTHONPATH", "")])]
        )
        workers = CeleryWorkers(
            env, cfg.naive_concurrency, self.log_dir / "c.log", app="naive_sender"
        )
        workers.start()
        with psycopg.connect(libpq_url(cfg.url), autocommit=True) as conn:
            ids = [int(r[0]) for r in conn.execute("SELECT id FROM outbox_events ORDER BY id")]
        try:
            meter = GroupCpuMeter({"drainers": [workers.pid], "emulator": [self.emulator.pid]})
            t0 = time.time()
            meter.start()
            self.profiler.record(scenario.key, "workers", workers.pid)
            send_tasks(cfg.redis_url, "bench.naive_send", ([i] for i in ids))
            enqueued = time.time() - t0
            drained = wait_drained(cfg.url, self._timeout(rows) * 5)
            cpu = meter.stop()
            self.profiler.stop()
        finally:
            workers.stop()
        result = self._finish(scenario, t0, drained, cpu, expected=rows)
        result.notes.append(f"{rows:,} tasks enqueued in {enqueued:.1f} s (inside the drain)")
        result.notes.append(
            "against Polar's real budget a sender of one event per request is capped at"
            f" {cfg.limit / cfg.window:.1f} events/s ({cfg.limit} requests per {cfg.window} s)"
        )
        return result

    # lat

    def _offer_load(
        self,
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
        cfg = self.cfg
        lib_rate = min(cfg.latency_lib_rate, target)
        fill_rate = max(0.0, target - lib_rate)
        margin = float(env.get("OUTBOX_CLOCK_MARGIN_SECONDS", cfg.latency_margin))
        prepare_outbox(cfg.url, 0, customers=CUSTOMERS)
        workers = CeleryWorkers(env, k, self.log_dir / f"{key}.log", beat=True)
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
        producer = ctx.Process(target=_producer, args=(spec, ready, go, start_at, results))
        producer.start()
        try:
            ready.get(timeout=120)
            start = time.time() + 0.5
            start_at.value = start
            go.set()
            filler = None
            if fill_rate >= 1:
                _sleep_until(start)
                filler = start_pgbench(
                    cfg.url,
                    BATCH_INSERT_SCRIPT,
                    self.log_dir,
                    clients=4,
                    seconds=run_seconds,
                    rate=fill_rate / cfg.latency_rows_per_tx,
                    defines={"customers": CUSTOMERS, "rows": cfg.latency_rows_per_tx},
                )
            window = (start + warmup, start + warmup + seconds)
            assert producer.pid is not None
            roots = {
                "drainers": [workers.pid],
                "emulator": [self.emulator.pid],
                "producers": [producer.pid] + ([filler.pid] if filler is not None else []),
            }
            meter = GroupCpuMeter(roots)
            _sleep_until(window[0])
            meter.start()
            self.profiler.record(key, "workers", workers.pid)
            _sleep_until(window[1])
            cpu = meter.stop()
            self.profiler.stop()
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

    def _latency(self, scenario: Scenario) -> DrainResult:
        cfg = self.cfg
        best = self.best_b()
        capacity = best.throughput if best is not None else 0.0
        target = cfg.latency_rate or (capacity / 2 if capacity else 200.0)
        lib_rate = min(cfg.latency_lib_rate, target)
        fill_rate = max(0.0, target - lib_rate)
        k = self.best_concurrency()
        run = self._offer_load(
            scenario.key,
            target,
            worker_env(
                cfg,
                self.emulator.url,
                OUTBOX_CLOCK_MARGIN_SECONDS=f"{cfg.latency_margin:g}",
                OUTBOX_DRAIN_INTERVAL_SECONDS=f"{cfg.drain_interval:g}",
            ),
            k,
            cfg.latency_warmup,
            cfg.latency_seconds,
        )
        lat, cpu, drained = run.lat, run.cpu, run.drained
        made, late, errors = run.made, run.late, run.errors
        result = DrainResult(
            key=scenario.key,
            label=scenario.label,
            seconds=cfg.latency_seconds,
            count=lat.rows,
            p50_ms=lat.p50 * 1000,
            p99_ms=lat.p99 * 1000,
            rows=lat.rows,
            cpu=cpu[0],
            elapsed=cpu[1],
            status_429=int(self.emulator.stats().get("status_429", 0)),
            requests=int(self.emulator.stats().get("ingest_requests", 0)),
        )
        share = f" = {result.throughput / capacity:.0%} of {best.key}" if best else ""
        result.notes.append(
            f"asked {target:,.0f} usages/s ({lib_rate:,.0f} record_usage + nudge,"
            f" {fill_rate:,.0f} outbox rows from pgbench, {cfg.latency_rows_per_tx} per"
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
            f"the record_usage producer made {made:,} usages, at most {late:.2f} s behind"
            " its schedule"
        )
        if errors:
            result.notes.append(f"producer errors: {errors}")
        if not drained or lat.undelivered:
            result.notes.append(f"NOT DRAINED: {lat.undelivered:,} rows of the window undelivered")
        return result

    # d

    def _limited(self, scenario: Scenario) -> DrainResult:
        from outbox.policy import window_allowance

        cfg = self.cfg
        limit = scenario.options.get("limit", cfg.limit)
        batch = scenario.options.get("batch", cfg.limited_batch)
        window = scenario.options.get("window", cfg.window)
        windows = cfg.pace_windows if "window" in scenario.options else cfg.windows
        allowance = window_allowance(limit)
        ceiling = limit * batch / window
        best_possible = allowance * batch / window
        settle = 5.0
        span = settle + window + windows * window + 2  # worst case to the end
        best = self.best_b()
        pace = min(best_possible, best.throughput) if best is not None else best_possible
        rows = int(max(pace, best_possible * 0.5) * span * 1.2) + batch
        prepare_outbox(cfg.url, rows)
        self.emulator.reset(rate_limit_per_minute=limit, window_seconds=float(window))
        workers = CeleryWorkers(
            worker_env(
                cfg,
                self.emulator.url,
                POLAR_REQUESTS_PER_MINUTE=str(limit),
                POLAR_RATE_WINDOW_SECONDS=str(window),
                OUTBOX_BATCH_SIZE=str(batch),
                OUTBOX_DRAIN_INTERVAL_SECONDS=f"{cfg.drain_interval:g}",
            ),
            self.best_concurrency(),
            self.log_dir / f"{scenario.key}.log",
            beat=True,
        )
        workers.start()
        try:
            started = time.time()
            w0 = (math.floor((started + settle) / window) + 1) * window
            w1 = w0 + windows * window
            meter = GroupCpuMeter({"drainers": [workers.pid], "emulator": [self.emulator.pid]})
            _sleep_until(w0)
            meter.start()
            self.profiler.record(scenario.key, "workers", workers.pid)
            _sleep_until(w1)
            cpu = meter.stop()
            self.profiler.stop()
            _sleep_until(w1 + 1.0)
        finally:
            workers.stop(kill=True)
        stats = self.emulator.stats()
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
            mean_batch=_mean(stats.get("accepted_batch_sizes") or []),
        )
        result.ratio = None
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

    # pace-L-P

    def _paced(self, scenario: Scenario) -> DrainResult:
        cfg = self.cfg
        limit, load = scenario.options["limit"], scenario.options["load"]
        batch, window = cfg.pace_batch, cfg.pace_window
        capacity = limit * batch / window
        target = capacity * load / 100
        self.emulator.reset(rate_limit_per_minute=limit, window_seconds=float(window))
        env = worker_env(
            cfg,
            self.emulator.url,
            POLAR_REQUESTS_PER_MINUTE=str(limit),
            POLAR_RATE_WINDOW_SECONDS=str(window),
            OUTBOX_BATCH_SIZE=str(batch),
            OUTBOX_CLOCK_MARGIN_SECONDS=f"{cfg.latency_margin:g}",
            OUTBOX_DRAIN_INTERVAL_SECONDS=f"{cfg.drain_interval:g}",
        )
        # Whole windows of the emulator: start measuring at a window boundary.
        warmup = cfg.pace_warmup
        seconds = cfg.pace_windows * window
        run = self._offer_load(scenario.key, target, env, cfg.pace_concurrency, warmup, seconds)
        stats = self.emulator.stats()
        lat = run.lat
        result = DrainResult(
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
            mean_batch=_mean(stats.get("accepted_batch_sizes") or []),
        )
        result.ratio = None
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
        result.notes.append(
            spread_note(stats.get("request_times") or [], *run.window, window, limit)
        )
        if not run.drained or lat.undelivered:
            result.notes.append(f"NOT DRAINED: {lat.undelivered:,} rows of the window undelivered")
        return result


def _mean(values: list[int]) -> float:
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


def _sleep_until(moment: float) -> None:
    delay = moment - time.time()
    if delay > 0:
        time.sleep(delay)


# -- the table ----------------------------------------------------------------------------------


def _fmt(value: float, digits: int = 1) -> str:
    return "-" if math.isnan(value) else f"{value:,.{digits}f}"


CPU_GROUPS = ("postgres", "drainers", "emulator", "producers", "redis", "other")


def format_table(results: Iterable[DrainResult], baseline: str = "a") -> str:
    """A Markdown table: rows/s, ratio to the baseline, latency, 429s, CPU by group."""
    results = list(results)
    base = next((r for r in results if r.key == baseline), None)
    header = (
        "| scenario | what | rows/s | vs (a) | rows | p50 ms | p99 ms | 429 | CPU cores:"
        " pg / drainers / emulator / producers / redis / other | CPU µs per row:"
        " pg / drainers / emulator |"
    )
    lines = [header, "|" + "---|" * 10]
    for r in results:
        if r is base:
            ratio = "100%"
        elif base is not None and base.throughput:
            ratio = f"{r.throughput / base.throughput:.1%}"
        else:
            ratio = "-"
        cpu = " / ".join(f"{r.cpu.get(g, 0.0):.2f}" for g in CPU_GROUPS) if r.cpu else "-"
        per_row = " / ".join(
            _fmt(r.cpu_us_per_row(g), 0) for g in ("postgres", "drainers", "emulator")
        )
        lines.append(
            f"| {r.key} | {r.label} | {_fmt(r.throughput, 0)} | {ratio} | {r.rows:,}"
            f" | {_fmt(r.p50_ms, 0)} | {_fmt(r.p99_ms, 0)} | {r.status_429:,} | {cpu}"
            f" | {per_row} |"
        )
    return "\n".join(lines)


def goal_lines(results: list[DrainResult], cfg: Config) -> list[str]:
    """Issue #4's goals, each marked met or missed."""
    by_key = {r.key: r for r in results}
    a = by_key.get("a")
    bs = [r for r in results if r.key.startswith("b-celery-")]
    best = max(bs, key=lambda r: r.throughput) if bs else None
    lines = []

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    if a is not None and best is not None and a.throughput:
        ratio = best.throughput / a.throughput
        lines.append(
            f"goal (b) >= 30% of (a): {best.key} {best.throughput:,.0f} rows/s = {ratio:.1%}"
            f" of {a.throughput:,.0f} -> {verdict(ratio >= 0.3)}"
        )
    c = by_key.get("c")
    if c is not None and best is not None and c.throughput:
        times = best.throughput / c.throughput
        lines.append(
            f"goal (b) >= 50x (c): {best.throughput:,.0f} / {c.throughput:,.0f} = {times:.1f}x"
            f" -> {verdict(times >= 50)}"
        )
    d = by_key.get("d")
    if d is not None:
        ceiling = cfg.limit * cfg.limited_batch / cfg.window
        share = d.throughput / ceiling
        lines.append(
            f"goal (d) >= 97% of the ceiling ({ceiling:,.0f}/s) with zero 429: {share:.1%},"
            f" {d.status_429} x 429 -> {verdict(share >= 0.97 and d.status_429 == 0)}"
        )
    lat = by_key.get("lat")
    if lat is not None:
        where = f" at {lat.throughput:,.0f} usages/s"
        if best is not None and best.throughput:
            where += f" ({lat.throughput / best.throughput:.0%} of {best.key})"
        lines.append(
            f"goal p99 commit -> accepted < 2 s at ~half capacity: p99 {lat.p99_ms / 1000:.2f} s"
            f"{where} -> {verdict(lat.p99_ms < 2000)}"
        )
    for r in results:
        if r.key.startswith("pace-"):
            _, limit, load = r.key.split("-")
            bound = 5.0 if int(load) >= 90 else (2.0 if int(limit) >= 500 else 3.0)
            if int(load) in (50, 90):
                lines.append(
                    f"goal {r.key}: p99 commit -> accepted < {bound:g} s with 0 x 429:"
                    f" p99 {r.p99_ms / 1000:.2f} s, {r.status_429} x 429"
                    f" -> {verdict(r.p99_ms < bound * 1000 and r.status_429 == 0)}"
                )
        if r.key.startswith("sat-"):
            limit = int(r.key.split("-")[1])
            ceiling = limit * cfg.pace_batch / cfg.pace_window
            share = r.throughput / ceiling
            lines.append(
                f"goal {r.key} >= 97% of the ceiling ({ceiling:,.0f}/s) with zero 429:"
                f" {share:.1%}, {r.status_429} x 429"
                f" -> {verdict(share >= 0.97 and r.status_429 == 0)}"
            )
    small, big = by_key.get("e-10k"), by_key.get("e-1m")
    if small is not None and big is not None and small.throughput:
        ratio = big.throughput / small.throughput
        lines.append(
            f"goal no cliff (read here as e-1m >= 80% of e-10k): {ratio:.0%}"
            f" -> {verdict(ratio >= 0.8)}"
        )
    return lines


# -- command line -------------------------------------------------------------------------------


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def parse_args(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(
        description="Drain benchmark (issue #4): the raw-SQL ceiling, our Celery workers and the"
        " in-process drainer against the Polar emulator, a naive one-request-per-event sender,"
        " the rate-limited run, commit-to-accepted latency and 10k vs 1M rows, in one table.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--url",
        default=os.environ.get("BENCH_DRAIN_DATABASE_URL", DEFAULT_URL),
        help="benchmark database (DROPPED and re-created; its name must contain 'bench';"
        " env BENCH_DRAIN_DATABASE_URL)",
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
        help="outbox rows per pgbench transaction (lat; bench/pgbench_outbox_batch.sql)",
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
    parser.add_argument(
        "--only", default="", help="comma-separated scenario keys or prefixes (default: all)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: few rows, 5 s windows")
    parser.add_argument("--keep-db", action="store_true", help="do not drop the database")
    parser.add_argument("--json", type=Path, default=None, help="also write results as JSON")
    parser.add_argument(
        "--py-spy", type=Path, default=None, help="record every drainer with py-spy into DIR"
    )
    parser.add_argument(
        "--py-spy-idle", action="store_true", help="py-spy also records waiting frames (--idle)"
    )
    args = parser.parse_args(argv)
    if args.quick:
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
        only=tuple(s.strip() for s in args.only.split(",") if s.strip()),
        keep_db=args.keep_db,
        json_path=args.json,
        py_spy=args.py_spy,
        py_spy_idle=args.py_spy_idle,
    )


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    facts = machine_facts(cfg.url)
    results = Bench(cfg).run()
    command = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    print_report(
        results,
        facts,
        table=format_table(results),
        command=command,
        cpu_line="CPU in cores (CPU-seconds per second) from the trigger until the outbox was"
        " empty (d, lat: the measured window); per row: CPU-seconds / rows delivered",
        goals=goal_lines(results, cfg),
        json_path=cfg.json_path,
    )
    bad = any(n.startswith(PROBLEMS) for r in results for n in r.notes)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
