"""What a reader needs to compare numbers: the machine, PostgreSQL's durability settings, and
the speed of this machine right now."""

from __future__ import annotations

import math
import os
import platform
import time
from typing import Any

from bench.common.database import connect, maintenance_url


def describe_machine(facts: dict[str, Any]) -> str:
    """One line naming the machine and PostgreSQL's durability settings, for a table's footer."""
    return (
        f"machine: nproc={facts['nproc']} ({facts['cpu']}), PostgreSQL {facts['postgresql']}"
        f" (fsync={facts['fsync']}, synchronous_commit={facts['synchronous_commit']},"
        f" shared_buffers={facts['shared_buffers']}), Python {facts['python']}"
    )


def machine_facts(url: str) -> dict[str, str]:
    """The facts a reader needs to compare numbers: cores, CPU, PostgreSQL and its durability."""
    facts = {
        "nproc": str(os.cpu_count()),
        "cpu": _cpu_model(),
        "python": platform.python_version(),
    }
    with connect(maintenance_url(url), autocommit=True) as conn:
        version = conn.execute("SHOW server_version").fetchone()
        facts["postgresql"] = str(version[0]) if version else "?"
        for setting in ("fsync", "synchronous_commit", "shared_buffers", "max_connections"):
            row = conn.execute(f"SHOW {setting}").fetchone()
            facts[setting] = str(row[0]) if row else "?"
    return facts


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def cpu_reference_ms(rounds: int = 3) -> float:
    """CPU time of a fixed pure-Python loop (best of `rounds`): the speed of this machine right
    now. On a shared VM it drifts; rows measured at different speeds compare less well."""
    best = math.inf
    for _ in range(rounds):
        began = time.process_time()
        total = 0
        for i in range(300_000):
            total += i % 7
        best = min(best, time.process_time() - began)
    return best * 1000
