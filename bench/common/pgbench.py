"""pgbench, the raw-SQL ceiling of every benchmark: found on PATH or in PostgreSQL's bin
directory, run with a custom script against the benchmark database."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from bench.common.database import database_name, libpq_url


def find_pgbench() -> str:
    """pgbench on PATH, or in a PostgreSQL installation's bin directory."""
    found = shutil.which("pgbench")
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pgbench"), reverse=True)
    if not candidates:
        raise RuntimeError("pgbench not found (it ships with PostgreSQL)")
    return str(candidates[0])


def pgbench_command(
    url: str,
    script: Path,
    *,
    clients: int,
    seconds: float,
    rate: float | None = None,
    defines: Mapping[str, object] | None = None,
    options: Sequence[str] = (),
) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of pgbench -M prepared with `script` for up to
    `seconds` (throttled to `rate` tx/s), `-D name=value` per define, then `options`."""
    parts = urlsplit(libpq_url(url))
    cmd = [
        find_pgbench(),
        "-h",
        parts.hostname or "127.0.0.1",
        "-p",
        str(parts.port or 5432),
        "-U",
        parts.username or "postgres",
        "-n",
        "-M",
        "prepared",
        "-c",
        str(clients),
        "-j",
        str(min(clients, os.cpu_count() or 1)),
        "-T",
        str(max(1, math.ceil(seconds))),
        "-f",
        str(script),
    ]
    for name, value in (defines or {}).items():
        cmd += ["-D", f"{name}={value}"]
    if rate is not None:
        cmd += ["-R", f"{rate:.1f}"]
    cmd += [*options, database_name(url)]
    env = dict(os.environ)
    if parts.password:
        env["PGPASSWORD"] = parts.password
    return cmd, env


def start_pgbench(
    url: str,
    script: Path,
    log_dir: Path,
    *,
    clients: int,
    seconds: float,
    rate: float | None = None,
    defines: Mapping[str, object] | None = None,
) -> subprocess.Popen[bytes]:
    """pgbench in the background, its output appended to `log_dir/pgbench-<script>.log`."""
    cmd, env = pgbench_command(
        url, script, clients=clients, seconds=seconds, rate=rate, defines=defines
    )
    with (log_dir / f"pgbench-{script.stem}.log").open("ab") as log:
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
