"""Process control shared by the benchmarks: ports, waiting for a child to come up or go away,
and an environment without the project's settings."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The prefixes of the project's settings: a child started by a benchmark gets only the ones
# the benchmark sets, never the caller's.
OUR_PREFIXES = ("OUTBOX_", "POLAR_", "USAGE_", "HOLD_")


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sleep_until(moment: float) -> None:
    """Sleep until the wall clock reads `moment` (at once if it already has)."""
    delay = moment - time.time()
    if delay > 0:
        time.sleep(delay)


def run_in_threads(target: Callable[[int], None], count: int) -> None:
    """`target(0)` ... `target(count - 1)`, each in a thread of its own; return when all end."""
    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def wait_ready(
    proc: subprocess.Popen[bytes],
    ready: Callable[[], bool],
    *,
    timeout: float,
    exited: Callable[[], str],
    late: str,
) -> None:
    """Poll `ready()` until it says yes; raise `exited()` if the process dies first and `late`
    if `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(exited())
        if ready():
            return
        time.sleep(0.2)
    raise RuntimeError(late)


def stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, then SIGKILL if it is still there 20 s later."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def clean_env(**overrides: str) -> dict[str, str]:
    """This environment without any of our settings, plus `overrides`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(OUR_PREFIXES)}
    env.pop("DATABASE_URL", None)
    env.pop("REDIS_URL", None)
    env.update(overrides)
    return env


def drop_our_settings() -> None:
    """Remove our settings from this process's environment (in a spawned child, before it loads
    the project's settings from its own arguments)."""
    for name in [n for n in os.environ if n.startswith(OUR_PREFIXES)]:
        del os.environ[name]
