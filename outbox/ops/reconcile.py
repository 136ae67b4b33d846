"""Reconcile the ledger with what Polar holds: totals first, events only where totals differ.

1. Totals. One `GET /v1/meters/{id}/quantities` per group of this database's customers (as
   many `external_customer_id` as fit in a URL) returns the meter's sum per hour (per day for
   windows over 7 days) over the whole window. Each bucket is compared with the ledger's
   credits of the same customers in the same bucket (delivered or pruned rows: what Polar
   should hold). Equal buckets are settled; a no-drift run costs one request per group.
2. Narrowing. A differing day is re-read per hour; a differing hour of a group is bisected by
   customers: one request for one half, the other half is the parent minus it. A difference
   costs about log2(customers per group) requests.
Refunds (docs/explanation/corrections.md) count net: a compensating event is one more event,
with negative credits in the bucket of its own timestamp, matched by its own identity; a usage
cancelled before Polar could hold it counts for nothing (neither expected nor missing), and its
refund has no event.

3. Events, only in a narrowed (customer, hour). Polar's events are listed and matched by
   identity: `metadata.usage_external_id` (our `external_id`, globally unique) with the
   customer; events delivered before that key existed (without it, or with a caller's own
   value under that name, not reserved then) by customer + `metadata.usage_id`.
   Found: missing (ours, not at Polar), unknown (at Polar, not ours), mismatched credits.
   Where the list fails (Polar's own server answers 500 without its analytics store), `--fix`
   resends the hour's delivered events: Polar dedups on `external_id`, so the present ones
   are free and `inserted` counts the missing ones; the hour's total is read again after.

Identity and windows make several databases feeding one Polar organization (customers
partitioned between them, `usage_id`s overlapping) and a database that was reset compare
without false differences: only this database's customers are summed, events are matched on
a globally unique key, and nothing before the database's first ledger entry is compared.

Every Polar call spends the shared rate budget at low priority, capped at
`RECONCILE_BUDGET_SHARE` of each window (delivery goes first): a long wait for a slot is
reported through `progress`, with why. A run has a deadline (`outbox reconcile --deadline`):
past it, `ReconcileDeadline`, and nothing is re-queued.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol
from urllib.parse import quote

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from outbox import events
from outbox.errors import PolarUnavailable, ReconcileDeadline
from outbox.models import Customer, LedgerEntry, OutboxEvent, utcnow
from outbox.polar.gateway import (
    USAGE_KEY_FIELD,
    Outcome,
    build_event,
    describe_failure,
    events_that_fit,
)
from outbox.polar.meters import find_meter
from outbox.refunds import REFUND_OF_KEY
from outbox.settings import Settings
from outbox.states import EventStatus, LedgerKind
from outbox.validation import check_customer_id

DEFAULT_LOOKBACK = timedelta(hours=24)
# Polar's quantities take at most 7 days per request with hourly buckets (kit/time_queries.py).
MAX_HOURLY_SPAN = timedelta(days=7)
# Customer ids per quantities request: as many as fit in this much query string (proxies and
# servers commonly refuse request lines over 8 KiB).
MAX_CUSTOMER_QUERY_CHARS = 6000
# The listed events of a narrowed hour must add up to its total; Polar's list lags ingestion.
LIST_RETRIES = 2
LIST_RETRY_SECONDS = 2.0
USAGE_KEY = USAGE_KEY_FIELD
SETTLED = (EventStatus.DELIVERED, None)  # None: the outbox row was pruned after delivery

Progress = Callable[[str], None]


class PolarSide(Protocol):
    """What reconcile needs from Polar (`outbox.polar.PolarGateway`)."""

    requests: int
    deadline: float | None  # time.monotonic(): no budget slot is waited for past it
    deadline_passed: bool  # the last wait for a slot gave up because of `deadline`
    on_budget_wait: Callable[[float, float, str], None] | None

    def meter_quantities(
        self,
        meter_id: str,
        *,
        start: datetime,
        end: datetime,
        interval: str,
        external_customer_ids: list[str],
    ) -> list[tuple[datetime, float]]: ...

    def list_events(
        self,
        *,
        external_customer_id: str | list[str] | None,
        name: str,
        start: datetime | None,
        end: datetime | None,
        metadata: dict[str, str] | None = None,
    ) -> Iterator[dict[str, Any]]: ...

    def list_meters(self) -> list[dict[str, Any]]: ...

    def ingest(self, events: list[dict[str, Any]]) -> Any: ...


@dataclass
class CustomerReconciliation:
    customer_id: str
    ledger_credits: int = 0
    polar_credits: int | None = None  # known only where reconcile looked closer
    missing: list[int] = field(default_factory=list)
    # Of `missing`, those that failed here: only `outbox replay` sends them again (not --fix).
    failed: list[int] = field(default_factory=list)
    in_flight: list[int] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    mismatched: list[dict[str, Any]] = field(default_factory=list)
    unsettled: list[dict[str, Any]] = field(default_factory=list)

    @property
    def differs(self) -> bool:
        return bool(self.missing or self.unknown or self.mismatched or self.unsettled)


@dataclass
class ReconcileReport:
    since: datetime
    until: datetime
    interval: str
    window_note: str
    ledger_credits: int
    polar_credits: float
    customers: list[CustomerReconciliation]
    meter_id: str = ""
    requests: int = 0
    requeued: list[int] = field(default_factory=list)
    recreated: list[int] = field(default_factory=list)
    resent: list[dict[str, Any]] = field(default_factory=list)

    @property
    def differs(self) -> bool:
        """Something differed (also when this run's resend already repaired it)."""
        return any(c.differs for c in self.customers) or any(r["inserted"] for r in self.resent)

    def as_dict(self) -> dict[str, Any]:
        return {
            "since": self.since.isoformat(),
            "until": self.until.isoformat(),
            "interval": self.interval,
            "window": self.window_note,
            "meter_id": self.meter_id,
            "differs": self.differs,
            "polar_requests": self.requests,
            "totals": {
                "ledger_credits": self.ledger_credits,
                "polar_credits": _number(self.polar_credits),
                "missing": sum(len(c.missing) for c in self.customers),
                "failed": sum(len(c.failed) for c in self.customers),
                "in_flight": sum(len(c.in_flight) for c in self.customers),
                "unknown": sum(len(c.unknown) for c in self.customers),
                "mismatched": sum(len(c.mismatched) for c in self.customers),
                "unsettled": sum(len(c.unsettled) for c in self.customers),
            },
            "customers": [
                {
                    "customer_id": c.customer_id,
                    "ledger_credits": c.ledger_credits,
                    "polar_credits": c.polar_credits,
                    "missing": c.missing,
                    "failed": c.failed,
                    "in_flight": c.in_flight,
                    "unknown": c.unknown,
                    "mismatched": c.mismatched,
                    "unsettled": c.unsettled,
                }
                for c in self.customers
            ],
            "requeued": self.requeued,
            "recreated": self.recreated,
            "resent": self.resent,
        }


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


@dataclass(frozen=True)
class _Usage:
    """A usage, or a compensating event (negative credits, `refund_of` its usage's id)."""

    event_id: int
    customer_id: str
    credits: int
    external_id: str
    occurred_at: datetime
    status: str | None  # None: the outbox row was pruned (it had been delivered)
    metadata: dict[str, Any]
    refund_of: int | None = None


def _floor(moment: datetime, interval: str) -> datetime:
    moment = moment.astimezone(UTC)
    if interval == "day":
        return moment.replace(hour=0, minute=0, second=0, microsecond=0)
    return moment.replace(minute=0, second=0, microsecond=0)


def _step(interval: str) -> timedelta:
    return timedelta(days=1) if interval == "day" else timedelta(hours=1)


def _ledger_usage(
    session: Session, customer_id: str | None, since: datetime, until: datetime
) -> list[_Usage]:
    """The window's usages and compensating events (a refund's entry with an event), as
    Polar should hold them: credits = -delta, so a compensation's are negative. Cancelled
    usages are left out: nothing of them may reach Polar."""
    query = (
        select(
            LedgerEntry.event_id,
            LedgerEntry.customer_id,
            LedgerEntry.delta,
            LedgerEntry.external_id,
            LedgerEntry.created_at,
            LedgerEntry.refund_of,
            OutboxEvent.status,
            OutboxEvent.event_metadata,
        )
        .outerjoin(OutboxEvent, OutboxEvent.id == LedgerEntry.event_id)
        .where(
            or_(
                LedgerEntry.kind == LedgerKind.USAGE,
                and_(LedgerEntry.kind == LedgerKind.REFUND, LedgerEntry.event_id.is_not(None)),
            ),
            LedgerEntry.created_at >= since,
            LedgerEntry.created_at < until,
            or_(OutboxEvent.status.is_(None), OutboxEvent.status != EventStatus.CANCELLED),
        )
        .order_by(LedgerEntry.id)
    )
    if customer_id is not None:
        query = query.where(LedgerEntry.customer_id == customer_id)
    return [
        _Usage(
            event_id=int(row.event_id),
            customer_id=row.customer_id,
            credits=-int(row.delta),
            external_id=str(row.external_id),
            # The event's Polar timestamp is the ledger entry's time (one `now` for both).
            occurred_at=row.created_at,
            status=row.status,
            metadata=dict(row.event_metadata or {}),
            refund_of=row.refund_of,
        )
        for row in session.execute(query)
    ]


def _our_customers(session: Session, customer_id: str | None) -> list[str]:
    if customer_id is not None:
        return [customer_id]
    return sorted(session.scalars(select(Customer.id)))


def customer_groups(customers: Sequence[str]) -> list[list[str]]:
    """Consecutive customers, as many per group as fit in one quantities request's URL."""
    groups: list[list[str]] = []
    size = 0
    for customer in customers:
        cost = len("&external_customer_id=") + len(quote(customer, safe=""))
        if not groups or size + cost > MAX_CUSTOMER_QUERY_CHARS:
            groups.append([])
            size = 0
        groups[-1].append(customer)
        size += cost
    return groups


def _credits_of(event: dict[str, Any], credits_field: str) -> float | None:
    value = (event.get("metadata") or {}).get(credits_field)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None  # a sum meter does not count it
    return value


def _timestamp(event: dict[str, Any]) -> datetime | None:
    value = event.get("timestamp")
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return value if isinstance(value, datetime) else None


class _Reconciler:
    def __init__(
        self,
        session: Session,
        polar: PolarSide,
        settings: Settings,
        *,
        meter_id: str,
        interval: str,
        since: datetime,
        until: datetime,
        born: datetime | None,
        ours: list[_Usage],
        fix: bool,
        progress: Progress,
    ) -> None:
        self.session = session
        self.polar = polar
        self.settings = settings
        self.meter_id = meter_id
        self.interval = interval
        self.since, self.until = since, until
        self.born = born
        self.fix = fix
        self.progress = progress
        self.per_customer: dict[str, CustomerReconciliation] = {}
        # What Polar should hold: per interval ("day" and/or "hour"), customer and bucket.
        self.expected: dict[str, dict[str, dict[datetime, int]]] = defaultdict(
            lambda: defaultdict(lambda: defaultdict(int))
        )
        self.rows: dict[tuple[str, datetime], list[_Usage]] = defaultdict(list)
        for usage in ours:
            self.entry(usage.customer_id).ledger_credits += usage.credits
            hour = _floor(usage.occurred_at, "hour")
            self.rows[(usage.customer_id, hour)].append(usage)
            if usage.status in SETTLED:
                for level in {interval, "hour"}:
                    bucket = _floor(usage.occurred_at, level)
                    self.expected[level][usage.customer_id][bucket] += usage.credits
            elif usage.status == EventStatus.FAILED:
                self.entry(usage.customer_id).missing.append(usage.event_id)
                self.entry(usage.customer_id).failed.append(usage.event_id)
            else:
                self.entry(usage.customer_id).in_flight.append(usage.event_id)
        self.requeue: list[_Usage] = []
        self.resent: list[dict[str, Any]] = []
        self.pre_born: list[tuple[str, datetime, float]] = []
        self.notes: list[str] = []

    def entry(self, customer_id: str) -> CustomerReconciliation:
        return self.per_customer.setdefault(
            customer_id, CustomerReconciliation(customer_id=customer_id)
        )

    def expected_of(self, group: Sequence[str], bucket: datetime, interval: str = "hour") -> int:
        by_customer = self.expected[interval]
        return sum(by_customer[c].get(bucket, 0) for c in group if c in by_customer)

    def before_born(self, group: Sequence[str], bucket: datetime, interval: str) -> float:
        """Credits Polar holds for `group` in `bucket` from before this database began."""
        return sum(
            credits
            for customer, moment, credits in self.pre_born
            if customer in group and _floor(moment, interval) == bucket
        )

    def differing(
        self, group: Sequence[str], polar: dict[datetime, float], interval: str = "hour"
    ) -> dict[datetime, float]:
        """The buckets whose totals differ (Polar's raw totals, for the narrowing below)."""
        out = {}
        for bucket, quantity in polar.items():
            ours = quantity
            if self.born is not None and bucket == _floor(self.born, interval):
                ours -= self.before_born(group, bucket, interval)
            if ours != self.expected_of(group, bucket, interval):
                out[bucket] = quantity
        return out

    def read_pre_born(self, groups: list[list[str]]) -> None:
        """Where this database began inside the window, Polar's totals of that bucket may hold
        events from before it (a reset database, customers coming back under the same ids):
        list that slice of the bucket, usually empty, one request per group."""
        born = self.born
        if born is None or not self.since <= born < self.until:
            return
        start = _floor(born, self.interval)
        if start == born:
            return
        for group in groups:
            try:
                events = list(
                    self.polar.list_events(
                        external_customer_id=group,
                        name=self.settings.usage_event_name,
                        start=start - timedelta(microseconds=1),
                        end=born,
                    )
                )
            except Exception as exc:
                self.notes.append(
                    "could not list Polar's events from before this database's first entry "
                    f"({_describe(exc, self.settings)}): its first {self.interval} may differ"
                )
                return
            for event in events:
                moment = _timestamp(event)
                credits = _credits_of(event, self.settings.usage_credits_field)
                if moment is not None and start <= moment < born and credits:
                    customer = str(event.get("external_customer_id") or "")
                    self.pre_born.append((customer, moment, credits))

    def quantities(
        self, group: Sequence[str], first: datetime, last: datetime, interval: str
    ) -> dict[datetime, float]:
        try:
            rows = self.polar.meter_quantities(
                self.meter_id,
                start=first,
                end=last,
                interval=interval,
                external_customer_ids=list(group),
            )
        except Exception as exc:
            raise PolarUnavailable(
                f"reading meter totals: {_describe(exc, self.settings)}"
            ) from None
        return {_floor(moment, interval): quantity for moment, quantity in rows}

    # -- 1. totals, 2. narrowing ---------------------------------------------------------------

    def run(self, groups: list[list[str]]) -> float:
        """Compare every group; return Polar's total over the window for our customers."""
        total = 0.0
        last = self.until - _step(self.interval)
        work: list[tuple[list[str], str, dict[datetime, float]]] = []
        self.read_pre_born(groups)
        for n, group in enumerate(groups, 1):
            self.progress(f"comparing meter totals: customer group {n}/{len(groups)}")
            polar = self.quantities(group, self.since, last, self.interval)
            total += sum(polar.values())
            differing = self.differing(group, polar, self.interval)
            if differing:
                work.append((group, self.interval, differing))
        while work:
            group, interval, differing = work.pop()
            self.progress(
                f"narrowing: {len(differing)} {interval}(s) differ for {len(group)} customer(s)"
            )
            if interval == "day":
                for day in sorted(differing):
                    hours = self.quantities(group, day, day + timedelta(hours=23), "hour")
                    diff = self.differing(group, hours)
                    if diff:
                        work.append((group, "hour", diff))
            elif len(group) == 1:
                for hour, quantity in sorted(differing.items()):
                    self.examine(group[0], hour, quantity)
            else:
                half, rest = group[: len(group) // 2], group[len(group) // 2 :]
                first = self.quantities(half, min(differing), max(differing), "hour")
                for part, values in (
                    (half, {b: first.get(b, 0.0) for b in differing}),
                    (rest, {b: q - first.get(b, 0.0) for b, q in differing.items()}),
                ):
                    diff = self.differing(part, values)
                    if diff:
                        work.append((part, "hour", diff))
        return total

    # -- 3. events, in one (customer, hour) ------------------------------------------------------

    def examine(self, customer: str, hour: datetime, polar_total: float) -> None:
        entry = self.entry(customer)
        ours = polar_total - self.before_born([customer], hour, "hour")
        entry.polar_credits = int((entry.polar_credits or 0) + ours)
        rows = self.rows.get((customer, hour), [])
        self.progress(f"listing Polar's events of {customer} in the hour {hour:%Y-%m-%d %H:00}")
        events: list[dict[str, Any]] | None = None
        failure = ""
        for attempt in range(LIST_RETRIES + 1):
            try:
                events = self.list_hour(customer, hour)
            except PolarUnavailable as exc:
                failure, events = exc.detail, None
                break
            listed = sum(_credits_of(e, self.settings.usage_credits_field) or 0 for e in events)
            if listed == polar_total:
                break
            failure = (
                f"Polar's event list shows {_number(listed)} of the hour's "
                f"{_number(polar_total)} credits (the list lags ingestion)"
            )
            if attempt < LIST_RETRIES:
                time.sleep(LIST_RETRY_SECONDS)
                continue
            events = None
        if events is None:
            self.unlistable(customer, hour, polar_total, rows, failure)
            return
        self.match(customer, rows, events)

    def list_hour(self, customer: str, hour: datetime) -> list[dict[str, Any]]:
        end = hour + timedelta(hours=1)
        try:
            listed = list(
                self.polar.list_events(
                    external_customer_id=customer,
                    name=self.settings.usage_event_name,
                    # Polar's bounds are strict: a microsecond before the hour, to its end.
                    start=hour - timedelta(microseconds=1),
                    end=end,
                )
            )
        except Exception as exc:
            raise PolarUnavailable(f"listing events: {_describe(exc, self.settings)}") from None
        out: dict[str, dict[str, Any]] = {}
        for n, event in enumerate(listed):
            moment = _timestamp(event)
            if moment is not None and not hour <= moment < end:
                continue
            # An event listed twice (a page shifted while paging) counts once.
            out.setdefault(str(event.get("id") or n), event)
        return list(out.values())

    def match(self, customer: str, rows: list[_Usage], events: list[dict[str, Any]]) -> None:
        entry = self.entry(customer)
        by_key = {u.external_id: u for u in rows}
        by_usage_id = {str(u.event_id): u for u in rows}
        seen: set[int] = set()
        by_id: list[dict[str, Any]] = []

        def settle(event: dict[str, Any], usage: _Usage | None) -> None:
            metadata = event.get("metadata") or {}
            if usage is None or usage.event_id in seen:
                key = metadata.get(USAGE_KEY)
                entry.unknown.append(str(key or metadata.get("usage_id") or event.get("id")))
                return
            seen.add(usage.event_id)
            credits = _credits_of(event, self.settings.usage_credits_field)
            if credits != usage.credits:
                entry.mismatched.append(
                    {"event_id": usage.event_id, "ledger": usage.credits, "polar": credits}
                )

        for event in events:
            moment = _timestamp(event)
            if self.born and moment is not None and moment < self.born:
                continue  # before this database existed (it was reset): not ours, whatever ids
            key = (event.get("metadata") or {}).get(USAGE_KEY)
            usage = by_key.get(str(key)) if key is not None else None
            if usage is None:
                by_id.append(event)  # matched by usage_id once every keyed event has its row
            else:
                settle(event, usage)
        # Events delivered before `usage_external_id` was ours: without it, or with a caller's
        # own value under that name (it was not reserved then). Same customer, same usage_id.
        for event in by_id:
            usage_id = (event.get("metadata") or {}).get("usage_id")
            settle(event, by_usage_id.get(str(usage_id)) if usage_id is not None else None)
        for usage in rows:
            if usage.event_id in seen and usage.status == EventStatus.FAILED:
                entry.missing.remove(usage.event_id)  # failed here, yet Polar has it
                entry.failed.remove(usage.event_id)
            if usage.event_id in seen or usage.status not in SETTLED:
                continue
            entry.missing.append(usage.event_id)
            self.requeue.append(usage)

    def unlistable(
        self, customer: str, hour: datetime, polar_total: float, rows: list[_Usage], why: str
    ) -> None:
        """The hour's events cannot be read: settle it by resending (with --fix) or say so."""
        entry = self.entry(customer)
        expected = self.expected["hour"][customer].get(hour, 0)
        settled = [u for u in rows if u.status in SETTLED]
        polar_total -= self.before_born([customer], hour, "hour")
        finding: dict[str, Any] = {
            "hour": hour.isoformat(),
            "ledger_credits": expected,
            "polar_credits": _number(polar_total),
            "reason": why,
        }
        if polar_total == expected:
            return  # only the listing failed; the totals agree
        if self.fix and settled and polar_total < expected:
            inserted = self.resend(settled)
            after = self.quantities([customer], hour, hour, "hour").get(hour, 0.0)
            after -= self.before_born([customer], hour, "hour")
            self.resent.append(
                {
                    "customer_id": customer,
                    "hour": hour.isoformat(),
                    "sent": len(settled),
                    "inserted": inserted,
                    "polar_credits_after": _number(after),
                }
            )
            if after == expected:
                return
            finding["polar_credits"] = _number(after)
        elif polar_total < expected:
            finding["fix"] = (
                f"--fix resends the hour's {len(settled)} delivered event(s); Polar dedups "
                "the ones it has"
            )
        entry.unsettled.append(finding)

    def resend(self, rows: list[_Usage]) -> int:
        """Send these delivered events again, as delivery built them: Polar dedups on
        `external_id`, so it stores (and bills) only the ones it lacks. Their count."""
        inserted = 0
        size = self.settings.outbox_batch_size
        events = [
            build_event(
                name=self.settings.usage_event_name,
                customer_id=u.customer_id,
                external_id=u.external_id,
                occurred_at=u.occurred_at,
                metadata=u.metadata,
                credits_field=self.settings.usage_credits_field,
                credits=u.credits,
                usage_id=str(u.event_id),
            )
            for u in rows
        ]
        while events:
            batch = events[:size]
            batch = batch[: events_that_fit(batch)]  # within Polar's body limit too
            result = self.polar.ingest(batch)
            if result.outcome is not Outcome.OK:
                raise PolarUnavailable(f"resending events: {result.message}")
            inserted += int(result.inserted)
            events = events[len(batch) :]
        return inserted


def _describe(exc: BaseException, settings: Settings) -> str:
    return describe_failure(exc, settings.polar_access_token)


def find_meter_id(polar: PolarSide, settings: Settings) -> str:
    """`POLAR_METER_ID`, or the meter `outbox doctor` finds (one request)."""
    if settings.polar_meter_id:
        return settings.polar_meter_id
    try:
        meters = polar.list_meters()
    except Exception as exc:
        raise PolarUnavailable(f"listing meters: {_describe(exc, settings)}") from None
    meter = find_meter(meters, settings)
    if meter is None:
        raise PolarUnavailable(
            f"no meter sums metadata.{settings.usage_credits_field} over events named "
            f"{settings.usage_event_name!r}: create it in Polar or set POLAR_METER_ID "
            "(see `outbox doctor`)"
        )
    return str(meter["id"])


def reconcile_window(
    since: datetime | None, until: datetime | None, now: datetime, born: datetime | None
) -> tuple[datetime, datetime, str, str]:
    """The window compared: whole buckets (hours; days past 7 days) around [since, until),
    starting no earlier than the database's first ledger entry. (since, until, interval,
    a sentence saying why)."""
    notes = []
    if until is None:
        notes.append("up to now: events not delivered yet count as in flight, not missing")
    until = min(until or now, now)
    if since is None:
        since = until - DEFAULT_LOOKBACK
        notes.insert(0, "the last 24 h")
    if born is not None and since < born:
        since = born
        notes.append("from this database's first ledger entry (nothing before it is ours)")
    since = min(since, until)
    start, end = _floor(since, "hour"), _floor(until, "hour")
    if end < until or end == start:
        end += timedelta(hours=1)
    interval = "hour"
    if ((end - timedelta(hours=1)).date() - start.date()).days > MAX_HOURLY_SPAN.days:
        interval = "day"  # Polar takes at most 7 days of hours per request
        start, end = _floor(since, "day"), _floor(until, "day")
        if end < until or end == start:
            end += timedelta(days=1)
    notes.append(f"in whole {interval}s, as Polar's meter totals come")
    return start, end, interval, "; ".join(notes)


def reconcile(
    session: Session,
    polar: PolarSide,
    settings: Settings,
    *,
    customer_id: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    fix: bool = False,
    now: datetime | None = None,
    progress: Progress | None = None,
    deadline: float | None = None,
) -> ReconcileReport:
    """Compare the ledger's usage with Polar's meter in the window around [since, until)
    (default: the last 24 h, up to now), totals first; optionally re-queue or resend what
    Polar lacks. Raises `PolarUnavailable` (one line) when Polar cannot answer, and
    `ReconcileDeadline` when it is not done within `deadline` seconds (nothing re-queued)."""
    now = now or utcnow()
    report_step = progress or (lambda _: None)
    stop_at = None if deadline is None else time.monotonic() + deadline
    last_step = ["starting"]

    def past_deadline() -> ReconcileDeadline:
        return ReconcileDeadline(
            f"reconcile cannot finish within its deadline ({deadline:g} s): stopped while "
            f"{last_step[0]}; nothing was re-queued. Narrow the window (--since, --until, "
            "--customer) or allow longer (--deadline)"
        )

    def step(text: str) -> None:
        if stop_at is not None and time.monotonic() >= stop_at:
            raise past_deadline()
        last_step[0] = text
        report_step(text)

    polar.deadline = stop_at
    polar.on_budget_wait = lambda waited, wait, why: report_step(
        f"waiting for a Polar request slot ({waited:.0f} s so far, {wait:.0f} s more at "
        f"least): {why}"
    )
    try:
        return _reconcile(session, polar, settings, customer_id, since, until, fix, now, step)
    except PolarUnavailable:
        if polar.deadline_passed:  # no request slot before the deadline: that is the cause
            raise past_deadline() from None
        raise
    finally:
        polar.deadline = polar.on_budget_wait = None


def _reconcile(
    session: Session,
    polar: PolarSide,
    settings: Settings,
    customer_id: str | None,
    since: datetime | None,
    until: datetime | None,
    fix: bool,
    now: datetime,
    step: Progress,
) -> ReconcileReport:
    if customer_id is not None:
        customer_id = check_customer_id(customer_id)
    # The database's first entry (by primary key: no scan of a big ledger).
    born = session.scalar(select(LedgerEntry.created_at).order_by(LedgerEntry.id).limit(1))
    start, end, interval, note = reconcile_window(since, until, now, born)
    requests_before = polar.requests
    if not settings.polar_meter_id:
        step("finding the meter that sums our usage events")
    meter_id = find_meter_id(polar, settings)
    ours = _ledger_usage(session, customer_id, start, end)
    worker = _Reconciler(
        session,
        polar,
        settings,
        meter_id=meter_id,
        interval=interval,
        since=start,
        until=end,
        born=born,
        ours=ours,
        fix=fix,
        progress=step,
    )
    polar_total = worker.run(customer_groups(_our_customers(session, customer_id)))
    report = ReconcileReport(
        since=start,
        until=end,
        interval=interval,
        window_note="; ".join([note, *worker.notes]),
        ledger_credits=sum(u.credits for u in ours),
        polar_credits=polar_total,
        customers=sorted(
            (c for c in worker.per_customer.values() if c.differs or c.in_flight),
            key=lambda c: c.customer_id,
        ),
        meter_id=meter_id,
        resent=worker.resent,
    )
    if fix and worker.requeue:
        report.requeued, report.recreated = _requeue(session, worker.requeue, settings, now)
    report.requests = polar.requests - requests_before
    return report


# A pruned row is re-created from its ledger entry: the caller's metadata went with the row.
RECREATED_NOTE = (
    "re-created by reconcile: Polar did not list it; its metadata was pruned with the row, so "
    "it is resent without it (credits_used, usage_id and usage_external_id are re-added: "
    "billing is unaffected)"
)


def _requeue(
    session: Session, missing: Sequence[_Usage], settings: Settings, now: datetime
) -> tuple[list[int], list[int]]:
    """Delivered-but-missing → pending (same external_id); pruned ones are re-created."""
    existing = [u.event_id for u in missing if u.status is not None]
    if existing:
        events.requeue_if_delivered(
            session, existing, now=now, note="re-queued by reconcile: Polar did not list it"
        )
    recreated = []
    for usage in missing:
        if usage.status is None and usage.external_id:
            metadata = {}
            if usage.refund_of is not None:  # a compensation names its usage again
                metadata[REFUND_OF_KEY] = _usage_external_id(session, usage.refund_of)
            events.recreate_pending(
                session,
                event_id=usage.event_id,
                external_id=usage.external_id,
                customer_id=usage.customer_id,
                name=settings.usage_event_name,
                credits=usage.credits,
                occurred_at=usage.occurred_at,
                now=now,
                note=RECREATED_NOTE,
                metadata=metadata,
                refund_of=usage.refund_of,
            )
            recreated.append(usage.event_id)
    session.flush()
    return existing, recreated


def _usage_external_id(session: Session, event_id: int) -> str:
    """A usage's `external_id`, from its ledger entry (kept when its row is pruned)."""
    external_id = session.scalar(
        select(LedgerEntry.external_id).where(
            LedgerEntry.event_id == event_id, LedgerEntry.kind == LedgerKind.USAGE
        )
    )
    return str(external_id or "")
