"""The shared Polar budget on real Redis: threads and processes together never exceed the
allowance of a window; a 429 seen by one pauses all; without Redis, a local share."""

from __future__ import annotations

import multiprocessing
import threading
import time
import uuid

import pytest
import redis

from outbox.ratelimit import FallbackRateBudget, LocalRateBudget, RedisRateBudget, make_budget
from outbox.settings import load_settings

LIMIT = 30  # allowance 28 (margin 2)
WINDOW = 2


def budget(redis_url: str, namespace: str) -> RedisRateBudget:
    return RedisRateBudget(
        redis.Redis.from_url(redis_url), LIMIT, namespace=namespace, window_seconds=WINDOW
    )


def _spend_for(redis_url: str, namespace: str, seconds: float, queue: object) -> None:
    mine = budget(redis_url, namespace)
    stamps = []
    deadline = time.time() + seconds
    while time.time() < deadline:
        if mine.try_acquire() is None:
            stamps.append(time.time())
        else:
            time.sleep(0.01)
    queue.put(stamps)  # type: ignore[attr-defined]


def per_window(stamps: list[float]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for stamp in stamps:
        key = int(stamp // WINDOW)
        counts[key] = counts.get(key, 0) + 1
    return counts


def test_processes_and_threads_share_one_budget(redis_url: str) -> None:
    namespace = f"test:{uuid.uuid4().hex}"
    queue: multiprocessing.Queue[list[float]] = multiprocessing.Queue()
    processes = [
        multiprocessing.Process(target=_spend_for, args=(redis_url, namespace, 5.0, queue))
        for _ in range(3)
    ]
    threads = [
        threading.Thread(target=_spend_for, args=(redis_url, namespace, 5.0, queue))
        for _ in range(3)
    ]
    for worker in [*processes, *threads]:
        worker.start()
    stamps = [stamp for _ in range(6) for stamp in queue.get(timeout=30)]
    for worker in processes:
        worker.join()
    for thread in threads:
        thread.join()
    windows = per_window(stamps)
    assert len(windows) >= 2
    # Redis and this machine share a clock here, so window boundaries agree.
    assert max(windows.values()) <= LIMIT - 2
    assert sum(1 for n in windows.values() if n == LIMIT - 2) >= 1  # the budget was used


def test_a_pause_seen_by_one_worker_stops_every_worker(redis_url: str) -> None:
    namespace = f"test:{uuid.uuid4().hex}"
    first, second = budget(redis_url, namespace), budget(redis_url, namespace)
    first.pause(1.5)
    wait = second.acquire(timeout=0)
    assert wait is not None and 1.0 < wait <= 1.5
    assert second.paused_for() > 1.0
    first.pause(0.5)  # a shorter pause never shortens a longer one
    assert second.paused_for() > 1.0
    assert second.acquire(timeout=2.0) is None  # waited the pause out


def test_without_redis_a_worker_spends_only_its_local_share(redis_url: str) -> None:
    dead = redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    fallback = FallbackRateBudget(
        RedisRateBudget(dead, LIMIT, namespace="x", window_seconds=60),
        LocalRateBudget(LIMIT // 4, margin=0, window_seconds=60),
    )
    granted = sum(1 for _ in range(20) if fallback.acquire(timeout=0) is None)
    assert granted == LIMIT // 4
    assert fallback.degraded


def test_make_budget_is_local_for_sqlite_and_shared_otherwise(redis_url: str) -> None:
    local = make_budget(load_settings(database_url="sqlite:///x.db"))
    assert isinstance(local, LocalRateBudget)
    shared = make_budget(
        load_settings(
            database_url="postgresql+psycopg://x/y",
            redis_url=redis_url,
            polar_environment="production",
        )
    )
    assert isinstance(shared, FallbackRateBudget)
    assert shared.primary.allowance == 490  # 500/minute in production, with a margin


def test_local_budget_windows_with_a_fake_clock() -> None:
    now = [1000.0]
    local = LocalRateBudget(5, margin=0, window_seconds=60, clock=lambda: now[0])
    assert [local.try_acquire() for _ in range(5)] == [None] * 5
    assert local.try_acquire() == pytest.approx(20.0)  # 1020 is the next window
    now[0] = 1020.0
    assert local.try_acquire() is None
    local.pause(10)
    assert local.try_acquire() == pytest.approx(10.0)


@pytest.mark.parametrize("kind", ["redis", "local"])
def test_a_low_priority_caller_takes_its_share_and_leaves_delivery_the_rest(
    redis_url: str, kind: str
) -> None:
    """Reconcile (share 0.25 of an allowance of 28 = 7) never takes more than its cap, and
    never a slot that would leave delivery fewer than that cap."""
    if kind == "redis":
        shared: RedisRateBudget | LocalRateBudget = RedisRateBudget(
            redis.Redis.from_url(redis_url),
            LIMIT,
            namespace=f"test:{uuid.uuid4().hex}",
            window_seconds=3600,
        )
    else:
        shared = LocalRateBudget(LIMIT, window_seconds=3600, clock=lambda: 7200.0)
    low = [shared.try_acquire(share=0.25) for _ in range(10)]
    assert low.count(None) == 7  # its cap
    assert all(wait is not None and wait > 0 for wait in low[7:])
    delivery = [shared.try_acquire() for _ in range(30)]
    assert delivery.count(None) == 28 - 7  # delivery still has the rest of the window

    if kind == "redis":
        busy: RedisRateBudget | LocalRateBudget = RedisRateBudget(
            redis.Redis.from_url(redis_url),
            LIMIT,
            namespace=f"test:{uuid.uuid4().hex}",
            window_seconds=3600,
        )
    else:
        busy = LocalRateBudget(LIMIT, window_seconds=3600, clock=lambda: 7200.0)
    assert [busy.try_acquire() for _ in range(22)] == [None] * 22  # delivery is busy
    # 6 slots are left, fewer than reconcile's cap of 7: reconcile waits for the next window.
    assert busy.try_acquire(share=0.25) is not None
    assert busy.try_acquire() is None  # delivery is not held back


def test_a_tiny_budget_still_gives_the_low_priority_caller_its_slot() -> None:
    tiny = LocalRateBudget(1, margin=0, window_seconds=3600, clock=lambda: 7200.0)
    assert tiny.try_acquire(share=0.2) is None
    assert tiny.try_acquire(share=0.2) is not None
