"""The client processes of the enqueue benchmark: threads running `record_usage` or the same
SQL with plain psycopg, and a bounded HTTP load generator; each spawned, released together, and
measured over the same window."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import random
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.common import (
    FAILED,
    OK,
    REFUSED,
    CpuMeter,
    Samples,
    ScenarioResult,
    connect,
    customer_id,
    libpq_url,
    run_in_threads,
    summarize,
)
from bench.enqueue.config import REPLAY_KEYS, Config

# The same statements as bench/enqueue/pgbench_usage.sql, for the psycopg clients (a-py).
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

    run_in_threads(loop, spec.concurrency)
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
    cpu = meter.over(window)
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
