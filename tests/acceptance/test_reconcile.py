"""`outbox reconcile` against the emulator, on real PostgreSQL: matched by identity (two databases
feeding one Polar organization, a database reset), totals first (few requests), every kind of
difference found and named, `--fix` billing a lost event exactly once, and Polar's own quirk
(an events list answering 500) settled by resending."""

from __future__ import annotations

import itertools
import json
import os
import random
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import Engine, delete
from sqlalchemy.engine import make_url
from sqlalchemy.orm import sessionmaker
from typer.testing import CliRunner

import polar_emulator
from cli.main import app as cli
from outbox.db import make_engine, session_scope
from outbox.delivery.deliverer import Deliverer, drain
from outbox.ledger import record_usage
from outbox.migrate import upgrade
from outbox.models import OutboxEvent
from outbox.polar.gateway import PolarGateway, close_gateway
from outbox.polar.ratelimit import LocalRateBudget, make_budget
from outbox.settings import get_settings, load_settings
from tests.conftest import truncate_all
from tests.factories import make_customer

runner = CliRunner()


@pytest.fixture
def env(
    pg_url: str,
    clean_redis: str,
    emulator: polar_emulator.RunningEmulator,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[None]:
    redis_url = clean_redis
    for key, value in {
        "POLAR_ACCESS_TOKEN": emulator.token,
        "POLAR_BASE_URL": emulator.url,
        "OUTBOX_CLOCK_MARGIN_SECONDS": "0",
        "REDIS_URL": redis_url,
        "POLAR_REQUESTS_PER_MINUTE": "100000",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("POLAR_METER_ID", raising=False)
    get_settings.cache_clear()
    yield
    close_gateway()
    get_settings.cache_clear()


@pytest.fixture
def second_db(pg_url: str) -> Iterator[tuple[str, Engine]]:
    """Another database of the same service (a second shard), migrated, dropped after."""
    admin = sa.create_engine(
        make_url(pg_url).set(database="postgres"),
        isolation_level="AUTOCOMMIT",
        poolclass=sa.pool.NullPool,
    )
    name = f"outbox_shard_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = make_url(pg_url).set(database=name).render_as_string(hide_password=False)
    upgrade(url)
    engine = make_engine(url)
    yield url, engine
    engine.dispose()
    from outbox.db import dispose_engines

    dispose_engines()
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


def deliver_all(url: str, engine: Engine) -> None:
    settings = load_settings(database_url=url)
    deliverer = Deliverer(
        sessionmaker(bind=engine, expire_on_commit=False),
        PolarGateway(settings, budget=LocalRateBudget(100_000)),
        settings,
        rng=random.Random(1),
    )
    for _ in range(20):
        if drain(deliverer, max_seconds=5, max_sleep=0.2).batches == 0:
            return


def reconcile(monkeypatch: pytest.MonkeyPatch, url: str, *args: str) -> tuple[int, dict[str, Any]]:
    monkeypatch.setenv("DATABASE_URL", url)
    get_settings.cache_clear()
    result = runner.invoke(cli, ["reconcile", "--json", *args])
    assert "Traceback" not in result.output, result.output
    assert result.exit_code in (0, 1), result.output
    return result.exit_code, json.loads(result.stdout)


def usage(engine: Engine, customer: str, *credits: int) -> list[tuple[int, str]]:
    with session_scope(engine) as session:
        results = [record_usage(session, customer, n) for n in credits]
    return [(r.event_id, r.external_id) for r in results]


def test_two_databases_and_a_reset_on_one_organization_give_no_false_difference(
    env: None,
    clean_tables: Engine,
    pg_url: str,
    second_db: tuple[str, Engine],
    emulator: polar_emulator.RunningEmulator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url_b, engine_b = second_db
    with session_scope(clean_tables) as session:
        alice = make_customer(session, credits=100, customer_id="alice")
        make_customer(session, credits=100, customer_id="amy")
    with session_scope(engine_b) as session:
        make_customer(session, credits=100, customer_id="bob")
    old_life = usage(clean_tables, "alice", 2, 3, 4)
    usage(clean_tables, "amy", 1, 1)
    b_events = usage(engine_b, "bob", 5, 6, 7)  # event ids 1, 2, 3 again
    deliver_all(pg_url, clean_tables)
    deliver_all(url_b, engine_b)
    # Bob's and alice's first events were delivered before `usage_external_id` existed: they
    # carry only `usage_id`.
    for _, external_id in b_events + old_life:
        emulator.state.by_external_id[external_id].metadata.pop("usage_external_id")

    # Database A is reset (ids restart at 1) and alice comes back under the same id.
    truncate_all(clean_tables)
    with session_scope(clean_tables) as session:
        make_customer(session, credits=100, customer_id=alice)
    a_events = usage(clean_tables, alice, 1, 9)
    deliver_all(pg_url, clean_tables)
    assert [event_id for event_id, _ in a_events] == [1, 2]  # the same ids as bob's

    for url in (pg_url, url_b):
        code, report = reconcile(monkeypatch, url)
        assert (code, report["differs"]) == (0, False), report
    code, report = reconcile(monkeypatch, url_b)
    assert report["totals"]["ledger_credits"] == report["totals"]["polar_credits"] == 18
    code, report = reconcile(monkeypatch, pg_url, "--customer", alice)
    assert code == 0 and report["totals"]["ledger_credits"] == 10

    # Polar loses one event of each database; each reconcile names its own, exactly.
    assert emulator.state.delete(a_events[1][1])
    assert emulator.state.delete(b_events[0][1])
    code, report = reconcile(monkeypatch, pg_url)
    assert code == 1
    assert [(c["customer_id"], c["missing"]) for c in report["customers"]] == [(alice, [2])]
    assert report["totals"]["unknown"] == report["totals"]["mismatched"] == 0
    code, report = reconcile(monkeypatch, url_b)
    assert code == 1
    assert [(c["customer_id"], c["missing"]) for c in report["customers"]] == [("bob", [1])]

    code, report = reconcile(monkeypatch, pg_url, "--fix")
    assert code == 1 and report["requeued"] == [2]
    deliver_all(pg_url, clean_tables)
    code, report = reconcile(monkeypatch, pg_url, "--fix")
    assert code == 0 and report["requeued"] == []
    deliver_all(pg_url, clean_tables)
    # Billed once: alice's old life (2+3+4) plus her new one (1+9), each event once.
    assert emulator.state.totals()["alice"] == 19
    stored = [e.external_id for e in emulator.state.events]
    assert stored.count(a_events[1][1]) == 1


def test_a_credits_mismatch_and_an_event_unknown_to_the_ledger_are_named(
    env: None,
    clean_tables: Engine,
    pg_url: str,
    emulator: polar_emulator.RunningEmulator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with session_scope(clean_tables) as session:
        customer = make_customer(session, credits=100)
    events = usage(clean_tables, customer, 5, 5, 5)
    deliver_all(pg_url, clean_tables)

    emulator.state.by_external_id[events[1][1]].metadata["credits_used"] = 7
    code, report = reconcile(monkeypatch, pg_url)
    assert code == 1, report
    assert report["customers"][0]["mismatched"] == [
        {"event_id": events[1][0], "ledger": 5, "polar": 7}
    ]
    assert report["totals"]["missing"] == report["totals"]["unknown"] == 0

    emulator.state.by_external_id[events[1][1]].metadata["credits_used"] = 5
    foreign = dict(polar_emulator.EmulatorConfig().meters[0])  # keep the default meter
    assert foreign["id"] == polar_emulator.METER_ID
    emulator.state.store(
        [
            {
                "name": "ai_generation",
                "external_customer_id": customer,
                "external_id": "someone_else_1",
                "timestamp": emulator.state.events[0].timestamp,
                "metadata": {"credits_used": 3, "usage_external_id": "usage_not_ours"},
            }
        ]
    )
    code, report = reconcile(monkeypatch, pg_url)
    assert code == 1, report
    assert report["customers"][0]["unknown"] == ["usage_not_ours"]
    assert report["totals"]["polar_credits"] == 18 and report["totals"]["ledger_credits"] == 15


def test_an_event_carrying_the_callers_own_usage_external_id_is_matched_by_usage_id(
    env: None,
    clean_tables: Engine,
    pg_url: str,
    emulator: polar_emulator.RunningEmulator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before `usage_external_id` was reserved a caller could send their own: the event Polar
    holds carries the caller's value, not ours. It is still this row (same customer, same
    `usage_id`): neither unknown nor missing, and only the event Polar really lost is named."""
    with session_scope(clean_tables) as session:
        customer = make_customer(session, credits=100)
    events = usage(clean_tables, customer, 2, 3, 4)
    deliver_all(pg_url, clean_tables)
    with session_scope(clean_tables) as session:  # as the old release stored and sent it
        session.execute(
            sa.update(OutboxEvent)
            .where(OutboxEvent.id == events[0][0])
            .values(event_metadata={"usage_external_id": "caller-ref-42"})
        )
    emulator.state.by_external_id[events[0][1]].metadata["usage_external_id"] = "caller-ref-42"
    assert emulator.state.delete(events[2][1])  # a real difference in the same hour

    code, report = reconcile(monkeypatch, pg_url)
    assert code == 1, report
    assert [(c["customer_id"], c["missing"]) for c in report["customers"]] == [
        (customer, [events[2][0]])
    ]
    assert report["totals"]["unknown"] == report["totals"]["mismatched"] == 0, report

    code, report = reconcile(monkeypatch, pg_url, "--fix")
    assert report["requeued"] == [events[2][0]], report
    deliver_all(pg_url, clean_tables)
    code, report = reconcile(monkeypatch, pg_url)
    assert (code, report["differs"]) == (0, False), report
    assert emulator.state.totals() == {customer: 9}


def test_fix_recreates_a_pruned_event_that_polar_lost_and_bills_it_once(
    env: None,
    clean_tables: Engine,
    pg_url: str,
    emulator: polar_emulator.RunningEmulator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with session_scope(clean_tables) as session:
        customer = make_customer(session, credits=100)
        record_usage(session, customer, 2)
        lost = record_usage(session, customer, 4, {"model": "gpt-x"})
    deliver_all(pg_url, clean_tables)
    with session_scope(clean_tables) as session:  # pruned after delivery
        session.execute(delete(OutboxEvent).where(OutboxEvent.id == lost.event_id))
    assert emulator.state.delete(lost.external_id)

    code, report = reconcile(monkeypatch, pg_url, "--fix")
    assert code == 1 and report["recreated"] == [lost.event_id], report
    with session_scope(clean_tables) as session:
        row = session.get(OutboxEvent, lost.event_id)
        assert row is not None and row.event_metadata == {}
        # The operator is told the caller's metadata is gone, and that billing is not.
        assert "metadata was pruned" in (row.last_error or "")
        assert "billing is unaffected" in (row.last_error or "")
    deliver_all(pg_url, clean_tables)
    assert emulator.state.totals() == {customer: 6}
    resent = emulator.state.by_external_id[lost.external_id].metadata
    assert resent == {
        "credits_used": 4,
        "usage_id": str(lost.event_id),
        "usage_external_id": lost.external_id,
    }
    code, _ = reconcile(monkeypatch, pg_url)
    assert code == 0


def test_no_drift_costs_one_totals_request_and_one_difference_a_handful(
    env: None,
    clean_tables: Engine,
    pg_url: str,
    emulator: polar_emulator.RunningEmulator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with session_scope(clean_tables) as session:
        customers = [make_customer(session, credits=100) for _ in range(40)]
        results = [record_usage(session, c, 1 + n % 3) for c in customers for n in range(3)]
    deliver_all(pg_url, clean_tables)
    monkeypatch.setenv("POLAR_METER_ID", polar_emulator.METER_ID)

    before = emulator.state.stats.requests
    code, report = reconcile(monkeypatch, pg_url)
    assert code == 0, report
    # One totals request for the 40 customers, and (this database began inside the window)
    # one list of that first hour's events from before it began: none.
    assert emulator.state.stats.requests - before == report["polar_requests"] == 2
    assert emulator.state.stats.quantities_requests == 1

    lost = results[61]
    assert emulator.state.delete(lost.external_id)
    before = emulator.state.stats.requests
    code, report = reconcile(monkeypatch, pg_url)
    assert code == 1
    assert [c["missing"] for c in report["customers"]] == [[lost.event_id]]
    # 2 as above + log2(40) ≈ 6 halvings + 1 listing, far from listing all 120 events.
    assert emulator.state.stats.requests - before == report["polar_requests"] <= 9
    assert emulator.state.stats.list_requests == 1 + 2


def test_where_polar_cannot_list_its_events_fix_resends_the_hour_and_polar_bills_the_lost_one(
    env: None,
    clean_tables: Engine,
    pg_url: str,
    emulator: polar_emulator.RunningEmulator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with session_scope(clean_tables) as session:
        customer = make_customer(session, credits=100)
    events = usage(clean_tables, customer, 2, 3, 4)
    deliver_all(pg_url, clean_tables)
    assert emulator.state.delete(events[0][1])
    emulator.configure(events_list_status=500)  # as Polar's own server without ClickHouse

    code, report = reconcile(monkeypatch, pg_url)
    assert code == 1
    [unsettled] = report["customers"][0]["unsettled"]
    assert unsettled["ledger_credits"] == 9 and unsettled["polar_credits"] == 7
    assert "500" in unsettled["reason"] and "--fix" in unsettled["fix"]

    code, report = reconcile(monkeypatch, pg_url, "--fix")
    assert code == 1
    assert [(r["sent"], r["inserted"], r["polar_credits_after"]) for r in report["resent"]] == [
        (3, 1, 9)
    ]
    assert report["totals"]["unsettled"] == 0
    assert emulator.state.totals() == {customer: 9}
    code, report = reconcile(monkeypatch, pg_url, "--fix")
    assert code == 0 and report["resent"] == []


def test_a_polar_error_is_one_line_and_exit_2(
    env: None,
    clean_tables: Engine,
    pg_url: str,
    emulator: polar_emulator.RunningEmulator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", pg_url)
    get_settings.cache_clear()
    emulator.configure(accepted_tokens=["rotated"])
    result = runner.invoke(cli, ["reconcile"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    # Off a terminal each step is a line on stderr; the error is the last, one line.
    *steps, error = result.stderr.strip().splitlines()
    assert "401" in error and not any("401" in line for line in steps), result.stderr
    assert emulator.token not in result.output


def test_reconcile_takes_only_its_share_of_the_shared_budget(
    env: None,
    clean_tables: Engine,
    pg_url: str,
    emulator: polar_emulator.RunningEmulator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """10 requests per 2 s window (allowance 8): reconcile may take 1 per window (20%), so
    its 3 requests (a totals request, the first hour's list and a meter lookup) come a window
    apart.

    Checked on the gaps the emulator sees, not on its fixed windows: the budget spaces its
    grants 2 s apart exactly, so a request that reaches the emulator a few ms late shares a
    fixed window with the next (a loaded run saw 58.04 s and 59.96 s in [58, 60)). Without
    the share they come milliseconds apart."""
    with session_scope(clean_tables) as session:
        customer = make_customer(session, credits=100)
    usage(clean_tables, customer, 1)
    deliver_all(pg_url, clean_tables)
    monkeypatch.setenv("POLAR_REQUESTS_PER_MINUTE", "10")
    monkeypatch.setenv("POLAR_RATE_WINDOW_SECONDS", "2")
    emulator.configure(window_seconds=2.0)
    time.sleep(2.1)  # the delivery's request is in an older window of the emulator's count
    with emulator.state.lock:
        emulator.state.stats = type(emulator.state.stats)()
    code, report = reconcile(monkeypatch, pg_url)
    assert code == 0 and report["polar_requests"] == 3
    times = emulator.state.stats.request_times
    assert len(times) == 3
    assert min(later - earlier for earlier, later in itertools.pairwise(times)) > 1.5, times


def test_off_a_terminal_each_step_is_one_line_on_stderr(
    env: None,
    clean_tables: Engine,
    pg_url: str,
    emulator: polar_emulator.RunningEmulator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A cron job or CI log sees what reconcile does as it goes (a spinner shows nothing)."""
    with session_scope(clean_tables) as session:
        customer = make_customer(session, credits=100)
    usage(clean_tables, customer, 2)
    deliver_all(pg_url, clean_tables)
    monkeypatch.setenv("DATABASE_URL", pg_url)
    get_settings.cache_clear()
    result = runner.invoke(cli, ["reconcile", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["totals"]["ledger_credits"] == 2
    assert result.stderr.splitlines() == [
        "comparing meter totals with Polar...",
        "finding the meter that sums our usage events",
        "comparing meter totals: customer group 1/1",
    ]


@pytest.mark.parametrize("deadline", ["0s", "soon", "-5m"])
def test_a_bad_deadline_is_exit_2_naming_the_option(
    env: None, clean_tables: Engine, pg_url: str, monkeypatch: pytest.MonkeyPatch, deadline: str
) -> None:
    monkeypatch.setenv("DATABASE_URL", pg_url)
    get_settings.cache_clear()
    result = runner.invoke(cli, ["reconcile", "--deadline", deadline])
    assert result.exit_code == 2 and "--deadline" in result.stderr, result.output


def test_reconcile_starved_by_delivery_says_so_and_stops_at_its_deadline(
    env: None,
    clean_tables: Engine,
    pg_url: str,
    emulator: polar_emulator.RunningEmulator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Delivery, its batches full, takes every slot of the shared budget as soon as it is due:
    reconcile (low priority) gets none. It says why while it waits, then stops at --deadline
    (exit 2, one line), instead of running on in silence (the review: 240 s and counting)."""
    with session_scope(clean_tables) as session:
        make_customer(session, credits=100)
    monkeypatch.setenv("DATABASE_URL", pg_url)
    monkeypatch.setenv("POLAR_REQUESTS_PER_MINUTE", "30")
    monkeypatch.setattr("outbox.polar.gateway.BUDGET_WAIT_REPORT_SECONDS", 0.5)
    get_settings.cache_clear()
    delivery = make_budget(get_settings())
    stop = threading.Event()

    def deliver() -> None:  # what a busy worker does with the budget
        while not stop.is_set():
            delivery.delivery_busy()
            wait = delivery.acquire(timeout=0.1)
            time.sleep(0.02 if wait is None else min(wait, 0.05))

    thread = threading.Thread(target=deliver, daemon=True)
    thread.start()
    try:
        result = runner.invoke(cli, ["reconcile", "--deadline", "3s"])
    finally:
        stop.set()
        thread.join(5)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    waits = [line for line in lines if line.startswith("waiting for a Polar request slot")]
    assert waits and "least): delivery goes first" in waits[0], lines
    assert "cannot finish within its deadline (3 s)" in lines[-1], lines
    assert "nothing was re-queued" in lines[-1]
    assert "Traceback" not in result.output


def seed_sql(engine: Engine, customer: str, rows: list[tuple[int, int, datetime]]) -> None:
    """Delivered usages written straight into the tables, at times in the past (the API can
    only record usage now): (event id, credits, when)."""
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO customers (id, balance, held, granted, used, created_at,"
                " updated_at) VALUES (:c, 1000, 0, 1000, 0, :t, :t)"
            ),
            {"c": customer, "t": rows[0][2] - timedelta(days=10)},
        )
        conn.execute(
            sa.text(
                "INSERT INTO ledger_entries (customer_id, kind, delta, balance_after, reason,"
                " created_at) VALUES (:c, 'grant', 1000, 1000, 'seed', :t)"
            ),
            {"c": customer, "t": rows[0][2] - timedelta(days=10)},
        )
        for event_id, credits, at in rows:
            params = {"id": event_id, "x": f"usage_{event_id}", "c": customer, "n": credits}
            conn.execute(
                sa.text(
                    "INSERT INTO outbox_events (id, external_id, customer_id, name, credits,"
                    " metadata, occurred_at, status, attempts, next_attempt_at, created_at,"
                    " updated_at, delivered_at) VALUES (:id, :x, :c, 'ai_generation', :n,"
                    " '{}', :t, 'delivered', 1, :t, :t, :t, :t)"
                ),
                {**params, "t": at},
            )
            conn.execute(
                sa.text(
                    "INSERT INTO ledger_entries (customer_id, kind, delta, balance_after,"
                    " event_id, external_id, created_at) VALUES (:c, 'usage', -:n, 1000, :id,"
                    " :x, :t)"
                ),
                {**params, "t": at},
            )


def test_a_month_is_compared_per_day_then_per_hour_where_a_day_differs(
    env: None,
    clean_tables: Engine,
    pg_url: str,
    emulator: polar_emulator.RunningEmulator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = datetime.now(UTC)
    rows = [(n, 1 + n % 3, now - timedelta(days=25, hours=-n * 7)) for n in range(1, 60)]
    seed_sql(clean_tables, "old_customer", rows)
    emulator.state.store(
        [
            {
                "name": "ai_generation",
                "external_customer_id": "old_customer",
                "external_id": f"usage_{n}",
                "timestamp": at,
                "metadata": {"credits_used": credits, "usage_id": str(n)},
            }
            for n, credits, at in rows
        ]
    )
    since = (now - timedelta(days=30)).isoformat()
    code, report = reconcile(monkeypatch, pg_url, "--since", since)
    assert (code, report["interval"]) == (0, "day"), report
    assert emulator.state.delete("usage_17")
    code, report = reconcile(monkeypatch, pg_url, "--since", since)
    assert code == 1
    assert [(c["customer_id"], c["missing"]) for c in report["customers"]] == [
        ("old_customer", [17])
    ]
    # meter lookup + daily totals + that day's hours + the hour's events
    assert report["polar_requests"] == 4


def test_a_failed_event_is_sent_to_replay_not_to_fix(
    env: None,
    clean_tables: Engine,
    pg_url: str,
    emulator: polar_emulator.RunningEmulator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--fix resends only delivered events Polar lost; a failed one needs `outbox replay`,
    and reconcile says so (it used to suggest --fix, which changed nothing)."""
    with session_scope(clean_tables) as session:
        customer = make_customer(session, credits=10)
    usage(clean_tables, customer, 2, 3)
    deliver_all(pg_url, clean_tables)
    ((failed_id, _),) = usage(clean_tables, customer, 4)
    with session_scope(clean_tables) as session:
        session.execute(
            sa.update(OutboxEvent)
            .where(OutboxEvent.id == failed_id)
            .values(status="failed", last_error="Polar: refused")
        )
    code, report = reconcile(monkeypatch, pg_url)
    assert code == 1
    (entry,) = [c for c in report["customers"] if c["customer_id"] == customer]
    assert entry["missing"] == [failed_id] and entry["failed"] == [failed_id]
    result = runner.invoke(cli, ["reconcile"])
    assert result.exit_code == 1, result.output
    assert "outbox replay" in result.stdout and f"[{failed_id}]" in result.stdout
    assert "--fix to re-queue" not in result.stdout


def test_refunds_reconcile_net_and_a_lost_compensation_is_found_and_billed_once(
    env: None,
    clean_tables: Engine,
    pg_url: str,
    emulator: polar_emulator.RunningEmulator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Compensating events are matched by identity like any event, totals are net (usage -
    refunds), a cancelled usage is not missing; a compensation Polar lost is re-queued (or
    re-created, pruned) with the same external_id and billed once."""
    from outbox.refunds import REFUND_OF_KEY, refund_usage

    with session_scope(clean_tables) as session:
        customer = make_customer(session, credits=100)
        whole = record_usage(session, customer, 7)
        partial = record_usage(session, customer, 5)
        cancelled = record_usage(session, customer, 4)
        part = refund_usage(session, partial.event_id, 2, reason="partial")
        assert refund_usage(session, cancelled.event_id, reason="r").action == "cancelled"
    deliver_all(pg_url, clean_tables)
    with session_scope(clean_tables) as session:
        late = refund_usage(session, whole.event_id, reason="after delivery")
    deliver_all(pg_url, clean_tables)
    assert emulator.state.totals() == {customer: 3}

    code, report = reconcile(monkeypatch, pg_url)
    assert code == 0, report
    assert report["totals"]["ledger_credits"] == report["totals"]["polar_credits"] == 3
    assert report["totals"]["missing"] == report["totals"]["in_flight"] == 0

    assert late.compensation_external_id is not None
    assert emulator.state.delete(late.compensation_external_id)  # Polar lost it
    code, report = reconcile(monkeypatch, pg_url, "--fix")
    assert code == 1 and report["requeued"] == [late.compensation_event_id], report
    deliver_all(pg_url, clean_tables)
    assert emulator.state.totals() == {customer: 3}
    assert reconcile(monkeypatch, pg_url)[0] == 0

    # A pruned compensation that Polar lost is written again from the ledger.
    assert part.compensation_event_id is not None and part.compensation_external_id is not None
    with session_scope(clean_tables) as session:
        session.execute(delete(OutboxEvent).where(OutboxEvent.id == part.compensation_event_id))
    assert emulator.state.delete(part.compensation_external_id)
    assert emulator.state.totals() == {customer: 5}
    code, report = reconcile(monkeypatch, pg_url, "--fix")
    assert code == 1 and report["recreated"] == [part.compensation_event_id], report
    with session_scope(clean_tables) as session:
        row = session.get(OutboxEvent, part.compensation_event_id)
        assert row is not None and (row.credits, row.refund_of) == (-2, partial.event_id)
        assert row.event_metadata == {REFUND_OF_KEY: partial.external_id}
    deliver_all(pg_url, clean_tables)
    assert emulator.state.totals() == {customer: 3}
    assert reconcile(monkeypatch, pg_url)[0] == 0
