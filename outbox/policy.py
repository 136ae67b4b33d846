"""Delivery policy as pure functions: no I/O; `now` and the random source are passed in.

Table-driven tests: tests/outbox/test_policy.py.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta

BACKOFF_BASE_SECONDS = 2.0
BACKOFF_CAP_SECONDS = 6 * 3600.0
FUTURE_TIMESTAMP_MESSAGE = "timestamp must be in the past"


def backoff_seconds(
    attempts: int,
    rng: random.Random,
    *,
    base: float = BACKOFF_BASE_SECONDS,
    cap: float = BACKOFF_CAP_SECONDS,
) -> float:
    """Exponential backoff with full jitter: uniform(0, min(cap, base * 2**attempts))."""
    exponent = min(max(attempts, 0), 62)
    return rng.uniform(0.0, min(cap, base * (2.0**exponent)))


def next_attempt_at(
    now: datetime,
    attempts: int,
    rng: random.Random,
    retry_after: float | None = None,
    *,
    base: float = BACKOFF_BASE_SECONDS,
    cap: float = BACKOFF_CAP_SECONDS,
) -> datetime:
    """When a row that failed `attempts` times may be tried again: backoff with full jitter,
    never sooner than Polar's Retry-After."""
    delay = backoff_seconds(attempts, rng, base=base, cap=cap)
    if retry_after is not None and math.isfinite(retry_after):
        delay = max(delay, retry_after)
    return now + timedelta(seconds=delay)


def lease_expires_at(now: datetime, lease_seconds: float) -> datetime:
    """The end of a lease taken `now`."""
    return now + timedelta(seconds=lease_seconds)


def is_lease_expired(now: datetime, expires_at: datetime | None) -> bool:
    """A lease without expiry is not a lease: treat it as expired."""
    return expires_at is None or expires_at <= now


def hold_back_cutoff(now: datetime, margin_seconds: float) -> datetime:
    """Events that occurred after this are not sent yet (Polar refuses future timestamps)."""
    return now - timedelta(seconds=margin_seconds)


@dataclass(frozen=True)
class BatchRejections:
    """A whole-batch 422, sorted by what it means for each event of the batch."""

    poison: dict[int, str] = field(default_factory=dict)
    future_timestamp: frozenset[int] = frozenset()
    unattributed: tuple[str, ...] = ()


def _index_of(loc: object, batch_len: int) -> int | None:
    if not isinstance(loc, list | tuple) or len(loc) < 3:
        return None
    if loc[0] != "body" or loc[1] != "events":
        return None
    index = loc[2]
    if isinstance(index, bool) or not isinstance(index, int):
        return None
    return index if 0 <= index < batch_len else None


def _is_future_timestamp(error: dict[str, object], loc: object) -> bool:
    message = str(error.get("msg", "")).lower()
    return FUTURE_TIMESTAMP_MESSAGE in message or (
        isinstance(loc, list | tuple)
        and bool(loc)
        and loc[-1] == "timestamp"
        and "future" in message
    )


def parse_batch_rejections(detail: object, batch_len: int) -> BatchRejections:
    """Map a 422's `detail` to batch indexes. `loc` is `["body", "events", i, ...]`; an error
    we cannot pin to an event of this batch is `unattributed` (the caller retries the batch).
    "Timestamp must be in the past" is clock skew (transient); anything else is poison, and an
    index with both kinds of error is poison."""
    if not isinstance(detail, list):
        return BatchRejections(unattributed=(str(detail)[:500],))
    poison: dict[int, str] = {}
    future: set[int] = set()
    unattributed: list[str] = []
    for error in detail:
        if not isinstance(error, dict):
            unattributed.append(str(error)[:500])
            continue
        loc = error.get("loc")
        index = _index_of(loc, batch_len)
        message = str(error.get("msg") or error.get("type") or "rejected by Polar")
        if index is None:
            unattributed.append(f"{loc}: {message}"[:500])
        elif _is_future_timestamp(error, loc):
            future.add(index)
        else:
            field_name = ".".join(str(p) for p in (loc or [])[3:] if isinstance(p, str | int))
            text = f"{field_name}: {message}" if field_name else message
            poison[index] = f"{poison[index]}; {text}" if index in poison else text
    return BatchRejections(
        poison=poison,
        future_timestamp=frozenset(future - set(poison)),
        unattributed=tuple(unattributed),
    )


def window_start(now: datetime, window_seconds: int = 60) -> int:
    """The fixed window `now` falls in, as an epoch second (Polar counts per minute)."""
    epoch = int(now.timestamp())
    return epoch - epoch % window_seconds


def seconds_until_next_window(now: datetime, window_seconds: int = 60) -> float:
    """How long until the next fixed window opens."""
    return window_start(now, window_seconds) + window_seconds - now.timestamp()


def window_allowance(limit: int, margin: int | None = None) -> int:
    """Requests we allow ourselves per window: the limit minus a safety margin (Polar's window
    boundary is not documented and clocks differ a little), at least 1."""
    if margin is None:
        margin = max(2, limit // 50)
    return max(1, limit - margin)
