"""`python bench/claim_settle.py`: what claiming and settling one batch costs, by batch size.

On a private database (`outbox_bench_claim_settle` by default) pre-filled with `--rows` pending
rows, one thread claims a batch and settles it (two transactions, as the deliverer does) until
the outbox is empty, for each batch size and each variant, in alternating rounds. Per row:
the wall time, the client's CPU (this process), the PostgreSQL backend's CPU (from
/proc/<pid>/stat: PostgreSQL must run on this machine) and the time spent inside the driver's
execute (statement time, round trip included).

Variants (the same rows, the same database, one run):

- `before`: the statements as they were (kept below, verbatim in effect): the claim through
  the ORM entity, `id IN (<one bind per row>)`, the history as a multi-row VALUES, and a
  retry's per-row values as a CASE with one branch per row;
- `after`: `outbox.events` as it is now (ids as ONE array parameter, per-row values joined
  from `unnest(...)` arrays, the history inserted from arrays, the claim as plain tuples);
- `one-stmt` (delivered only): the settle and its history in ONE statement, a data-modifying
  CTE (`WITH moved AS (UPDATE ... RETURNING) INSERT ... SELECT FROM moved`), an idea measured
  and not kept (see docs/benchmarks.md, "Claim and settle").

`--settle delivered` (default) or `retry` (the per-row values path: backoff per row).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import Engine, and_, case, event, func, insert, literal, select, text, update
from sqlalchemy.orm import Session

from bench.common import drop_database, recreate_database
from bench.drain.rows import prepare_outbox
from outbox import attempts, events
from outbox.db import make_engine, session_scope
from outbox.events import EVENTS, ClaimedEvent
from outbox.models import OutboxEvent, utcnow
from outbox.policy import next_attempt_at
from outbox.states import AttemptDecision, EventStatus

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/outbox_bench_claim_settle"
SIZES = (100, 500, 1000, 2000, 5000)

# -- the statements before (the baseline) ---------------------------------------------------


def before_claim(session: Session, *, owner: str, limit: int, now: datetime) -> list[ClaimedEvent]:
    due = (
        select(OutboxEvent.id)
        .where(
            OutboxEvent.status == EventStatus.PENDING,
            OutboxEvent.next_attempt_at <= now,
            OutboxEvent.occurred_at <= now,
        )
        .order_by(OutboxEvent.next_attempt_at, OutboxEvent.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .cte("due")
    )
    rows = session.execute(
        update(OutboxEvent)
        .where(OutboxEvent.id.in_(select(due.c.id)))
        .values(
            status=EventStatus.INFLIGHT,
            lease_owner=owner,
            lease_expires_at=now + timedelta(seconds=60),
            updated_at=now,
        )
        .returning(
            OutboxEvent.id,
            OutboxEvent.external_id,
            OutboxEvent.customer_id,
            OutboxEvent.name,
            OutboxEvent.credits,
            OutboxEvent.event_metadata,
            OutboxEvent.occurred_at,
            OutboxEvent.attempts,
            OutboxEvent.created_at,
        )
    ).all()
    claimed = [
        ClaimedEvent(
            id=row.id,
            external_id=row.external_id,
            customer_id=row.customer_id,
            name=row.name,
            credits=row.credits,
            metadata=dict(row.event_metadata or {}),
            occurred_at=row.occurred_at,
            attempts=row.attempts,
            created_at=row.created_at,
        )
        for row in rows
    ]
    claimed.sort(key=lambda e: e.id)
    return claimed


def _before_record(
    session: Session,
    steps: Sequence[attempts.Step],
    decision: AttemptDecision,
    now: datetime,
    owner: str,
) -> None:
    if not steps:
        return
    session.execute(
        insert(attempts.ATTEMPTS),
        [
            {
                "event_id": s.event_id,
                "attempted_at": now,
                "decision": decision.value,
                "claim_token": owner,
                "attempt": s.attempt,
                "polar_status": 200,
                "message": s.message,
                "replay_id": None,
            }
            for s in steps
        ],
    )


def _before_claimed_by(owner: str, ids: Iterable[int]) -> Any:
    return and_(
        OutboxEvent.id.in_(list(ids)),
        OutboxEvent.status == EventStatus.INFLIGHT,
        OutboxEvent.lease_owner == owner,
    )


def before_delivered(session: Session, ids: Sequence[int], owner: str, now: datetime) -> int:
    moved = session.execute(
        update(OutboxEvent)
        .where(_before_claimed_by(owner, ids))
        .values(
            status=EventStatus.DELIVERED,
            maybe_at_polar=True,
            delivered_at=now,
            lease_owner=None,
            lease_expires_at=None,
            last_error=None,
            updated_at=now,
        )
        .returning(OutboxEvent.id, OutboxEvent.attempts)
        .execution_options(synchronize_session=False)
    ).all()
    _before_record(
        session,
        [attempts.Step(r.id, r.attempts + 1) for r in moved],
        AttemptDecision.DELIVERED,
        now,
        owner,
    )
    return len(moved)


def before_retry(
    session: Session, per_row: Mapping[int, Mapping[str, Any]], owner: str, now: datetime
) -> int:
    values: dict[str, Any] = {}
    for column in {c for row in per_row.values() for c in row}:
        kind = EVENTS.c[column].type
        values[column] = case(
            *((EVENTS.c.id == i, literal(row[column], kind)) for i, row in per_row.items()),
            else_=EVENTS.c[column],
        )
    rows = session.execute(
        update(EVENTS)
        .where(
            EVENTS.c.id.in_(list(per_row)),
            EVENTS.c.status == EventStatus.INFLIGHT,
            EVENTS.c.lease_owner == owner,
        )
        .values(
            lease_owner=None,
            lease_expires_at=None,
            status=EventStatus.PENDING,
            last_error="bench",
            updated_at=now,
            maybe_at_polar=True,
            **values,
        )
        .returning(EVENTS.c.id, EVENTS.c.attempts, EVENTS.c.last_error)
    ).all()
    _before_record(
        session,
        [attempts.Step(r.id, r.attempts, r.last_error) for r in rows],
        AttemptDecision.RETRY,
        now,
        owner,
    )
    return len(rows)


# -- an idea measured: the settle and its history in one statement ---------------------------


def one_statement_delivered(session: Session, ids: Sequence[int], owner: str, now: datetime) -> int:
    moved = (
        update(EVENTS)
        .where(events._claimed_by(session, owner, ids))
        .values(
            status=EventStatus.DELIVERED,
            maybe_at_polar=True,
            delivered_at=now,
            lease_owner=None,
            lease_expires_at=None,
            last_error=None,
            updated_at=now,
        )
        .returning(EVENTS.c.id, EVENTS.c.attempts)
        .cte("moved")
    )
    a = attempts.ATTEMPTS
    history = insert(a).from_select(
        ["event_id", "attempted_at", "decision", "claim_token", "attempt", "polar_status"],
        select(
            moved.c.id,
            literal(now, a.c.attempted_at.type),
            literal(AttemptDecision.DELIVERED.value, a.c.decision.type),
            literal(owner, a.c.claim_token.type),
            moved.c.attempts + 1,
            literal(200, a.c.polar_status.type),
        ),
    )
    counted = select(func.count()).select_from(moved).add_cte(history.cte("history"))
    return int(session.execute(counted).scalar_one())


# -- the run ---------------------------------------------------------------------------------

Claim = Callable[[Session, str, int, datetime], list[ClaimedEvent]]
Settle = Callable[[Session, list[ClaimedEvent], str, datetime], int]


def after_claim(session: Session, owner: str, limit: int, now: datetime) -> list[ClaimedEvent]:
    return events.claim_batch(
        session, owner=owner, limit=limit, now=now, lease_seconds=60, hold_back_until=now
    )


def _retry_values(batch: list[ClaimedEvent], now: datetime) -> dict[int, dict[str, Any]]:
    rng = random.Random(7)
    return {
        e.id: {"attempts": e.attempts + 1, "next_attempt_at": next_attempt_at(now, 1, rng)}
        for e in batch
    }


SETTLES: dict[str, dict[str, Settle]] = {
    "delivered": {
        "before": lambda s, b, o, now: before_delivered(s, [e.id for e in b], o, now),
        "after": lambda s, b, o, now: events.mark_delivered_if_claimed(
            s, ids=[e.id for e in b], owner=o, now=now, polar_status=200
        ),
        "one-stmt": lambda s, b, o, now: one_statement_delivered(s, [e.id for e in b], o, now),
    },
    "retry": {
        "before": lambda s, b, o, now: before_retry(s, _retry_values(b, now), o, now),
        "after": lambda s, b, o, now: events.retry_later_if_claimed(
            s, events=b, owner=o, now=now, error="bench", rng=random.Random(7), max_attempts=25
        )[0],
    },
}
CLAIMS: dict[str, Claim] = {
    "before": lambda s, o, n, now: before_claim(s, owner=o, limit=n, now=now),
    "after": after_claim,
    "one-stmt": after_claim,
}


@dataclass
class Measure:
    rows: int = 0
    wall: float = 0.0
    client_cpu: float = 0.0
    pg_cpu: float = 0.0
    claim_stmt: float = 0.0
    settle_stmt: float = 0.0
    statements: int = 0
    sql_chars: int = 0


@dataclass
class StatementClock:
    """Time inside cursor.execute, summed (round trip and server included)."""

    total: float = 0.0
    count: int = 0
    chars: int = 0
    _started: list[float] = field(default_factory=list)

    def before(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self.count += 1
        self.chars += len(statement)
        self._started.append(time.perf_counter())

    def after(self, *args: Any) -> None:
        self.total += time.perf_counter() - self._started.pop()


def backend_cpu(session: Session) -> float:
    pid = session.execute(text("SELECT pg_backend_pid()")).scalar_one()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_one(engine: Engine, url: str, rows: int, size: int, variant: str, settle: str) -> Measure:
    prepare_outbox(url, rows)
    claim, settle_fn = CLAIMS[variant], SETTLES[settle][variant]
    clock = StatementClock()
    m = Measure()
    with Session(engine) as probe:  # pool_size=1: the one backend every session below uses
        pg_before = backend_cpu(probe)
    event.listen(engine, "before_cursor_execute", clock.before)
    event.listen(engine, "after_cursor_execute", clock.after)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    try:
        while True:
            now = utcnow()
            owner = events.new_claim_token("bench")
            t0 = clock.total
            with session_scope(engine) as session:
                batch = claim(session, owner, size, now)
            m.claim_stmt += clock.total - t0
            if not batch:
                break
            t0 = clock.total
            with session_scope(engine) as session:
                moved = settle_fn(session, batch, owner, utcnow())
            m.settle_stmt += clock.total - t0
            assert moved == len(batch), (moved, len(batch))
            m.rows += moved
            if settle == "retry" and m.rows >= rows:
                break  # retried rows come back due later: one pass over the rows
    finally:
        m.wall = time.perf_counter() - wall0
        m.client_cpu = time.process_time() - cpu0
        event.remove(engine, "before_cursor_execute", clock.before)
        event.remove(engine, "after_cursor_execute", clock.after)
    with Session(engine) as probe:
        m.pg_cpu = backend_cpu(probe) - pg_before
    m.statements, m.sql_chars = clock.count, clock.chars
    return m


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("BENCH_DATABASE_URL", DEFAULT_URL))
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--rows", type=int, default=20_000, help="rows per measured pass")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (median)")
    parser.add_argument("--settle", choices=sorted(SETTLES), default="delivered")
    parser.add_argument("--variants", default=None, help="default: every variant of --settle")
    parser.add_argument("--keep-db", action="store_true")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    variants = args.variants.split(",") if args.variants else list(SETTLES[args.settle])
    recreate_database(args.url)
    engine = make_engine(args.url, pool_size=1, max_overflow=0)
    results: dict[tuple[int, str], list[Measure]] = {}
    try:
        for size in sizes:
            rows = max(args.rows, size * 4)
            for _ in range(args.rounds):
                for variant in variants:
                    m = run_one(engine, args.url, rows, size, variant, args.settle)
                    results.setdefault((size, variant), []).append(m)
                    print(
                        f"  {size:>5} {variant:<8} {m.wall * 1e6 / m.rows:7.1f} µs/row",
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        engine.dispose()
        if not args.keep_db:
            drop_database(args.url)
    print(
        f"\nsettle = {args.settle}; per row, median of {args.rounds} rounds "
        f"({' '.join(sys.argv[1:]) or 'defaults'})\n"
    )
    print(
        "| batch | variant | wall µs/row | client CPU µs/row | PostgreSQL CPU µs/row "
        "| claim stmt µs/row | settle stmt µs/row | SQL chars per batch | vs before |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for size in sizes:
        base = None
        for variant in variants:
            ms = results[(size, variant)]

            def med(f: Callable[[Measure], float], ms: list[Measure] = ms) -> float:
                return statistics.median(f(m) / m.rows * 1e6 for m in ms)

            wall = med(lambda m: m.wall)
            base = wall if base is None else base
            batches = ms[0].rows / size
            print(
                f"| {size:,} | {variant} | {wall:.1f} | {med(lambda m: m.client_cpu):.1f} "
                f"| {med(lambda m: m.pg_cpu):.1f} | {med(lambda m: m.claim_stmt):.1f} "
                f"| {med(lambda m: m.settle_stmt):.1f} "
                f"| {ms[0].sql_chars / batches:,.0f} | {wall / base:.0%} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
