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


# The union variant of Polar's `EventCreate` that our events are (they carry
# `external_customer_id`). Polar checks each event against every variant, with no
# discriminator, and lists the errors of each (docs/explanation/polar.md, "Schema errors come
# once per union variant"): only this variant's say anything about our event.
SENT_VARIANT = "EventCreateExternalCustomer"
# The members of Polar's metadata value union (str | int | float | bool): one bad value is
# listed once per member, its `loc` ending in the member's tag.
_METADATA_MEMBER_TAGS = frozenset({"constrained-str", "str", "int", "float", "bool"})


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


def _variant_of(loc: list[object] | tuple[object, ...]) -> str | None:
    """The union variant a schema error names (`loc[3]`, a class name); None for a service
    error, whose `loc` names the field right after the index."""
    part = loc[3] if len(loc) > 3 else None
    return part if isinstance(part, str) and part[:1].isupper() else None


def _field_path(parts: list[object] | tuple[object, ...]) -> str:
    """`metadata.bad` for [metadata, bad, constrained-str]: the union member tag is noise."""
    names = [str(p) for p in parts if isinstance(p, str | int) and not isinstance(p, bool)]
    if len(names) >= 3 and names[0] == "metadata" and names[-1] in _METADATA_MEMBER_TAGS:
        names = names[:-1]
    return ".".join(names)


def _is_future_timestamp(error: dict[str, object], loc: object) -> bool:
    message = str(error.get("msg", "")).lower()
    return FUTURE_TIMESTAMP_MESSAGE in message or (
        isinstance(loc, list | tuple)
        and bool(loc)
        and loc[-1] == "timestamp"
        and "future" in message
    )


def parse_batch_rejections(
    detail: object, batch_len: int, *, variant: str = SENT_VARIANT
) -> BatchRejections:
    """Map a 422's `detail` to batch indexes (`loc` is `["body", "events", i, ...]`:
    docs/explanation/polar-422s.md).

    - An event is judged only by the errors of the union `variant` we send and by service
      errors (no variant in `loc`); the other variants' errors (e.g. the spurious
      `EventCreateCustomer.customer_id` "Field required") are ignored.
    - "Timestamp must be in the past" is clock skew: transient, whatever else is listed for
      that event (once Polar's clock has passed it, a real fault is named alone).
    - Any other error of ours makes the event poison.
    - What cannot be pinned to an event of this batch is `unattributed` (the caller retries the
      whole batch with backoff, loudly): a `loc` without an index in range, or an index named
      only under another variant.
    """
    if not isinstance(detail, list):
        return BatchRejections(unattributed=(str(detail)[:500],))
    reasons: dict[int, dict[str, str]] = {}  # index -> field path -> Polar's first message
    future: set[int] = set()
    other_variant_only: dict[int, str] = {}
    unattributed: list[str] = []
    for error in detail:
        if not isinstance(error, dict):
            unattributed.append(str(error)[:500])
            continue
        loc = error.get("loc")
        index = _index_of(loc, batch_len)
        message = str(error.get("msg") or error.get("type") or "rejected by Polar")
        if index is None or not isinstance(loc, list | tuple):
            unattributed.append(f"{loc}: {message}"[:500])
            continue
        tag = _variant_of(loc)
        if tag is not None and tag != variant:
            other_variant_only.setdefault(index, f"{tag}: {message}")
            continue
        if _is_future_timestamp(error, loc):
            future.add(index)
            continue
        path = _field_path(loc[4:] if tag is not None else loc[3:])
        reasons.setdefault(index, {}).setdefault(path, message)
    for index, text in sorted(other_variant_only.items()):
        if index not in reasons and index not in future:
            unattributed.append(f"events[{index}] refused only as {text}"[:500])
    return BatchRejections(
        poison={
            i: "; ".join(f"{path}: {msg}" if path else msg for path, msg in by_path.items())[:2000]
            for i, by_path in reasons.items()
            if i not in future
        },
        future_timestamp=frozenset(future),
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


# -- pacing the shared request budget --------------------------------------------------------
#
# Polar counts requests per organization in a fixed window (60 s) whose start is not
# documented. A fixed-window counter of our own only agrees with Polar's when both windows
# start together, and it lets the whole allowance go in the window's first second. Instead
# the budget hands out slots at a steady pace (GCRA, the "generic cell rate algorithm": one
# "theoretical arrival time" per budget). All times are integer microseconds (Redis TIME), so
# the Lua script in outbox/ratelimit.py and `take_slot` compute the same thing.
#
# Why any window of Polar's holds at most `allowance` slots, wherever it starts: a slot is
# granted at t_k only if t_k >= tat_k - tolerance, and tat_{k+1} = max(tat_k, t_k) + interval.
# So tat_n >= t_1 + (n - 1) * interval and t_n >= t_1 + (n - 1) * interval - tolerance. In a
# half-open interval [s, s + W) holding n slots, t_n - t_1 < W, hence
# n < 1 + (W + tolerance) / interval. With interval >= (W + tolerance) / allowance that is
# n < 1 + allowance: at most `allowance` slots in ANY interval of length W.

PACING_TOLERANCE_SHARE = 1 / 240  # of the window: 0.25 s of 60 s


@dataclass(frozen=True)
class Pacing:
    """How one budget hands out slots (microseconds). `tolerance_us` lets a caller that came
    a little late (scheduling, a Redis round trip) keep the slot it was due, so that lateness
    is not lost throughput; the interval is widened by as much, so no window holds more.
    `low_interval_us` > 0: the spacing of a low-priority caller (reconcile), see `take_slot`."""

    interval_us: int
    tolerance_us: int
    low_interval_us: int = 0


def pacing(
    allowance: int,
    window_seconds: float,
    *,
    low_cap: int = 0,
    tolerance_share: float = PACING_TOLERANCE_SHARE,
) -> Pacing:
    """The pacing that spends at most `allowance` slots in any `window_seconds` interval, and
    at most `low_cap` of them at low priority (0: none reserved, full priority). The tolerance
    is how late a waiting caller may wake and still lose no slot (0.25 s of Polar's minute)."""
    window_us = round(window_seconds * 1_000_000)
    tolerance_us = int(window_us * tolerance_share)
    interval_us = -(-(window_us + tolerance_us) // max(1, allowance))  # ceil
    low_interval_us = -(-window_us // low_cap) if low_cap > 0 else 0
    return Pacing(interval_us, tolerance_us, low_interval_us)


@dataclass(frozen=True)
class SlotDecision:
    """`wait_us` is None when a slot was granted (then `tat_us`/`low_tat_us` are the new
    state to store), else how long until asking again makes sense (state unchanged)."""

    wait_us: int | None
    tat_us: int
    low_tat_us: int


def take_slot(
    tat_us: int,
    low_tat_us: int,
    now_us: int,
    pace: Pacing,
    *,
    low: bool = False,
    delivery_busy: bool = False,
) -> SlotDecision:
    """One GCRA step. Delivery (`low=False`) gets a slot when it is due (within the
    tolerance). A low-priority caller (reconcile) gets at most one per `low_interval_us` (its
    own cap per window, by the same argument with no tolerance), and then:
    - while delivery is not `delivery_busy` (its batches are not full: the budget is not what
      holds it back), a due slot like delivery's: it delays delivery by one slot at most;
    - while it is, only a slot delivery left unused (`tat <= now - interval`).
    Both draw from the same `tat`, so together they stay within the allowance."""
    if low:
        lead = pace.interval_us if delivery_busy else -pace.tolerance_us
        wait = max(tat_us + lead - now_us, low_tat_us - now_us)
        if wait > 0:
            return SlotDecision(wait, tat_us, low_tat_us)
        return SlotDecision(
            None, max(tat_us, now_us) + pace.interval_us, now_us + pace.low_interval_us
        )
    if tat_us - now_us > pace.tolerance_us:
        return SlotDecision(tat_us - pace.tolerance_us - now_us, tat_us, low_tat_us)
    return SlotDecision(None, max(tat_us, now_us) + pace.interval_us, low_tat_us)
