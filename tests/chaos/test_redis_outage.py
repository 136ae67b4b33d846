"""Redis stopped and started under load: every Celery worker process is still running and
consuming afterwards, in each way the project runs them (compose: workers and a separate
beat; `outbox worker`: a worker with its beat, -B), and every usage is delivered.

Uses a redis-server of its own (tests/chaos/conftest.py; TEST_PRIVATE_REDIS_PORT names its
port), never the shared one.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import yaml
from celery import Celery
from sqlalchemy import Engine

import polar_emulator
from api.nudge import Nudger
from outbox.db import session_scope
from outbox.ledger import record_usage
from tests.acceptance.conftest import ROOT, Worker, all_delivered, status_counts, wait_until
from tests.chaos.conftest import PrivateRedis
from tests.factories import make_customer

OUTAGE_SECONDS = 4
CONSUMED = "Task outbox.drain["  # Celery logs it for each drain message a worker takes


def commands(style: str, tmp_path: Path) -> list[tuple[str, list[str]]]:
    """(name, argv) of the processes of one way of running, as it really runs them."""
    if style == "compose":  # docker-compose.yml's worker and its one beat
        services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
        worker, beat = services["worker"]["command"], services["beat"]["command"]
        assert worker[:3] == beat[:3] == ["celery", "-A", "worker"]
        beat = [
            a if not a.startswith("--schedule=") else f"--schedule={tmp_path}/beat" for a in beat
        ]
        python = [sys.executable, "-m"]
        return [("worker", python + worker), ("beat", python + beat)]
    # `outbox worker` (a worker with its beat), on two hosts; each in its own directory.
    outbox = str(Path(sys.executable).with_name("outbox"))
    return [("worker", [outbox, "worker", "--concurrency=1"]) for _ in range(2)]


def test_every_worker_keeps_consuming_after_redis_stops_and_starts_under_load(
    tmp_path: Path,
    clean_tables: Engine,
    emulator: polar_emulator.RunningEmulator,
    private_redis: PrivateRedis,
    start_worker: Callable[..., Worker],
) -> None:
    """Both ways of running at once, on one Redis (one outage, to keep the test short)."""
    processes = [
        (name, start_worker(argv=argv, REDIS_URL=private_redis.url))
        for style in ("compose", "outbox-worker")
        for name, argv in commands(style, tmp_path)
    ]
    workers = [process for name, process in processes if name == "worker"]
    broker = Celery(broker=private_redis.url)
    broker.conf.broker_transport_options = {"socket_connect_timeout": 1, "socket_timeout": 1}
    nudge = Nudger(lambda: broker.send_task("outbox.drain", expires=30, retry=False))
    with session_scope(clean_tables) as session:
        customer = make_customer(session, credits=100_000)
    offered = [0]
    stop = threading.Event()

    def offer() -> None:  # 20 usages a second, each nudging a drain (as the API does)
        while not stop.is_set():
            with session_scope(clean_tables) as session:
                record_usage(session, customer, 1)
            offered[0] += 1
            nudge()
            time.sleep(0.05)

    def logs() -> str:
        return "\n".join(f"--- {n}\n{p.output()[-2500:]}" for n, p in processes)

    load = threading.Thread(target=offer)
    load.start()
    try:
        wait_until(lambda: all(CONSUMED in w.output() for w in workers), 60, "every worker", logs)
        private_redis.stop()
        time.sleep(OUTAGE_SECONDS)
        private_redis.start()  # same port
        marks = [len(w.output()) for w in workers]
        wait_until(
            lambda: all(
                CONSUMED in w.output()[mark:] for w, mark in zip(workers, marks, strict=True)
            ),
            90,
            "every worker consuming again after Redis returned",
            logs,
        )
        time.sleep(2)
    finally:
        stop.set()
        load.join(10)
        nudge.stop()
    for name, process in processes:
        assert process.process.poll() is None, f"{name} exited:\n{process.output()[-4000:]}"
    wait_until(all_delivered(clean_tables, offered[0]), 90, "catch-up", logs)
    assert status_counts(clean_tables) == {"delivered": offered[0]}
    assert emulator.state.totals() == {customer: offered[0]}
    for name, process in processes:
        # Nothing tripped over a closed connection (kombu#582: restarting Gossip).
        assert "Unrecoverable error" not in process.output()
        assert "Error on restarting" not in process.output(), process.output()[-4000:]


def test_a_worker_holding_a_message_it_has_not_started_survives_redis_going_away(
    clean_tables: Engine,
    emulator: polar_emulator.RunningEmulator,
    private_redis: PrivateRedis,
    start_worker: Callable[..., Worker],
) -> None:
    """The case that ended workers (kombu 5.7: "Unrecoverable error: AttributeError("'NoneType'
    object has no attribute 'hostname'")"): Redis goes away while the worker holds a drain
    message that no pool process has started yet, and is still polling for more. Closing the
    lost connection then restores that message through a transport that has already let go
    of its connection, unless the message was never Redis's to restore (worker/celery_app.py:
    no ack emulation)."""
    emulator.configure(latency_ms=1500)  # each batch of one takes 1.5 s: the drain stays busy
    with session_scope(clean_tables) as session:
        customer = make_customer(session, credits=1000)
        for _ in range(10):
            record_usage(session, customer, 1)
    # One process, room for two messages, no beat: the drain sent below runs, and the helper
    # it asks for (its first batch is full) waits, unacknowledged, while the worker polls.
    argv = [sys.executable, "-m", "celery", "-A", "worker", "worker", "--concurrency=1"]
    worker = start_worker(
        argv=[*argv, "--prefetch-multiplier=2", "--loglevel=INFO", "--without-gossip"],
        REDIS_URL=private_redis.url,
        OUTBOX_BATCH_SIZE="1",
    )
    broker = Celery(broker=private_redis.url)
    wait_until(lambda: "ready." in worker.output(), 60, "the worker", worker.output)
    broker.send_task("outbox.drain", expires=60)
    wait_until(
        lambda: worker.output().count("Task outbox.drain[") >= 2,
        60,
        "the drain running and its helper waiting",
        worker.output,
    )
    private_redis.stop()
    time.sleep(OUTAGE_SECONDS)
    private_redis.start()
    wait_until(
        lambda: (
            status_counts(clean_tables) == {"delivered": 10} or worker.process.poll() is not None
        ),
        120,
        "delivery after Redis returned",
        worker.output,
    )
    output = worker.output()
    assert "Restoring 1 unacknowledged message(s)" in output, output[-4000:]  # the case above
    assert worker.process.poll() is None, output[-4000:]
    assert "Unrecoverable error" not in output, output[-4000:]
    emulator.configure(latency_ms=0)
    mark = len(output)
    broker.send_task("outbox.drain", expires=60)  # and it still consumes
    wait_until(lambda: CONSUMED in worker.output()[mark:], 60, "a drain after", worker.output)
    assert emulator.state.totals() == {customer: 10}
