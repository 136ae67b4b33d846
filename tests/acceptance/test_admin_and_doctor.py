"""The admin API (stats, events, replay: admin scope only) and `outbox doctor` against the
emulator."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, update
from typer.testing import CliRunner

import polar_emulator
from api.app import create_app
from cli.main import app as cli
from outbox.db import session_scope
from outbox.ledger import record_usage
from outbox.models import OutboxEvent
from outbox.settings import get_settings, load_settings
from outbox.tokens import create_token
from tests.factories import make_customer

runner = CliRunner()


@pytest.fixture
def api(clean_tables: Engine, pg_url: str) -> Iterator[tuple[TestClient, dict[str, str]]]:
    with session_scope(clean_tables) as session:
        admin, _ = create_token(session, "admin", name="ops")
        usage, _ = create_token(session, "usage", name="app")
    client = TestClient(create_app(load_settings(database_url=pg_url), engine=clean_tables))
    yield client, {"admin": admin, "usage": usage}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_admin_stats_events_and_replay(
    api: tuple[TestClient, dict[str, str]], clean_tables: Engine
) -> None:
    client, tokens = api
    with session_scope(clean_tables) as session:
        customer = make_customer(session, credits=50)
        ids = [record_usage(session, customer, 2).event_id for _ in range(4)]
        session.execute(
            update(OutboxEvent)
            .where(OutboxEvent.id.in_(ids[:2]))
            .values(status="failed", last_error="Polar: nope")
        )
    for path in ("/v1/admin/outbox/stats", "/v1/admin/outbox/events"):
        assert client.get(path, headers=bearer(tokens["usage"])).status_code == 403
        assert client.get(path).status_code == 401
    stats = client.get("/v1/admin/outbox/stats", headers=bearer(tokens["admin"])).json()
    assert stats["counts"] == {
        "pending": 2,
        "inflight": 0,
        "delivered": 0,
        "failed": 2,
        "cancelled": 0,
    }
    assert stats["credits_undelivered"] == 8
    assert set(stats) == {
        "counts",
        "oldest_pending_seconds",
        "delivered_last_minute",
        "credits_undelivered",
        "compensations_undelivered",
        "credits_refunded",
    }

    failed = client.get(
        "/v1/admin/outbox/events",
        params={"status": "failed", "limit": 1},
        headers=bearer(tokens["admin"]),
    ).json()
    assert [e["event_id"] for e in failed["items"]] == [ids[1]] and failed["next_cursor"]
    bad = client.get(
        "/v1/admin/outbox/events", params={"status": "lost"}, headers=bearer(tokens["admin"])
    )
    assert bad.status_code == 422 and bad.json()["field"] == "status"

    refused = client.post(
        "/v1/admin/outbox/replay",
        json={"event_ids": [ids[0], ids[3]]},
        headers=bearer(tokens["admin"]),
    )
    assert refused.status_code == 409 and refused.json()["code"] == "not_replayable"
    unknown = client.post(
        "/v1/admin/outbox/replay", json={"event_ids": [999999]}, headers=bearer(tokens["admin"])
    )
    assert unknown.status_code == 404 and unknown.json()["code"] == "event_not_found"
    dry = client.post(
        "/v1/admin/outbox/replay",
        json={"status": "failed", "customer_id": customer, "dry_run": True},
        headers=bearer(tokens["admin"]),
    ).json()
    assert dry == {
        "replayed": 0,
        "would_replay": 2,
        "event_ids": ids[:2],
        "credits": 4,
        "dry_run": True,
        "replay_id": None,
    }
    done = client.post(
        "/v1/admin/outbox/replay",
        json={"event_ids": ids[:2], "reason": "fixed"},
        headers=bearer(tokens["admin"]),
    ).json()
    assert done["replayed"] == 2 and done["replay_id"]
    events = client.get("/v1/admin/outbox/events", headers=bearer(tokens["admin"])).json()
    replayed = [e for e in events["items"] if e["event_id"] in ids[:2]]
    assert {e["status"] for e in replayed} == {"pending"}
    assert {e["last_replay_id"] for e in replayed} == {done["replay_id"]}
    nothing = client.post("/v1/admin/outbox/replay", json={}, headers=bearer(tokens["admin"]))
    assert nothing.status_code == 422


@pytest.fixture
def doctor_env(
    monkeypatch: pytest.MonkeyPatch, pg_url: str, redis_url: str
) -> Iterator[polar_emulator.RunningEmulator]:
    running = polar_emulator.serve_in_thread()
    for key, value in {
        "DATABASE_URL": pg_url,
        "REDIS_URL": redis_url,
        "POLAR_ACCESS_TOKEN": running.token,
        "POLAR_BASE_URL": running.url,
        "POLAR_PRODUCT_ID": polar_emulator.PRODUCT_ID,
        "POLAR_WEBHOOK_SECRET": "whsec_dGVzdA==",
    }.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    from outbox.polar.gateway import close_gateway

    close_gateway()
    yield running
    close_gateway()
    get_settings.cache_clear()
    running.stop()


def doctor() -> tuple[int, list[dict[str, object]]]:
    result = runner.invoke(cli, ["doctor", "--json"])
    assert "Traceback" not in result.output
    return result.exit_code, json.loads(result.stdout)


def test_doctor_passes_on_a_complete_setup_and_names_each_missing_piece(
    doctor_env: polar_emulator.RunningEmulator,
) -> None:
    code, checks = doctor()
    assert code == 0, checks
    assert [c["check"] for c in checks] == [
        "database",
        "schema",
        "redis",
        "webhook secret",
        "polar token",
        "meter",
        "product",
        "metered price",
        "meter credits benefit",
    ]
    token = next(c for c in checks if c["check"] == "polar token")
    # It says what it talked to: the emulator's URL, not "Polar sandbox".
    assert doctor_env.url in str(token["detail"]) and "POLAR_BASE_URL" in str(token["detail"])
    doctor_env.configure(meters=[])
    code, checks = doctor()
    meter = next(c for c in checks if c["check"] == "meter")
    assert code == 1 and meter["ok"] is False and "credits_used" in str(meter["fix"])
    doctor_env.configure(accepted_tokens=["someone-else"])
    code, checks = doctor()
    token = next(c for c in checks if c["check"] == "polar token")
    assert code == 1 and token["ok"] is False and "POLAR_ACCESS_TOKEN" in str(token["fix"])


def test_doctor_names_a_missing_webhook_secret_and_says_what_it_did_not_check(
    doctor_env: polar_emulator.RunningEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("POLAR_WEBHOOK_SECRET")
    monkeypatch.delenv("POLAR_PRODUCT_ID")
    get_settings.cache_clear()
    code, checks = doctor()
    by_name = {str(c["check"]): c for c in checks}
    secret = by_name["webhook secret"]
    assert code == 1 and secret["ok"] is False and "503" in str(secret["detail"])
    assert "POLAR_WEBHOOK_SECRET" in str(secret["fix"])
    product = by_name["product"]
    assert product["skipped"] is True and "POLAR_PRODUCT_ID is not set" in str(product["detail"])
    assert "metered price" not in by_name  # not checked, and said so


def test_doctor_refuses_sqlite_in_production_and_an_unmigrated_schema(
    doctor_env: polar_emulator.RunningEmulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from outbox.migrate import upgrade

    url = f"sqlite:///{tmp_path}/outbox.db"
    upgrade(url, "ae5a70274df4")  # the first revision: behind head
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("POLAR_ENVIRONMENT", "production")
    get_settings.cache_clear()
    code, checks = doctor()
    by_name = {str(c["check"]): c for c in checks}
    assert code == 1
    assert by_name["database"]["ok"] is True
    schema = by_name["schema"]
    assert schema["ok"] is False and "at ae5a70274df4" in str(schema["detail"])
    assert by_name["schema"]["fix"] == "outbox db upgrade"
    assert by_name["production database"]["ok"] is False
    assert "PostgreSQL" in str(by_name["production database"]["fix"])


def test_doctor_does_not_create_a_missing_sqlite_file(
    doctor_env: polar_emulator.RunningEmulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path}/typo.db")
    get_settings.cache_clear()
    code, checks = doctor()
    database = checks[0]
    assert code == 1 and database["check"] == "database" and database["ok"] is False
    assert "no SQLite database at" in str(database["detail"])
    assert "schema" not in {c["check"] for c in checks}
    assert not (tmp_path / "typo.db").exists()
