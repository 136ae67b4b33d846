"""Enqueue benchmark (issue #3): how fast can usage be recorded, next to the raw-SQL ceiling?

One run, one machine, one PostgreSQL, its own database (default `outbox_bench`, dropped and
re-created, tables emptied and re-seeded before every scenario), one table with ratios to (a):

  a          raw-SQL ceiling: pgbench, bench/pgbench_usage.sql (conditional UPDATE ... RETURNING,
             INSERT outbox_events ... RETURNING id, INSERT ledger_entries, COMMIT), -M prepared,
             many customers picked at random
  a-hot      the same on ONE customer (the ceiling for d)
  a-py-PxT   the same SQL from Python with plain psycopg (no SQLAlchemy, no domain code):
             P processes x T threads (how much of the gap is "Python at all")
  b-PxT      `record_usage` inside `outbox.db.session_scope`, one transaction per usage,
             P processes x T threads (1x16 = one process, threads only: the GIL case)
  c-bare     the floor (issue #13): the same spend statement behind one async Starlette route
             (bench/bare_app.py: bearer token by hash, json.loads, psycopg's async pool), the
             same uvicorn workers and load as c
  c          POST /v1/usage over loopback HTTP: uvicorn --factory api.app:create_app with N
             workers, a usage token, a bounded load generator (fixed in-flight requests) in
             separate process(es)
  c-idem     the same with a fresh Idempotency-Key on every request
  c-replay   the same with Idempotency-Keys already used (100 keys, each first used in the
             warm-up): every request in the window is a replay
  *-base     with --base DIR: c, c-idem and c-replay against a server run from another checkout
             (e.g. `git archive <commit> | tar -x -C DIR`), interleaved with this one's rows in
             each round: an A/B of two versions of the code in one run
  d-http     every request on ONE customer (row-lock contention), huge balance
  d-http-402 the same with a balance that runs out half-way: only 201 and 402 may appear
  d-lib      `record_usage` on ONE customer, in-process

Throughput counts transactions that completed inside the measured window (after a warm-up);
latency is per transaction (p50/p99), measured by the client. After each scenario the ledger is
checked: outbox rows == usage entries == 201s seen, balance == sum(delta), no balance < 0.

    python bench/enqueue.py                 # the full run (about 3 minutes)
    python bench/enqueue.py --quick         # a smoke run (about 40 s)
    python bench/enqueue.py --only b,c      # some scenarios (a key or a prefix: a, b, c, d)
    python bench/enqueue.py --only =a,c     # "=a": (a) alone, not a-hot and a-py-*
    python bench/enqueue.py --trace         # the round trips of one usage, by protocol message
"""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing as mp
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from common import (
    DEFAULT_URL,
    FAILED,
    HOT_CUSTOMER,
    HUGE_BALANCE,
    OK,
    REFUSED,
    CpuMeter,
    Samples,
    ScenarioResult,
    check_ledger,
    connect,
    cpu_reference_ms,
    customer_id,
    database_name,
    drop_database,
    format_table,
    free_port,
    libpq_url,
    machine_facts,
    print_report,
    recreate_database,
    reset_tables,
    seed_customers,
    summarize,
)

REPO = Path(__file__).resolve().parent.parent
PGBENCH_SCRIPT = Path(__file__).resolve().parent / "pgbench_usage.sql"
# Clients run a little past the window, so no backend exits (taking its CPU ticks along)
# before the window's last CPU reading.
TAIL_SECONDS = 0.5
# c-replay: the keys (one per customer bench_1..bench_N) every request picks from.
REPLAY_KEYS = 100
# Notes that report a problem (kept from every repeat, not only the median run).
PROBLEMS = ("LEDGER INCONSISTENT", "outbox rows", "errors other than 402", "pgbench exited")

# The same statements as bench/pgbench_usage.sql, for the psycopg clients (a-py).
DEDUCT_SQL = (
    "UPDATE customers SET balance = balance - %s, used = used + %s, updated_at = %s"
    " WHERE id = %s AND balance >= %s RETURNING balance"
)
INSERT_EVENT_SQL = (
    "INSERT INTO outbox_events (external_id, customer_id, name, credits, metadata, occurred_at,"
    " status, attempts, next_attempt_at, created_at, updated_at)"
    " VALUES (%s, %s, 'ai_generation', %s, '{}', %s, 'pending', 0, %s, %s, %s) RETURNING id"
)
INSERT_LEDGER_SQL = (
    "INSERT INTO ledger_entries (customer_id, kind, delta, balance_after, event_id, external_id,"
    " created_at) VALUES (%s, 'usage', %s, %s, %s, %s, %s)"
)


@dataclass(frozen=True)
class Config:
    """What the command line asked for."""

    url: str
    seconds: float
    warmup: float
    clients: int
    customers: int
    layouts: tuple[tuple[int, int], ...]
    http_workers: int
    http_clients: int
    app: str
    repeat: int
    gen_procs: int
    only: tuple[str, ...]
    keep_db: bool
    json_path: Path | None
    base_dir: Path | None = None


@dataclass(frozen=True)
class ClientSpec:
    """What one client process does (pickled to a spawned process)."""

    kind: str  # "record_usage" | "psycopg" | "http"
    url: str
    concurrency: int  # threads, or in-flight HTTP requests
    customers: int  # picks bench_1..bench_<customers> at random; 1 = the hot customer
    run_seconds: float  # warm-up + measured window
    seed: int
    port: int = 0
    token: str = ""
    idempotency: str = ""  # "" | "fresh" (a new key per request) | "replay" (REPLAY_KEYS keys)


# -- client processes -------------------------------------------------------------------------


def _error_key(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"


def _run_threads(
    spec: ClientSpec, make_tx: Callable[[], Callable[[str], int]], barrier: Callable[[], float]
) -> Samples:
    """`spec.concurrency` threads, each running transactions back to back until the deadline."""
    per_thread = [Samples() for _ in range(spec.concurrency)]
    txs = [make_tx() for _ in range(spec.concurrency)]
    deadline = barrier() + spec.run_seconds

    def loop(index: int) -> None:
        rng = random.Random(spec.seed * 1000 + index)
        samples, tx = per_thread[index], txs[index]
        while time.time() < deadline:
            cid = customer_id(rng.randint(1, spec.customers))
            began = time.perf_counter()
            try:
                code = tx(cid)
            except Exception as exc:
                code = FAILED
                samples.errors[_error_key(exc)] += 1
            samples.add(time.time(), time.perf_counter() - began, code)

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(spec.concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    merged = Samples()
    for samples in per_thread:
        merged.extend(samples)
    return merged


def _record_usage_client(spec: ClientSpec, barrier: Callable[[], float]) -> Samples:
    """The library path: `record_usage` in `session_scope`, the process-wide engine."""
    from outbox.db import get_engine, session_scope
    from outbox.errors import InsufficientCredits
    from outbox.ledger import record_usage
    from outbox.settings import load_settings

    settings = load_settings(database_url=spec.url)
    engine = get_engine(spec.url)

    def tx(cid: str) -> int:
        try:
            with session_scope(engine) as session:
                record_usage(session, cid, 1, settings=settings)
        except InsufficientCredits:
            return REFUSED
        return OK

    return _run_threads(spec, lambda: tx, barrier)


def _psycopg_client(spec: ClientSpec, barrier: Callable[[], float]) -> Samples:
    """The same SQL with plain psycopg, one connection per thread."""
    import uuid
    from datetime import UTC, datetime

    def make_tx() -> Callable[[str], int]:
        conn = connect(libpq_url(spec.url))

        def tx(cid: str) -> int:
            now = datetime.now(UTC)
            try:
                with conn.cursor() as cur:
                    row = cur.execute(DEDUCT_SQL, (1, 1, now, cid, 1)).fetchone()
                    if row is None:
                        conn.rollback()
                        return REFUSED
                    external_id = f"usage_{uuid.uuid4().hex}"
                    event = cur.execute(
                        INSERT_EVENT_SQL, (external_id, cid, 1, now, now, now, now)
                    ).fetchone()
                    assert event is not None
                    cur.execute(INSERT_LEDGER_SQL, (cid, -1, row[0], event[0], external_id, now))
                conn.commit()
            except BaseException:
                conn.rollback()
                raise
            return OK

        return tx

    return _run_threads(spec, make_tx, barrier)


def _http_client(spec: ClientSpec, barrier: Callable[[], float]) -> Samples:
    """A bounded load generator: `spec.concurrency` keep-alive connections, one request in
    flight on each (closed loop), hand-written HTTP/1.1 so the generator stays cheap."""
    try:
        import uvloop

        run: Callable[[Any], Samples] = uvloop.run
    except ImportError:  # pragma: no cover - uvicorn[standard] brings uvloop
        run = asyncio.run
    return run(_http_main(spec, barrier))


async def _http_main(spec: ClientSpec, barrier: Callable[[], float]) -> Samples:
    import uuid

    samples = Samples()
    connections = [
        await asyncio.open_connection("127.0.0.1", spec.port) for _ in range(spec.concurrency)
    ]
    start = await asyncio.to_thread(barrier)
    deadline = start + spec.run_seconds
    head = (
        f"POST /v1/usage HTTP/1.1\r\nHost: 127.0.0.1:{spec.port}\r\n"
        f"Authorization: Bearer {spec.token}\r\nContent-Type: application/json\r\n"
    ).encode()

    replay = spec.idempotency == "replay"

    async def loop(index: int) -> None:
        rng = random.Random(spec.seed * 1000 + index)
        reader, writer = connections[index]
        while time.time() < deadline:
            number = rng.randint(1, min(spec.customers, REPLAY_KEYS) if replay else spec.customers)
            body = b'{"customer_id":"%s","credits":1}' % customer_id(number).encode()
            extra = (
                f"Idempotency-Key: {uuid.uuid4().hex}\r\n".encode()
                if spec.idempotency == "fresh"
                else b"Idempotency-Key: replay-%d\r\n" % number
                if replay
                else b""
            )
            request = head + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body
            began = time.perf_counter()
            try:
                writer.write(request)
                response = await reader.readuntil(b"\r\n\r\n")
                status = int(response[9:12])
                at = response.lower().index(b"\r\ncontent-length:")
                length = int(response[at + 17 : response.index(b"\r\n", at + 2)])
                payload = await reader.readexactly(length)
            except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
                samples.errors[_error_key(exc)] += 1
                samples.add(time.time(), time.perf_counter() - began, FAILED)
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", spec.port)
                continue
            code = {201: OK, 402: REFUSED}.get(status, status)
            if code not in (OK, REFUSED):
                samples.errors[f"HTTP {status}: {payload[:160].decode(errors='replace')}"] += 1
            samples.add(time.time(), time.perf_counter() - began, code)
        writer.close()

    await asyncio.gather(*(loop(i) for i in range(spec.concurrency)))
    return samples


CLIENTS: dict[str, Callable[[ClientSpec, Callable[[], float]], Samples]] = {
    "record_usage": _record_usage_client,
    "psycopg": _psycopg_client,
    "http": _http_client,
}


def _client_process(
    spec: ClientSpec, ready: Any, go: Any, start_at: Any, results: Any
) -> None:  # pragma: no cover - runs in a spawned process
    def barrier() -> float:
        ready.put(os.getpid())
        go.wait()
        return float(start_at.value)

    try:
        results.put((os.getpid(), CLIENTS[spec.kind](spec, barrier), None))
    except BaseException:
        ready.put(os.getpid())  # never leave the driver waiting for a dead client
        results.put((os.getpid(), None, traceback.format_exc()))


def run_clients(
    cfg: Config,
    key: str,
    label: str,
    specs: list[ClientSpec],
    *,
    server_pids: tuple[int, ...] = (),
) -> ScenarioResult:
    """Start one spawned process per spec, release them together, measure the window."""
    ctx = mp.get_context("spawn")
    ready, results = ctx.Queue(), ctx.Queue()
    go, start_at = ctx.Event(), ctx.Value("d", 0.0)
    procs = [
        ctx.Process(target=_client_process, args=(spec, ready, go, start_at, results))
        for spec in specs
    ]
    for proc in procs:
        proc.start()
    for _ in procs:
        ready.get(timeout=120)
    start = time.time() + 0.2
    start_at.value = start
    go.set()
    window = (start + cfg.warmup, start + cfg.warmup + cfg.seconds)
    meter = CpuMeter(load_roots=[p.pid for p in procs if p.pid], server_roots=server_pids)
    _sleep_until(window[0])
    meter.start()
    _sleep_until(window[1])
    cpu = meter.cores()
    merged = Samples()
    problems = []
    for _ in procs:
        _, samples, problem = results.get(timeout=cfg.seconds + cfg.warmup + 120)
        if problem:
            problems.append(problem)
        else:
            merged.extend(samples)
    for proc in procs:
        proc.join(timeout=30)
    if problems:
        raise RuntimeError(f"{key}: a client process failed:\n" + "\n".join(problems))
    result = summarize(key, label, merged, window)
    result.cpu = cpu
    return result


def _sleep_until(moment: float) -> None:
    delay = moment - time.time()
    if delay > 0:
        time.sleep(delay)


# -- pgbench ----------------------------------------------------------------------------------


def find_pgbench() -> str | None:
    """pgbench on PATH, or in a PostgreSQL installation's bin directory."""
    found = shutil.which("pgbench")
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pgbench"), reverse=True)
    return str(candidates[0]) if candidates else None


def run_pgbench(cfg: Config, key: str, label: str, customers: int) -> ScenarioResult:
    """pgbench with the custom script for warm-up + window; latencies from its per-transaction
    log (completion time and latency of every transaction)."""
    exe = find_pgbench()
    if exe is None:
        raise RuntimeError("pgbench not found (it ships with PostgreSQL)")
    parts = urlsplit(libpq_url(cfg.url))
    logdir = Path(tempfile.mkdtemp(prefix="bench-pgbench-"))
    cmd = [
        exe,
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
        str(cfg.clients),
        "-j",
        str(min(cfg.clients, os.cpu_count() or 1)),
        "-T",
        str(math.ceil(cfg.warmup + cfg.seconds) + 1),
        "-D",
        f"customers={customers}",
        "-f",
        str(PGBENCH_SCRIPT),
        "-l",
        f"--log-prefix={logdir / 'pgbench'}",
        database_name(cfg.url),
    ]
    env = dict(os.environ)
    if parts.password:
        env["PGPASSWORD"] = parts.password
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    meter = CpuMeter(load_roots=[proc.pid])
    window = (start + cfg.warmup, start + cfg.warmup + cfg.seconds)
    _sleep_until(window[0])
    meter.start()
    _sleep_until(window[1])
    cpu = meter.cores()
    stdout, stderr = proc.communicate(timeout=120)
    samples = Samples()
    for path in logdir.glob("pgbench*"):
        for line in path.read_text().splitlines():
            fields = line.split()
            if fields[2].isdigit():
                end = int(fields[4]) + int(fields[5]) / 1e6
                samples.add(end, int(fields[2]) / 1e6, OK)
            else:  # "failed" or "skipped"
                samples.add(int(fields[4]) + int(fields[5]) / 1e6, math.nan, FAILED)
                samples.errors[f"pgbench: {fields[2]}"] += 1
    shutil.rmtree(logdir, ignore_errors=True)
    result = summarize(key, label, samples, window)
    result.cpu = cpu
    if proc.returncode != 0:
        result.notes.append(f"pgbench exited {proc.returncode}: {stderr.strip()[-300:]}")
    tps = [line for line in stdout.splitlines() if line.startswith("tps")]
    if tps:
        result.notes.append(f"pgbench's own figure: {tps[0]}")
    return result


# -- the API server ---------------------------------------------------------------------------


class ApiServer:
    """`uvicorn --factory api.app:create_app --workers N` on a free loopback port (the same
    server `outbox serve --workers N` runs, without its Celery nudge unless asked)."""

    def __init__(self, url: str, workers: int, app: str, cwd: Path = REPO) -> None:
        self.url = url
        self.workers = workers
        self.app = app
        self.cwd = cwd
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            self.app,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
            "--no-access-log",
            "--log-level",
            "warning",
        ]

    def start(self) -> None:
        import httpx

        env = dict(os.environ, DATABASE_URL=self.url, PYTHONPATH=str(self.cwd))
        self.proc = subprocess.Popen(self.command(), cwd=self.cwd, env=env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"uvicorn exited with {self.proc.returncode}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("uvicorn did not answer /healthz within 60 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def create_usage_token(url: str) -> str:
    """A fresh `usage` token in the benchmark database."""
    from sqlalchemy.pool import NullPool

    from outbox.db import make_engine, session_scope
    from outbox.tokens import create_token

    engine = make_engine(url, poolclass=NullPool)
    deadline = time.monotonic() + 60
    try:
        while True:
            try:
                with session_scope(engine) as session:
                    token, _ = create_token(session, "usage", "bench")
                return token
            except Exception as exc:  # out of connections on a shared machine: wait
                if "too many clients" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
    finally:
        engine.dispose()


# -- scenarios --------------------------------------------------------------------------------


@dataclass
class Scenario:
    key: str
    label: str
    customers: int  # seeded; 1 = only the hot customer
    run: Callable[[Scenario], ScenarioResult]
    balance: int = HUGE_BALANCE
    server: str = ""  # "" (none), "api", "bare" (bench/bare_app.py) or "base" (--base DIR)
    replays: bool = False


class Bench:
    """Runs the selected scenarios in order, each on freshly emptied and seeded tables."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.servers: dict[str, ApiServer] = {}
        self._last: dict[str, ScenarioResult] = {}
        self.runs: dict[str, list[ScenarioResult]] = {}

    def scenarios(self) -> list[Scenario]:
        cfg = self.cfg
        many = cfg.customers
        out = [
            Scenario("a", f"pgbench, {cfg.clients} clients, raw SQL", many, self._pgbench),
            Scenario("a-hot", f"pgbench, {cfg.clients} clients, ONE customer", 1, self._pgbench),
        ]
        for procs, threads in cfg.layouts:
            out.append(
                Scenario(
                    f"a-py-{procs}x{threads}",
                    f"same SQL via psycopg, {procs} proc x {threads} threads",
                    many,
                    self._clients("psycopg", procs, threads),
                )
            )
        for procs, threads in cfg.layouts:
            out.append(
                Scenario(
                    f"b-{procs}x{threads}",
                    f"record_usage + session_scope, {procs} proc x {threads} threads",
                    many,
                    self._clients("record_usage", procs, threads),
                )
            )
        http = f"{cfg.http_workers} uvicorn workers, {cfg.http_clients} in flight"
        out.append(
            Scenario(
                "c-bare",
                f"floor: same SQL, one async Starlette route + psycopg, {http}",
                many,
                self._http(),
                server="bare",
            )
        )
        servers = ["api", "base"] if cfg.base_dir is not None else ["api"]
        for key, what, mode in (
            ("c", "POST /v1/usage", ""),
            ("c-idem", "POST /v1/usage + fresh Idempotency-Key", "fresh"),
            ("c-replay", "POST /v1/usage, replayed Idempotency-Key", "replay"),
        ):
            for server in servers:
                suffix = "-base" if server == "base" else ""
                out.append(
                    Scenario(
                        key + suffix,
                        f"{what}{' (--base)' if suffix else ''}, {http}",
                        many,
                        self._http(idempotency=mode),
                        server=server,
                        replays=mode == "replay",
                    )
                )
        out += [
            Scenario("d-http", f"ONE customer, {http}", 1, self._http(), server="api"),
            Scenario(
                "d-http-402",
                "ONE customer, balance runs out half-way",
                1,
                self._http(),
                balance=0,  # sized from d-http's throughput, see run()
                server="api",
            ),
        ]
        procs, threads = max(cfg.layouts)
        out.append(
            Scenario(
                "d-lib",
                f"ONE customer, record_usage, {procs} proc x {threads} threads",
                1,
                self._clients("record_usage", procs, threads),
            )
        )
        return [s for s in out if self._selected(s.key)]

    def _selected(self, key: str) -> bool:
        if not self.cfg.only:
            return True
        return any(
            key == sel.removeprefix("=") or (sel[:1] != "=" and key.startswith(sel + "-"))
            for sel in self.cfg.only
        )

    def _pgbench(self, scenario: Scenario) -> ScenarioResult:
        return run_pgbench(self.cfg, scenario.key, scenario.label, scenario.customers)

    def _clients(self, kind: str, procs: int, threads: int) -> Callable[[Scenario], ScenarioResult]:
        def run(scenario: Scenario) -> ScenarioResult:
            specs = [
                ClientSpec(
                    kind=kind,
                    url=self.cfg.url,
                    concurrency=threads,
                    customers=scenario.customers,
                    run_seconds=self.cfg.warmup + self.cfg.seconds + TAIL_SECONDS,
                    seed=i + 1,
                )
                for i in range(procs)
            ]
            return run_clients(self.cfg, scenario.key, scenario.label, specs)

        return run

    def _http(self, *, idempotency: str = "") -> Callable[[Scenario], ScenarioResult]:
        def run(scenario: Scenario) -> ScenarioResult:
            server = self.servers[scenario.server]
            assert server.proc is not None
            token = create_usage_token(self.cfg.url)
            gens = self.cfg.gen_procs
            per_gen = [
                self.cfg.http_clients // gens + (1 if i < self.cfg.http_clients % gens else 0)
                for i in range(gens)
            ]
            base = ClientSpec(
                kind="http",
                url=self.cfg.url,
                concurrency=0,
                customers=scenario.customers,
                run_seconds=self.cfg.warmup + self.cfg.seconds + TAIL_SECONDS,
                seed=0,
                port=server.port,
                token=token,
                idempotency=idempotency,
            )
            specs = [replace(base, concurrency=n, seed=i + 1) for i, n in enumerate(per_gen) if n]
            return run_clients(
                self.cfg, scenario.key, scenario.label, specs, server_pids=(server.proc.pid,)
            )

        return run

    def run(self) -> list[ScenarioResult]:
        """Run every selected scenario `--repeat` times, in rounds (a, b, ..., then a, b, ...
        again) so a slow minute on a shared machine hits every row alike; each row is the
        median run by throughput."""
        cfg = self.cfg
        scenarios = self.scenarios()
        runs: dict[str, list[ScenarioResult]] = {s.key: [] for s in scenarios}
        self.runs = runs
        recreate_database(cfg.url)
        try:
            for round_number in range(cfg.repeat):
                if cfg.repeat > 1:
                    print(f"round {round_number + 1} of {cfg.repeat}", file=sys.stderr)
                for scenario in scenarios:
                    if scenario.server and scenario.server not in self.servers:
                        server = self._make_server(scenario.server)
                        self.servers[scenario.server] = server
                        server.start()
                    runs[scenario.key].append(self._run_once(scenario))
                    # A server keeps its pooled connections (each scenario's new token fills
                    # the sync pool once): stop it, so that the next row finds PostgreSQL's
                    # max_connections free. It restarts in seconds, before the warm-up.
                    for server in self.servers.values():
                        server.stop()
                    self.servers.clear()
        finally:
            for server in self.servers.values():
                server.stop()
            if not cfg.keep_db:
                drop_database(cfg.url)
        results = [self._median(runs[s.key]) for s in scenarios]
        baseline = runs.get("a")
        if baseline and cfg.repeat > 1:
            # Ratios to (a) of the same round: the machine's speed drifts between rounds.
            for scenario, result in zip(scenarios, results, strict=True):
                ratios = sorted(
                    r.throughput / a.throughput
                    for r, a in zip(runs[scenario.key], baseline, strict=True)
                    if a.throughput
                )
                if ratios and scenario.key != "a":
                    result.ratio = ratios[len(ratios) // 2]
                    result.notes.append(
                        "ratio to (a) of the same round: "
                        + ", ".join(f"{x:.0%}" for x in ratios)
                        + " (the median is the table's)"
                    )
        return results

    def _make_server(self, kind: str) -> ApiServer:
        cfg = self.cfg
        if kind == "bare":
            return ApiServer(cfg.url, cfg.http_workers, "bench.bare_app:create_app")
        if kind == "base":
            assert cfg.base_dir is not None
            return ApiServer(cfg.url, cfg.http_workers, cfg.app, cwd=cfg.base_dir)
        return ApiServer(cfg.url, cfg.http_workers, cfg.app)

    def round_ratio(self, key: str, base: str) -> tuple[float, list[float]] | None:
        """The median over rounds of key's throughput / base's throughput in the same round,
        and every round's ratio (None if either row was not run)."""
        mine, theirs = self.runs.get(key), self.runs.get(base)
        if not mine or not theirs:
            return None
        ratios = [
            m.throughput / t.throughput for m, t in zip(mine, theirs, strict=True) if t.throughput
        ]
        if not ratios:
            return None
        return sorted(ratios)[len(ratios) // 2], ratios

    @staticmethod
    def _median(runs: list[ScenarioResult]) -> ScenarioResult:
        ordered = sorted(runs, key=lambda r: r.throughput)
        result = ordered[len(ordered) // 2]
        if len(ordered) > 1:
            result.notes.append(
                f"median of {len(ordered)} runs: "
                + ", ".join(f"{r.throughput:,.0f}" for r in runs)
                + " tx/s (in run order)"
            )
            for other in ordered:  # a problem in any run shows, not only in the median
                if other is not result:
                    result.notes += [n for n in other.notes if n.startswith(PROBLEMS)]
        return result

    def _run_once(self, scenario: Scenario) -> ScenarioResult:
        balance = scenario.balance
        if scenario.key == "d-http-402":
            balance = self._runout_balance()
        reset_tables(self.cfg.url)
        seed_customers(self.cfg.url, scenario.customers, balance)
        print(f"running {scenario.key}: {scenario.label} ...", file=sys.stderr, flush=True)
        reference = cpu_reference_ms()
        result = scenario.run(scenario)
        result.cpu_reference_ms = reference
        result.ledger = check_ledger(self.cfg.url)
        self._check(result, balance)
        print(format_table([result]).splitlines()[-1], file=sys.stderr, flush=True)
        self._last[scenario.key] = result
        return result

    def _runout_balance(self) -> int:
        """Enough credits for the warm-up and half the window at d-http's pace."""
        hot = self._last.get("d-http")
        pace = hot.throughput if hot is not None and hot.throughput else 500.0
        return max(100, int(pace * (self.cfg.warmup + self.cfg.seconds / 2)))

    def _check(self, result: ScenarioResult, balance: int) -> None:
        ledger = result.ledger
        assert ledger is not None
        if not ledger.consistent:
            result.notes.append(f"LEDGER INCONSISTENT: {ledger}")
        replays = any(s.key == result.key and s.replays for s in self.scenarios())
        if replays:
            if ledger.events > REPLAY_KEYS:
                result.notes.append(f"outbox rows {ledger.events} > {REPLAY_KEYS} keys replayed")
        elif ledger.events != result.total_ok:
            result.notes.append(
                f"outbox rows {ledger.events} != successful usages seen {result.total_ok}"
            )
        if result.failed:
            result.notes.append(f"errors other than 402: {result.errors}")
        if result.key == "d-http-402":
            result.notes.append(
                f"balance {balance:,} credits: {result.total_ok:,} accepted in the whole run"
                f" (warm-up included), then {result.codes.get(REFUSED, 0):,} refused with 402"
                f" in the window"
            )


# -- round trips (--trace) --------------------------------------------------------------------


def trace_round_trips(url: str) -> str:
    """The wire protocol of one usage, from libpq's trace: every Query and every Sync the
    client sends costs one round trip to PostgreSQL."""
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from fastapi.testclient import TestClient
    from psycopg.pq import Trace
    from sqlalchemy import event

    from api.app import create_app
    from outbox.db import make_engine, session_scope
    from outbox.ledger import record_usage
    from outbox.settings import load_settings

    settings = load_settings(database_url=url)
    trace_file = tempfile.NamedTemporaryFile("w+", suffix=".trace", delete=False)  # noqa: SIM115
    engine = make_engine(url, pool_size=1, max_overflow=0)

    @event.listens_for(engine, "connect")
    def _trace(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.pgconn.trace(trace_file.fileno())
        dbapi_connection.pgconn.set_trace_flags(Trace.SUPPRESS_TIMESTAMPS | Trace.REGRESS_MODE)

    reset_tables(url)
    seed_customers(url, 1, HUGE_BALANCE)
    token = create_usage_token(url)
    client = TestClient(create_app(settings, engine=engine))
    cases: list[tuple[str, Callable[[], object]]] = [
        (
            "record_usage in session_scope",
            lambda: record_usage_once(session_scope, engine, record_usage, settings),
        ),
        (
            "POST /v1/usage",
            lambda: client.post(
                "/v1/usage",
                json={"customer_id": HOT_CUSTOMER, "credits": 1},
                headers={"Authorization": f"Bearer {token}"},
            ),
        ),
        (
            "POST /v1/usage + Idempotency-Key",
            lambda: client.post(
                "/v1/usage",
                json={"customer_id": HOT_CUSTOMER, "credits": 1},
                headers={
                    "Authorization": f"Bearer {token}",
                    "Idempotency-Key": f"k{time.monotonic_ns()}",
                },
            ),
        ),
    ]
    report = []
    for name, call in cases:
        for _ in range(7):  # past psycopg's prepare threshold, the token cache warm
            call()
        trace_file.flush()
        offset = os.path.getsize(trace_file.name)
        call()
        trace_file.flush()
        with open(trace_file.name) as f:
            f.seek(offset)
            lines = [line.rstrip("\n").split("\t") for line in f]
        messages = _round_trips(lines, _prepared_names(trace_file.name))
        report.append(f"{name}: {len(messages)} round trips")
        report += [f"  {i + 1}. {m}" for i, m in enumerate(messages)]
    client.close()
    engine.dispose()
    trace_file.close()
    os.unlink(trace_file.name)
    return "\n".join(report)


def record_usage_once(session_scope: Any, engine: Any, record_usage: Any, settings: Any) -> None:
    """One library usage, as scenario b runs it."""
    with session_scope(engine) as session:
        record_usage(session, HOT_CUSTOMER, 1, settings=settings)


def _prepared_names(path: str) -> dict[str, str]:
    names: dict[str, str] = {}
    with open(path) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) > 3 and parts[0] == "F" and parts[2] == "Parse":
                name = parts[3].strip().split(" ", 1)[0].strip('"')
                names[name] = _parse_sql(parts[3])
    return names


def _round_trips(lines: list[list[str]], prepared: dict[str, str]) -> list[str]:
    """One entry per Query or Sync sent, named by the statement it carried."""
    trips: list[str] = []
    current = ""
    for parts in lines:
        if len(parts) < 3 or parts[0] != "F":
            continue
        kind = parts[2]
        args = parts[3].strip() if len(parts) > 3 else ""
        if kind == "Query":
            trips.append(_short(args.strip('"')))
        elif kind == "Parse":
            current = _parse_sql(args)
        elif kind == "Bind":
            statement = args.split(" ")[1].strip('"') if " " in args else ""
            current = prepared.get(statement, current) if statement else current
        elif kind == "Sync":
            trips.append(_short(current))
            current = ""
    return trips


def _parse_sql(args: str) -> str:
    """The statement of a traced Parse message: `"name" "sql" nparams ...`."""
    match = re.match(r'\s*"[^"]*" "(.*)" \d+', args)
    return match.group(1) if match else args


def _short(sql: str) -> str:
    words = sql.split()
    if not words or words == [";"]:
        return "; (empty query: pool_pre_ping on checkout)"
    head = words[0].upper()
    if head in ("INSERT", "DELETE") and len(words) > 2:
        return f"{head} {words[2]}"
    if head == "UPDATE" and len(words) > 1:
        return f"UPDATE {words[1]}"
    if head == "SELECT":
        table = words[words.index("FROM") + 1] if "FROM" in words else ""
        return f"SELECT {table}".strip() if table else " ".join(words[:4])
    return " ".join(words[:3])


# -- command line -----------------------------------------------------------------------------


def parse_layouts(text: str) -> tuple[tuple[int, int], ...]:
    """ "1x16,2x8" -> ((1, 16), (2, 8))."""
    layouts = []
    for part in text.split(","):
        procs, _, threads = part.strip().partition("x")
        layouts.append((int(procs), int(threads)))
    return tuple(layouts)


def parse_args(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        description="Enqueue benchmark (issue #3): the raw-SQL ceiling, record_usage in-process,"
        " POST /v1/usage over HTTP and one hot customer, side by side in one table.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--url",
        default=os.environ.get("BENCH_DATABASE_URL", DEFAULT_URL),
        help="benchmark database (DROPPED and re-created; its name must contain 'bench';"
        " env BENCH_DATABASE_URL)",
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
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated scenario keys or prefixes, e.g. 'a,b-4x4,c'; '=a' is the key alone"
        " (default: all)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 s windows, fewer rows")
    parser.add_argument("--keep-db", action="store_true", help="do not drop the database")
    parser.add_argument("--json", type=Path, default=None, help="also write results as JSON")
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
        only=tuple(s.strip() for s in args.only.split(",") if s.strip()),
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
    command = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    print_report(
        results,
        facts,
        table=format_table(results),
        command=command,
        cpu_line=f"window {cfg.seconds:g} s after {cfg.warmup:g} s warm-up; CPU in cores"
        " (CPU-seconds per second) during the window",
        goals=goal_lines(results, bench),
        json_path=cfg.json_path,
    )
    failed = any(r.failed or (r.ledger is not None and not r.ledger.consistent) for r in results)
    return 1 if failed else 0


def goal_lines(results: list[ScenarioResult], bench: Bench | None = None) -> list[str]:
    """Issue #3's and #13's goals, each marked met or missed (ratios: the median over rounds
    of the ratio within a round)."""
    by_key = {r.key: r for r in results}
    base = by_key.get("a")
    lines = []
    if bench is not None:
        for key, other, goal, what in (
            ("c", "c-bare", 0.8, "goal (c) >= 80% of the floor (c-bare)"),
            ("c-idem", "c", 0.8, "goal (c-idem) >= 80% of (c)"),
            ("c-replay", "c", 1.0, "goal (c-replay) >= (c)"),
            ("c", "c-base", 0.0, "A/B: c vs c-base (--base)"),
            ("c-idem", "c-idem-base", 0.0, "A/B: c-idem vs c-idem-base (--base)"),
            ("c-replay", "c-replay-base", 0.0, "A/B: c-replay vs c-replay-base (--base)"),
        ):
            found = bench.round_ratio(key, other)
            if found is None:
                continue
            ratio, each = found
            verdict = "" if not goal else " -> met" if ratio >= goal else " -> MISSED"
            lines.append(
                f"{what}: {ratio:.0%} (rounds: {', '.join(f'{r:.0%}' for r in each)}){verdict}"
            )
    if base is not None and base.throughput:
        bs = [r for r in results if r.key.startswith("b-")]
        if bs:
            best = max(bs, key=lambda r: r.throughput)
            ratio = best.ratio_to(base)
            lines.append(
                f"goal (b) >= 50% of (a): best {best.key} {ratio:.0%}"
                f" -> {'met' if ratio >= 0.5 else 'MISSED'}"
            )
        c = by_key.get("c")
        if c is not None:
            ratio = c.ratio_to(base)
            met = ratio >= 0.25 and c.p99_ms < 20
            lines.append(
                f"goal (c) >= 25% of (a) with p99 < 20 ms: {ratio:.0%}, p99 {c.p99_ms:.1f} ms"
                f" -> {'met' if met else 'MISSED'}"
            )
    ds = [r for r in results if r.key.startswith("d-")]
    if ds:
        bad = sum(r.failed for r in ds)
        lines.append(
            f"goal (d) no errors other than 402: {bad} other errors"
            f" -> {'met' if bad == 0 else 'MISSED'}"
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
