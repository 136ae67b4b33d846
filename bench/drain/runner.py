"""Runs the drain scenarios in order with one emulator for the whole run, and holds what the rows
share: the configuration, the log directory, the emulator, the profiler, the rows measured so
far (the best b-celery row sizes later ones)."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from bench.common import (
    Emulator,
    GroupCpuMeter,
    announce,
    clean_env,
    cpu_reference_ms,
    drop_database,
    flush_redis,
    recreate_database,
    show_row,
)
from bench.drain.config import BATCH, EMULATOR_TOKEN, UNLIMITED_RPM, Config
from bench.drain.profiler import Profiler
from bench.drain.report import format_table
from bench.drain.result import DrainResult
from bench.drain.scenarios import scenarios


class Bench:
    """Runs the selected scenarios in order; the emulator lives for the whole run."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.log_dir = Path(tempfile.mkdtemp(prefix="bench-drain-"))
        self.emulator = Emulator(self.log_dir)
        self.profiler = Profiler(cfg.py_spy, idle=cfg.py_spy_idle)
        self.results: dict[str, DrainResult] = {}

    def run(self) -> list[DrainResult]:
        cfg = self.cfg
        recreate_database(cfg.url)
        self.emulator.start()
        try:
            for scenario in scenarios(cfg):
                announce(scenario.key, scenario.label)
                reference = cpu_reference_ms()
                self.emulator.reset()
                flush_redis(cfg.redis_url)
                result = scenario.run(self, scenario)
                result.cpu_reference_ms = reference
                self.results[scenario.key] = result
                show_row(format_table([result]))
        finally:
            self.profiler.stop()
            self.emulator.stop()
            if not cfg.keep_db:
                drop_database(cfg.url)
        print(f"logs: {self.log_dir}", file=sys.stderr)
        return list(self.results.values())

    def best_concurrency(self) -> int:
        """The K of the fastest b-celery row measured so far (else the largest asked)."""
        measured = [
            (r.throughput, int(k.rsplit("-", 1)[1]))
            for k, r in self.results.items()
            if k.startswith("b-celery-")
        ]
        return max(measured)[1] if measured else max(self.cfg.concurrency)

    def best_b(self) -> DrainResult | None:
        bs = [r for k, r in self.results.items() if k.startswith("b-celery-")]
        return max(bs, key=lambda r: r.throughput) if bs else None

    def timeout(self, rows: int) -> float:
        """How long a drain of `rows` may take before it counts as NOT DRAINED."""
        return max(120.0, rows / 100)

    def meter(self, drainers: int) -> GroupCpuMeter:
        """CPU of the drainers' process tree and of the emulator (and the usual groups)."""
        return GroupCpuMeter({"drainers": [drainers], "emulator": [self.emulator.pid]})

    def start_measuring(
        self, key: str, name: str, pid: int, *, profile_emulator: bool = True
    ) -> tuple[GroupCpuMeter, float]:
        """From now: the CPU of the drainers (`pid`'s tree) and the emulator, py-spy on them if
        asked; returns the running meter and the start time."""
        meter = self.meter(pid)
        t0 = time.time()
        meter.start()
        self.profiler.record(key, name, pid)
        if profile_emulator:
            self.profiler.record(key, "emulator", self.emulator.pid)
        return meter, t0

    def stop_measuring(self, meter: GroupCpuMeter) -> tuple[dict[str, float], float]:
        """Stop the meter and py-spy: (cores per group, seconds measured)."""
        cpu = meter.stop()
        self.profiler.stop()
        return cpu

    def worker_env(self, **overrides: str) -> dict[str, str]:
        """A worker pointed at the benchmark database, Redis db and emulator; the budget never
        binds and no clock margin holds rows back unless `overrides` say otherwise."""
        env = clean_env(
            DATABASE_URL=self.cfg.url,
            REDIS_URL=self.cfg.redis_url,
            POLAR_ACCESS_TOKEN=EMULATOR_TOKEN,
            POLAR_BASE_URL=self.emulator.url,
            OUTBOX_CLOCK_MARGIN_SECONDS="0",
            OUTBOX_BATCH_SIZE=str(BATCH),
            POLAR_REQUESTS_PER_MINUTE=str(UNLIMITED_RPM),
            PYTHONUNBUFFERED="1",
        )
        env.update(overrides)
        return env

    def limited_env(self, limit: int, window: int, batch: int, **overrides: str) -> dict[str, str]:
        """`worker_env` for a Polar that allows `limit` requests per `window` seconds, with
        batches of `batch` events and beat every --drain-interval seconds."""
        return self.worker_env(
            POLAR_REQUESTS_PER_MINUTE=str(limit),
            POLAR_RATE_WINDOW_SECONDS=str(window),
            OUTBOX_BATCH_SIZE=str(batch),
            OUTBOX_DRAIN_INTERVAL_SECONDS=f"{self.cfg.drain_interval:g}",
            **overrides,
        )
