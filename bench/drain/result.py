"""One row of the drain table."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from bench.common import ScenarioResult


@dataclass
class DrainResult(ScenarioResult):
    """One row of the table: `count` rows in the steady window of `seconds`."""

    rows: int = 0  # delivered in the whole run
    elapsed: float = 0.0  # trigger -> drained: the CPU window
    status_429: int = 0
    requests: int = 0  # ingest requests the emulator answered
    mean_batch: float = math.nan  # events per accepted ingest request (pace-*, sat-*)

    def cpu_us_per_row(self, group: str) -> float:
        """CPU microseconds per delivered row spent by `group` over the whole drain."""
        if not self.cpu or not self.rows:
            return math.nan
        return 1e6 * self.cpu.get(group, 0.0) * self.elapsed / self.rows

    def as_dict(self) -> dict[str, Any]:
        data = super().as_dict()
        data.update(
            rows_per_s=round(self.throughput, 1),
            rows=self.rows,
            elapsed=round(self.elapsed, 2),
            status_429=self.status_429,
            requests=self.requests,
            mean_batch=None if math.isnan(self.mean_batch) else round(self.mean_batch, 1),
        )
        return data
