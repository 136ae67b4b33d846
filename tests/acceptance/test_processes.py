"""The containers' commands, run as real processes: `outbox serve` (the API, whose after-commit
nudge wakes a worker that has no beat), `celery -A worker beat` and `outbox worker`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from sqlalchemy import Engine

import polar_emulator
from outbox.db import session_scope
from outbox.ledger import record_usage
from outbox.tokens import create_token
from tests.acceptance.conftest import ROOT, all_delivered, wait_until
from tests.factories import make_customer

Start = Callable[..., subprocess.Popen[bytes]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def start(worker_env: dict[str, str], tmp_path: Path) -> Iterator[Start]:
    processes: list[tuple[subprocess.Popen[bytes], Path]] = []

    def run(*argv: str, **env: str) -> subprocess.Popen[bytes]:
        log = tmp_path / f"process{len(processes)}.log"
        process = subprocess.Popen(
            list(argv),
            cwd=ROOT,
            env={**worker_env, **env},
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        processes.append((process, log))
        return process

    yield run
    for process, _ in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    for process, log in processes:
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        print(log.read_text(errors="replace")[-2000:])


def logs(tmp_path: Path) -> Callable[[], str]:
    return lambda: "\n".join(p.read_text(errors="replace")[-1500:] for p in tmp_path.glob("*.log"))


def test_the_api_nudges_a_worker_after_commit(
    clean_tables: Engine, emulator: polar_emulator.RunningEmulator, start: Start, tmp_path: Path
) -> None:
    port = free_port()
    # No beat anywhere, and a beat interval too long to matter: only the nudge can deliver. A
    # real clock margin: the row is not due when the nudge is sent, so the nudge must wait for it.
    quiet = {"OUTBOX_DRAIN_INTERVAL_SECONDS": "3600", "OUTBOX_CLOCK_MARGIN_SECONDS": "1"}
    start(sys.executable, "-m", "cli.main", "serve", "--port", str(port), **quiet)
    start(
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker",
        "worker",
        "--concurrency=1",
        "--without-gossip",
        "--without-mingle",
        **quiet,
    )
    with session_scope(clean_tables) as session:
        customer = make_customer(session, credits=10)
        token, _ = create_token(session, "usage")
    api = f"http://127.0.0.1:{port}"
    wait_until(lambda: _up(api), 30, "outbox serve", logs(tmp_path))
    time.sleep(2)  # let the worker connect to the broker
    response = httpx.post(
        f"{api}/v1/usage",
        json={"customer_id": customer, "credits": 4},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status_code == 201, response.text
    wait_until(all_delivered(clean_tables, 1), 30, "nudged delivery", logs(tmp_path))
    assert emulator.state.totals() == {customer: 4}


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def test_a_separate_beat_process_drives_outbox_worker(
    clean_tables: Engine, emulator: polar_emulator.RunningEmulator, start: Start, tmp_path: Path
) -> None:
    with session_scope(clean_tables) as session:
        customer = make_customer(session, credits=10)
        for _ in range(3):
            record_usage(session, customer, 2)  # no API, no nudge: only beat can wake a worker
    # Compose's beat command, with LOG_FORMAT=json: every line it prints is one JSON object.
    beat = [*compose_command("beat")[:-1], f"--schedule={tmp_path / 'beat-schedule'}"]
    start(sys.executable, "-m", *beat, LOG_FORMAT="json")
    start(sys.executable, "-m", "cli.main", "worker", "--no-beat", "--concurrency", "1")
    wait_until(all_delivered(clean_tables, 3), 60, "beat-driven delivery", logs(tmp_path))
    assert emulator.state.totals() == {customer: 6}
    beat_lines = (tmp_path / "process0.log").read_text().splitlines()
    assert any("beat: Starting" in line for line in beat_lines), beat_lines
    for line in filter(str.strip, beat_lines):
        assert json.loads(line)["level"], line


def compose_command(service: str) -> list[str]:
    """The command of one of docker-compose.yml's services."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return list(compose["services"][service]["command"])


def test_serve_with_two_workers_serves_on_the_port_it_checked_and_stops_on_sigterm(
    clean_tables: Engine, start: Start, tmp_path: Path
) -> None:
    """Compose's command (`--workers 2`): the socket `outbox serve` bound while checking the port
    is the one both worker processes serve on (no second bind, so no race for the port)."""
    port = free_port()
    process = start(
        sys.executable, "-m", "cli.main", "serve", "--port", str(port), "--workers", "2"
    )
    api = f"http://127.0.0.1:{port}"
    wait_until(lambda: _up(api), 60, "outbox serve --workers 2", logs(tmp_path))
    with session_scope(clean_tables) as session:
        customer = make_customer(session, credits=10)
        token, _ = create_token(session, "usage")
    for n in range(1, 5):
        response = httpx.post(
            f"{api}/v1/usage",
            json={"customer_id": customer, "credits": 1},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert response.status_code == 201, response.text
        assert response.json()["balance"] == 10 - n
    os.killpg(process.pid, signal.SIGTERM)
    assert process.wait(30) == 0, logs(tmp_path)()
