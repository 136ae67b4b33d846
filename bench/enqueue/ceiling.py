"""The raw-SQL ceiling (a, a-hot): pgbench runs pgbench_usage.sql, the transaction of one usage,
and logs every transaction; its log gives the same samples as the client processes."""

from __future__ import annotations

import math
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import (
    FAILED,
    OK,
    CpuMeter,
    Samples,
    ScenarioResult,
    pgbench_command,
    summarize,
)
from bench.enqueue.config import Config

PGBENCH_SCRIPT = Path(__file__).resolve().parent / "pgbench_usage.sql"


def run_pgbench(cfg: Config, key: str, label: str, customers: int) -> ScenarioResult:
    """pgbench with the custom script for warm-up + window; latencies from its per-transaction
    log (completion time and latency of every transaction)."""
    logdir = Path(tempfile.mkdtemp(prefix="bench-pgbench-"))
    cmd, env = pgbench_command(
        cfg.url,
        PGBENCH_SCRIPT,
        clients=cfg.clients,
        seconds=math.ceil(cfg.warmup + cfg.seconds) + 1,
        defines={"customers": customers},
        options=["-l", f"--log-prefix={logdir / 'pgbench'}"],
    )
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    meter = CpuMeter(load_roots=[proc.pid])
    window = (start + cfg.warmup, start + cfg.warmup + cfg.seconds)
    cpu = meter.over(window)
    stdout, stderr = proc.communicate(timeout=120)
    samples = read_log(logdir)
    shutil.rmtree(logdir, ignore_errors=True)
    result = summarize(key, label, samples, window)
    result.cpu = cpu
    if proc.returncode != 0:
        result.notes.append(f"pgbench exited {proc.returncode}: {stderr.strip()[-300:]}")
    tps = [line for line in stdout.splitlines() if line.startswith("tps")]
    if tps:
        result.notes.append(f"pgbench's own figure: {tps[0]}")
    return result


def read_log(logdir: Path) -> Samples:
    """Every transaction of pgbench's per-transaction logs (`-l`): its completion time and
    latency, or FAILED for a failed or skipped one."""
    samples = Samples()
    for path in logdir.glob("pgbench*"):
        for line in path.read_text().splitlines():
            fields = line.split()
            if fields[2].isdigit():
                end = int(fields[4]) + int(fields[5]) / 1e6
                samples.add(end, int(fields[2]) / 1e6, OK)
            else:  # "failed" or "skipped"
                samples.add(int(fields[4]) + int(fields[5]) / 1e6, math.nan, FAILED)
                samples.errors[f"pgbench: {fields[2]}"] += 1
    return samples
