"""The operator CLI: real commands against the test database; --json for scripts; bad input
gets a message naming the problem and exit code 2, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, select, update
from typer.testing import CliRunner

from cli.main import app
from outbox.db import session_scope
from outbox.ledger import record_usage
from outbox.models import AuditEntry, OutboxEvent
from outbox.settings import get_settings

runner = CliRunner()


@pytest.fixture
def cli_db(clean_tables: Engine, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Engine]:
    monkeypatch.setenv("DATABASE_URL", pg_url)
    get_settings.cache_clear()
    yield clean_tables
    get_settings.cache_clear()


def run(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.stdout, result.stderr


def test_every_command_has_help() -> None:
    commands = [
        [],
        ["db", "upgrade"],
        ["token", "create"],
        ["grant"],
        ["refund"],
        ["debit"],
        ["serve"],
        ["worker"],
        ["dev"],
        ["status"],
        ["failed"],
        ["replay"],
        ["reconcile"],
        ["prune"],
        ["doctor"],
        ["polar-emulator"],
        ["events", "show"],
        ["customers", "show"],
    ]
    for command in commands:
        code, out, _ = run(*command, "--help")
        assert code == 0, command
        assert "Usage" in out, command


def test_grant_with_a_key_refund_and_debit(cli_db: Engine) -> None:
    for _ in range(2):  # a retried grant with the same key grants once
        code, out, _ = run("grant", "bob", "10", "--reason", "r", "--idempotency-key", "g1")
        assert code == 0, out
    code, out, _ = run("grant", "bob", "10", "--reason", "r", "--idempotency-key", "g1", "--json")
    assert code == 0 and json.loads(out) == {"grant_id": 1, "balance": 10, "replayed": True}
    with session_scope(cli_db) as session:
        usage = record_usage(session, "bob", 4)

    code, out, _ = run("refund", str(usage.event_id), "--credits", "1", "--reason", "goodwill")
    assert code == 0 and "compensating event" in out, out
    code, out, _ = run("refund", str(usage.event_id), "--reason", "the rest", "--json")
    body = json.loads(out)
    assert code == 0 and (body["credits"], body["balance"], body["action"]) == (
        3,
        10,
        "compensated",
    )
    code, _, err = run("refund", str(usage.event_id), "--reason", "again")
    assert code == 2 and "already refunded" in err
    code, _, err = run("refund", str(body["compensation_event_id"]), "--reason", "r")
    assert code == 2 and "only a usage can be refunded" in err
    code, _, err = run("refund", "999999", "--reason", "r")
    assert code == 2 and "no such usage event" in err
    code, _, err = run("refund", str(usage.event_id))
    assert code == 2 and "--reason" in err

    code, out, _ = run("debit", "bob", "3", "--reason", "duplicate grant", "--json")
    assert code == 0 and json.loads(out)["balance"] == 7
    code, _, err = run("debit", "bob", "8", "--reason", "too much")
    assert code == 2 and "enough credits" in err
    code, _, err = run("debit", "bob", "1", "--reason", "")
    assert code == 2 and "reason" in err
    code, out, _ = run("status", "--json")
    assert json.loads(out)["credits_refunded"] == 4
    # Each refund and debit that changed something is in the audit log, refusals are not.
    with session_scope(cli_db) as session:
        entries = session.scalars(
            select(AuditEntry)
            .where(AuditEntry.action.in_(["refund", "debit"]))
            .order_by(AuditEntry.id)
        ).all()
        assert [(e.action, e.reason, e.detail["credits"]) for e in entries] == [
            ("refund", "goodwill", 1),
            ("refund", "the rest", 3),
            ("debit", "duplicate grant", 3),
        ]
        assert all(e.actor.startswith("cli:") for e in entries)
        assert entries[1].detail["event_id"] == usage.event_id
        assert entries[1].detail["action"] == "compensated"


def test_grant_status_failed_replay_round_trip(cli_db: Engine) -> None:
    code, out, _ = run("grant", "alice", "10", "--reason", "welcome", "--json")
    assert code == 0 and json.loads(out)["balance"] == 10
    with session_scope(cli_db) as session:
        ids = [record_usage(session, "alice", 2).event_id for _ in range(2)]
        session.execute(
            update(OutboxEvent)
            .where(OutboxEvent.id == ids[0])
            .values(status="failed", last_error="Polar: customer refused [loc 0]")
        )
    code, out, _ = run("status", "--json")
    stats = json.loads(out)
    assert code == 0
    assert stats["counts"]["failed"] == 1 and stats["credits_undelivered"] == 4

    code, out, _ = run("failed", "--json")
    rows = json.loads(out)
    assert [r["event_id"] for r in rows] == [ids[0]]
    assert rows[0]["last_error"] == "Polar: customer refused [loc 0]"

    code, out, _ = run("failed")  # the table for people, 80 columns wide when not a terminal
    assert code == 0
    assert (
        "alice" in out
        and "Polar: customer refused [loc 0]" in out
        and f"#{ids[0]}  alice  2 credits" in out
    )

    code, out, _ = run("replay", "--all-failed", "--dry-run", "--json")
    assert code == 0 and json.loads(out)["would_replay"] == 1
    code, out, _ = run("replay", "--event-id", str(ids[1]))
    assert code == 2  # pending: not replayable
    code, out, _ = run("replay", "--all-failed", "--reason", "fixed", "--json")
    assert code == 0 and json.loads(out)["event_ids"] == [ids[0]]
    code, out, _ = run("failed", "--json")
    assert json.loads(out) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["grant", "bob", "0", "--reason", "x"], "credits"),
        (["grant", " bob", "1", "--reason", "x"], "customer_id"),
        (["token", "create", "--scope", "root"], "scope"),
        (["replay"], "--event-id"),
        (["replay", "--event-id", "1", "--all-failed"], "not both"),
        (["replay", "--event-id", "424242"], "no such event"),
        (["replay", "--customer", "c"], "--event-id"),
        (["prune", "--older-than", "soon"], "older_than"),
        (["prune", "--older-than", "0d"], "positive"),
        (["failed", "--customer", ""], "customer_id"),
        (["reconcile", "--since", "yesterday"], "--since"),
        (["events", "show", "424242"], "no such event"),
        (["customers", "show", "nobody"], "No such customer"),
        (["serve", "--console-only", "--no-console"], "not both"),
    ],
)
def test_bad_input_is_named_and_exits_2(cli_db: Engine, args: list[str], message: str) -> None:
    code, out, err = run(*args)
    assert code == 2, out + err
    assert message in out + err


def test_bad_configuration_exits_2_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OUTBOX_BATCH_SIZE", "lots")
    get_settings.cache_clear()
    try:
        code, out, err = run("status")
    finally:
        get_settings.cache_clear()
    assert code == 2
    assert "OUTBOX_BATCH_SIZE" in out + err


def test_token_create_prints_the_token_alone(cli_db: Engine) -> None:
    code, out, _ = run("token", "create", "--scope", "usage", "--name", "app")
    assert code == 0
    assert out.strip().startswith("pou_") and len(out.strip().splitlines()) == 1


def test_tokens_can_be_listed_and_revoked(cli_db: Engine) -> None:
    code, out, _ = run("token", "create", "--scope", "admin", "--name", "ops")
    assert code == 0
    code, out, _ = run("token", "list", "--json")
    [row] = json.loads(out)
    assert (row["name"], row["scope"], row["revoked_at"]) == ("ops", "admin", None)
    assert run("token", "revoke", str(row["id"]))[0] == 0
    assert run("token", "revoke", str(row["id"]))[0] == 2  # already revoked
    assert json.loads(run("token", "list", "--json")[1])[0]["revoked_at"]


def test_db_upgrade_as_the_migration_container_runs_it(tmp_path: Path) -> None:
    """The exact command of docker-compose's `migrate` service, as a real process."""
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path}/fresh.db"}
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "db", "upgrade"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "fresh.db").exists()


def test_replay_without_a_choice_says_what_to_give(cli_db: Engine) -> None:
    code, out, err = run("replay")
    assert code == 2 and out == ""
    assert "--event-id ID (repeatable) or --all-failed" in err and "not both" not in err
    code, _, err = run("replay", "--all-failed", "--event-id", "1")
    assert code == 2 and "not both" in err


def test_reconcile_refuses_a_since_in_the_future(cli_db: Engine) -> None:
    """It would compare nothing and say all is well."""
    code, out, err = run("reconcile", "--since", "2999-01-01T00:00:00Z")
    assert code == 2 and out == ""
    assert "--since 2999-01-01T00:00:00Z is in the future" in err


def test_prune_writes_no_spinner_where_stderr_is_not_a_terminal(
    pg_url: str, clean_tables: Engine, tmp_path: Path
) -> None:
    """A log file or a pipe gets the result, not a frame of the progress spinner."""
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "prune"],
        cwd=tmp_path,
        env={**os.environ, "DATABASE_URL": pg_url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and "deleted 0 delivered row(s)" in result.stdout


def test_flags_are_shown_as_flags() -> None:
    """`--json` takes no value; `--beat` is on unless `--no-beat` (help and reference)."""
    _, out, _ = run("status", "--help")
    assert "--json " in out and "<bool>" not in out
    _, out, _ = run("worker", "--help")
    assert "--beat / --no-beat" in out and "[default: beat]" in out
    reference = (Path(__file__).resolve().parents[2] / "docs" / "reference" / "cli.md").read_text()
    assert "| `--beat`, `--no-beat` | on |" in reference


def _failed_event(engine: Engine, customer: str, message: str) -> int:
    from outbox.events import claim_batch, fail_if_claimed
    from outbox.ledger import grant_credits
    from outbox.models import utcnow

    with session_scope(engine) as session:
        grant_credits(session, customer, 10, reason="welcome")
        event_id = record_usage(session, customer, 2, {"model": "m1"}).event_id
    now = utcnow()
    with session_scope(engine) as session:
        session.execute(update(OutboxEvent).values(next_attempt_at=now))
        claim_batch(session, owner="w:1", limit=10, now=now, lease_seconds=60, hold_back_until=now)
        fail_if_claimed(session, errors={event_id: message}, owner="w:1", now=now, polar_status=422)
    return event_id


def test_replay_says_what_it_did_and_the_history_keeps_the_failure(cli_db: Engine) -> None:
    event_id = _failed_event(cli_db, "carol", "422: carol refused")
    code, out, _ = run("replay", "--event-id", str(event_id), "--reason", "fixed in Polar")
    assert code == 0
    assert "replayed 1 event(s), 2 credits, as replay #" in out and "pending again" in out
    assert "it had failed with: 422: carol refused" in out  # the old error, said to be old
    assert "\n  last error:" not in out

    code, out, _ = run("events", "show", str(event_id), "--json")
    shown = json.loads(out)
    assert code == 0 and shown["status"] == "pending"
    assert shown["sent"]["external_customer_id"] == "carol"
    assert shown["sent"]["metadata"]["model"] == "m1"
    assert [(h["decision"], h["polar_status"], h["message"]) for h in shown["history"]] == [
        ("failed", 422, "422: carol refused"),
        ("replayed", None, None),
    ]
    assert shown["history"][1]["replay_reason"] == "fixed in Polar"
    code, out, _ = run("events", "show", str(event_id))
    assert code == 0 and "422: carol refused" in out and "fixed in Polar" in out


def test_customers_show(cli_db: Engine) -> None:
    event_id = _failed_event(cli_db, "dave", "422: nope")
    code, out, _ = run("customers", "show", "dave", "--json")
    shown = json.loads(out)
    assert code == 0
    assert (shown["balance"], shown["granted"], shown["used"], shown["held"]) == (8, 10, 2, 0)
    assert [e["kind"] for e in shown["ledger"]] == ["usage", "grant"]
    assert [u["event_id"] for u in shown["usage_events"]] == [event_id]
    code, out, _ = run("customers", "show", "dave")
    assert code == 0 and "balance 8" in out and "422: nope" in out


def test_status_shows_the_last_drain_and_the_workers(cli_db: Engine) -> None:
    from outbox.service_state import record_drain

    code, out, _ = run("status", "--json")
    assert code == 0 and json.loads(out)["delivery"]["last_drain_at"] is None
    code, out, _ = run("status")
    assert code == 0 and "never" in out
    with session_scope(cli_db) as session:
        record_drain(session, "host-b:7", 3)
    code, out, _ = run("status", "--json")
    assert code == 0
    delivery = json.loads(out)["delivery"]
    assert delivery["last_drain_worker"] == "host-b:7"
    assert [w["worker"] for w in delivery["workers"]] == ["host-b:7"]
    code, out, _ = run("status")
    assert code == 0 and "host-b:7" in out


def test_a_grant_is_recorded_in_the_audit_log(cli_db: Engine) -> None:
    from sqlalchemy import select

    from outbox.models import AuditEntry

    code, _, _ = run("grant", "erin", "5", "--reason", "promo")
    assert code == 0
    with session_scope(cli_db) as session:
        entry = session.scalars(select(AuditEntry)).one()
    assert (entry.action, entry.reason, entry.detail["credits"]) == ("grant", "promo", 5)
    assert entry.actor.startswith("cli:")
