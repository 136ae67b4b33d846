"""One Polar request budget for the whole organization, shared by every worker, paced.

Polar counts requests per organization in a fixed 60-second window over all endpoints and answers
429 (Retry-After: 60) past the limit (docs/explanation/polar.md); where its window starts is not
documented. So every process takes a slot from one Redis budget before each request, and the budget
hands slots out at a steady pace (GCRA, `outbox.policy.take_slot`): at most the allowance (the limit
minus a safety margin) in ANY interval of one window, however Polar's window is aligned, instead of
the whole allowance in the first second of a wall-clock minute. A 429 seen by any worker pauses all
of them until its Retry-After has passed. Time comes from Redis's clock (TIME inside the script), so
workers with skewed clocks still agree. Without Redis a worker falls back to a local, paced share of
the budget and says so in its log."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

import redis

from outbox.policy import PACING_TOLERANCE_SHARE, Pacing, pacing, take_slot, window_allowance
from outbox.settings import Settings

log = logging.getLogger("outbox.ratelimit")

DEFAULT_LOCAL_SHARE_DIVISOR = 4
BUSY_SECONDS = 5.0

# KEYS[1]: the namespace. ARGV[1]: interval, ARGV[2]: tolerance, ARGV[3]: 0, or the interval
# of a low-priority caller (all microseconds), ARGV[4]: window length in seconds (accounting).
# Mirrors `outbox.policy.take_slot` (tests/outbox/test_ratelimit.py checks they agree).
# Returns {0, slots granted in this fixed window, now in us} when a slot was taken, {1, ms}
# while paused, {2, ms} when no slot is due yet (ms: how long until asking again makes sense).
# Numbers are stored with %.0f: Lua's tostring would round microsecond epochs (%.14g).
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local paused = redis.call('PTTL', KEYS[1] .. ':pause')
if paused > 0 then return {1, paused} end
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local low_interval = tonumber(ARGV[3])
local tat_key = KEYS[1] .. ':tat'
local tat = tonumber(redis.call('GET', tat_key) or '0')
if low_interval > 0 then
  local low_key = KEYS[1] .. ':tat:low'
  local low_tat = tonumber(redis.call('GET', low_key) or '0')
  local lead = -tolerance
  if redis.call('EXISTS', KEYS[1] .. ':busy') == 1 then lead = interval end
  local wait = math.max(tat + lead - now, low_tat - now)
  if wait > 0 then return {2, math.ceil(wait / 1000)} end
  redis.call('SET', low_key, string.format('%.0f', now + low_interval), 'PX',
    math.ceil(low_interval / 1000) + 1000)
elseif tat - now > tolerance then
  return {2, math.ceil((tat - tolerance - now) / 1000)}
end
local next_tat = math.max(tat, now) + interval
redis.call('SET', tat_key, string.format('%.0f', next_tat), 'PX',
  math.ceil((next_tat - now) / 1000) + 1000)
local window_us = tonumber(ARGV[4]) * 1000000
local key = KEYS[1] .. ':window:' .. string.format('%.0f', now - (now % window_us))
local used = redis.call('INCR', key)
if used == 1 then redis.call('PEXPIRE', key, math.ceil(window_us / 500)) end
return {0, used, now}
"""

# KEYS[1]: the namespace. ARGV[1]: ms. Delivery's batches are full (the budget holds it back):
# low-priority callers take only slots delivery leaves unused for that long.
_BUSY = "redis.call('SET', KEYS[1] .. ':busy', '1', 'PX', ARGV[1]) return 1"

# KEYS[1]: the namespace. ARGV[1]: pause in ms. Extends a pause, never shortens it.
_PAUSE = """
local current = redis.call('PTTL', KEYS[1] .. ':pause')
if current < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1] .. ':pause', '1', 'PX', ARGV[1])
end
return 1
"""

# KEYS[1]: the namespace. ARGV[1]: window length in seconds. Returns {slots granted in this
# fixed window, pause ms}.
_PEEK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local window_us = tonumber(ARGV[1]) * 1000000
local key = KEYS[1] .. ':window:' .. string.format('%.0f', now - (now % window_us))
local used = tonumber(redis.call('GET', key) or '0')
return {used, math.max(0, redis.call('PTTL', KEYS[1] .. ':pause'))}
"""


def low_priority_cap(allowance: int, share: float | None) -> int:
    """Slots per window a low-priority caller (reconcile) may take: `share` of the allowance,
    at least 1; 0 means no cap (delivery). Such a caller also takes a slot only when delivery
    left a whole slot unused (`outbox.policy.take_slot`), so it never eats into what delivery
    needs."""
    if share is None:
        return 0
    return max(1, int(allowance * share))


class RateBudget(Protocol):
    """A shared request budget. `acquire` returns None when a slot was taken, otherwise the
    seconds to wait before asking again (it waited up to `timeout` first). With `share`, the
    caller has low priority and a cap (`low_priority_cap`). `granted_in_window`: slots
    granted in the current fixed window as of this process's last grant (for the gauge)."""

    @property
    def granted_in_window(self) -> int: ...

    def acquire(self, *, timeout: float, share: float | None = None) -> float | None: ...

    def pause(self, seconds: float) -> None: ...

    def delivery_busy(self) -> None:
        """Delivery sent a full batch: the budget is what holds it back, so low-priority
        callers get only slots it leaves unused, for the next `BUSY_SECONDS`."""

    def used_this_window(self) -> int: ...

    def paused_for(self) -> float: ...


class _WaitingBudget:
    """`acquire` on top of a non-blocking `try_acquire`: wait while the wait fits in `timeout`."""

    sleep: Callable[[float], None]
    granted_in_window: int = 0

    def try_acquire(self, share: float | None = None) -> float | None:
        raise NotImplementedError

    def acquire(self, *, timeout: float, share: float | None = None) -> float | None:
        deadline = time.monotonic() + timeout
        while True:
            wait = self.try_acquire(share)
            if wait is None:
                return None
            left = deadline - time.monotonic()
            if wait > left:
                return wait
            self.sleep(max(wait, 0.001))


class RedisRateBudget(_WaitingBudget):
    """The organization-wide budget in Redis (one instance, not a cluster)."""

    def __init__(
        self,
        client: redis.Redis,
        limit: int,
        *,
        margin: int | None = None,
        namespace: str = "outbox:polar",
        window_seconds: int = 60,
        tolerance_share: float = PACING_TOLERANCE_SHARE,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.client = client
        self.allowance = window_allowance(limit, margin)
        self.namespace = namespace
        self.window_seconds = window_seconds
        self.tolerance_share = tolerance_share
        self.sleep = sleep
        self.last_grant_us = 0  # Redis's clock at this process's last grant (tests read it)
        self._acquire = client.register_script(_ACQUIRE)
        self._pause = client.register_script(_PAUSE)
        self._busy = client.register_script(_BUSY)
        self._peek = client.register_script(_PEEK)

    def pacing(self, share: float | None = None) -> Pacing:
        return pacing(
            self.allowance,
            self.window_seconds,
            low_cap=low_priority_cap(self.allowance, share),
            tolerance_share=self.tolerance_share,
        )

    def try_acquire(self, share: float | None = None) -> float | None:
        pace = self.pacing(share)
        reply = self._acquire(
            keys=[self.namespace],
            args=[pace.interval_us, pace.tolerance_us, pace.low_interval_us, self.window_seconds],
        )
        if int(reply[0]) != 0:
            return int(reply[1]) / 1000.0
        self.granted_in_window = int(reply[1])
        self.last_grant_us = int(reply[2])
        return None

    def pause(self, seconds: float) -> None:
        self._pause(keys=[self.namespace], args=[max(1, int(seconds * 1000))])

    def delivery_busy(self) -> None:
        self._busy(keys=[self.namespace], args=[int(BUSY_SECONDS * 1000)])

    def used_this_window(self) -> int:
        used, _ = self._peek(keys=[self.namespace], args=[self.window_seconds])
        return int(used)

    def paused_for(self) -> float:
        _, paused = self._peek(keys=[self.namespace], args=[self.window_seconds])
        return int(paused) / 1000.0


class LocalRateBudget(_WaitingBudget):
    """The same paced budget inside one process (SQLite/`outbox dev`, or a fallback)."""

    def __init__(
        self,
        limit: int,
        *,
        margin: int | None = None,
        window_seconds: int = 60,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        tolerance_share: float = PACING_TOLERANCE_SHARE,
    ) -> None:
        self.allowance = window_allowance(limit, margin)
        self.window_seconds = window_seconds
        self.tolerance_share = tolerance_share  # as RedisRateBudget's
        self.clock = clock
        self.sleep = sleep
        self._lock = threading.Lock()
        self._tat_us = 0
        self._low_tat_us = 0
        self._window = -1
        self._used = 0
        self._paused_until = 0.0
        self._busy_until = 0.0

    def try_acquire(self, share: float | None = None) -> float | None:
        with self._lock:
            now = self.clock()
            if now < self._paused_until:
                return self._paused_until - now
            cap = low_priority_cap(self.allowance, share)
            pace = pacing(
                self.allowance,
                self.window_seconds,
                low_cap=cap,
                tolerance_share=self.tolerance_share,
            )
            now_us = int(now * 1_000_000)
            decision = take_slot(
                self._tat_us,
                self._low_tat_us,
                now_us,
                pace,
                low=cap > 0,
                delivery_busy=now < self._busy_until,
            )
            if decision.wait_us is not None:
                return decision.wait_us / 1_000_000
            self._tat_us, self._low_tat_us = decision.tat_us, decision.low_tat_us
            window = int(now // self.window_seconds)
            if window != self._window:
                self._window, self._used = window, 0
            self._used += 1
            self.granted_in_window = self._used
            return None

    def pause(self, seconds: float) -> None:
        with self._lock:
            self._paused_until = max(self._paused_until, self.clock() + seconds)

    def delivery_busy(self) -> None:
        with self._lock:
            self._busy_until = self.clock() + BUSY_SECONDS

    def used_this_window(self) -> int:
        with self._lock:
            window = int(self.clock() // self.window_seconds)
            return self._used if window == self._window else 0

    def paused_for(self) -> float:
        with self._lock:
            return max(0.0, self._paused_until - self.clock())


class FallbackRateBudget:
    """Redis when it answers; otherwise this worker's local share (limit / divisor), with a
    warning at most once a minute. Goes back to Redis as soon as it answers again."""

    def __init__(self, primary: RedisRateBudget, fallback: LocalRateBudget) -> None:
        self.primary = primary
        self.fallback = fallback
        self.degraded = False
        self._last_warning = 0.0

    @property
    def granted_in_window(self) -> int:
        return (self.fallback if self.degraded else self.primary).granted_in_window

    def _failed(self, exc: Exception) -> None:
        self.degraded = True
        now = time.monotonic()
        if now - self._last_warning > 60:
            self._last_warning = now
            log.warning(
                "Redis unreachable (%s): using this worker's local share of the Polar budget "
                "(%d requests/minute)",
                type(exc).__name__,
                self.fallback.allowance,
            )

    def acquire(self, *, timeout: float, share: float | None = None) -> float | None:
        try:
            result = self.primary.acquire(timeout=timeout, share=share)
        except redis.RedisError as exc:
            self._failed(exc)
            return self.fallback.acquire(timeout=timeout, share=share)
        if self.degraded:
            self.degraded = False
            log.info("Redis is back: the shared Polar budget is in use again")
        return result

    def pause(self, seconds: float) -> None:
        self.fallback.pause(seconds)
        try:
            self.primary.pause(seconds)
        except redis.RedisError as exc:
            self._failed(exc)

    def delivery_busy(self) -> None:
        self.fallback.delivery_busy()
        try:
            self.primary.delivery_busy()
        except redis.RedisError as exc:
            self._failed(exc)

    def used_this_window(self) -> int:
        try:
            return self.primary.used_this_window()
        except redis.RedisError:
            return self.fallback.used_this_window()

    def paused_for(self) -> float:
        try:
            return max(self.primary.paused_for(), self.fallback.paused_for())
        except redis.RedisError:
            return self.fallback.paused_for()


def make_budget(
    settings: Settings,
    redis_client: redis.Redis | None = None,
    *,
    local_share_divisor: int = DEFAULT_LOCAL_SHARE_DIVISOR,
) -> RateBudget:
    """The budget for this process: local for SQLite (`outbox dev` is one process), else the
    shared Redis budget with a local fallback."""
    limit = settings.requests_per_minute
    if settings.is_sqlite and redis_client is None:
        return LocalRateBudget(limit, window_seconds=settings.polar_rate_window_seconds)
    client = redis_client or redis.Redis.from_url(
        settings.redis_url, socket_connect_timeout=1, socket_timeout=2
    )
    namespace = f"outbox:polar:{settings.polar_environment}"
    window = settings.polar_rate_window_seconds
    return FallbackRateBudget(
        RedisRateBudget(client, limit, namespace=namespace, window_seconds=window),
        LocalRateBudget(max(1, limit // local_share_divisor), margin=0, window_seconds=window),
    )
