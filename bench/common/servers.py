"""The servers a benchmark starts and stops: the API under uvicorn, the Polar emulator, and real
Celery workers; each on a free port or in a process group of its own, logging to a file."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.common.processes import REPO, clean_env, free_port, stop_process, wait_ready


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
        env = dict(os.environ, DATABASE_URL=self.url, PYTHONPATH=str(self.cwd))
        proc = self.proc = subprocess.Popen(self.command(), cwd=self.cwd, env=env)
        wait_ready(
            proc,
            self._healthy,
            timeout=60,
            exited=lambda: f"uvicorn exited with {proc.returncode}",
            late="uvicorn did not answer /healthz within 60 s",
        )

    def _healthy(self) -> bool:
        import httpx

        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1).is_success
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        stop_process(self.proc)


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
        wait_ready(
            self.proc,
            self._answers,
            timeout=60,
            exited=lambda: f"the emulator exited: {self.log_path.read_text()[-500:]}",
            late="the emulator did not answer within 60 s",
        )

    def _answers(self) -> bool:
        with contextlib.suppress(Exception):
            self.client.stats()
            return True
        return False

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
        stop_process(self.proc)


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
        wait_ready(
            self.proc,
            lambda: re.search(r"celery@\S+ ready", self.output(offset)) is not None,
            timeout=timeout,
            exited=lambda: f"celery exited: {self.output(offset)[-2000:]}",
            late=f"celery was not ready within {timeout:.0f} s",
        )

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
