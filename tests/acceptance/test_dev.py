"""The README's first command path: `outbox dev` from an empty directory, then the README's
curl steps (with httpx), and the event accepted by the emulator; dev keeps to its own database
and emulator whatever a deployment's `.env` says, prints the exports that point a second
terminal's `outbox` commands at them, never prints a password, and revokes its earlier tokens."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.polar_webhooks import decoded_key, signed

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without our settings (plus `extra`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OUTBOX_", "POLAR_"))}
    env.pop("DATABASE_URL", None)  # the default: sqlite:///./outbox.db in the working dir
    env.pop("TOKEN", None)
    env.update(extra)
    return env


def start_dev(
    cwd: Path, port: int, emulator_port: int, *args: str, **extra_env: str
) -> subprocess.Popen[str]:
    env = clean_env(**extra_env)
    env["PYTHONUNBUFFERED"] = "1"
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cli.main",
            "dev",
            "--port",
            str(port),
            "--emulator-port",
            str(emulator_port),
            *args,
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

    # The next start carries on with the same database (the demo customer is not re-granted),
    # and mints a new token while revoking the first: one dev token is valid at a time.
    process = start_dev(tmp_path, port, emulator_port)
    try:
        second, second_banner = read_token(process)
        wait_ready(port)
        # Each start has its own webhook secret: no one can sign webhooks for every dev API.
        first_secret = exports(banner)["POLAR_WEBHOOK_SECRET"]
        assert exports(second_banner)["POLAR_WEBHOOK_SECRET"] != first_secret
        credits = httpx.get(
            f"http://127.0.0.1:{port}/v1/customers/demo_customer/credits",
            headers={"Authorization": f"Bearer {second}"},
        )
        assert credits.json()["balance"] == 165  # 100 + 20 - 3 - 2 + 50: nothing re-granted
        stale = httpx.get(
            f"http://127.0.0.1:{port}/v1/customers/demo_customer/credits",
            headers={"Authorization": f"Bearer {token}"},
        )
        assert stale.status_code == 401
        tokens = json.loads(outbox(tmp_path, "token", "list", "--json").stdout)
        assert [t["name"] for t in tokens if t["revoked_at"] is None] == ["outbox dev"]
        # Its Polar remembers what the first start delivered, as the real one would: reconcile
        # finds nothing missing.
        emulator = httpx.Client(base_url=f"http://127.0.0.1:{emulator_port}")
        assert emulator.get("/_emulator/totals").json() == {"demo_customer": 5}
        reconciled = outbox(tmp_path, "reconcile", **exports(second_banner))
        assert reconciled.returncode == 0, reconciled.stdout + reconciled.stderr
        # A second dev server on the same database is refused, and revokes nothing.
        third = start_dev(tmp_path, free_port(), free_port())
        third_output, _ = third.communicate(timeout=60)
        assert third.returncode == 2, third_output
        assert "another `outbox dev`" in third_output and "is running on this database" in (
            third_output
        )
        assert httpx.get(
            f"http://127.0.0.1:{port}/v1/customers/demo_customer/credits",
            headers={"Authorization": f"Bearer {second}"},
        ).is_success
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(30)


def outbox(cwd: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    """An `outbox` command in a second terminal where dev's DATABASE_URL export was pasted."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OUTBOX_", "POLAR_"))}
    env["DATABASE_URL"] = f"sqlite:///{cwd / 'outbox.db'}"
    env.update(extra)
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
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

    # 6. Credits bought in Polar: the emulator signs a Meter Credits webhook with this start's
    # secret and sends it to the API, as Polar would.
    bought = emulator.post(
        "/_emulator/webhooks/meter-credits", json={"customer_id": "demo_customer", "units": 50}
    ).json()
    assert bought["status"] == 202, bought
    assert bought["payload"]["data"]["customer"]["external_id"] == "demo_customer"
    assert api.get("/v1/customers/demo_customer/credits").json()["balance"] == 165


def test_outbox_dev_names_a_busy_port_and_the_flag(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "cli.main", "dev", "--port", str(port)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2
    assert f"port {port}" in result.stderr and "--port" in result.stderr
    assert "Traceback" not in result.stderr


def exports(banner: str) -> dict[str, str]:
    """The banner's `export NAME=value` lines, as a shell would set them."""
    script = "\n".join(
        line.strip() for line in banner.splitlines() if line.strip().startswith("export ")
    )
    result = subprocess.run(
        ["bash", "-c", script + "\nenv -0"], env={}, capture_output=True, text=True, check=True
    )
    pairs = (item.split("=", 1) for item in result.stdout.split("\0") if "=" in item)
    return {k: v for k, v in pairs if k in {"DATABASE_URL", "TOKEN"} or k.startswith("POLAR_")}


def test_dev_ignores_a_deployment_env_and_prints_exports_for_a_second_terminal(
    tmp_path: Path,
) -> None:
    """A `.env` written for a deployment (its database on host `postgres`, a real-looking
    Polar token; the same exported in the shell) changes nothing for dev: its own SQLite, the
    emulator; the printed exports make doctor and reconcile work from any directory."""
    (tmp_path / ".env").write_text(
        "DATABASE_URL=postgresql+psycopg://outbox:s3cretpw@postgres:5432/outbox\n"
        "POLAR_ACCESS_TOKEN=polar_oat_AbCdEf0123456789\n"
        "POLAR_ENVIRONMENT=production\n"  # plain dev ignores it too (docs/howto/polar-setup.md)
        "POLAR_PRODUCT_ID=prod_of_the_real_organization\n"
        "POLAR_METER_ID=meter_of_the_real_organization\n"
    )
    port, emulator_port = free_port(), free_port()
    process = start_dev(
        tmp_path,
        port,
        emulator_port,
        DATABASE_URL="postgresql+psycopg://outbox:s3cretpw@postgres:5432/outbox",
        POLAR_ACCESS_TOKEN="polar_oat_AbCdEf0123456789",
    )
    try:
        token, banner = read_token(process)
        wait_ready(port)
        assert "polar_oat_AbCdEf0123456789" not in banner and "s3cretpw" not in banner
        assert (
            "not used   DATABASE_URL, POLAR_ACCESS_TOKEN, POLAR_PRODUCT_ID, POLAR_ENVIRONMENT"
            in banner
        )
        env = exports(banner)
        assert env["DATABASE_URL"] == f"sqlite:///{tmp_path / 'outbox.db'}"
        assert env["POLAR_BASE_URL"] == f"http://127.0.0.1:{emulator_port}"
        assert env["TOKEN"] == token
        usage = httpx.post(
            f"http://127.0.0.1:{port}/v1/usage",
            json={"customer_id": "demo_customer", "credits": 4},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert usage.status_code == 201, usage.text
        emulator = httpx.Client(base_url=f"http://127.0.0.1:{emulator_port}")
        eventually(lambda: emulator.get("/_emulator/totals").json() == {"demo_customer": 4})

        # The exported webhook secret is the one the API verifies with: a webhook signed with
        # it is accepted; one signed with a secret known beforehand (the fixed one dev once
        # had) is not.
        secret = env["POLAR_WEBHOOK_SECRET"]
        known = "whsec_b3V0Ym94IGRldjogbG9jYWwgd2ViaG9va3Mgb25seQ=="
        assert secret.startswith("whsec_") and len(decoded_key(secret)) == 24
        webhooks = f"http://127.0.0.1:{port}/v1/polar/webhooks"
        event = {"type": "order.paid", "data": {}}
        accepted = httpx.post(webhooks, **signed(event, "wh_dev_1", key=decoded_key(secret)))
        assert accepted.status_code == 202, accepted.text
        for key in (decoded_key(known), known.encode()):
            forged = httpx.post(webhooks, **signed(event, "wh_dev_2", key=key))
            assert forged.status_code == 403

        # The second terminal: the exports pasted, in the same directory (its `.env` is read
        # too, and must not win) and in another one (no .env, no outbox.db).
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        second_terminal = clean_env(**env)
        for cwd in (tmp_path, elsewhere):
            doctor = run_cli(cwd, second_terminal, "doctor", "--json")
            assert doctor.returncode == 0, doctor.stdout + doctor.stderr
            report = json.loads(doctor.stdout)
            listed = report["checks"] if isinstance(report, dict) else report
            checks = {c.get("check") or c.get("name"): c for c in listed}
            assert checks["product"]["ok"] and checks["meter"]["ok"], checks
        status = run_cli(elsewhere, second_terminal, "status", "--json")
        assert json.loads(status.stdout)["counts"]["delivered"] == 1
        reconcile = run_cli(
            elsewhere, second_terminal, "reconcile", "--until", "2100-01-01T00:00:00Z", "--json"
        )
        assert reconcile.returncode == 0, reconcile.stdout + reconcile.stderr
        assert not (elsewhere / "outbox.db").exists()
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(30)
    assert process.returncode == 0


def test_dev_starts_with_the_env_example_copied_as_the_deploy_guide_says(tmp_path: Path) -> None:
    shutil.copy(ROOT / ".env.example", tmp_path / ".env")
    port, emulator_port = free_port(), free_port()
    process = start_dev(tmp_path, port, emulator_port)
    try:
        _, banner = read_token(process)
        wait_ready(port)
        assert "local Polar emulator" in banner
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(30)
    assert process.returncode == 0


def test_dev_never_prints_a_database_password(tmp_path: Path) -> None:
    """Nothing listens on port 1: dev names the URL it could not migrate, password hidden."""
    result = run_cli(
        tmp_path,
        clean_env(),
        "dev",
        "--port",
        str(free_port()),
        "--emulator-port",
        str(free_port()),
        "--database-url",
        "postgresql+psycopg://app:hunter2pw@127.0.0.1:1/homeify",
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "postgresql+psycopg://app:***@127.0.0.1:1/homeify" in result.stderr
    assert "hunter2pw" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_dev_never_sends_to_polar_production_nor_without_a_token(tmp_path: Path) -> None:
    ports = ("--port", str(free_port()), "--emulator-port", str(free_port()))
    production = run_cli(
        tmp_path,
        clean_env(POLAR_ACCESS_TOKEN="polar_oat_AbCdEf0123456789", POLAR_ENVIRONMENT="production"),
        "dev",
        "--polar",
        "sandbox",
        *ports,
    )
    assert production.returncode == 2
    assert "never bills it" in production.stderr and "Traceback" not in production.stderr
    tokenless = run_cli(tmp_path, clean_env(), "dev", "--polar", "sandbox", *ports)
    assert tokenless.returncode == 2
    assert "POLAR_ACCESS_TOKEN" in tokenless.stderr
    assert not (tmp_path / "outbox.db").exists()


def run_cli(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_dev_polar_sandbox_uses_the_shells_token_and_never_prints_it(tmp_path: Path) -> None:
    """--polar sandbox: the token of the shell (here Polar is an emulator at POLAR_BASE_URL,
    standing in for the sandbox), never printed, and no emulator of dev's own."""
    import polar_emulator

    polar = polar_emulator.serve_in_thread(port=0)
    port, emulator_port = free_port(), free_port()
    try:
        process = start_dev(
            tmp_path,
            port,
            emulator_port,
            "--polar",
            "sandbox",
            POLAR_ACCESS_TOKEN=polar.token,
            POLAR_BASE_URL=polar.url,
        )
        try:
            token, banner = read_token(process)
            wait_ready(port)
            assert polar.token not in banner
            assert "your sandbox token, as in this shell (not printed)" in banner
            usage = httpx.post(
                f"http://127.0.0.1:{port}/v1/usage",
                json={"customer_id": "demo_customer"},
                headers={"Authorization": f"Bearer {token}"},
            )
            assert usage.status_code == 201, usage.text
            eventually(lambda: polar.state.totals() == {"demo_customer": 1})  # default: 1
            with socket.socket() as sock:  # dev started no emulator of its own
                assert sock.connect_ex(("127.0.0.1", emulator_port)) != 0
        finally:
            process.send_signal(signal.SIGINT)
            process.wait(30)
    finally:
        polar.stop()
