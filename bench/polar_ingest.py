"""Polar's own server: ingest time, server CPU and body bytes by batch size.

Runs against the real Polar API started by `../shared/real-polar/run-polar.sh start` (its
`polar.env` holds POLAR_URL and POLAR_TOKEN; its `api.pid` and `worker.pid` name the uvicorn
process and the worker whose CPU is counted). For each metadata shape and batch size it sends
`--warmup` batches, then `--requests` batches one after the other, each of fresh events
(distinct `external_id`s, spread over the seeded customers), built exactly as delivery builds
them (`outbox.polar.build_event`) and encoded exactly as the delivery's SDK call encodes them
(the SDK's own request builder). It records, per batch size:

- ingest time per request (send to response), p50 and p99;
- the Polar API process's CPU time per request (user + system from /proc, its threads
  included), and the worker's and PostgreSQL's CPU over the same window (ingestion queues work
  for the worker; PostgreSQL is the whole machine's, so a neighbour shows up there);
- the request body in bytes; Polar refuses a body over 10 MiB (413): such a batch is sent once
  to see the 413, and larger ones of that shape are not sent.

Metadata shapes (`--shapes`): `typical` (a plan id beside what delivery adds: credits_used,
usage_id, usage_external_id); `largest` (the most `outbox.validation.check_metadata` admits:
47 keys of 40 characters, string values of 500 ASCII characters); `largest-bytes` (the same,
with the characters that take the most bytes once JSON-encoded: 4-byte UTF-8 in keys, control
characters written as \\u00XX in values).

    python bench/polar_ingest.py --json /tmp/polar-ingest.json
    python bench/polar_ingest.py --shapes typical --sizes 100,1000 --requests 5     # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from common import GroupCpuMeter, percentile

from outbox.polar.gateway import build_event
from outbox.validation import (
    MAX_METADATA_KEY_LENGTH,
    MAX_METADATA_KEYS,
    MAX_METADATA_STRING_LENGTH,
    RESERVED_METADATA_KEYS,
)

POLAR_MAX_BODY_BYTES = 10 * 1024 * 1024  # Polar's API_MAX_REQUEST_BODY_SIZE
DEFAULT_SIZES = "100,500,1000,2000,5000,10000"
DEFAULT_SHAPES = "typical,largest,largest-bytes"
EVENT_NAME = "ai_generation"
CREDITS_FIELD = "credits_used"
# Keys a caller may set: Polar's 50 minus the three delivery adds.
USER_KEYS = MAX_METADATA_KEYS - len(RESERVED_METADATA_KEYS | {CREDITS_FIELD})


def _default_env() -> Path:
    base = os.environ.get("REAL_POLAR_DIR") or os.path.join(
        os.environ.get("TMPDIR") or "/tmp", "real-polar"
    )
    return Path(base) / "polar.env"


def read_env(path: Path) -> dict[str, str]:
    """KEY=value lines of run-polar.sh's polar.env."""
    values = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip()
    return values


def _key(i: int, char: str) -> str:
    """A metadata key of exactly MAX_METADATA_KEY_LENGTH characters, unique by `i`."""
    tag = f"k{i:02d}"
    return tag + char * (MAX_METADATA_KEY_LENGTH - len(tag))


def user_metadata(shape: str) -> dict[str, str | int | float | bool]:
    """The caller's metadata of one event, per shape (see the module docstring)."""
    if shape == "typical":
        return {"plan_id": "plan_pro_2026"}
    if shape == "largest":
        return {_key(i, "k"): "v" * MAX_METADATA_STRING_LENGTH for i in range(USER_KEYS)}
    if shape == "largest-bytes":
        # U+1F600 is 4 bytes of UTF-8 (the SDK's JSON is not ASCII-escaped); U+0001 is written
        # \u0001, 6 bytes: both are admitted by check_metadata (no control characters in keys).
        return {
            _key(i, "\U0001f600"): "\x01" * MAX_METADATA_STRING_LENGTH for i in range(USER_KEYS)
        }
    raise SystemExit(f"unknown shape {shape!r}: typical, largest, largest-bytes")


def make_events(size: int, shape: str, customers: list[str], serial: int) -> list[dict[str, Any]]:
    """`size` fresh events, as delivery builds them (a row id as usage_id, a new external_id)."""
    metadata = user_metadata(shape)
    occurred = datetime.now(UTC) - timedelta(seconds=1)
    return [
        build_event(
            name=EVENT_NAME,
            customer_id=customers[i % len(customers)],
            external_id=f"usage_{uuid.uuid4().hex}",
            occurred_at=occurred,
            metadata=metadata,
            credits_field=CREDITS_FIELD,
            credits=random.randint(1, 50),
            usage_id=str(serial + i),
        )
        for i in range(size)
    ]


@dataclass
class Row:
    """One (shape, size) of the table."""

    shape: str
    size: int
    body_bytes: int
    requests: int = 0
    status: dict[str, int] = field(default_factory=dict)
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    max_ms: float = float("nan")
    api_cpu_ms_per_request: float = float("nan")
    worker_cpu_ms_per_request: float = float("nan")
    pg_cpu_ms_per_request: float = float("nan")
    events_per_s: float = float("nan")
    other_cores: float = float("nan")
    inserted: int = 0
    note: str = ""

    @property
    def api_cpu_us_per_event(self) -> float:
        return self.api_cpu_ms_per_request * 1000 / self.size


class Ingester:
    """Sends batches through the Polar SDK's own request builder and HTTP client."""

    def __init__(self, url: str, token: str, timeout: float) -> None:
        from polar.v2026_10 import Polar

        self.sdk = Polar(token, base_url=url, timeout=timeout)
        self.client = self.sdk.events.client

    def request(self, events: list[dict[str, Any]]) -> Any:
        return self.client.build_request(
            method="POST", url="/v1/events/ingest", path_params={}, query_params={},
            body={"events": events},
        )  # fmt: skip

    def send(self, request: Any) -> tuple[str, float, dict[str, Any]]:
        """(HTTP status or "network", seconds, JSON body)."""
        from polar.base import PolarNetworkError

        started = time.perf_counter()
        try:
            response = self.client.send_request(request)
        except PolarNetworkError:
            return "network", time.perf_counter() - started, {}
        elapsed = time.perf_counter() - started
        try:
            body = response.json()
        except ValueError:
            body = {}
        return str(response.status_code), elapsed, body if isinstance(body, dict) else {}


def measure(
    ingester: Ingester,
    shape: str,
    size: int,
    args: argparse.Namespace,
    pids: dict[str, int],
    serial: int,
) -> Row:
    """Warm-up, then `args.requests` batches of `size` events, one at a time."""
    customers = args.customers.split(",")
    probe = ingester.request(make_events(size, shape, customers, serial))
    row = Row(shape, size, len(probe.content))
    if row.body_bytes > POLAR_MAX_BODY_BYTES:
        status, elapsed, _ = ingester.send(probe)
        row.requests, row.status = 1, {status: 1}
        row.p50_ms = row.p99_ms = row.max_ms = elapsed * 1000
        row.note = f"over Polar's 10 MiB: {status}"
        return row
    # Built before the warm-up: building takes seconds for big batches, longer than the
    # server's keep-alive, and the warm-up then opens a fresh connection.
    batches = [
        ingester.request(make_events(size, shape, customers, serial + (args.warmup + i) * size))
        for i in range(args.requests)
    ]
    refused = False
    for i in range(args.warmup):
        status, _, _ = ingester.send(
            ingester.request(make_events(size, shape, customers, serial + i * size))
        )
        refused = refused or status != "200"
    if refused:
        # Polar fails this size (a 5xx): three tries are enough to show it.
        batches = batches[:3]
        row.note = "warm-up refused; "
    meter = GroupCpuMeter({"api": [pids["api"]], "worker": [pids["worker"]]})
    latencies: list[float] = []
    status_counts: dict[str, int] = {}
    meter.start()
    for request in batches:
        status, elapsed, body = ingester.send(request)
        latencies.append(elapsed)
        status_counts[status] = status_counts.get(status, 0) + 1
        row.inserted += int(body.get("inserted", 0))
    cores, seconds = meter.stop()
    latencies.sort()
    n = len(latencies)
    row.requests, row.status = n, status_counts
    row.p50_ms = percentile(latencies, 50) * 1000
    row.p99_ms = percentile(latencies, 99) * 1000
    row.max_ms = latencies[-1] * 1000
    row.api_cpu_ms_per_request = cores["api"] * seconds / n * 1000
    row.worker_cpu_ms_per_request = cores["worker"] * seconds / n * 1000
    row.pg_cpu_ms_per_request = cores["postgres"] * seconds / n * 1000
    row.events_per_s = row.inserted / sum(latencies)
    row.other_cores = cores["other"]
    if row.inserted != size * n:
        row.note += f"inserted {row.inserted} of {size * n}"
    return row


def _fmt_bytes(n: int) -> str:
    if n >= 1024 * 1024:
        return f"{n / 1024 / 1024:.2f} MiB"
    return f"{n / 1024:.1f} KiB"


def table(rows: list[Row]) -> str:
    head = (
        "| metadata | batch | body | per event | requests | ingest p50 ms | p99 ms | events/s "
        "(one at a time) | Polar API CPU ms per request | API CPU µs per event | worker CPU ms "
        "per request | PostgreSQL CPU ms per request | other cores | note |"
    )
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        status = ", ".join(f"{n} x {code}" for code, n in sorted(r.status.items()))
        if r.note.startswith("over"):
            lines.append(
                f"| {r.shape} | {r.size:,} | {_fmt_bytes(r.body_bytes)} | "
                f"{r.body_bytes / r.size:,.0f} B | {status} | - | - | - | - | - | - | - | - | "
                f"{r.note} |"
            )
            continue
        lines.append(
            f"| {r.shape} | {r.size:,} | {_fmt_bytes(r.body_bytes)} | "
            f"{r.body_bytes / r.size:,.0f} B | {status} | {r.p50_ms:,.0f} | {r.p99_ms:,.0f} | "
            f"{r.events_per_s:,.0f} | {r.api_cpu_ms_per_request:,.0f} | "
            f"{r.api_cpu_us_per_event:,.0f} | {r.worker_cpu_ms_per_request:,.0f} | "
            f"{r.pg_cpu_ms_per_request:,.0f} | {r.other_cores:.2f} | {r.note} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", type=Path, default=_default_env(), help="run-polar.sh's polar.env")
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="batch sizes, comma-separated")
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="metadata shapes (see above)")
    parser.add_argument("--requests", type=int, default=20, help="measured requests per size")
    parser.add_argument("--warmup", type=int, default=2, help="requests sent before measuring")
    parser.add_argument("--timeout", type=float, default=300.0, help="HTTP timeout, seconds")
    parser.add_argument(
        "--customers",
        default="user_alice," + ",".join(f"user_bench_{i}" for i in range(2, 11)),
        help="external customer ids the events are spread over (seeded in Polar)",
    )
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args(argv)

    env = read_env(args.env)
    pid_dir = args.env.parent
    pids = {name: int((pid_dir / f"{name}.pid").read_text()) for name in ("api", "worker")}
    ingester = Ingester(env["POLAR_URL"], env["POLAR_TOKEN"], args.timeout)
    sizes = [int(s) for s in args.sizes.split(",")]
    rows: list[Row] = []
    serial = int(time.time()) * 100_000
    for shape in args.shapes.split(","):
        for size in sizes:
            row = measure(ingester, shape, size, args, pids, serial)
            serial += size * (args.requests + args.warmup + 1)
            rows.append(row)
            print(table([row]).splitlines()[-1], flush=True)
            if row.note.startswith("over"):
                break  # larger batches of this shape are over the limit too
    print()
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 0 if all(set(r.status) <= {"200", "413"} for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
