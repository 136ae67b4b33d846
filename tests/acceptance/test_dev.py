"""The README's first command path: `outbox dev` from an empty directory, then the README's
curl steps (with httpx), and the event accepted by the emulator."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_dev(cwd: Path, port: int, emulator_port: int) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OUTBOX_", "POLAR_"))}
    env.pop("DATABASE_URL", None)  # the default: sqlite:///./outbox.db in the working dir
    env["PYTHONUNBUFFERED"] = "1"
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "outbox.cli",
            "dev",
            "--port",
            str(port),
            "--emulator-port",
            str(emulator_port),
        ],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def read_token(process: subprocess.Popen[str], timeout: float = 60) -> tuple[str, str]:
    assert process.stdout is not None
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line)
        if "Ctrl-C stops cleanly" in line:  # the end of the banner
            text = "".join(seen)
            match = re.search(r"export TOKEN=(\S+)", text)
            assert match, text
            return match.group(1), text
    raise AssertionError("outbox dev printed no token:\n" + "".join(seen))


def wait_ready(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("outbox dev did not become ready")


def test_outbox_dev_from_an_empty_directory_bills_the_readme_example(tmp_path: Path) -> None:
    port, emulator_port = free_port(), free_port()
    process = start_dev(tmp_path, port, emulator_port)
    try:
        token, banner = read_token(process)
        wait_ready(port)
        assert "curl" in banner and "/v1/usage" in banner
        api = httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"}
        )
        usage = api.post(
            "/v1/usage",
            json={"customer_id": "demo_customer", "credits": 3, "metadata": {"plan_id": "fp_42"}},
            headers={"Idempotency-Key": "plan-42"},
        )
        assert usage.status_code == 201, usage.text
        again = api.post(
            "/v1/usage",
            json={"customer_id": "demo_customer", "credits": 3, "metadata": {"plan_id": "fp_42"}},
            headers={"Idempotency-Key": "plan-42"},
        )
        assert again.json() == usage.json()
        assert api.get("/v1/customers/demo_customer/credits").json()["balance"] == 97
        emulator = httpx.Client(base_url=f"http://127.0.0.1:{emulator_port}")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            events = emulator.get("/_emulator/events").json()
            if events:
                break
            time.sleep(0.2)
        assert [e["external_id"] for e in events] == [usage.json()["external_id"]]
        assert events[0]["metadata"]["credits_used"] == 3
        history = api.get("/v1/customers/demo_customer/usage").json()["items"]
        assert history[0]["status"] == "delivered"
        assert api.get("/docs").status_code == 200
        walkthrough(tmp_path, api, emulator)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(30)
    assert process.returncode == 0
    assert (tmp_path / "outbox.db").exists()

    # The next start carries on with the same database (the demo customer is not re-granted).
    process = start_dev(tmp_path, port, emulator_port)
    try:
        token, _ = read_token(process)
        wait_ready(port)
        credits = httpx.get(
            f"http://127.0.0.1:{port}/v1/customers/demo_customer/credits",
            headers={"Authorization": f"Bearer {token}"},
        ).json()
        assert credits["balance"] == 115  # 100 + 20 - 3 - 2: nothing re-granted
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(30)


def outbox(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OUTBOX_", "POLAR_"))}
    env.pop("DATABASE_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "outbox.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def eventually(condition: object, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError("condition not met in time")


def walkthrough(cwd: Path, api: httpx.Client, emulator: httpx.Client) -> None:
    """The README's walkthrough, step by step, with the CLI in the same directory."""
    granted = outbox(cwd, "grant", "demo_customer", "20", "--reason", "welcome bonus")
    assert granted.returncode == 0, granted.stderr
    assert api.get("/v1/customers/demo_customer/credits").json()["balance"] == 117
    assert emulator.get("/_emulator/totals").json() == {"demo_customer": 3}
    status = outbox(cwd, "status", "--json")
    assert json.loads(status.stdout)["counts"]["delivered"] == 1

    emulator.post("/_emulator/config", json={"reject_customers": ["demo_customer"]})
    refused = api.post("/v1/usage", json={"customer_id": "demo_customer", "credits": 2})
    assert refused.status_code == 201
    eventually(lambda: json.loads(outbox(cwd, "failed", "--json").stdout))
    failed = json.loads(outbox(cwd, "failed", "--json").stdout)
    assert [row["event_id"] for row in failed] == [refused.json()["event_id"]]
    assert "demo_customer" in failed[0]["last_error"]
    emulator.post("/_emulator/config", json={"reject_customers": []})
    replayed = outbox(cwd, "replay", "--all-failed", "--reason", "customer unblocked")
    assert replayed.returncode == 0, replayed.stderr
    eventually(lambda: emulator.get("/_emulator/totals").json() == {"demo_customer": 5})


def test_outbox_dev_names_a_busy_port_and_the_flag(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "outbox.cli", "dev", "--port", str(port)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2
    assert f"port {port}" in result.stderr and "--port" in result.stderr
    assert "Traceback" not in result.stderr
