"""Servers of the tests' own: a free port, a private redis-server and a private PostgreSQL
cluster (in a temporary directory, on a free port) that a test may stop and restart. A test
never stops, restarts or reconfigures the machine's PostgreSQL or Redis, which other people
and the developer's own `outbox serve` use (tests/conftest.py checks the PostgreSQL cluster
is the same process at the end of the run as at its start).
"""

from __future__ import annotations

import ctypes
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis
import sqlalchemy as sa

from tests.conftest import service_missing


def free_port() -> int:
    """A TCP port nothing listens on now (the kernel's choice)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_server_installed() -> bool:
    return shutil.which("redis-server") is not None


def _die_with_parent() -> None:
    """In a child, before exec: SIGTERM it when the test process dies, even by SIGKILL."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


PR_SET_PDEATHSIG = 1


class PrivateRedis:
    """A redis-server of the test's own, on its own port, that the test may stop and restart."""

    def __init__(self, tmp: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            service_missing("redis-server (binary)", FileNotFoundError("redis-server"))
        self.binary = binary or "redis-server"
        # CI (or a machine where free ports are scarce) may name the port: TEST_PRIVATE_REDIS_PORT.
        self.port = int(os.environ.get("TEST_PRIVATE_REDIS_PORT") or free_port())
        self.dir = tmp
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,  # a killed test run leaves no redis-server behind
        )
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                client.ping()
                return
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError("private redis-server did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def postgres_bindir() -> Path | None:
    """The directory of initdb/pg_ctl: $PG_BINDIR, Debian's newest /usr/lib/postgresql/*/bin,
    or wherever initdb is on PATH."""
    candidates = [os.environ.get("PG_BINDIR", "")]
    candidates += sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2])
    )[::-1]
    on_path = shutil.which("initdb")
    candidates.append(str(Path(on_path).parent) if on_path else "")
    for candidate in candidates:
        if candidate and (Path(candidate) / "initdb").is_file():
            return Path(candidate)
    return None


def can_run_private_postgres() -> bool:
    """The server binaries are installed and, as root, there is a `postgres` user to run as."""
    if postgres_bindir() is None:
        return False
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return False
    return True


def _process_identity(pid: int) -> str | None:
    """`<pid> <start time>` of a live process (the start time tells a reused pid apart)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return f"{pid} {stat.rsplit(')', 1)[1].split()[19]}"


CLUSTER_PREFIX = "outbox-test-pg-"
OWNER_FILE = "owner"  # in a private cluster's directory: the test process that made it


def reap_abandoned_clusters(root: Path | None = None) -> list[Path]:
    """Stop and delete the private clusters whose test run is gone (killed, say, before its
    fixtures could clean up): each directory names its owner process, and one that no longer
    lives leaves its cluster to whoever comes next. Returns the directories removed."""
    removed = []
    for directory in Path(root or tempfile.gettempdir()).glob(CLUSTER_PREFIX + "*"):
        try:
            owner = (directory / OWNER_FILE).read_text().strip()
        except OSError:
            continue  # being created, or not ours
        pid = int(owner.split()[0])
        if _process_identity(pid) == owner:
            continue  # its run is still going
        pidfile = directory / "data" / "postmaster.pid"
        bindir = postgres_bindir()
        if pidfile.exists() and bindir is not None:
            as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
            subprocess.run(
                [
                    *as_user,
                    str(bindir / "pg_ctl"),
                    "-D",
                    str(directory / "data"),
                    "-m",
                    "immediate",
                    "-w",
                    "-t",
                    "30",
                    "stop",
                ],
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(directory, ignore_errors=True)
        removed.append(directory)
    return removed


class PrivatePostgres:
    """A PostgreSQL cluster of the test's own: initdb into a temporary directory, started on a
    free port (trust auth, user postgres), that the test may stop and restart. PostgreSQL
    refuses to run as root: as root, the cluster runs as the `postgres` user."""

    def __init__(self) -> None:
        bindir = postgres_bindir()
        if bindir is None:
            service_missing("PostgreSQL server binaries (initdb)", FileNotFoundError("initdb"))
        assert bindir is not None
        self.bindir = bindir
        self.as_user: list[str] = []
        owner: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                service_missing("a `postgres` user to run a private cluster as", KeyError())
            self.as_user = ["runuser", "-u", "postgres", "--"]
        reap_abandoned_clusters()
        # Not under pytest's tmp_path: as root, that is private to root.
        self.dir = Path(tempfile.mkdtemp(prefix=CLUSTER_PREFIX))
        (self.dir / OWNER_FILE).write_text(f"{_process_identity(os.getpid())}\n")
        if owner is not None:
            os.chown(self.dir, owner.pw_uid, owner.pw_gid)
        self.data = self.dir / "data"
        self.port = free_port()
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync")
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"port = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.dir}'\nmax_connections = 200\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
            )

    def _run(self, tool: str, *args: str) -> None:
        result = subprocess.run(
            [*self.as_user, str(self.bindir / tool), *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode != 0:
            log = self.dir / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{tool} {' '.join(args)} failed:\n{result.stderr}\n{tail}")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        log = str(self.dir / "server.log")
        self._run("pg_ctl", "-D", str(self.data), "-l", log, "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def create_database(self, name: str) -> str:
        admin = sa.create_engine(
            self.url(), isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool
        )
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        admin.dispose()
        return self.url(name)

    def destroy(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


def cluster_identity(url: str) -> tuple[str, str] | None:
    """(postmaster pid, start time) of the PostgreSQL server at `url`, or None if it does not
    answer. Another pair later means the server was restarted in between."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            started = str(conn.exec_driver_sql("SELECT pg_postmaster_start_time()").scalar())
            try:  # superuser (trust auth as postgres, as here); else the start time alone
                pid_file = conn.exec_driver_sql("SELECT pg_read_file('postmaster.pid')")
                pid = str(pid_file.scalar()).splitlines()[0]
            except sa.exc.DBAPIError:
                pid = "?"
        return pid, started
    except sa.exc.OperationalError:
        return None
    finally:
        engine.dispose()


@contextmanager
def migrated_database(server: PrivatePostgres, name: str) -> Iterator[str]:
    """A database `name` on `server`, migrated to head, as DATABASE_URL while it is used (for
    a test module that overrides the session's `pg_url`)."""
    from outbox.db import dispose_engines
    from outbox.migrate import upgrade
    from outbox.settings import get_settings

    url = server.create_database(name)
    upgrade(url)
    previous = os.environ.get("DATABASE_URL")
    os.environ["DATABASE_URL"] = url
    get_settings.cache_clear()
    try:
        yield url
    finally:
        dispose_engines()
        if previous is None:
            os.environ.pop("DATABASE_URL", None)
        else:
            os.environ["DATABASE_URL"] = previous
        get_settings.cache_clear()
