"""The Polar wrapper: the ONLY place that knows polar-sdk's exception types.

`PolarGateway.ingest` never raises for Polar or network faults: it returns an `IngestResult`
sorted into one `Outcome`, and the delivery code decides what each means for the rows.
Every HTTP attempt first takes a slot of the shared rate budget; a 429 pauses every worker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import httpx
from polar.base import (
    PolarClientError,
    PolarDeserializationError,
    PolarError,
    PolarNetworkError,
    PolarRateLimitError,
    PolarServerError,
)
from polar.v2026_10 import Polar
from polar.v2026_10.client import SERVERS
from polar.v2026_10.errors import HTTPValidationError
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from outbox import metrics
from outbox.errors import ConfigError
from outbox.logs import redact
from outbox.polar.ratelimit import RateBudget, make_budget
from outbox.policy import BatchRejections, parse_batch_rejections
from outbox.settings import Settings, get_settings

log = logging.getLogger("outbox.polar")

IN_CALL_ATTEMPTS = 3
BUDGET_WAIT_SECONDS = 5.0
# A low-priority caller that waits longer than this for a slot is told so (`on_budget_wait`),
# and again after each as long.
BUDGET_WAIT_REPORT_SECONDS = 10.0
EVENTS_PAGE_SIZE = 100
# The metadata key that carries an event's `external_id` (globally unique) back to reconcile.
USAGE_KEY_FIELD = "usage_external_id"
# Polar refuses an ingest body over 10 MiB (413). A request is cut at half of it, whatever the
# events' metadata: the largest metadata the API admits makes an event ~150 KB of JSON, so a
# batch's byte size, not its count, is what binds then (docs/scaling.md).
POLAR_MAX_BODY_BYTES = 10 * 1024 * 1024
MAX_INGEST_BODY_BYTES = POLAR_MAX_BODY_BYTES // 2


class Outcome(StrEnum):
    OK = "ok"
    TRANSIENT = "transient"
    RATE_LIMITED = "rate_limited"
    AUTH = "auth"
    REJECTED = "rejected"


@dataclasses.dataclass(frozen=True)
class IngestResult:
    outcome: Outcome
    inserted: int = 0
    duplicates: int = 0
    retry_after: float | None = None
    status_code: int | None = None
    message: str = ""
    rejections: BatchRejections | None = None


def build_event(
    *,
    name: str,
    customer_id: str,
    external_id: str,
    occurred_at: datetime,
    metadata: Mapping[str, str | int | float | bool],
    credits_field: str,
    credits: int,
    usage_id: str,
) -> dict[str, Any]:
    """One Polar event: `credits_used` an int (a sum meter ignores strings and booleans), our
    event id as `usage_id` and the `external_id` again as `usage_external_id` (Polar's event
    list does not return `external_id`; reconcile matches on it), a tz-aware timestamp."""
    if occurred_at.tzinfo is None:
        raise ValueError("occurred_at must be timezone-aware")
    return {
        "name": name,
        "external_customer_id": customer_id,
        "external_id": external_id,
        "timestamp": occurred_at.astimezone(UTC).isoformat(),
        "metadata": {
            **metadata,
            credits_field: int(credits),
            "usage_id": str(usage_id),
            USAGE_KEY_FIELD: external_id,
        },
    }


def _json_bytes(value: Any) -> int:
    # As the SDK's HTTP client encodes a body (httpx: compact, not ASCII-escaped, UTF-8).
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return len(text.encode())


def events_that_fit(events: list[dict[str, Any]], max_bytes: int = MAX_INGEST_BODY_BYTES) -> int:
    """How many of `events`, from the first, one ingest request can carry within `max_bytes`
    of body; always at least one (an event alone is far below the limit)."""
    if _json_bytes({"events": events}) <= max_bytes:
        return len(events)
    size = len('{"events":[]}')
    for count, event in enumerate(events):
        size += _json_bytes(event) + (1 if count else 0)  # the comma before it
        if size > max_bytes:
            return max(count, 1)
    return len(events)


def _detail_of(exc: HTTPValidationError) -> list[dict[str, Any]]:
    detail = getattr(exc.error, "detail", None) or []
    out = []
    for item in detail:
        if isinstance(item, dict):
            out.append(item)
        else:
            out.append(
                {
                    "loc": list(getattr(item, "loc", None) or []),
                    "msg": getattr(item, "msg", ""),
                    "type": getattr(item, "type", ""),
                }
            )
    return out


def classify_failure(exc: BaseException, batch_len: int, secret: str | None = None) -> IngestResult:
    """Sort any failure of an ingest call into one outcome (the one place that does)."""
    text = redact(str(exc), secret)[:1000]
    if isinstance(exc, PolarRateLimitError):
        return IngestResult(
            Outcome.RATE_LIMITED,
            retry_after=float(exc.retry_after) if exc.retry_after is not None else 60.0,
            status_code=429,
            message="429 rate limited by Polar",
        )
    if isinstance(exc, HTTPValidationError):
        rejections = parse_batch_rejections(_detail_of(exc), batch_len)
        return IngestResult(
            Outcome.REJECTED, status_code=422, message=f"422: {text}", rejections=rejections
        )
    if isinstance(exc, PolarClientError):
        status = exc.status_code
        if status in (401, 403):
            return IngestResult(
                Outcome.AUTH, status_code=status, message=f"{status}: Polar refused the token"
            )
        hint = " (body over Polar's 10 MiB)" if status == 413 else ""
        return IngestResult(
            Outcome.TRANSIENT, status_code=status, message=f"{status}{hint}: {text}"
        )
    if isinstance(exc, PolarServerError):
        return IngestResult(
            Outcome.TRANSIENT, status_code=exc.status_code, message=f"{exc.status_code}: {text}"
        )
    if isinstance(exc, PolarNetworkError):
        return IngestResult(Outcome.TRANSIENT, message=f"network error: {text}")
    if isinstance(exc, PolarDeserializationError):
        return IngestResult(Outcome.TRANSIENT, message=f"unreadable answer from Polar: {text}")
    return IngestResult(Outcome.TRANSIENT, message=f"{type(exc).__name__}: {text}")


def _parse_time(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def describe_failure(exc: BaseException, secret: str | None = None) -> str:
    """One line for an operator: what Polar (or the network) answered to a read."""
    if isinstance(exc, BudgetWait):
        return str(exc)
    if isinstance(exc, PolarServerError) or (
        isinstance(exc, PolarClientError) and not isinstance(exc, PolarRateLimitError)
    ):
        text = str(exc).split(" - ", 1)[-1]
        text = " ".join(redact(text, secret).split())[:200]
        return f"Polar answered {exc.status_code}: {text}"
    return " ".join(classify_failure(exc, 0, secret).message.split())[:300]


def _retry_in_call(exc: BaseException) -> bool:
    """Worth a quick second try inside the call: no answer, or a 5xx."""
    return isinstance(exc, PolarNetworkError | PolarServerError)


class BudgetWait(Exception):
    """The shared rate budget has no slot now."""

    def __init__(self, wait: float) -> None:
        super().__init__(f"rate budget spent; retry in {wait:.1f} s")
        self.wait = wait


class PolarGateway:
    """One per process (see `get_gateway`): the SDK client, the rate budget, auth state."""

    def __init__(
        self,
        settings: Settings,
        *,
        budget: RateBudget | None = None,
        budget_share: float | None = None,
    ) -> None:
        """`budget_share`: spend the budget at low priority, capped at that share of each
        window (reconcile); None: delivery's full priority."""
        if not settings.polar_access_token:
            raise ConfigError(
                "POLAR_ACCESS_TOKEN is not set: create an organization access token in Polar"
            )
        self.settings = settings
        self._token = settings.polar_access_token
        self.budget = budget or make_budget(settings)
        self.budget_share = budget_share
        # Delivery gives up quickly (the row goes back to pending); a low-priority reader
        # (reconcile) waits for its share, up to two windows.
        self.budget_wait_seconds = (
            BUDGET_WAIT_SECONDS
            if budget_share is None
            else 2.0 * settings.polar_rate_window_seconds + 1
        )
        self.client = Polar(
            settings.polar_access_token,
            environment=settings.polar_environment,
            base_url=settings.polar_base_url,
            timeout=settings.polar_timeout_seconds,
        )
        self.credentials_ok: bool | None = None
        self.requests = 0  # HTTP requests sent (reconcile reports what it spent)
        # A caller's own deadline (time.monotonic()): no slot is waited for past it.
        self.deadline: float | None = None
        self.deadline_passed = False  # the last wait for a slot gave up for that deadline
        # Told (seconds waited so far, seconds still to wait at least, why) while a slot is
        # long in coming (reconcile).
        self.on_budget_wait: Callable[[float, float, str], None] | None = None

    def _spend(self) -> None:
        started = time.perf_counter()
        if self.deadline is None and self.on_budget_wait is None:
            wait = self.budget.acquire(timeout=self.budget_wait_seconds, share=self.budget_share)
            if wait is not None:
                raise BudgetWait(wait)
        else:
            self._wait_for_slot()
        metrics.RATE_SLOT_WAIT.observe(time.perf_counter() - started)
        metrics.RATE_BUDGET_SLOTS.labels("delivery" if self.budget_share is None else "low").inc()
        metrics.RATE_BUDGET_USED.set(self.budget.granted_in_window)

    def _wait_for_slot(self) -> None:
        """`_spend`'s wait, up to the caller's deadline, saying why every
        BUDGET_WAIT_REPORT_SECONDS. Raises `BudgetWait` when no slot comes in time."""
        start = time.monotonic()
        give_up = start + self.budget_wait_seconds
        if self.deadline is not None:
            give_up = min(give_up, self.deadline)
        self.deadline_passed = False
        reported = start
        while True:
            left = give_up - time.monotonic()
            step = max(0.0, min(left, BUDGET_WAIT_REPORT_SECONDS))
            wait = self.budget.acquire(timeout=step, share=self.budget_share)
            if wait is None:
                return
            now = time.monotonic()
            giving_up = now + wait > give_up
            # Said at once when the wait will be long, then every BUDGET_WAIT_REPORT_SECONDS.
            if self.on_budget_wait is not None and (
                giving_up or now + wait - reported >= BUDGET_WAIT_REPORT_SECONDS
            ):
                self.on_budget_wait(now - start, wait, self._why_no_slot())
                reported = now
            if giving_up:
                self.deadline_passed = give_up == self.deadline
                raise BudgetWait(wait)
            time.sleep(min(wait, BUDGET_WAIT_REPORT_SECONDS))

    def _why_no_slot(self) -> str:
        paused = self.budget.paused_for()
        if paused > 0:
            return f"Polar answered 429: every process waits {paused:.0f} s more"
        if self.budget_share is None:
            return "the shared request budget is spent for now"
        return (
            f"delivery goes first (requests spent in this rate window: "
            f"{self.budget.used_this_window()}); reconcile takes at most "
            f"{self.budget_share:.0%} of a window "
            "(RECONCILE_BUDGET_SHARE), and while delivery's batches are full only the slots "
            "it leaves"
        )

    def take_slot(self) -> float | None:
        """Take the slot of the next request now, waiting for it up to the budget's wait:
        None when taken (pass `slot_taken=True` to the call that spends it), else the
        seconds until one is free."""
        try:
            self._spend()
        except BudgetWait as wait:
            return wait.wait
        return None

    def _call(self, fn: Any, /, *, slot_taken: bool = False, **kwargs: Any) -> Any:
        """Spend a slot, call, and retry briefly on no-answer/5xx (each try spends a slot;
        the first one spends the slot already taken when `slot_taken`)."""
        have_slot = [slot_taken]

        def attempt() -> Any:
            if have_slot[0]:
                have_slot[0] = False
            else:
                self._spend()
            self.requests += 1
            try:
                return fn(**kwargs)
            except PolarRateLimitError as exc:
                self.budget.pause(float(exc.retry_after or 60))
                raise

        def log_retry(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.info("retrying Polar call: %s", redact(str(exc), self._token)[:200])

        for try_ in Retrying(
            retry=retry_if_exception(_retry_in_call),
            stop=stop_after_attempt(IN_CALL_ATTEMPTS),
            wait=wait_random_exponential(multiplier=0.05, max=1.0),
            reraise=True,
            before_sleep=log_retry,
        ):
            with try_:
                return attempt()
        raise AssertionError("unreachable")  # pragma: no cover

    def ingest(self, events: list[dict[str, Any]], *, slot_taken: bool = False) -> IngestResult:
        """Send one batch (after `take_slot` when `slot_taken`). Never raises for Polar,
        network or budget faults."""
        metrics.BATCH_EVENTS.observe(len(events))
        try:
            response = self._call(self.client.events.ingest, slot_taken=slot_taken, events=events)
        except BudgetWait as wait:
            return IngestResult(Outcome.RATE_LIMITED, retry_after=wait.wait, message=str(wait))
        except Exception as exc:
            result = classify_failure(exc, len(events), self._token)
            if result.outcome is Outcome.AUTH:
                self.credentials_ok = False
            return result
        self.credentials_ok = True
        return IngestResult(
            Outcome.OK,
            inserted=int(response.inserted),
            duplicates=int(response.duplicates),
            status_code=200,  # the SDK returns the body of Polar's 200 only
        )

    def list_events(
        self,
        *,
        external_customer_id: str | list[str] | None,
        name: str,
        start: datetime | None,
        end: datetime | None,
        metadata: dict[str, str] | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Polar's events, page by page (each page spends the budget). Raises on failure."""
        page = 1
        while True:
            result = self._call(
                self.client.events.list,
                external_customer_id=external_customer_id,
                name=name,
                start_timestamp=start.astimezone(UTC).isoformat() if start else None,
                end_timestamp=end.astimezone(UTC).isoformat() if end else None,
                metadata=metadata,
                page=page,
                limit=EVENTS_PAGE_SIZE,
            )
            for item in result.items:
                data = dataclasses.asdict(item)
                timestamp = data.get("timestamp")
                if isinstance(timestamp, str):
                    data["timestamp"] = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
                yield data
            max_page = getattr(getattr(result, "pagination", None), "max_page", page)
            if page >= (max_page or page) or not result.items:
                return
            page += 1

    def meter_quantities(
        self,
        meter_id: str,
        *,
        start: datetime,
        end: datetime,
        interval: str,
        external_customer_ids: list[str],
    ) -> list[tuple[datetime, float]]:
        """One request: the meter's total per `interval` bucket for these customers, one row
        per bucket from `start`'s to `end`'s (both inclusive). Raises on failure."""
        result = self._call(
            self.client.meters.quantities,
            id=meter_id,
            start_timestamp=start.astimezone(UTC).isoformat(),
            end_timestamp=end.astimezone(UTC).isoformat(),
            interval=interval,
            external_customer_id=external_customer_ids,
        )
        self.credentials_ok = True
        return [(_parse_time(q.timestamp), float(q.quantity)) for q in result.quantities or []]

    def _get_json(self, path: str, **params: Any) -> Any:
        """A raw GET: for the few fields `outbox doctor` reads we skip the SDK's strict models
        (they refuse payloads with fields newer than the SDK, as webhooks do)."""
        base = self.settings.polar_base_url or SERVERS[self.settings.polar_environment]
        self._spend()
        self.requests += 1
        response = httpx.get(
            base.rstrip("/") + path,
            params=params,
            headers={"Authorization": f"Bearer {self._token}"},
            timeout=self.settings.polar_timeout_seconds,
        )
        if response.status_code == 429:
            self.budget.pause(float(response.headers.get("Retry-After", "60") or 60))
        if response.status_code in (401, 403):
            self.credentials_ok = False
        return response

    def list_meters(self) -> list[dict[str, Any]]:
        """Every meter of the organization (for `outbox doctor`). Raises on failure."""
        response = self._get_json("/v1/meters/", limit=100)
        if response.status_code != 200:
            raise PolarClientError(response.status_code, response.text[:500])
        self.credentials_ok = True
        return list(response.json().get("items") or [])

    def get_product(self, product_id: str) -> dict[str, Any] | None:
        """A product, or None if Polar does not know it. Raises on other failures."""
        response = self._get_json(f"/v1/products/{product_id}")
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise PolarClientError(response.status_code, response.text[:500])
        return dict(response.json())

    def close(self) -> None:
        with contextlib.suppress(PolarError, OSError):
            self.client.__exit__(None, None, None)


_lock = threading.Lock()
_gateway: tuple[int, PolarGateway] | None = None


def get_gateway(settings: Settings | None = None) -> PolarGateway:
    """This process's gateway, made on first use (and again after a fork)."""
    global _gateway
    with _lock:
        if _gateway is None or _gateway[0] != os.getpid():
            _gateway = (os.getpid(), PolarGateway(settings or get_settings()))
        return _gateway[1]


def close_gateway() -> None:
    """Close this process's gateway (shutdown, tests)."""
    global _gateway
    with _lock:
        if _gateway is not None and _gateway[0] == os.getpid():
            _gateway[1].close()
        _gateway = None
