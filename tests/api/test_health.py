"""/readyz tells a load balancer the truth about the schema: 503 `schema_not_migrated` until
`outbox db upgrade`, ready at once after it; and a /v1 call on an unmigrated database is a 503
naming the problem, not a 500; Polar refusing batches is reported but keeps the API ready, and
a check that raises is not ready."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from api.app import create_app
from outbox.db import make_engine, session_scope
from outbox.migrate import upgrade
from outbox.service_state import (
    CREDENTIALS_REJECTED,
    INGEST_UNATTRIBUTED_422,
    POLAR_CREDENTIALS,
    POLAR_INGEST,
    set_state,
)
from outbox.settings import load_settings
from tests.cli.test_errors import FIRST_REVISION


@pytest.fixture(params=["postgresql", "sqlite"])
def unmigrated_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgresql":
        return str(request.getfixturevalue("empty_pg_url"))
    url = f"sqlite:///{tmp_path}/outbox.db"
    make_engine(url).connect().close()
    return url


@pytest.fixture
def unmigrated_client(unmigrated_url: str) -> Iterator[TestClient]:
    engine = make_engine(unmigrated_url)
    with TestClient(create_app(load_settings(database_url=unmigrated_url), engine=engine)) as c:
        yield c
    engine.dispose()


def test_readyz_is_503_until_the_schema_is_migrated(
    unmigrated_client: TestClient, unmigrated_url: str
) -> None:
    response = unmigrated_client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "not_ready" and body["code"] == "schema_not_migrated"
    assert body["checks"]["database"] == "ok"
    assert "outbox db upgrade" in body["checks"]["schema"]

    upgrade(unmigrated_url, FIRST_REVISION)  # behind head: still not ready
    behind = unmigrated_client.get("/readyz").json()
    assert behind["code"] == "schema_not_migrated"
    assert f"at {FIRST_REVISION}" in behind["checks"]["schema"]

    upgrade(unmigrated_url)
    ready = unmigrated_client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"]["schema"] == "ok"


def test_a_v1_call_on_an_unmigrated_database_is_a_503_naming_it(
    unmigrated_client: TestClient,
) -> None:
    response = unmigrated_client.get(
        "/v1/customers/alice/credits", headers={"Authorization": "Bearer pou_whatever"}
    )
    assert response.status_code == 503, response.text
    assert response.json()["code"] == "schema_not_migrated"


def test_a_422_naming_no_event_is_reported_but_keeps_the_api_ready(
    client: TestClient, clean_tables: Engine
) -> None:
    """The request path never depends on Polar (DESIGN 4): Polar refusing our batches is shown
    under `polar_ingest` but does not take the API out of rotation; a rejected token does."""
    with session_scope(clean_tables) as session:
        set_state(session, POLAR_INGEST, INGEST_UNATTRIBUTED_422, "['body', 'events']: bad")
    response = client.get("/readyz")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ready"
    assert "naming no event" in body["checks"]["polar_ingest"]
    assert "['body', 'events']: bad" in body["checks"]["polar_ingest"]

    with session_scope(clean_tables) as session:
        set_state(session, POLAR_CREDENTIALS, CREDENTIALS_REJECTED, "401 invalid_token")
    rejected = client.get("/readyz")
    assert rejected.status_code == 503, rejected.text
    assert "rejected by Polar" in rejected.json()["checks"]["polar_credentials"]


@pytest.fixture(params=["postgresql", "sqlite"])
def migrated_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    url = (
        str(request.getfixturevalue("empty_pg_url"))
        if request.param == "postgresql"
        else f"sqlite:///{tmp_path}/outbox.db"
    )
    upgrade(url)
    return url


def test_a_check_that_raises_after_select_1_is_not_ready(migrated_url: str) -> None:
    """The database answers `SELECT 1` but reading the shared state fails (here: its table is
    gone): 503 naming the check, not 200 with `"database": "ok"`."""
    engine = make_engine(migrated_url)
    try:
        with TestClient(create_app(load_settings(database_url=migrated_url), engine=engine)) as c:
            assert c.get("/readyz").status_code == 200
            with engine.begin() as conn:
                conn.exec_driver_sql("DROP TABLE service_state")
            response = c.get("/readyz")
        assert response.status_code == 503, response.text
        body = response.json()
        assert body["status"] == "not_ready"
        assert body["checks"]["database"] == "ok"
        assert body["checks"]["polar_credentials"].startswith("failed: ")
    finally:
        engine.dispose()
