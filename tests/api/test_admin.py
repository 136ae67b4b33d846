"""POST /v1/admin/outbox/replay agrees with `outbox replay` and its docs: either `event_ids` or
`status: "failed"` (optionally with `customer_id`), never both, never neither; a dry run answers
`would_replay` and moves nothing; the answer is the CLI's `--json` object."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select, update
from typer.testing import CliRunner

from cli.main import app as cli
from outbox.db import session_scope
from outbox.ledger import record_usage
from outbox.models import OutboxEvent
from outbox.settings import get_settings

REPLAY = "/v1/admin/outbox/replay"


@pytest.fixture
def failed_ids(clean_tables: Engine, fund: Callable[[str, int], None]) -> list[int]:
    """Two failed events of alice, one of bob, and one pending event of alice."""
    fund("alice", 50)
    fund("bob", 50)
    with session_scope(clean_tables) as session:
        ids = [record_usage(session, c, 2).event_id for c in ("alice", "alice", "bob", "alice")]
        session.execute(
            update(OutboxEvent)
            .where(OutboxEvent.id.in_(ids[:3]))
            .values(status="failed", last_error="Polar: refused")
        )
    return ids


def statuses(engine: Engine) -> dict[int, str]:
    with session_scope(engine) as session:
        return dict(session.execute(select(OutboxEvent.id, OutboxEvent.status)).all())


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "event_ids"),
        ({"dry_run": True}, "event_ids"),
        ({"event_ids": [1], "status": "failed"}, "status"),
        ({"event_ids": [1], "customer_id": "alice"}, "customer_id"),
        ({"customer_id": "alice"}, "customer_id"),
        ({"event_ids": [2**63]}, "event_ids.0"),
        ({"event_ids": [0]}, "event_ids.0"),
        ({"event_ids": []}, "event_ids"),
    ],
)
def test_a_replay_that_is_not_either_or_is_422_naming_a_real_field(
    client: TestClient,
    admin_headers: dict[str, str],
    failed_ids: list[int],
    clean_tables: Engine,
    body: dict[str, object],
    field: str,
) -> None:
    before = statuses(clean_tables)
    response = client.post(REPLAY, json=body, headers=admin_headers)
    assert response.status_code == 422, response.text
    error = response.json()
    assert error["code"] == "invalid_request" and error["field"] == field
    assert "all_failed" not in error["detail"]
    assert statuses(clean_tables) == before


def test_a_dry_run_answers_would_replay_and_moves_nothing(
    client: TestClient, admin_headers: dict[str, str], failed_ids: list[int], clean_tables: Engine
) -> None:
    before = statuses(clean_tables)
    response = client.post(
        REPLAY,
        json={"status": "failed", "customer_id": "alice", "dry_run": True},
        headers=admin_headers,
    )
    assert response.status_code == 200, response.text
    assert response.json() == {
        "replayed": 0,
        "would_replay": 2,
        "event_ids": failed_ids[:2],
        "credits": 4,
        "dry_run": True,
        "replay_id": None,
    }
    assert statuses(clean_tables) == before


def test_the_api_and_the_cli_answer_the_same_object(
    client: TestClient,
    admin_headers: dict[str, str],
    failed_ids: list[int],
    monkeypatch: pytest.MonkeyPatch,
    pg_url: str,
) -> None:
    monkeypatch.setenv("DATABASE_URL", pg_url)
    get_settings.cache_clear()
    runner = CliRunner()
    for api_body, cli_args in [
        ({"status": "failed", "dry_run": True}, ["--all-failed", "--dry-run"]),
        (
            {"event_ids": failed_ids[:1], "dry_run": True},
            ["--event-id", str(failed_ids[0]), "--dry-run"],
        ),
    ]:
        api = client.post(REPLAY, json=api_body, headers=admin_headers).json()
        result = runner.invoke(cli, ["replay", *cli_args, "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout) == api
    done = client.post(REPLAY, json={"event_ids": failed_ids[2:3]}, headers=admin_headers).json()
    assert done["replayed"] == 1 and done["would_replay"] is None and done["replay_id"]
    assert done["event_ids"] == failed_ids[2:3] and done["credits"] == 2
    get_settings.cache_clear()


def test_an_events_history_over_http_and_a_viewer_reads_but_cannot_replay(
    client: TestClient,
    admin_headers: dict[str, str],
    new_token: Callable[[str], str],
    failed_ids: list[int],
) -> None:
    viewer = {"Authorization": f"Bearer {new_token('viewer')}"}
    done = client.post(
        REPLAY, json={"event_ids": failed_ids[:1], "reason": "fixed"}, headers=admin_headers
    )
    assert done.status_code == 200
    answer = client.get(f"/v1/admin/outbox/events/{failed_ids[0]}", headers=viewer)
    assert answer.status_code == 200
    body = answer.json()
    assert body["status"] == "pending" and body["sent"]["external_customer_id"] == "alice"
    assert [(h["decision"], h["replay_reason"]) for h in body["history"]] == [("replayed", "fixed")]
    assert client.get("/v1/admin/outbox/stats", headers=viewer).status_code == 200
    assert client.get("/v1/admin/outbox/events", headers=viewer).status_code == 200
    refused = client.post(REPLAY, json={"event_ids": failed_ids[1:2]}, headers=viewer)
    assert refused.status_code == 403 and refused.json()["code"] == "forbidden"
    missing = client.get("/v1/admin/outbox/events/424242", headers=viewer)
    assert missing.status_code == 404 and missing.json()["code"] == "event_not_found"
    usage = {"Authorization": f"Bearer {new_token('usage')}"}
    assert client.get(f"/v1/admin/outbox/events/{failed_ids[0]}", headers=usage).status_code == 403


def test_a_grant_over_http_is_recorded_once_in_the_audit_log(
    client: TestClient, admin_headers: dict[str, str], clean_tables: Engine
) -> None:
    from sqlalchemy import func

    from outbox.models import AuditEntry

    headers = {**admin_headers, "Idempotency-Key": "grant-1"}
    for _ in range(2):  # the second is a replay of the first: nothing new is recorded
        answer = client.post(
            "/v1/customers/frank/grants", json={"credits": 7, "reason": "promo"}, headers=headers
        )
        assert answer.status_code == 201
    with session_scope(clean_tables) as session:
        assert session.scalar(select(func.count()).select_from(AuditEntry)) == 1
        entry = session.scalars(select(AuditEntry)).one()
    assert (entry.action, entry.reason, entry.actor) == ("grant", "promo", "api-token:test admin")
