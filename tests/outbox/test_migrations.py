"""Migrations that convert data, on PostgreSQL and SQLite, with rows the old schema wrote."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy.engine import make_url

from outbox.migrate import alembic_config, upgrade
from tests.conftest import TEST_DATABASE_URL, service_missing

BEFORE_WEBHOOK_BODIES = "c499b4e2ea0e"


@pytest.fixture(params=["postgresql", "sqlite"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database with no schema at all."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/migrate.db"
        return
    base = make_url(TEST_DATABASE_URL)
    name = f"outbox_migrate_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except sa.exc.OperationalError as exc:
        service_missing("PostgreSQL", exc)
    yield base.set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


def test_stored_webhooks_keep_their_payload_as_body_and_get_their_id_hash(empty_url: str) -> None:
    upgrade(empty_url, BEFORE_WEBHOOK_BODIES)
    engine = sa.create_engine(empty_url, poolclass=sa.pool.NullPool)
    payload = {"type": "benefit_grant.created", "data": {"n": 1}}
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO webhook_events (webhook_id, type, payload, received_at, outcome)"
                " VALUES ('wh_old', 'benefit_grant.created', :payload, :now, 'granted')"
            ),
            {"payload": json.dumps(payload), "now": "2026-11-30 00:00:00+00"},
        )
    upgrade(empty_url)
    with engine.connect() as conn:
        row = conn.execute(
            sa.text("SELECT webhook_id, webhook_id_sha256, body, outcome FROM webhook_events")
        ).one()
    assert row.webhook_id == "wh_old" and row.outcome == "granted"
    assert row.webhook_id_sha256 == hashlib.sha256(b"wh_old").hexdigest()
    assert json.loads(bytes(row.body)) == payload

    command.downgrade(alembic_config(empty_url), BEFORE_WEBHOOK_BODIES)
    with engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT webhook_id, payload FROM webhook_events")).one()
    assert stored.webhook_id == "wh_old"
    assert (json.loads(stored.payload) if isinstance(stored.payload, str) else stored.payload) == (
        payload
    )
    engine.dispose()
