"""Whole-system fixtures: real Celery worker processes, Redis, PostgreSQL, the emulator."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from sqlalchemy import Engine, func, select

import polar_emulator
from outbox.db import session_scope
from outbox.models import OutboxEvent

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def emulator() -> Iterator[polar_emulator.RunningEmulator]:
    running = polar_emulator.serve_in_thread(config=polar_emulator.EmulatorConfig(seed=11))
    yield running
    running.stop()


@pytest.fixture
def clean_redis(redis_url: str) -> Iterator[str]:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield redis_url
    client.flushdb()
    client.close()


@pytest.fixture
def worker_env(
    pg_url: str, clean_redis: str, emulator: polar_emulator.RunningEmulator
) -> dict[str, str]:
    """The environment of a worker process pointed at the test database, Redis and emulator."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OUTBOX_", "POLAR_"))}
    env.update(
        DATABASE_URL=pg_url,
        REDIS_URL=clean_redis,
        POLAR_ACCESS_TOKEN=emulator.token,
        POLAR_BASE_URL=emulator.url,
        OUTBOX_CLOCK_MARGIN_SECONDS="0",
        OUTBOX_DRAIN_INTERVAL_SECONDS="0.5",
        OUTBOX_BACKOFF_BASE_SECONDS="0.05",
        OUTBOX_BACKOFF_CAP_SECONDS="0.5",
        OUTBOX_LEASE_SECONDS="5",
        POLAR_TIMEOUT_SECONDS="5",
        PYTHONUNBUFFERED="1",
    )
    return env


class Worker:
    """A real `celery -A worker worker -B` process (its own process group, so kill -9 takes
    its prefork children too)."""

    def __init__(
        self,
        env: dict[str, str],
        log_path: Path,
        concurrency: int = 2,
        argv: list[str] | None = None,
    ) -> None:
        """`argv`: the command to run in its own directory (e.g. the compose file's, or
        `outbox worker`); default: a worker with its beat, without gossip, mingle and
        heartbeat, as the tests need no more."""
        self.log_path = log_path
        self.log = log_path.open("ab")
        self.process = subprocess.Popen(
            argv
            or [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "worker",
                "worker",
                "-B",
                f"--concurrency={concurrency}",
                "--loglevel=INFO",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                f"--schedule={log_path.with_suffix('.beat')}",
            ],
            cwd=log_path.parent if argv else ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill9(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill9()
        self.log.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def start_worker(worker_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    workers: list[Worker] = []

    def start(concurrency: int = 2, argv: list[str] | None = None, **env: str) -> Worker:
        log_path = tmp_path / f"worker{len(workers)}.log"
        worker = Worker({**worker_env, **env}, log_path, concurrency, argv)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()


def status_counts(engine: Engine) -> dict[str, int]:
    with session_scope(engine) as session:
        return {
            status: int(n)
            for status, n in session.execute(
                select(OutboxEvent.status, func.count()).group_by(OutboxEvent.status)
            )
        }


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, on_timeout: Callable[[], str] = str
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{on_timeout()}")


def all_delivered(engine: Engine, total: int) -> Callable[[], bool]:
    return lambda: status_counts(engine).get("delivered", 0) == total


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Served:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@pytest.fixture
def serve(
    pg_url: str, clean_redis: str, clean_tables: Engine, tmp_path: Path
) -> Iterator[Callable[..., Served]]:
    """Start `outbox serve` (its own process group) on a free port; stopped (then killed) after."""
    started: list[Served] = []

    def start(*args: str, **env: str) -> Served:
        port = free_port()
        log = tmp_path / f"serve{len(started)}.log"
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("OUTBOX_", "POLAR_"))}
        environ.update(DATABASE_URL=pg_url, REDIS_URL=clean_redis, PYTHONUNBUFFERED="1", **env)
        process = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "serve", "--port", str(port), *args],
            cwd=ROOT,
            env=environ,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        served = Served(f"http://127.0.0.1:{port}", process, log)
        started.append(served)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert process.poll() is None, served.output()
            try:
                if httpx.get(f"{served.url}/healthz", timeout=1).status_code == 200:
                    return served
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"outbox serve did not start\n{served.output()}")

    yield start
    for served in started:
        if served.process.poll() is None:
            os.killpg(served.process.pid, signal.SIGTERM)
    for served in started:
        try:
            served.process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(served.process.pid, signal.SIGKILL)
            served.process.wait(10)
