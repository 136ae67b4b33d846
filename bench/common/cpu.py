"""CPU accounting by process group, from /proc: which tree of processes used how many cores
while a scenario ran (PostgreSQL, Redis, the driver and "other" are always counted)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping

from bench.common.processes import sleep_until


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

    def over(self, window: tuple[float, float]) -> dict[str, float]:
        """Cores per group from `window`'s start to its end (wall clock), sleeping till then."""
        sleep_until(window[0])
        self.start()
        sleep_until(window[1])
        return self.cores()
