"""The reference docs are generated from the code and must be current; the README and the
tutorial run as written, on a fresh clone (their code blocks, through tests/docs_runner.py)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import skip_locally_fail_in_ci

ROOT = Path(__file__).resolve().parent.parent


def test_reference_docs_are_generated_from_the_current_code() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/gen_reference.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr + "\nrun: python scripts/gen_reference.py"


def test_the_cli_reference_names_required_options() -> None:
    """`outbox token create` without --scope is refused: the reference must say so."""
    cli = (ROOT / "docs" / "reference" / "cli.md").read_text()
    assert "Usage: `outbox token create --scope SCOPE [OPTIONS]`" in cli
    assert "| `--scope` | **required** |" in cli
    assert "| `--reason` | **required** |" in cli


def fresh_clone(tmp_path: Path) -> Path:
    """A `git clone` of this repository's HEAD, plus the working tree's uncommitted changes to
    tracked files (so a local run tests what is on disk; CI's tree is HEAD), and a `.venv`
    that reuses this one's installed dependencies, stamped so `scripts/venv.sh` installs
    nothing (the clone's own code is imported, never this checkout's)."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    diff = subprocess.run(
        ["git", "diff", "HEAD", "--binary"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    if diff:
        subprocess.run(["git", "apply"], cwd=clone, input=diff, check=True, timeout=60)
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(clone / ".venv")], check=True
    )
    purelib = sysconfig.get_paths()["purelib"]
    venv_lib = next((clone / ".venv" / "lib").glob("python3*")) / "site-packages"
    (venv_lib / "_docs_test.pth").write_text(
        f"{clone}\nimport site; site.addsitedir({purelib!r})\n"
    )
    outbox = clone / ".venv" / "bin" / "outbox"
    outbox.write_text(
        f"#!{clone / '.venv' / 'bin' / 'python'}\nfrom cli.main import main\nmain()\n"
    )
    outbox.chmod(0o755)
    digest = hashlib.sha256(
        (clone / "pyproject.toml").read_bytes() + (clone / "requirements-lock.txt").read_bytes()
    ).hexdigest()
    (clone / ".venv" / ".installed").write_text(digest + "\n")
    return clone


def isolated_network() -> list[str]:
    """The documents use 127.0.0.1:8000 and :8765 as written: run them in a network namespace
    of their own (as root; else in a user namespace, which most Linux machines allow to
    anyone), so they never need those ports free here nor take them from a running
    `outbox dev`; directly only where neither works and both ports are free."""
    if shutil.which("unshare") and shutil.which("ip"):
        for unshare in (["unshare", "-n"], ["unshare", "-r", "-n"]):
            probe = subprocess.run(
                [*unshare, "sh", "-c", "ip link set lo up"], capture_output=True, timeout=30
            )
            if probe.returncode == 0:
                return [*unshare, "sh", "-c", 'ip link set lo up && exec "$@"', "-"]
    for port in (8000, 8765):
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                skip_locally_fail_in_ci(f"port {port} is in use and no network namespace")
    return []


def run_documents(tmp_path: Path, *names: str) -> dict[str, Any]:
    clone = fresh_clone(tmp_path)
    result = subprocess.run(
        [
            *isolated_network(),
            sys.executable,
            str(ROOT / "tests" / "docs_runner.py"),
            str(clone),
            *names,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    reports: dict[str, Any] = json.loads(result.stdout)
    for name, report in reports.items():
        for block in report["blocks"]:
            if block["lang"] in ("bash", "sh", "python") and "rc" in block:
                assert block["rc"] == 0, (
                    f"{name}: this block failed:\n{block['code']}\n{block['output']}"
                )
        assert report["server_exit"] == 0, name
    return reports


@pytest.mark.slow
def test_the_readme_runs_as_written_on_a_fresh_clone(tmp_path: Path) -> None:
    """./scripts/dev.sh, the walkthrough in a second terminal, the library snippet: every
    block succeeds and Polar (the emulator) ends up with every credit spent, once."""
    report = run_documents(tmp_path, "README.md")["README.md"]
    ran = [b for b in report["blocks"] if "rc" in b]
    assert {b["lang"] for b in ran} == {"bash", "python"}
    assert report["status"]["counts"]["failed"] == 0
    assert report["totals"] == {"demo_customer": 3 + 2 + 1}  # the usage, the replay, the library


@pytest.mark.slow
def test_the_tutorial_runs_as_written_and_drains_the_apps_own_database(tmp_path: Path) -> None:
    report = run_documents(tmp_path, "docs/tutorial.md")["docs/tutorial.md"]
    ran = [b for b in report["blocks"] if "rc" in b]
    assert [b["lang"] for b in ran].count("python") >= 2
    assert "homeify.db" in report["banner"]
    # The HTTP generation and the library's, both reached Polar from the app's database.
    assert report["totals"] == {"demo_customer": 1, "user_123": 2}
    assert report["status"]["counts"]["failed"] == 0


def test_the_http_reference_lists_every_declared_status_with_its_meaning() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    from gen_reference import http_api_page

    spec = {
        "paths": {
            "/readyz": {
                "get": {
                    "description": "Readiness.",
                    "responses": {
                        "200": {"description": "OK"},
                        "503": {"description": "not ready: database down or token rejected"},
                    },
                }
            }
        }
    }
    page = http_api_page(spec)
    assert (
        "| GET | `/readyz` | Readiness. | 200, 503 not ready: database down or token rejected |"
        in page
    )


def test_polar_setup_says_what_plain_outbox_dev_does_with_production() -> None:
    """It used to say plain `outbox dev` refuses POLAR_ENVIRONMENT=production; it ignores it
    (tests/acceptance/test_dev.py starts it with one), and `--polar sandbox` refuses it."""
    text = " ".join((ROOT / "docs" / "howto" / "polar-setup.md").read_text().split())
    assert "it refuses `POLAR_ENVIRONMENT=production`" not in text
    assert "Plain `outbox dev` uses neither that token nor `POLAR_ENVIRONMENT`" in text


def test_the_tutorials_library_script_runs_twice(tmp_path: Path) -> None:
    """Its idempotent re-call is what the page advertises: a second run (a retry) charges
    nothing and finds its plan, instead of ending in an IntegrityError traceback."""
    from outbox.migrate import upgrade

    text = (ROOT / "docs" / "tutorial.md").read_text()
    section = text[text.index("## 2. As a library") :]
    start = section.index("```python\n") + len("```python\n")
    script = section[start : section.index("\n```", start)]
    url = f"sqlite:///{tmp_path}/homeify.db"
    upgrade(url)
    env = {**os.environ, "DATABASE_URL": url}
    runs = [
        subprocess.run(
            [sys.executable, "-c", script],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        for _ in range(2)
    ]
    for run in runs:
        assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
        assert run.stdout.strip() == "generated fp_42", run.stdout
    from outbox.db import make_engine

    engine = make_engine(url)
    with engine.connect() as conn:
        balance = conn.exec_driver_sql(
            "SELECT balance FROM customers WHERE id = 'user_123'"
        ).scalar()
    engine.dispose()
    assert balance == 8  # 10 granted, 2 charged once
