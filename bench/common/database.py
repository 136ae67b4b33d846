"""Helpers shared by the benchmarks: a throwaway database, seeding, per-transaction samples,
CPU accounting by process group, and the results table.

The benchmarks never touch the test suite's database: `recreate_database` refuses any database
whose name does not contain "bench".
"""

from __future__ import annotations

import json
import math
import os
import platform
import socket
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/outbox_bench"
CUSTOMER_PREFIX = "bench_"
HOT_CUSTOMER = "bench_1"
# Big enough that no run of any length drains a customer by accident.
HUGE_BALANCE = 1_000_000_000_000

# Outcome codes, HTTP-like so in-process and HTTP scenarios read the same in the table.
OK = 201
REFUSED = 402  # insufficient credits: the one refusal a load test is allowed to see
FAILED = 599  # anything else (exception, connection error): always a bug in a benchmark run


# -- database ---------------------------------------------------------------------------------


def connect(conninfo: str, **kwargs: Any) -> psycopg.Connection[Any]:
    """psycopg.connect, waiting up to a minute while PostgreSQL is out of connections (on a
    shared machine, other work may hold most of max_connections for a moment)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return psycopg.connect(conninfo, **kwargs)
        except psycopg.OperationalError as exc:
            if "too many clients" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def libpq_url(url: str) -> str:
    """The libpq form of a SQLAlchemy URL (`postgresql+psycopg://` -> `postgresql://`)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(scheme=parts.scheme.split("+", 1)[0]))


def database_name(url: str) -> str:
    """The database a URL points at."""
    return urlsplit(url).path.lstrip("/")


def _maintenance_url(url: str) -> str:
    return urlunsplit(urlsplit(libpq_url(url))._replace(path="/postgres"))


def recreate_database(url: str) -> None:
    """Drop and create the benchmark database, then migrate it to the newest schema.

    Refuses a name without "bench" so a typo can never wipe the test suite's database.
    """
    name = database_name(url)
    if "bench" not in name or not name.replace("_", "").isalnum():
        raise SystemExit(f"refusing to recreate {name!r}: benchmark databases contain 'bench'")
    with connect(_maintenance_url(url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    from outbox.migrate import upgrade

    upgrade(url)


def drop_database(url: str) -> None:
    """Drop the benchmark database (end of run, unless asked to keep it)."""
    name = database_name(url)
    if "bench" not in name:
        raise SystemExit(f"refusing to drop {name!r}")
    with connect(_maintenance_url(url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def reset_tables(url: str) -> None:
    """Empty every table of the schema (not `alembic_version`) and checkpoint, so each scenario
    starts from the same empty indexes and no checkpoint left by the last one lands in it."""
    with connect(libpq_url(url), autocommit=True) as conn:
        tables = [
            row[0]
            for row in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
                " AND tablename <> 'alembic_version'"
            )
        ]
        conn.execute("TRUNCATE " + ", ".join(f'"{t}"' for t in tables) + " RESTART IDENTITY")
        conn.execute("CHECKPOINT")


def seed_customers(url: str, count: int, balance: int) -> None:
    """`count` customers `bench_1..bench_<count>` with `balance` credits each, every one backed
    by a grant ledger entry so `balance == sum(delta)` holds as it would after `grant_credits`."""
    with connect(libpq_url(url), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO customers (id, balance, held, granted, used, created_at, updated_at)"
            " SELECT %s || g, %s, 0, %s, 0, now(), now() FROM generate_series(1, %s) g",
            (CUSTOMER_PREFIX, balance, balance, count),
        )
        conn.execute(
            "INSERT INTO ledger_entries (customer_id, kind, delta, balance_after, reason,"
            " created_at) SELECT %s || g, 'grant', %s, %s, 'benchmark seed', now()"
            " FROM generate_series(1, %s) g",
            (CUSTOMER_PREFIX, balance, balance, count),
        )
        # Only the seeded tables: ANALYZE of a table emptied by TRUNCATE records it as empty,
        # and the planner then scans it sequentially while a scenario fills it (the keyed
        # usage's lookup of idempotency_records slowed down within every round after the first).
        # Left unanalyzed, it is "unknown" and gets index scans, as a table in service does.
        conn.execute("ANALYZE customers, ledger_entries")


def customer_id(number: int) -> str:
    """The id of seeded customer `number` (1-based)."""
    return f"{CUSTOMER_PREFIX}{number}"


@dataclass(frozen=True)
class LedgerCheck:
    """What the database says after a scenario: the invariants a load must never break."""

    events: int
    usage_entries: int
    mismatched_customers: int  # balance != sum(ledger delta)
    negative_balances: int

    @property
    def consistent(self) -> bool:
        return (
            self.mismatched_customers == 0
            and self.negative_balances == 0
            and self.events == self.usage_entries
        )


def check_ledger(url: str) -> LedgerCheck:
    """Count outbox rows and usage entries, and look for broken balances."""
    with connect(libpq_url(url), autocommit=True) as conn:
        events = conn.execute("SELECT count(*) FROM outbox_events").fetchone()
        usage = conn.execute("SELECT count(*) FROM ledger_entries WHERE kind = 'usage'").fetchone()
        mismatched = conn.execute(
            "SELECT count(*) FROM customers c LEFT JOIN (SELECT customer_id, sum(delta) AS s"
            " FROM ledger_entries GROUP BY customer_id) l ON l.customer_id = c.id"
            " WHERE c.balance <> coalesce(l.s, 0)"
        ).fetchone()
        negative = conn.execute("SELECT count(*) FROM customers WHERE balance < 0").fetchone()
    assert events and usage and mismatched and negative
    return LedgerCheck(int(events[0]), int(usage[0]), int(mismatched[0]), int(negative[0]))


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
    with connect(_maintenance_url(url), autocommit=True) as conn:
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


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- samples ----------------------------------------------------------------------------------


@dataclass
class Samples:
    """Per-transaction samples from one client process: completion time (wall clock, so several
    processes agree), latency in seconds, and an outcome code (OK, REFUSED, FAILED or an HTTP
    status). `errors` counts what went wrong, by message."""

    ends: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    codes: list[int] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)

    def add(self, end: float, latency: float, code: int) -> None:
        self.ends.append(end)
        self.latencies.append(latency)
        self.codes.append(code)

    def extend(self, other: Samples) -> None:
        self.ends.extend(other.ends)
        self.latencies.extend(other.latencies)
        self.codes.extend(other.codes)
        self.errors.update(other.errors)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The nearest-rank percentile `q` (0-100) of already sorted values; NaN when empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass
class ScenarioResult:
    """One row of the table."""

    key: str
    label: str
    seconds: float
    count: int = 0
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    codes: dict[int, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    total_ok: int = 0  # whole run, warm-up included: must equal the outbox rows written
    cpu_reference_ms: float = 0.0  # see cpu_reference_ms()
    ratio: float | None = None  # to (a), when measured round by round (--repeat)
    ledger: LedgerCheck | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        """Committed (or refused) transactions per second in the measured window."""
        return self.count / self.seconds if self.seconds else 0.0

    def ratio_to(self, base: ScenarioResult) -> float:
        """Throughput relative to `base`: the per-round median when there is one."""
        if self.ratio is not None:
            return self.ratio
        return self.throughput / base.throughput if base.throughput else math.nan

    @property
    def failed(self) -> int:
        return sum(n for code, n in self.codes.items() if code not in (OK, REFUSED))

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "label": self.label,
            "seconds": self.seconds,
            "count": self.count,
            "tx_per_s": round(self.throughput, 1),
            "ratio_to_a": None if self.ratio is None else round(self.ratio, 3),
            "p50_ms": round(self.p50_ms, 2),
            "p99_ms": round(self.p99_ms, 2),
            "codes": {str(k): v for k, v in self.codes.items()},
            "errors": self.errors,
            "cpu_cores": {k: round(v, 2) for k, v in self.cpu.items()},
            "total_ok": self.total_ok,
            "cpu_reference_ms": round(self.cpu_reference_ms, 1),
            "ledger": None if self.ledger is None else self.ledger.__dict__,
            "notes": self.notes,
        }


def summarize(
    key: str, label: str, samples: Samples, window: tuple[float, float]
) -> ScenarioResult:
    """Keep the transactions that completed inside the measured window."""
    start, end = window
    latencies: list[float] = []
    codes: Counter[int] = Counter()
    for t, latency, code in zip(samples.ends, samples.latencies, samples.codes, strict=True):
        if start <= t < end:
            latencies.append(latency)
            codes[code] += 1
    latencies.sort()
    return ScenarioResult(
        key=key,
        label=label,
        seconds=end - start,
        count=len(latencies),
        p50_ms=percentile(latencies, 50) * 1000,
        p99_ms=percentile(latencies, 99) * 1000,
        codes=dict(codes),
        errors=dict(samples.errors),
        total_ok=sum(1 for code in samples.codes if code == OK),
    )


# -- CPU accounting ---------------------------------------------------------------------------


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


def _ticks_per_second() -> int:
    return int(os.sysconf("SC_CLK_TCK"))


def _process_table() -> dict[int, tuple[str, int, int, int]]:
    """pid -> (command name, parent pid, start time, user+system ticks) for every process."""
    table: dict[int, tuple[str, int, int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        # The command name is in parentheses and may contain spaces.
        name = raw[raw.index("(") + 1 : raw.rindex(")")]
        rest = raw[raw.rindex(")") + 2 :].split()
        table[int(entry)] = (name, int(rest[1]), int(rest[19]), int(rest[11]) + int(rest[12]))
    return table


def _busy_ticks() -> int:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields[:8]) - idle


class GroupCpuMeter:
    """CPU used between `start()` and `stop()`, in cores, by named process trees (`groups`:
    name -> root pids, descendants included), PostgreSQL, Redis, this driver, and "other" (the
    machine's busy time minus all of those: a neighbour's work, or a process that exited)."""

    def __init__(self, groups: Mapping[str, Iterable[int]]) -> None:
        self.groups = {name: list(roots) for name, roots in groups.items()}
        self._start: tuple[float, int, dict[tuple[int, int], int]] | None = None

    def _snapshot(self) -> tuple[dict[tuple[int, int], int], dict[tuple[int, int], str]]:
        table = _process_table()
        children: dict[int, list[int]] = {}
        for pid, (_, ppid, _, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        owner: dict[int, str] = {}
        for name, roots in self.groups.items():
            stack = [pid for pid in roots if pid in table]
            while stack:
                pid = stack.pop()
                if pid not in owner:
                    owner[pid] = name
                    stack.extend(children.get(pid, ()))
        ticks: dict[tuple[int, int], int] = {}
        groups: dict[tuple[int, int], str] = {}
        for pid, (name, _, started, used) in table.items():
            key = (pid, started)
            ticks[key] = used
            if pid in owner:
                groups[key] = owner[pid]
            elif pid == os.getpid():
                groups[key] = "driver"
            elif name == "postgres" or name.startswith("postgres:"):
                groups[key] = "postgres"
            elif name.startswith("redis-server"):
                groups[key] = "redis"
        return ticks, groups

    def start(self) -> None:
        self._start = (time.monotonic(), _busy_ticks(), self._snapshot()[0])

    def stop(self) -> tuple[dict[str, float], float]:
        """(cores per group, seconds measured)."""
        assert self._start is not None, "start() first"
        t0, busy0, ticks0 = self._start
        ticks1, groups = self._snapshot()
        elapsed = max(time.monotonic() - t0, 1e-9)
        hz = _ticks_per_second()
        used = dict.fromkeys([*self.groups, "postgres", "redis", "driver"], 0)
        for key, group in groups.items():
            used[group] += ticks1[key] - ticks0.get(key, 0)
        cores = {name: n / hz / elapsed for name, n in used.items()}
        busy = (_busy_ticks() - busy0) / hz / elapsed
        cores["other"] = max(0.0, busy - sum(cores.values()))
        cores["busy"] = busy
        return cores, elapsed


class CpuMeter(GroupCpuMeter):
    """The enqueue benchmark's groups: the load (clients / generator) and the server (uvicorn),
    next to PostgreSQL, Redis, this driver and other."""

    def __init__(self, load_roots: Iterable[int] = (), server_roots: Iterable[int] = ()) -> None:
        super().__init__({"load": load_roots, "server": server_roots})

    def cores(self) -> dict[str, float]:
        """`stop()`, cores per group only."""
        return self.stop()[0]


# -- the table --------------------------------------------------------------------------------


def _fmt(value: float, digits: int = 1) -> str:
    return "-" if math.isnan(value) else f"{value:,.{digits}f}"


def format_table(results: Sequence[ScenarioResult], baseline: str = "a") -> str:
    """A Markdown table: throughput, latency, ratio to the baseline row, outcomes, CPU."""
    base = next((r for r in results if r.key == baseline), None)
    header = (
        "| scenario | what | tx/s | p50 ms | p99 ms | vs (a) | 201 | 402 | other"
        " | CPU cores: pg / load / server / other | CPU ms per tx: pg / client+server |"
    )
    lines = [header, "|" + "---|" * 11]
    for r in results:
        ratio = (
            "100%"
            if r is base
            else f"{r.ratio_to(base):.0%}"
            if base is not None and base.throughput
            else "-"
        )
        cpu = (
            " / ".join(f"{r.cpu.get(k, 0.0):.2f}" for k in ("postgres", "load", "server", "other"))
            if r.cpu
            else "-"
        )
        per_tx = (
            f"{1000 * r.cpu.get('postgres', 0.0) / r.throughput:.2f} / "
            f"{1000 * (r.cpu.get('load', 0.0) + r.cpu.get('server', 0.0)) / r.throughput:.2f}"
            if r.cpu and r.throughput
            else "-"
        )
        lines.append(
            f"| {r.key} | {r.label} | {_fmt(r.throughput, 0)} | {_fmt(r.p50_ms, 2)}"
            f" | {_fmt(r.p99_ms, 2)} | {ratio} | {r.codes.get(OK, 0):,}"
            f" | {r.codes.get(REFUSED, 0):,} | {r.failed:,} | {cpu} | {per_tx} |"
        )
    return "\n".join(lines)


def print_report(
    results: Sequence[ScenarioResult],
    facts: dict[str, str],
    *,
    table: str,
    command: str,
    cpu_line: str,
    goals: Sequence[str],
    json_path: Path | None,
) -> None:
    """A benchmark's report: its table, every row's notes, the machine, how CPU was counted,
    the speed reference, the command, the goals; and the same as JSON if asked."""
    print()
    print(table)
    print()
    for r in results:
        for note in r.notes:
            print(f"- {r.key}: {note}")
    print()
    print(describe_machine(facts))
    print(cpu_line)
    references = [r.cpu_reference_ms for r in results if r.cpu_reference_ms]
    if references:
        print(
            f"CPU speed reference (a fixed pure-Python loop, before each scenario):"
            f" {min(references):.0f}-{max(references):.0f} ms"
            " (a wide range means the machine's speed drifted during the run)"
        )
    print(f"command: {command}")
    if goals:
        print()
        print("\n".join(goals))
    if json_path is not None:
        report = {"machine": facts, "command": command, "results": [r.as_dict() for r in results]}
        json_path.write_text(json.dumps(report, indent=2) + "\n")
