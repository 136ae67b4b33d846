"""What the command line asked for, and the constants of the enqueue benchmark."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Clients run a little past the window, so no backend exits (taking its CPU ticks along)
# before the window's last CPU reading.
TAIL_SECONDS = 0.5
# c-replay: the keys (one per customer bench_1..bench_N) every request picks from.
REPLAY_KEYS = 100
# Notes that report a problem (kept from every repeat, not only the median run).
PROBLEMS = ("LEDGER INCONSISTENT", "outbox rows", "errors other than 402", "pgbench exited")


@dataclass(frozen=True)
class Config:
    """What the command line asked for."""

    url: str
    seconds: float
    warmup: float
    clients: int
    customers: int
    layouts: tuple[tuple[int, int], ...]
    http_workers: int
    http_clients: int
    app: str
    repeat: int
    gen_procs: int
    only: tuple[str, ...]
    keep_db: bool
    json_path: Path | None
    base_dir: Path | None = None
