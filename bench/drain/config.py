"""The drain benchmark's constants, and what the command line asked for."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/outbox_bench_drain"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/14"
EMULATOR_TOKEN = "polar_emulator_token"  # polar_emulator.DEFAULT_TOKEN
BATCH = 1000  # OUTBOX_BATCH_SIZE's default (outbox/settings.py)
CUSTOMERS = 1000
# The highest POLAR_REQUESTS_PER_MINUTE the settings accept: the budget is never the limit.
UNLIMITED_RPM = 100_000
# Notes that report a problem.
PROBLEMS = ("NOT DRAINED", "FAILED ROWS", "EMULATOR", "pgbench exited", "producer")


@dataclass(frozen=True)
class Config:
    """What the command line asked for."""

    url: str
    redis_url: str
    rows: int
    naive_rows: int
    clients: int
    concurrency: tuple[int, ...]
    threads: tuple[int, ...]
    naive_concurrency: int
    cliff_rows: int
    cliff_background: int
    limit: int
    window: int
    windows: int
    limited_batch: int
    drain_interval: float
    latency_seconds: float
    latency_warmup: float
    latency_rate: float | None
    latency_lib_rate: float
    latency_rows_per_tx: int
    latency_margin: float
    pace_limits: tuple[int, ...]
    pace_loads: tuple[int, ...]
    pace_batch: int
    pace_window: int
    pace_windows: int
    pace_warmup: float
    pace_concurrency: int
    only: tuple[str, ...]
    keep_db: bool
    json_path: Path | None
    py_spy: Path | None
    py_spy_idle: bool
