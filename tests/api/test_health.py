"""/readyz tells a load balancer the truth about the schema: 503 `schema_not_migrated` until
`outbox db upgrade`, ready at once after it; and a /v1 call on an unmigrated database is a 503
naming the problem, not a 500."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from outbox.db import make_engine
from outbox.migrate import upgrade
from outbox.settings import load_settings
from tests.test_cli_errors import FIRST_REVISION


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
