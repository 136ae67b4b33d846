"""Delivery paced over Polar's window: real Celery workers against a rate-limited emulator.

The window is shortened to 4 s (Polar's is 60 s) so the test takes seconds; the pacing is the
same function of (limit, window). Offered load is half of the rate-limited capacity (limit x
batch size per window): every usage is delivered, Polar never answers 429, and the requests are
spread over each window instead of being spent at its start.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from celery import Celery
from sqlalchemy import Engine

import polar_emulator
from api.nudge import Nudger
from outbox.db import session_scope
from outbox.ledger import record_usage
from tests.acceptance.conftest import Worker, all_delivered, status_counts, wait_until
from tests.factories import make_customer

LIMIT = 20  # requests per window at "Polar"
WINDOW = 4  # seconds (60 at Polar; shortened for the test)
BATCH = 5
CAPACITY = LIMIT * BATCH / WINDOW  # events per second the budget can carry
RATE = CAPACITY / 2  # offered load: half of it
SECONDS = 3 * WINDOW  # three whole windows of load


def test_half_the_capacity_is_delivered_without_a_429_and_spread_over_each_window(
    clean_tables: Engine,
    clean_redis: str,
    emulator: polar_emulator.RunningEmulator,
    start_worker: Callable[..., Worker],
) -> None:
    """Usage comes as the API sends it: each commit nudges a drain (at most 10 a second)."""
    emulator.configure(rate_limit_per_minute=LIMIT, window_seconds=float(WINDOW))
    env = {
        "POLAR_REQUESTS_PER_MINUTE": str(LIMIT),
        "POLAR_RATE_WINDOW_SECONDS": str(WINDOW),
        "OUTBOX_BATCH_SIZE": str(BATCH),
    }
    workers = [start_worker(concurrency=1, **env), start_worker(concurrency=1, **env)]
    with session_scope(clean_tables) as session:
        customer = make_customer(session, credits=10_000)
    # Let both workers come up (a first usage is delivered) before the load starts.
    with session_scope(clean_tables) as session:
        record_usage(session, customer, 1)
    wait_until(all_delivered(clean_tables, 1), 60, "the first delivery", workers[0].output)

    broker = Celery(broker=clean_redis)
    nudge = Nudger(lambda: broker.send_task("outbox.drain", expires=30, retry=False))
    offered = [1]

    def offer() -> None:
        started = time.monotonic()
        n = 0
        while (elapsed := time.monotonic() - started) < SECONDS:
            due = int(elapsed * RATE) - n
            if due > 0:
                with session_scope(clean_tables) as session:
                    for _ in range(due):
                        record_usage(session, customer, 1)
                n += due
                nudge()
            time.sleep(0.02)
        offered[0] += n

    load_started = time.time()
    load = threading.Thread(target=offer)
    load.start()
    load.join(SECONDS + 30)
    load_ended = time.time()
    nudge.stop()
    total = offered[0]
    assert total >= RATE * SECONDS * 0.9
    wait_until(all_delivered(clean_tables, total), 60, "delivery", workers[0].output)

    stats = emulator.state.stats
    assert status_counts(clean_tables) == {"delivered": total}
    assert emulator.state.totals() == {customer: total}
    assert stats.status_429 == 0
    assert max(stats.accepted_batch_sizes) <= BATCH
    # Each whole window of the load: at most its limit, and its first fifth holds about a
    # fifth of it (one request of slack: the emulator counts on arrival, after the network).
    # Spent at the start (a fixed-window counter with a backlog), it would hold nearly all.
    first = int(load_started // WINDOW + 1) * WINDOW
    windows = range(first, int(load_ended // WINDOW) * WINDOW, WINDOW)
    assert len(windows) >= 2
    for start in windows:
        in_window = [t for t in stats.request_times if start <= t < start + WINDOW]
        first_fifth = [t for t in in_window if t < start + WINDOW / 5]
        assert len(in_window) <= LIMIT
        assert len(first_fifth) <= LIMIT / 5 + 1, (start, len(first_fifth), len(in_window))
