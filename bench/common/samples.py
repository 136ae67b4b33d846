"""Per-transaction samples, the percentiles of a window, and one row of a results table."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.common.database import LedgerCheck

# Outcome codes, HTTP-like so in-process and HTTP scenarios read the same in the table.
OK = 201
REFUSED = 402  # insufficient credits: the one refusal a load test is allowed to see
FAILED = 599  # anything else (exception, connection error): always a bug in a benchmark run


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
