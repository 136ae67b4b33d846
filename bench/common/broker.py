"""The Celery broker (Redis) as the benchmarks use it: publish tasks, look at the queue, empty
the benchmark's Redis db."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import redis


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
