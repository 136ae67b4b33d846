"""Every way an `outbox` command can fail before doing its work, as a user sees it: one line on
stderr naming the problem, exit 2, nothing on stdout, no traceback, no password — on PostgreSQL
and SQLite, in-process (CliRunner) for every command and as real processes for a few."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy import Engine
from typer.testing import CliRunner

from cli.main import app
from outbox.migrate import upgrade
from outbox.settings import get_settings

ROOT = Path(__file__).resolve().parents[2]
FIRST_REVISION = "ae5a70274df4"
SECRET = "s3cret-pw"
runner = CliRunner()

# Every command that needs the database, with arguments that would otherwise be valid.
COMMANDS = [
    ["status"],
    ["status", "--json"],
    ["failed"],
    ["grant", "alice", "5", "--reason", "welcome"],
    ["replay", "--all-failed"],
    ["replay", "--event-id", "1"],
    ["token", "create", "--scope", "usage"],
    ["token", "list"],
    ["token", "revoke", "1"],
    ["prune"],
    ["worker"],
]


def assert_one_line_failure(code: int, stdout: str, stderr: str, *expected: str) -> None:
    """Exit 2, nothing on stdout, one line on stderr that names the problem, no secrets."""
    everything = stdout + stderr
    assert code == 2, everything
    assert "Traceback" not in everything, everything
    assert SECRET not in everything, everything
    assert stdout == "", everything
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), everything
    for text in expected:
        assert text in lines[0], everything


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """Set variables for the next commands; the settings are read again each time."""
    monkeypatch.setenv("POLAR_ACCESS_TOKEN", "polar_oat_test")  # so `worker` gets to the database

    def no_exec(*argv: object) -> None:
        raise AssertionError(f"`outbox worker` started Celery despite the failure: {argv}")

    monkeypatch.setattr(os, "execv", no_exec)
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


def invoke(env: pytest.MonkeyPatch, database_url: str, args: list[str]) -> tuple[int, str, str]:
    env.setenv("DATABASE_URL", database_url)
    get_settings.cache_clear()
    result = runner.invoke(app, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout, result.stderr


def run_process(args: list[str], cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess[str]:
    """`outbox ARGS` as a real process, as a user would type it."""
    environment = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    environment.update(env, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


UNREACHABLE_PG = f"postgresql+psycopg://outbox:{SECRET}@127.0.0.1:1/outbox"


@pytest.mark.parametrize("args", COMMANDS, ids=" ".join)
def test_an_unreachable_postgresql(env: pytest.MonkeyPatch, args: list[str]) -> None:
    code, out, err = invoke(env, UNREACHABLE_PG, args)
    assert_one_line_failure(code, out, err, "cannot open", "127.0.0.1:1", "outbox:***@")


@pytest.mark.parametrize("args", COMMANDS, ids=" ".join)
def test_a_missing_sqlite_file_is_named_and_not_created(
    env: pytest.MonkeyPatch, args: list[str], tmp_path: Path
) -> None:
    path = tmp_path / "outbox.db"
    code, out, err = invoke(env, f"sqlite:///{path}", args)
    assert_one_line_failure(code, out, err, f"no SQLite database at {path}", "outbox db upgrade")
    assert not path.exists()


@pytest.mark.parametrize("args", [*COMMANDS, ["db", "upgrade"]], ids=" ".join)
def test_a_sqlite_path_in_a_missing_directory(
    env: pytest.MonkeyPatch, args: list[str], tmp_path: Path
) -> None:
    path = tmp_path / "no" / "such" / "dir" / "outbox.db"
    code, out, err = invoke(env, f"sqlite:///{path}", args)
    expected = "does not exist" if args[0] == "db" else f"no SQLite database at {path}"
    assert_one_line_failure(code, out, err, expected)


@pytest.mark.parametrize("args", COMMANDS, ids=" ".join)
def test_an_unmigrated_postgresql(
    env: pytest.MonkeyPatch, args: list[str], empty_pg_url: str
) -> None:
    code, out, err = invoke(env, empty_pg_url, args)
    assert_one_line_failure(code, out, err, "not migrated (no revision", "`outbox db upgrade`")


@pytest.mark.parametrize("args", COMMANDS, ids=" ".join)
def test_an_outdated_postgresql(
    env: pytest.MonkeyPatch, args: list[str], empty_pg_url: str
) -> None:
    upgrade(empty_pg_url, FIRST_REVISION)
    code, out, err = invoke(env, empty_pg_url, args)
    assert_one_line_failure(code, out, err, f"at {FIRST_REVISION}, head is", "outbox db upgrade")


@pytest.mark.parametrize("args", COMMANDS, ids=" ".join)
def test_an_unmigrated_sqlite_file(
    env: pytest.MonkeyPatch, args: list[str], tmp_path: Path
) -> None:
    path = tmp_path / "outbox.db"
    sa.create_engine(f"sqlite:///{path}").connect().close()  # an empty file, no tables
    assert path.exists()
    code, out, err = invoke(env, f"sqlite:///{path}", args)
    assert_one_line_failure(code, out, err, "not migrated (no revision", "outbox db upgrade")


def test_a_schema_from_a_newer_version_is_named(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/outbox.db"
    upgrade(url)
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = 'f00dfeedbeef'")
    engine.dispose()
    code, out, err = invoke(env, url, ["status"])
    assert_one_line_failure(code, out, err, "f00dfeedbeef", "newer polar-usage-outbox")


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        (f"postgresql+psycopg://outbox:{SECRET}@db:notaport/outbox", "not a usable SQLAlchemy URL"),
        (f"postgres://outbox:{SECRET}@db/outbox", "postgresql+psycopg://"),
        (f"postgresql+psycopg://outbox:{SECRET}@[::1/outbox", "not a usable SQLAlchemy URL"),
        ("not a url at all", "not a usable SQLAlchemy URL"),
        # An unescaped "@" in the password: parsers take its tail for the host.
        (f"postgresql+psycopg://outbox:p@{SECRET}@db:notaport/outbox", "DATABASE_URL"),
        (f"postgresql+psycopg://outbox:p@{SECRET}@127.0.0.1:1/outbox", "cannot open"),
    ],
)
@pytest.mark.parametrize("args", [["status"], ["token", "list"], ["db", "upgrade"]], ids=" ".join)
def test_an_unparseable_database_url_is_named_without_its_password(
    env: pytest.MonkeyPatch, url: str, reason: str, args: list[str]
) -> None:
    code, out, err = invoke(env, url, args)
    assert_one_line_failure(code, out, err, reason)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["token", "revoke", str(2**64)], "TOKEN_ID"),
        (["token", "revoke", str(2**63)], "TOKEN_ID"),
        (["failed", "--limit", str(2**64)], "--limit"),
        (["replay", "--event-id", str(2**63)], "--event-id"),
        (["replay", "--event-id", "1", "--event-id", str(10**30)], "--event-id"),
        (["prune", "--batch-size", str(2**64)], "--batch-size"),
        (["grant", "alice", str(2**64), "--reason", "x"], "credits"),
    ],
)
@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_integers_past_64_bits_are_a_usage_error(
    env: pytest.MonkeyPatch,
    args: list[str],
    named: str,
    backend: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    if backend == "postgresql":
        request.getfixturevalue("clean_tables")
        url = str(request.getfixturevalue("pg_url"))
    else:
        url = f"sqlite:///{tmp_path}/outbox.db"
        upgrade(url)
    code, out, err = invoke(env, url, args)
    assert_one_line_failure(code, out, err, named)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["token", "revoke", str(2**63 - 1)], "no active token"),
        (["replay", "--event-id", str(2**63 - 1)], "no such event"),
    ],
)
@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_the_largest_64_bit_id_is_looked_up(
    env: pytest.MonkeyPatch,
    args: list[str],
    message: str,
    backend: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    if backend == "postgresql":
        request.getfixturevalue("clean_tables")
        url = str(request.getfixturevalue("pg_url"))
    else:
        url = f"sqlite:///{tmp_path}/outbox.db"
        upgrade(url)
    code, out, err = invoke(env, url, args)
    assert_one_line_failure(code, out, err, message)
    result = runner.invoke(app, ["failed", "--limit", str(2**63 - 1), "--json"])
    assert result.exit_code == 0 and result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["stauts"], "Did you mean 'status'?"),
        (["grant", "alice"], "Missing argument"),
        (["failed", "--limit", "lots"], "--limit"),
        (["status", "--jsn"], "--jsn"),
    ],
)
def test_usage_errors_are_one_line(args: list[str], message: str) -> None:
    result = runner.invoke(app, args)
    assert_one_line_failure(result.exit_code, result.stdout, result.stderr, message, "--help")


def test_bad_configuration_is_one_line(env: pytest.MonkeyPatch) -> None:
    env.setenv("OUTBOX_BATCH_SIZE", "lots")
    for args in (["status"], ["worker"], ["doctor"]):
        code, out, err = invoke(env, "sqlite:///unused.db", args)
        assert_one_line_failure(code, out, err, "OUTBOX_BATCH_SIZE")


def test_the_worker_refuses_to_start_without_a_polar_token(
    env: pytest.MonkeyPatch, pg_url: str
) -> None:
    env.delenv("POLAR_ACCESS_TOKEN")
    code, out, err = invoke(env, pg_url, ["worker"])
    assert_one_line_failure(code, out, err, "POLAR_ACCESS_TOKEN is not set")


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.startswith("outbox (polar-usage-outbox) 0.")


# Real processes: what a user sees in a terminal.


def test_status_in_another_directory_creates_nothing_and_says_why(tmp_path: Path) -> None:
    """Issue 12: `outbox status` in a directory without outbox.db made an empty one, then printed
    60 lines of `no such table`. Now no command but `outbox dev` has a default database."""
    result = run_process(["status"], cwd=tmp_path)
    assert_one_line_failure(
        result.returncode, result.stdout, result.stderr, "DATABASE_URL is not set"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def dev_database_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory holding `outbox dev`'s database (./outbox.db, with a customer in it), as the
    working directory, with no DATABASE_URL set."""
    upgrade(f"sqlite:///{tmp_path}/outbox.db")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


@pytest.mark.parametrize(
    "args",
    [["status"], ["failed"], ["token", "list"], ["db", "upgrade"], ["doctor"], ["serve"]],
    ids=" ".join,
)
def test_no_command_but_dev_falls_back_to_devs_database(
    dev_database_here: Path, monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    """A production operator whose DATABASE_URL is missing (or mistyped: DATABSE_URL) is told,
    instead of being shown dev's data with exit 0."""
    monkeypatch.setattr(os, "execv", lambda *_: pytest.fail("started"))
    result = runner.invoke(app, args)
    if args == ["doctor"]:  # a failed check, named, exit 1
        assert result.exit_code == 1 and "DATABASE_URL is not set" in result.stdout, result.stdout
    else:
        assert_one_line_failure(
            result.exit_code, result.stdout, result.stderr, "DATABASE_URL is not set"
        )
    monkeypatch.setenv("DATABSE_URL", f"sqlite:///{dev_database_here}/outbox.db")
    get_settings.cache_clear()
    result = runner.invoke(app, args)
    assert_one_line_failure(
        result.exit_code, result.stdout, result.stderr, "DATABSE_URL (did you mean DATABASE_URL?)"
    )


def test_an_applications_own_polar_variables_are_left_alone(
    dev_database_here: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tutorial runs the outbox inside an application's environment."""
    monkeypatch.setenv("POLAR_ORGANIZATION_ID", "org_123")
    monkeypatch.setenv("POLAR_CLIENT_SECRET", "polar_cs_abc")
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{dev_database_here}/outbox.db")
    result = runner.invoke(app, ["status", "--json"])
    assert result.exit_code == 0, result.stderr


def test_serve_checks_the_database_first_and_makes_no_sqlite_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runbook's promise: a mistyped SQLite path never becomes an empty database."""
    missing = tmp_path / "outbx.db"
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{missing}")
    get_settings.cache_clear()
    result = runner.invoke(app, ["serve", "--port", "1"])
    assert_one_line_failure(result.exit_code, result.stdout, result.stderr, str(missing))
    assert not missing.exists()


@pytest.mark.parametrize("command", ["serve", "polar-emulator"])
def test_a_busy_port_is_one_line_and_exit_2(
    dev_database_here: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{dev_database_here}/outbox.db")
    get_settings.cache_clear()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = runner.invoke(app, [command, "--port", str(port)])
    assert_one_line_failure(
        result.exit_code, result.stdout, result.stderr, f"port {port}", "already in use"
    )


def test_worker_refuses_to_start_without_redis(
    dev_database_here: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a banner and retries forever: one line naming Redis, exit 2."""
    monkeypatch.setattr(os, "execv", lambda *_: pytest.fail("`outbox worker` started Celery"))
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{dev_database_here}/outbox.db")
    monkeypatch.setenv("POLAR_ACCESS_TOKEN", "polar_oat_AbCdEf0123456789")
    monkeypatch.setenv("REDIS_URL", f"redis://:{SECRET}@127.0.0.1:1/0")
    get_settings.cache_clear()
    result = runner.invoke(app, ["worker"])
    assert_one_line_failure(
        result.exit_code, result.stdout, result.stderr, "Redis at", "does not answer", "REDIS_URL"
    )


@pytest.mark.slow
def test_processes_on_an_unreachable_and_an_unparseable_database() -> None:
    result = run_process(["token", "list"], DATABASE_URL=UNREACHABLE_PG)
    assert_one_line_failure(result.returncode, result.stdout, result.stderr, "cannot open")
    bad = f"postgresql+psycopg://outbox:{SECRET}@db:notaport/outbox"
    result = run_process(["grant", "alice", "1", "--reason", "x"], DATABASE_URL=bad)
    assert_one_line_failure(result.returncode, result.stdout, result.stderr, "DATABASE_URL")


@pytest.mark.slow
def test_processes_on_an_unmigrated_postgresql(empty_pg_url: str) -> None:
    for args in (["status"], ["replay", "--all-failed"], ["failed"]):
        result = run_process(args, DATABASE_URL=empty_pg_url)
        assert_one_line_failure(
            result.returncode, result.stdout, result.stderr, "run `outbox db upgrade`"
        )
    result = run_process(["db", "upgrade"], DATABASE_URL=empty_pg_url)
    assert result.returncode == 0 and "(head)" in result.stderr, result.stderr
    assert run_process(["status"], DATABASE_URL=empty_pg_url).returncode == 0


@pytest.mark.slow
def test_process_integer_past_64_bits(pg_url: str, clean_tables: Engine) -> None:
    result = run_process(["token", "revoke", str(2**64)], DATABASE_URL=pg_url)
    assert_one_line_failure(result.returncode, result.stdout, result.stderr, "TOKEN_ID")


@pytest.mark.slow
def test_celery_worker_refuses_to_start_without_a_polar_token(pg_url: str) -> None:
    """`celery -A worker worker` (what docker-compose runs) fails at start, not every 5 s."""
    environment = {k: v for k, v in os.environ.items() if k != "POLAR_ACCESS_TOKEN"}
    environment.update(DATABASE_URL=pg_url, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker", "worker", "--concurrency=1"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "error: POLAR_ACCESS_TOKEN is not set" in result.stderr
    assert "ready" not in result.stdout + result.stderr


@pytest.mark.slow
def test_an_unexpected_error_is_one_line_unless_debug(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/outbox.db"
    upgrade(url)
    bug = (
        "import cli.main, outbox.events\n"
        "def broken(session): raise KeyError('counts')\n"
        "outbox.events.outbox_stats = broken\n"
        "cli.main.main()\n"
    )
    environment = {**os.environ, "DATABASE_URL": url, "PYTHONPATH": str(ROOT)}
    for debug in (False, True):
        argv = [sys.executable, "-c", bug, *(["--debug"] if debug else []), "status"]
        result = subprocess.run(
            argv, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=120
        )
        if debug:
            assert result.returncode == 1 and "Traceback" in result.stderr
        else:
            assert_one_line_failure(
                result.returncode, result.stdout, result.stderr, "unexpected KeyError", "--debug"
            )


@pytest.mark.parametrize(
    "url",
    [
        UNREACHABLE_PG,
        f"postgresql+psycopg://outbox:p@{SECRET}@127.0.0.1:1/outbox",
        f"postgresql+psycopg://outbox:{SECRET}@db:notaport/outbox",
    ],
)
@pytest.mark.parametrize("json_out", [False, True])
def test_doctor_names_an_unusable_database_without_its_password(
    env: pytest.MonkeyPatch, url: str, json_out: bool
) -> None:
    code, out, err = invoke(env, url, ["doctor", *(["--json"] if json_out else [])])
    assert code == 1 and "Traceback" not in out + err and SECRET not in out + err, out + err
    assert "database" in out and ("✗ database" in out or '"ok": false' in out), out


# The password as a query parameter (valid for SQLAlchemy and libpq), plain or percent-encoded.
QUERY_PASSWORD_URLS = [
    f"postgresql+psycopg://outbox@127.0.0.1:1/outbox?password={SECRET}",
    f"postgresql+psycopg://outbox@127.0.0.1:1/outbox?sslmode=disable&password={SECRET}",
    f"postgresql+psycopg://outbox@127.0.0.1:1/outbox?sslpassword={SECRET}&connect_timeout=5",
    f"postgresql+psycopg://outbox:{SECRET}@127.0.0.1:1/outbox?password={SECRET}",
    "postgresql+psycopg://outbox@127.0.0.1:1/outbox?password=s3cret%2Dpw",
]


@pytest.mark.parametrize("url", QUERY_PASSWORD_URLS)
@pytest.mark.parametrize("args", [["status"], ["db", "upgrade"]], ids=" ".join)
def test_a_password_in_the_query_is_not_printed(
    env: pytest.MonkeyPatch, url: str, args: list[str]
) -> None:
    code, out, err = invoke(env, url, args)
    assert_one_line_failure(code, out, err, "cannot open", "127.0.0.1:1", "password=***")
    assert "s3cret%2Dpw" not in out + err


@pytest.mark.parametrize("url", QUERY_PASSWORD_URLS)
@pytest.mark.parametrize("json_out", [False, True])
def test_doctor_does_not_print_a_password_in_the_query(
    env: pytest.MonkeyPatch, url: str, json_out: bool
) -> None:
    code, out, err = invoke(env, url, ["doctor", *(["--json"] if json_out else [])])
    assert code == 1 and "Traceback" not in out + err, out + err
    assert SECRET not in out + err and "s3cret%2Dpw" not in out + err, out + err
    assert "password=***" in out, out


# An unescaped "@" in the password: libpq takes its tail for the host and names it in its
# error ("failed to resolve host 'tpw@127.0.0.1'"); a short tail must not leak either.
@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://outbox:s3cr@tpw@127.0.0.1:1/outbox",
        "postgresql+psycopg://outbox:s3cr@tpw@nohost.invalid:1/outbox",
        "postgresql+psycopg://outbox:ab@cd@ef@nohost.invalid/outbox",
    ],
)
@pytest.mark.parametrize("args", [["status"], ["doctor"]], ids=" ".join)
def test_no_fragment_of_a_password_with_an_at_sign_is_printed(
    env: pytest.MonkeyPatch, url: str, args: list[str]
) -> None:
    code, out, err = invoke(env, url, args)
    everything = out + err
    assert code in (1, 2) and "Traceback" not in everything, everything
    password = url.split("://outbox:", 1)[1].rsplit("@", 1)[0]
    for fragment in password.split("@"):
        assert f"{fragment}@" not in everything and f":{fragment}" not in everything, everything
    assert "outbox:***@" in everything, everything
