"""The API against its own OpenAPI schema (schemathesis, in-process, real PostgreSQL): every
operation with the usage token and with the admin token, then a stateful run along the schema's
links. No 5xx, no status the schema does not list, no body that breaks its response schema, and
no valid request refused.

The CI run is small (SCHEMATHESIS_EXAMPLES=40 per operation, SCHEMATHESIS_STEPS=300: 30 stateful
scenarios of 10 calls; derandomized, so the same run every time; about 20 s). A longer, random
local run: SCHEMATHESIS_EXAMPLES=1000 SCHEMATHESIS_STEPS=3000 SCHEMATHESIS_RANDOM=1 (with -s for
the statuses seen).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.stateful import run_state_machine_as_test
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    positive_data_acceptance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy import Engine

from api.app import create_app
from outbox.db import make_engine
from outbox.models import Base
from outbox.settings import load_settings
from tests.api.conftest import bearer

pytestmark = pytest.mark.slow  # hundreds of generated requests

EXAMPLES = int(os.environ.get("SCHEMATHESIS_EXAMPLES", "40"))
STEPS = int(os.environ.get("SCHEMATHESIS_STEPS", "300"))
RANDOM = os.environ.get("SCHEMATHESIS_RANDOM", "") == "1"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    response_schema_conformance,
    positive_data_acceptance,
]
# A valid request may still be refused for what the database holds, never for its shape: no
# such customer/hold/event (404), not enough credits (402), a closed hold or a reused key (409).
# 400, 413, 415, 422 and 431 stay "valid request rejected".
CONFIG = schemathesis.Config.from_dict(
    {
        "checks": {
            "positive_data_acceptance": {
                "expected-statuses": ["2xx", "401", "402", "403", "404", "409"],
            }
        }
    }
)
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not RANDOM,
    database=None,
    suppress_health_check=list(HealthCheck),
)

SEEDED = "user_123"  # the schema's example
WEBHOOK_SECRET = "fuzz-webhook-secret"


def _served_schema() -> dict[str, Any]:
    """The schema the API serves; it does not depend on the database (checked below)."""
    return create_app(
        load_settings(database_url="sqlite://"), engine=make_engine("sqlite://")
    ).openapi()


SPEC = _served_schema()
SPEC_OPERATIONS = [
    (method, path)
    for path, item in SPEC["paths"].items()
    for method in item
    if method != "parameters"
]
# schemathesis' pytest fixture loader does not run on pytest 9 (it sets Function._nodeid): the
# schema is loaded here and each call goes to the test's app (real PostgreSQL) with `app=`.
schema = schemathesis.openapi.from_dict(SPEC, config=CONFIG)


def _whole_floats_as_integers(schema: Any) -> Any:
    """JSON Schema counts `3.0` as an integer; the API refuses it on purpose (a client that
    sends a float for credits has a bug; the schema's description says so). Such bodies are
    not generated."""

    @schema.hook("filter_body")
    def _no_float_integers(context: Any, body: Any) -> bool:
        if not isinstance(body, dict):
            return True
        ids = body.get("event_ids")
        integers = [body.get("credits"), *(ids if isinstance(ids, list) else [ids])]
        return not any(isinstance(value, float) for value in integers)

    return schema


schema = _whole_floats_as_integers(schema)


def test_the_fuzzed_schema_is_the_one_served(app: FastAPI) -> None:
    assert TestClient(app).get("/openapi.json").json() == SPEC


@pytest.fixture
def app(clean_tables: Engine, pg_url: str) -> FastAPI:
    """The API with webhooks configured (unsigned deliveries are then 403, not 503)."""
    settings = load_settings(database_url=pg_url, polar_webhook_secret=WEBHOOK_SECRET)
    return create_app(settings, engine=clean_tables)


@pytest.fixture
def seeded(fund: Callable[[str, int], None]) -> None:
    fund(SEEDED, 1_000_000)


# Statuses seen, by operation: printed at the end of the module's run (`-s` shows them).
SEEN: Counter[tuple[str, int]] = Counter()


@pytest.fixture(scope="module", autouse=True)
def report_statuses() -> Iterator[None]:
    yield
    for label in sorted({label for label, _ in SEEN}):
        counts = {status: n for (seen, status), n in sorted(SEEN.items()) if seen == label}
        print(f"\n{label}: {sum(counts.values())} calls, by status {counts}", end="")
    print(f"\ntotal: {sum(SEEN.values())} calls")


# One test per operation, parametrized by pytest: `schema.parametrize()` gives every
# operation the same node id, and pytest-xdist (scripts/test.sh) runs one item per node id,
# so 15 of the 16 operations went unfuzzed.
OPERATIONS = [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("operation", OPERATIONS, ids=[op.label for op in OPERATIONS])
def test_every_operation_with_either_token(
    operation: Any, app: FastAPI, seeded: None, usage_token: str, admin_token: str
) -> None:
    @given(case=operation.as_strategy())
    @FUZZ
    def fuzz(case: schemathesis.Case) -> None:
        for token in (usage_token, admin_token):
            response = case.call_and_validate(headers=bearer(token), checks=CHECKS, app=app)
            SEEN[case.operation.label, response.status_code] += 1

    fuzz()


def test_every_operation_is_fuzzed_under_its_own_id() -> None:
    assert len(OPERATIONS) == len(SPEC_OPERATIONS) > 10
    assert len({op.label for op in OPERATIONS}) == len(OPERATIONS)


SCENARIO_TABLES = ", ".join(
    f'"{table.name}"' for table in Base.metadata.sorted_tables if table.name != "api_tokens"
)


def test_stateful_links(
    app: FastAPI, admin_token: str, clean_tables: Engine, fund: Callable[[str, int], None]
) -> None:
    stateful = schemathesis.openapi.from_asgi("/openapi.json", app, config=CONFIG)
    machine_class = _whole_floats_as_integers(stateful).as_state_machine()
    headers = bearer(admin_token)
    found: list[str] = []

    class Machine(machine_class):  # type: ignore[misc,valid-type]
        def setup(self) -> None:
            # Each scenario starts from the same database (tokens kept), so hypothesis can
            # replay one: the links a scenario may take depend on what the API answered.
            with clean_tables.begin() as conn:
                conn.exec_driver_sql(f"TRUNCATE {SCENARIO_TABLES} RESTART IDENTITY")
            fund(SEEDED, 1_000_000)

        def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, Any]:
            return {"headers": headers}

        def validate_response(self, response: Any, case: schemathesis.Case, **kwargs: Any) -> None:
            SEEN[f"stateful {case.operation.label}", response.status_code] += 1
            try:
                case.validate_response(response, checks=CHECKS)
            except Exception as exc:
                # Replaying a stateful failure meets a database that has moved on (hypothesis
                # then reports FlakyStrategyDefinition): keep the first failure as it was.
                found.append(f"{case.as_curl_command(headers=headers)}\n{exc}")
                raise

    try:
        run_state_machine_as_test(
            Machine,
            settings=settings(
                max_examples=max(1, STEPS // 10),
                stateful_step_count=10,
                deadline=None,
                derandomize=not RANDOM,
                database=None,
                suppress_health_check=list(HealthCheck),
            ),
        )
    except Exception:
        if found:
            pytest.fail(f"first failure of the stateful run:\n{found[0]}", pytrace=False)
        raise
