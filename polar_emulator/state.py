"""The emulator's in-memory Polar: configuration (faults, clock, limits), stored events, stats.

Behaviour copied from Polar's server (docs/explanation/polar.md): dedup on (organization,
external_id) with ON CONFLICT DO NOTHING semantics; one invalid event rejects the whole batch with
422 and stores nothing; timestamps must not be in Polar's future; a fixed 60-second rate window per
organization over every /v1 endpoint, 429 with `Retry-After`."""

from __future__ import annotations

import json
import math
import random
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from polar_emulator.meters import filter_matches

# Polar's server writes one meter-event row per event it inserts and meter the event matches,
# all in ONE INSERT of 7 parameters a row, and asyncpg takes at most 32,767 parameters: past
# that, the whole ingest fails with a 500 and stores nothing [seen on Polar's own server,
# docs/benchmarks.md]. With one meter, 4,681 events are the most one request can carry.
MAX_QUERY_PARAMETERS = 32_767
METER_EVENT_PARAMETERS = 7
DEFAULT_TOKEN = "polar_emulator_token"  # noqa: S105 - a fixed test token, not a secret
ORGANIZATION_ID = "00000000-0000-4000-8000-00000000e0e0"
METER_ID = "11111111-1111-4111-8111-111111111111"
PRODUCT_ID = "22222222-2222-4222-8222-222222222222"


def default_meters() -> list[dict[str, Any]]:
    """As Polar lists a meter (tests/contract/fixtures/meters_list_item.json): Polar strips the
    `metadata.` prefix of the aggregation's property."""
    return [
        {
            "metadata": {},
            "created_at": "2026-01-01T00:00:00Z",
            "modified_at": "2026-01-01T00:00:00Z",
            "id": METER_ID,
            "name": "AI Generation Credits",
            "unit": "scalar",
            "custom_label": None,
            "custom_multiplier": None,
            "filter": {
                "conjunction": "and",
                "clauses": [{"property": "name", "operator": "eq", "value": "ai_generation"}],
            },
            "aggregation": {"func": "sum", "property": "credits_used"},
            "organization_id": ORGANIZATION_ID,
            "archived_at": None,
        }
    ]


def default_products() -> dict[str, dict[str, Any]]:
    return {
        PRODUCT_ID: {
            "id": PRODUCT_ID,
            "name": "Homeify Pro",
            "prices": [
                {"id": "price_metered", "amount_type": "metered_unit", "meter_id": METER_ID}
            ],
            "benefits": [
                {
                    "id": "benefit_credits",
                    "type": "meter_credit",
                    "properties": {"meter_id": METER_ID, "units": 20, "rollover": False},
                }
            ],
        }
    }


@dataclass
class EmulatorConfig:
    """Everything settable at run time (`POST /_emulator/config`, `RunningEmulator.configure`)."""

    accepted_tokens: list[str] = field(default_factory=lambda: [DEFAULT_TOKEN])
    rate_limit_per_minute: int | None = None  # None: unlimited
    window_seconds: float = 60.0
    retry_after_mode: str = "window"  # "window": seconds left; "polar": always 60
    error_5xx_rate: float = 0.0
    rate_429_rate: float = 0.0
    accept_then_drop_rate: float = 0.0
    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    reject_customers: list[str] = field(default_factory=list)
    known_customer_ids: list[str] = field(default_factory=list)  # Polar customer UUIDs
    unattributed_422_next: int = 0  # the next N ingests: a 422 naming no event
    clock_offset_seconds: float = 0.0
    # e.g. 500: Polar's own server answers its events list so without its analytics store.
    events_list_status: int | None = None
    seed: int | None = None
    # Where `POST /_emulator/webhooks/meter-credits` sends, signed with this secret (`outbox
    # dev` sets both: its API's webhook route and this start's secret).
    webhook_url: str | None = None
    webhook_secret: str | None = None
    meters: list[dict[str, Any]] = field(default_factory=default_meters)
    products: dict[str, dict[str, Any]] = field(default_factory=default_products)

    def update(self, changes: dict[str, Any]) -> None:
        names = {f.name for f in fields(self)}
        unknown = set(changes) - names
        if unknown:
            raise ValueError(f"unknown emulator setting(s): {', '.join(sorted(unknown))}")
        for name, value in changes.items():
            setattr(self, name, value)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StoredEvent:
    id: str
    external_id: str | None
    name: str
    external_customer_id: str | None
    customer_id: str | None
    timestamp: datetime
    metadata: dict[str, Any]
    ingested_at: datetime

    def public(self) -> dict[str, Any]:
        """As Polar's GET /v1/events/ lists it (no external_id)."""
        return {
            "id": self.id,
            "timestamp": self.timestamp.isoformat(),
            "organization_id": ORGANIZATION_ID,
            "customer_id": self.customer_id,
            "customer": None,
            "external_customer_id": self.external_customer_id,
            "member_id": None,
            "external_member_id": None,
            "child_count": 0,
            "parent_id": None,
            "label": self.name,
            "name": self.name,
            "source": "user",
            "metadata": self.metadata,
        }

    def full(self) -> dict[str, Any]:
        return {
            **self.public(),
            "external_id": self.external_id,
            "ingested_at": self.ingested_at.isoformat(),
        }


@dataclass
class Stats:
    requests: int = 0
    ingest_requests: int = 0
    list_requests: int = 0
    quantities_requests: int = 0
    accepted_batches: int = 0
    events_inserted: int = 0
    duplicates: int = 0
    status_401: int = 0
    status_422: int = 0
    unattributed_422: int = 0
    status_429: int = 0
    status_429_window: int = 0
    injected_5xx: int = 0
    meter_event_overflows: int = 0  # batches refused with Polar's 500 (MAX_QUERY_PARAMETERS)
    dropped_after_store: int = 0
    max_requests_in_a_window: int = 0
    # When each /v1 request was counted (time.time(), 429s included) and the size of each
    # accepted batch: tests check how requests spread over a window and how full batches are.
    request_times: list[float] = field(default_factory=list)
    accepted_batch_sizes: list[int] = field(default_factory=list)


def is_sum_number(value: object) -> bool:
    """A sum meter counts numbers only (not strings, not booleans)."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


class EmulatorState:
    """Thread-safe state shared by the emulator's handlers and the Python API."""

    def __init__(self, config: EmulatorConfig | None = None) -> None:
        self.lock = threading.Lock()
        self.config = config or EmulatorConfig()
        self.rng = random.Random(self.config.seed)
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.events: list[StoredEvent] = []
            self.by_external_id: dict[str, StoredEvent] = {}
            self.stats = Stats()
            self._window_start = 0.0
            self._window_count = 0
            self.rng = random.Random(self.config.seed)

    def configure(self, changes: dict[str, Any]) -> None:
        with self.lock:
            self.config.update(changes)
            if "seed" in changes:
                self.rng = random.Random(self.config.seed)

    def now(self) -> datetime:
        """Polar's clock: the machine's, shifted by `clock_offset_seconds`."""
        return datetime.now(UTC) + timedelta(seconds=self.config.clock_offset_seconds)

    def chance(self, rate: float) -> bool:
        return rate > 0 and self.rng.random() < rate

    def count_request(self) -> float | None:
        """Count one /v1 request in the fixed window; the Retry-After if over the limit."""
        config = self.config
        now = time.time()
        window = config.window_seconds
        start = now - (now % window)
        if start != self._window_start:
            self._window_start, self._window_count = start, 0
        self._window_count += 1
        self.stats.requests += 1
        self.stats.request_times.append(now)
        self.stats.max_requests_in_a_window = max(
            self.stats.max_requests_in_a_window, self._window_count
        )
        limit = config.rate_limit_per_minute
        if limit is not None and self._window_count > limit:
            self.stats.status_429 += 1
            self.stats.status_429_window += 1
            if config.retry_after_mode == "polar":
                return 60.0
            return max(1.0, math.ceil(start + window - now))
        return None

    def overflows_meter_events(self, events: list[dict[str, Any]]) -> bool:
        """Whether Polar's server would fail this batch with a 500: more meter-event rows (an
        event it inserts, not a duplicate, times each meter, not archived, it matches) than
        one INSERT can carry (MAX_QUERY_PARAMETERS)."""
        meters = [m for m in self.config.meters if m.get("archived_at") is None]
        most = MAX_QUERY_PARAMETERS // METER_EVENT_PARAMETERS
        if len(events) * len(meters) <= most:
            return False  # cannot overflow: skip matching every event
        seen: set[str] = set()
        rows = 0
        for event in events:
            external_id = event.get("external_id")
            if external_id is not None:
                if external_id in self.by_external_id or external_id in seen:
                    continue
                seen.add(external_id)
            view = SimpleNamespace(
                name=event["name"],
                metadata=event.get("metadata") or {},
                timestamp=event["timestamp"],
            )
            rows += sum(1 for m in meters if filter_matches(m.get("filter") or {}, view))
        return rows > most

    def store(self, events: list[dict[str, Any]]) -> tuple[int, int]:
        """Insert validated events; (inserted, duplicates) like Polar counts them."""
        inserted = 0
        now = datetime.now(UTC)
        for event in events:
            external_id = event.get("external_id")
            if external_id is not None and external_id in self.by_external_id:
                continue
            stored = StoredEvent(
                id=str(uuid.uuid4()),
                external_id=external_id,
                name=event["name"],
                external_customer_id=event.get("external_customer_id"),
                customer_id=event.get("customer_id"),
                timestamp=event["timestamp"],
                metadata=dict(event.get("metadata") or {}),
                ingested_at=now,
            )
            self.events.append(stored)
            if external_id is not None:
                self.by_external_id[external_id] = stored
            inserted += 1
        self.stats.events_inserted += inserted
        self.stats.duplicates += len(events) - inserted
        return inserted, len(events) - inserted

    def totals(self) -> dict[str, float]:
        """Per external customer id: the deduplicated sum of metadata.credits_used."""
        with self.lock:
            out: dict[str, float] = {}
            for event in self.events:
                value = event.metadata.get("credits_used")
                if event.name == "ai_generation" and is_sum_number(value):
                    key = event.external_customer_id or ""
                    out[key] = out.get(key, 0) + value  # type: ignore[operator]
            return out

    def save(self, path: Path) -> None:
        """Write the stored events to `path` (JSON, replaced atomically): `outbox dev` keeps
        its Polar's memory across restarts, as the real Polar would."""
        with self.lock:
            rows = [
                {
                    **asdict(e),
                    "timestamp": e.timestamp.isoformat(),
                    "ingested_at": e.ingested_at.isoformat(),
                }
                for e in self.events
            ]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"events": rows}))
        tmp.replace(path)

    def load(self, path: Path) -> int:
        """Add the events saved at `path` (those not stored yet); how many were added."""
        rows = json.loads(path.read_text())["events"]
        added = 0
        with self.lock:
            for row in rows:
                if row["external_id"] is not None and row["external_id"] in self.by_external_id:
                    continue
                event = StoredEvent(
                    **{
                        **row,
                        "timestamp": datetime.fromisoformat(row["timestamp"]),
                        "ingested_at": datetime.fromisoformat(row["ingested_at"]),
                    }
                )
                self.events.append(event)
                if event.external_id is not None:
                    self.by_external_id[event.external_id] = event
                added += 1
        return added

    def delete(self, external_id: str) -> bool:
        with self.lock:
            event = self.by_external_id.pop(external_id, None)
            if event is None:
                return False
            self.events.remove(event)
            return True
