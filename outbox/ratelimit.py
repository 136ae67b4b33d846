"""One Polar request budget per minute for the whole organization, shared by every worker.

Polar counts requests per organization in a fixed 60-second window over all endpoints and
answers 429 (Retry-After: 60) past the limit (POLAR.md). So every process takes a slot from one
Redis counter per window before each request, keeping a safety margin under the limit; and a
429 seen by any worker pauses all of them until its Retry-After has passed. Window boundaries
come from Redis's clock (TIME inside the script), so workers with skewed clocks still agree.
Without Redis a worker falls back to a local share of the budget and says so in its log.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

import redis

from outbox.policy import window_allowance
from outbox.settings import Settings

log = logging.getLogger("outbox.ratelimit")

DEFAULT_LOCAL_SHARE_DIVISOR = 4

# KEYS[1]: the namespace. ARGV[1]: allowance per window, ARGV[2]: window length in seconds,
# ARGV[3]: 0, or the cap of a low-priority caller (see `low_priority_cap`).
# Returns {0, used} when a slot was taken, {1, ms} while paused, {2, ms} when the window is
# spent (ms: how long until trying again makes sense).
_ACQUIRE = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window_ms = tonumber(ARGV[2]) * 1000
local paused = redis.call('PTTL', KEYS[1] .. ':pause')
if paused > 0 then return {1, paused} end
local start = now_ms - (now_ms % window_ms)
local key = KEYS[1] .. ':window:' .. start
local cap = tonumber(ARGV[3] or '0')
if cap > 0 then
  local low_key = key .. ':low'
  local total = tonumber(redis.call('GET', key) or '0')
  local low = tonumber(redis.call('GET', low_key) or '0')
  if low >= cap or total >= math.max(cap, tonumber(ARGV[1]) - cap) then
    return {2, start + window_ms - now_ms}
  end
  redis.call('INCR', low_key)
  redis.call('PEXPIRE', low_key, window_ms * 2)
end
local used = redis.call('INCR', key)
if used == 1 then redis.call('PEXPIRE', key, window_ms * 2) end
if used > tonumber(ARGV[1]) then return {2, start + window_ms - now_ms} end
return {0, used}
"""

# KEYS[1]: the namespace. ARGV[1]: pause in ms. Extends a pause, never shortens it.
_PAUSE = """
local current = redis.call('PTTL', KEYS[1] .. ':pause')
if current < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1] .. ':pause', '1', 'PX', ARGV[1])
end
return 1
"""

# KEYS[1]: the namespace. ARGV[1]: window length. Returns {used in this window, pause ms}.
_PEEK = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window_ms = tonumber(ARGV[1]) * 1000
local start = now_ms - (now_ms % window_ms)
local used = tonumber(redis.call('GET', KEYS[1] .. ':window:' .. start) or '0')
return {used, math.max(0, redis.call('PTTL', KEYS[1] .. ':pause'))}
"""


def low_priority_cap(allowance: int, share: float | None) -> int:
    """Slots per window a low-priority caller (reconcile) may take: `share` of the allowance,
    at least 1; 0 means no cap (delivery). Such a caller also takes a slot only while the
    window has more than that cap left (or, in a tiny budget, nothing used beyond the cap),
    so it never eats into what delivery needs."""
    if share is None:
        return 0
    return max(1, int(allowance * share))


class RateBudget(Protocol):
    """A shared request budget. `acquire` returns None when a slot was taken, otherwise the
    seconds to wait before asking again (it waited up to `timeout` first). With `share`, the
    caller has low priority and a cap (`low_priority_cap`)."""

    def acquire(self, *, timeout: float, share: float | None = None) -> float | None: ...

    def pause(self, seconds: float) -> None: ...

    def used_this_window(self) -> int: ...

    def paused_for(self) -> float: ...


class _WaitingBudget:
    """`acquire` on top of a non-blocking `try_acquire`: wait while the wait fits in `timeout`."""

    sleep: Callable[[float], None]

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
            self.sleep(max(wait, 0.005))


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
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.client = client
        self.allowance = window_allowance(limit, margin)
        self.namespace = namespace
        self.window_seconds = window_seconds
        self.sleep = sleep
        self._acquire = client.register_script(_ACQUIRE)
        self._pause = client.register_script(_PAUSE)
        self._peek = client.register_script(_PEEK)

    def try_acquire(self, share: float | None = None) -> float | None:
        cap = low_priority_cap(self.allowance, share)
        status, value = self._acquire(
            keys=[self.namespace], args=[self.allowance, self.window_seconds, cap]
        )
        return None if int(status) == 0 else int(value) / 1000.0

    def pause(self, seconds: float) -> None:
        self._pause(keys=[self.namespace], args=[max(1, int(seconds * 1000))])

    def used_this_window(self) -> int:
        used, _ = self._peek(keys=[self.namespace], args=[self.window_seconds])
        return int(used)

    def paused_for(self) -> float:
        _, paused = self._peek(keys=[self.namespace], args=[self.window_seconds])
        return int(paused) / 1000.0


class LocalRateBudget(_WaitingBudget):
    """The same fixed-window budget inside one process (SQLite/`outbox dev`, or a fallback)."""

    def __init__(
        self,
        limit: int,
        *,
        margin: int | None = None,
        window_seconds: int = 60,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.allowance = window_allowance(limit, margin)
        self.window_seconds = window_seconds
        self.clock = clock
        self.sleep = sleep
        self._lock = threading.Lock()
        self._window = -1
        self._used = 0
        self._used_low = 0
        self._paused_until = 0.0

    def try_acquire(self, share: float | None = None) -> float | None:
        with self._lock:
            now = self.clock()
            if now < self._paused_until:
                return self._paused_until - now
            window = int(now // self.window_seconds)
            if window != self._window:
                self._window, self._used, self._used_low = window, 0, 0
            cap = low_priority_cap(self.allowance, share)
            if self._used >= self.allowance or (
                cap and (self._used_low >= cap or self._used >= max(cap, self.allowance - cap))
            ):
                return (window + 1) * self.window_seconds - now
            self._used += 1
            self._used_low += 1 if cap else 0
            return None

    def pause(self, seconds: float) -> None:
        with self._lock:
            self._paused_until = max(self._paused_until, self.clock() + seconds)

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
