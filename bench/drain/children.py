"""The child processes of the drain benchmark (spawned, their arguments pickled): the in-process
drainer (b-inproc) and the producer of usage at a steady rate (lat, pace)."""

from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass
from typing import Any

from bench.common import drop_our_settings, run_in_threads
from bench.drain.config import BATCH, EMULATOR_TOKEN, UNLIMITED_RPM


@dataclass(frozen=True)
class InprocSpec:
    """What the in-process drainer does (pickled to a spawned process)."""

    url: str
    redis_url: str
    polar_url: str
    threads: int


def inproc_drainer(
    spec: InprocSpec, ready: Any, go: Any, done: Any, results: Any
) -> None:  # pragma: no cover - runs in a spawned process
    """`Deliverer` + `drain` in `spec.threads` threads until nothing is claimable; then stay
    alive (connections open) until the driver has read the CPU meter."""
    try:
        drop_our_settings()
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

        def run(_thread: int) -> None:
            reports.append(drain(deliverer, max_seconds=3600))

        ready.put(os.getpid())
        go.wait()
        run_in_threads(run, spec.threads)
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


def usage_producer(
    spec: ProducerSpec, ready: Any, go: Any, start_at: Any, results: Any
) -> None:  # pragma: no cover - runs in a spawned process
    """Open loop: usage k is due at start + k / rate (thread i takes k = i, i + T, ...), so a
    slow commit makes the next ones late, never fewer."""
    try:
        drop_our_settings()
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

        run_in_threads(loop, spec.threads)
        nudge.stop()
        results.put((sum(done), max(late), errors[:5], None))
    except BaseException:
        ready.put(os.getpid())
        results.put((0, 0.0, [], traceback.format_exc()))
