"""Delivery: claim a batch, send it to Polar in ONE request, settle every row by its outcome.

The rules (docs/state_machine.md; what Polar does: docs/explanation/polar.md):
- OK → delivered (inserted or duplicate: Polar dedups on `external_id`, so a resend is free).
- Network error, timeout, 5xx, an unattributable 4xx → pending with backoff; counts an attempt.
  A 500 also halves the claims of this worker process for a while (`outbox.delivery.sizer`):
  Polar's server fails batches past its meter-row limit with a 500.
- A slot of the shared, paced rate budget first, then the claim (docs/explanation/pacing.md):
  no slot within the budget's wait → nothing is claimed, the rows stay due.
- A request carries at most OUTBOX_BATCH_SIZE events and half of Polar's 10 MiB body limit:
  claimed rows past that (big metadata) go back to pending as they were, no attempt spent.
- 429 → pending after Retry-After (and every worker paused as long); not the events' fault,
  no attempt.
- 422 naming events → those rows failed with Polar's message (poison); the rest resent at once,
  and again if the resend is refused for other events (Polar validates in two stages), bounded.
  An event is judged only by the errors of the union variant we send (`outbox.policy`).
- 422 "timestamp must be in the past" → pending shortly (clock skew); never dead-lettered,
  whatever else Polar lists beside it.
- 422 naming no event we can attribute → the whole batch pending with backoff (an attempt),
  loudly: an ERROR log line, a metric, a detail in /readyz. No row is failed as poison; like
  any repeated fault, a row fails after OUTBOX_MAX_ATTEMPTS such attempts.
- 401/403 → every row back to pending, no attempt; delivery pauses and says so (flag in the
  database for /readyz, a log line at ERROR, a metric) until the credentials work again.

No transaction is held open while Polar is called: the claim commits first (the lease is what
protects the rows), the outcome is settled in a second short transaction.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from http import HTTPStatus

from sqlalchemy.orm import Session, sessionmaker

from outbox import metrics
from outbox.db import session_scope
from outbox.delivery.sizer import BatchSizer
from outbox.events import (
    ClaimedEvent,
    claim_batch,
    fail_if_claimed,
    has_due,
    mark_delivered_if_claimed,
    new_claim_token,
    release_if_claimed,
    rescue_expired_leases,
    retry_later_if_claimed,
    unclaim_if_claimed,
)
from outbox.models import utcnow
from outbox.polar.gateway import IngestResult, Outcome, PolarGateway, build_event, events_that_fit
from outbox.service_state import (
    CREDENTIALS_OK,
    CREDENTIALS_REJECTED,
    INGEST_OK,
    INGEST_UNATTRIBUTED_422,
    POLAR_CREDENTIALS,
    POLAR_INGEST,
    record_drain,
    set_state,
)
from outbox.settings import Settings

log = logging.getLogger("outbox.delivery")

# A 422 can only name events of the batch it refused; each resend drops at least one row,
# but a pathological Polar could keep refusing: give up the round after this many resends.
MAX_REJECTION_ROUNDS = 8
FUTURE_TIMESTAMP_RETRY_SECONDS = 1.0
AUTH_PAUSE_SECONDS = 30.0
HEARTBEAT_SECONDS = 5.0


@dataclass
class BatchReport:
    """What one batch did; `pause_seconds` > 0 asks the drainer to wait before the next one."""

    batch_id: str
    claimed: int = 0
    delivered: int = 0
    failed: int = 0
    retried: int = 0
    inserted: int = 0
    duplicates: int = 0
    requests: int = 0
    pause_seconds: float = 0.0
    outcomes: list[str] = field(default_factory=list)


def to_polar_event(event: ClaimedEvent, settings: Settings) -> dict[str, object]:
    """The Polar event for a claimed row: name, external ids, timestamp, metadata
    (docs/glossary.md, "usage event"). A compensating event goes as written: its negative
    credits, its own external_id, the usage's external_id under `refund_of` in its metadata
    (docs/explanation/corrections.md)."""
    return build_event(
        name=event.name,
        customer_id=event.customer_id,
        external_id=event.external_id,
        occurred_at=event.occurred_at,
        metadata=event.metadata,
        credits_field=settings.usage_credits_field,
        credits=event.credits,
        usage_id=str(event.id),
    )


class Deliverer:
    """Delivers batches for one worker process; cheap to build, holds no connection itself."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        gateway: PolarGateway,
        settings: Settings,
        *,
        worker_id: str | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.sessions = sessions
        self.gateway = gateway
        self.settings = settings
        self.worker_id = worker_id or f"worker-{uuid.uuid4().hex[:8]}"
        self.rng = rng or random.Random()
        self.clock = clock
        self._credentials_ok: bool | None = None
        self._unattributed_422: bool | None = None
        self._last_heartbeat = float("-inf")
        self.sizer = BatchSizer(settings.outbox_batch_size)

    # -- transactions -----------------------------------------------------------------------

    def _run(self, fn: Callable[[Session], int]) -> int:
        with session_scope(self.sessions) as session:
            return fn(session)

    # -- the batch --------------------------------------------------------------------------

    def claim(self, owner: str) -> list[ClaimedEvent]:
        """Lease the next batch to `owner` (committed before anything is sent)."""
        now = self.clock()
        hold_back = now - timedelta(seconds=self.settings.outbox_clock_margin_seconds)
        with session_scope(self.sessions) as session:
            return claim_batch(
                session,
                owner=owner,
                limit=self.sizer.cap,
                now=now,
                lease_seconds=self.settings.outbox_lease_seconds,
                hold_back_until=hold_back,
            )

    def has_due(self) -> bool:
        """Whether a row is due now (a cheap look, no lock: the claim decides)."""
        now = self.clock()
        hold_back = now - timedelta(seconds=self.settings.outbox_clock_margin_seconds)
        with session_scope(self.sessions) as session:
            return has_due(session, now=now, hold_back_until=hold_back)

    def rescue(self) -> int:
        """Make rows of lost workers (expired leases) claimable again."""
        now = self.clock()
        rescued = self._run(
            lambda s: rescue_expired_leases(
                s, now=now, max_attempts=self.settings.outbox_max_attempts
            )
        )
        if rescued:
            log.warning("rescued rows from expired leases", extra={"rows": rescued})
            metrics.RESCUED.inc(rescued)
        return rescued

    def deliver_batch(self) -> BatchReport:
        """Claim one batch and deliver it; settle every row. Never raises for Polar faults."""
        owner = new_claim_token(self.worker_id)
        report = BatchReport(batch_id=owner)
        if not self.has_due():
            return report
        # The slot first, the claim once it is granted: while the budget is the bottleneck,
        # the wait for the slot is what fills the batch (every row that became due meanwhile
        # goes in it, up to OUTBOX_BATCH_SIZE); when it is not, the slot is free at once and a
        # lone usage goes immediately. No row waits leased to a worker that waits.
        wait = self.gateway.take_slot()
        if wait is not None:
            report.pause_seconds = wait  # nothing claimed: the rows stay due, no attempt
            report.outcomes.append(Outcome.RATE_LIMITED.value)
            return report
        pending = self.claim(owner)
        report.claimed = len(pending)
        if not pending:  # another worker took them while this one waited for its slot
            metrics.RATE_BUDGET_SLOTS_UNUSED.inc()
            return report
        if len(pending) >= self.sizer.cap:
            self.gateway.budget.delivery_busy()  # reconcile steps back while batches are full
        events = [to_polar_event(event, self.settings) for event in pending]
        fits = events_that_fit(events)
        if fits < len(pending):
            # Big metadata: the rest would take the body past Polar's limit. They are due
            # again at once, for the next request.
            now = self.clock()
            rest = [e.id for e in pending[fits:]]
            report.claimed -= self._run(
                lambda s: unclaim_if_claimed(s, ids=rest, owner=owner, now=now)
            )
            pending, events = pending[:fits], events[:fits]
        slot_taken = True
        for _ in range(MAX_REJECTION_ROUNDS):
            started = time.perf_counter()
            result = self.gateway.ingest(events, slot_taken=slot_taken)
            slot_taken = False
            metrics.POLAR_REQUEST_SECONDS.observe(time.perf_counter() - started)
            report.requests += 1
            report.outcomes.append(result.outcome.value)
            metrics.POLAR_OUTCOMES.labels(result.outcome.value).inc()
            if result.outcome is Outcome.OK:
                self.sizer.accepted()
            elif result.status_code == HTTPStatus.INTERNAL_SERVER_ERROR:
                self.sizer.server_error(len(events))
            pending = self._settle(owner, pending, result, report)
            if not pending:
                break
            events = [to_polar_event(event, self.settings) for event in pending]
        else:
            moved, failed = self._retry(
                owner, pending, "Polar kept refusing the batch; will retry", count_attempt=True
            )
            report.retried += moved
            report.failed += failed
        self._log(report)
        return report

    # -- settling ----------------------------------------------------------------------------

    def _settle(
        self,
        owner: str,
        pending: list[ClaimedEvent],
        result: IngestResult,
        report: BatchReport,
    ) -> list[ClaimedEvent]:
        """Settle `pending` by `result`; return the rows to resend at once (after a 422)."""
        outcome = result.outcome
        if outcome is Outcome.OK:
            now = self.clock()
            delivered = self._run(
                lambda s: mark_delivered_if_claimed(
                    s,
                    ids=[e.id for e in pending],
                    owner=owner,
                    now=now,
                    polar_status=result.status_code,
                )
            )
            report.delivered += delivered
            report.inserted += result.inserted
            report.duplicates += result.duplicates
            metrics.observe_delivered(pending, now)
            self._credentials(True, None)
            self._ingest_alert(None)
            return []
        if outcome is Outcome.AUTH:
            now = self.clock()
            self._run(
                lambda s: release_if_claimed(
                    s,
                    ids=[e.id for e in pending],
                    owner=owner,
                    now=now,
                    delay_seconds=AUTH_PAUSE_SECONDS,
                    polar_status=result.status_code,
                    message=result.message or None,
                )
            )
            report.pause_seconds = AUTH_PAUSE_SECONDS
            self._credentials(False, result.message)
            return []
        if outcome is Outcome.RATE_LIMITED:
            moved, _ = self._retry(
                owner,
                pending,
                result.message or "rate limited",
                count_attempt=False,
                retry_after=result.retry_after,
                polar_status=result.status_code,
            )
            report.retried += moved
            report.pause_seconds = max(report.pause_seconds, result.retry_after or 1.0)
            return []
        if outcome is Outcome.REJECTED and result.rejections is not None:
            return self._settle_rejections(owner, pending, result, report)
        # TRANSIENT (or a REJECTED without indexes): the batch's fault or Polar's, retry it.
        moved, failed = self._retry(
            owner,
            pending,
            result.message or "transient error",
            count_attempt=True,
            retry_after=result.retry_after,
            polar_status=result.status_code,
        )
        report.retried += moved
        report.failed += failed
        return []

    def _settle_rejections(
        self,
        owner: str,
        pending: list[ClaimedEvent],
        result: IngestResult,
        report: BatchReport,
    ) -> list[ClaimedEvent]:
        rejections = result.rejections
        assert rejections is not None
        poison = {pending[i].id: msg for i, msg in rejections.poison.items() if i < len(pending)}
        early = [
            pending[i]
            for i in sorted(rejections.future_timestamp)
            if i < len(pending) and pending[i].id not in poison
        ]
        if rejections.unattributed or (not poison and not early):
            # We cannot tell which event Polar means (or whether our indexes are its indexes):
            # failing the batch would dead-letter good usage. Retry it, and say so loudly.
            reasons = rejections.unattributed or ("a 422 listing no error",)
            detail = f"{len(pending)} events, Polar said: {'; '.join(reasons)}"[:1000]
            log.error(
                "Polar refused a batch with a 422 that names no event of it: the batch is "
                "retried with backoff (rows fail only after OUTBOX_MAX_ATTEMPTS). Check what we "
                "send (a Polar API change?) in the reasons.",
                extra={"batch_id": owner, "events": len(pending), "reasons": list(reasons)},
            )
            metrics.UNATTRIBUTED_REJECTIONS.inc()
            self._ingest_alert(detail)
            moved, failed = self._retry(
                owner,
                pending,
                f"422 naming no event: {detail}",
                count_attempt=True,
                polar_status=result.status_code,
            )
            report.retried += moved
            report.failed += failed
            return []
        if poison:
            now = self.clock()
            failed = self._run(
                lambda s: fail_if_claimed(
                    s, errors=poison, owner=owner, now=now, polar_status=result.status_code
                )
            )
            report.failed += failed
            metrics.POISON_EVENTS.inc(failed)
            log.warning(
                "Polar refused events; they are failed (see `outbox failed`)",
                extra={"batch_id": owner, "event_ids": sorted(poison), "reasons": poison},
            )
        if early:
            moved, _ = self._retry(
                owner,
                early,
                "Polar says the timestamp is in its future (clock skew); retrying",
                count_attempt=False,
                retry_after=FUTURE_TIMESTAMP_RETRY_SECONDS,
                polar_status=result.status_code,
            )
            report.retried += moved
        settled = set(poison) | {e.id for e in early}
        return [e for e in pending if e.id not in settled]

    def _retry(
        self,
        owner: str,
        events: Sequence[ClaimedEvent],
        error: str,
        *,
        count_attempt: bool,
        retry_after: float | None = None,
        polar_status: int | None = None,
    ) -> tuple[int, int]:
        now = self.clock()
        with session_scope(self.sessions) as session:
            return retry_later_if_claimed(
                session,
                events=events,
                owner=owner,
                now=now,
                error=error,
                rng=self.rng,
                max_attempts=self.settings.outbox_max_attempts,
                retry_after=retry_after,
                count_attempt=count_attempt,
                backoff_base=self.settings.outbox_backoff_base_seconds,
                backoff_cap=self.settings.outbox_backoff_cap_seconds,
                polar_status=polar_status,
            )

    def _credentials(self, ok: bool, detail: str | None) -> None:
        """Record whether Polar accepts our token: loud on the change, quiet otherwise."""
        metrics.POLAR_AUTH_OK.set(1 if ok else 0)
        if self._credentials_ok is ok:
            return
        self._credentials_ok = ok
        if ok:
            log.info("Polar accepts the access token; delivery is running")
        else:
            log.error(
                "Polar REJECTED the access token (401/403): delivery is paused, no row is "
                "failed. Fix POLAR_ACCESS_TOKEN; delivery resumes by itself.",
                extra={"detail": detail},
            )
        with session_scope(self.sessions) as session:
            set_state(
                session, POLAR_CREDENTIALS, CREDENTIALS_OK if ok else CREDENTIALS_REJECTED, detail
            )

    def _ingest_alert(self, detail: str | None) -> None:
        """Record (for /readyz) that Polar refuses our batches without naming an event, or
        that a batch went through again (written on the change only)."""
        alert = detail is not None
        if self._unattributed_422 is False and not alert:
            return
        self._unattributed_422 = alert
        with session_scope(self.sessions) as session:
            set_state(
                session, POLAR_INGEST, INGEST_UNATTRIBUTED_422 if alert else INGEST_OK, detail
            )

    def heartbeat(self, delivered: int) -> None:
        """Record a finished drain and that this worker is alive (the console's overview,
        `outbox status`): at most every HEARTBEAT_SECONDS (every second while rows are
        delivered), so busy workers do not queue on its row."""
        now = time.monotonic()
        if now - self._last_heartbeat < (1.0 if delivered else HEARTBEAT_SECONDS):
            return
        self._last_heartbeat = now
        with session_scope(self.sessions) as session:
            record_drain(session, self.worker_id, delivered)

    def _log(self, report: BatchReport) -> None:
        log.info(
            "batch settled",
            extra={
                "batch_id": report.batch_id,
                "claimed": report.claimed,
                "delivered": report.delivered,
                "failed": report.failed,
                "retried": report.retried,
                "inserted": report.inserted,
                "duplicates": report.duplicates,
                "requests": report.requests,
            },
        )


@dataclass
class DrainReport:
    """The sum of a drain run."""

    batches: int = 0
    delivered: int = 0
    failed: int = 0
    retried: int = 0
    rescued: int = 0
    pause_seconds: float = 0.0


def drain(
    deliverer: Deliverer,
    *,
    max_seconds: float = 50.0,
    max_batches: int | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    sleep: Callable[[float], None] = time.sleep,
    max_sleep: float = 1.0,
) -> DrainReport:
    """Deliver batches until the outbox has nothing due, time is up, or a long pause is asked
    (rate limit, bad credentials): long waits live in the rows, never in a sleeping worker."""
    report = DrainReport()
    deadline = time.monotonic() + max_seconds
    report.rescued = deliverer.rescue()
    while not should_stop() and time.monotonic() < deadline:
        if max_batches is not None and report.batches >= max_batches:
            break
        batch = deliverer.deliver_batch()
        if batch.claimed == 0:
            report.pause_seconds = max(report.pause_seconds, batch.pause_seconds)
            break
        report.batches += 1
        report.delivered += batch.delivered
        report.failed += batch.failed
        report.retried += batch.retried
        if batch.pause_seconds > 0:
            if batch.pause_seconds > max_sleep:
                report.pause_seconds = batch.pause_seconds
                break
            sleep(batch.pause_seconds)
    deliverer.heartbeat(report.delivered)
    return report
