"""outbox/ops/doctor.py: for one configuration at a time, each check's ✓ or ✗ and the one-line
fix it prints, against real PostgreSQL, SQLite, Redis and the emulator standing in for Polar.

`outbox doctor` as a command (exit codes, the emulator's URL in the output, a missing webhook
secret, an unmigrated schema, SQLite in production, a missing SQLite file):
tests/acceptance/test_admin_and_doctor.py; a database URL's password never printed:
tests/cli/test_errors.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine

import polar_emulator
from outbox.ops.doctor import Check, polar_target, run_checks
from outbox.polar.gateway import PolarGateway
from outbox.polar.ratelimit import LocalRateBudget
from outbox.settings import Settings, load_settings


@pytest.fixture
def emulator() -> Iterator[polar_emulator.RunningEmulator]:
    running = polar_emulator.serve_in_thread()
    yield running
    running.stop()


@pytest.fixture
def complete(
    pg_url: str, redis_url: str, emulator: polar_emulator.RunningEmulator
) -> dict[str, Any]:
    """A production-like configuration in which every check passes."""
    return {
        "database_url": pg_url,
        "redis_url": redis_url,
        "polar_access_token": emulator.token,
        "polar_base_url": emulator.url,
        "polar_product_id": polar_emulator.PRODUCT_ID,
        "polar_webhook_secret": "whsec_dGVzdA==",
    }


def doctor(**values: Any) -> dict[str, Check]:
    settings = load_settings(**values)
    checks = run_checks(settings, lambda: gateway(settings))
    return {check.name: check for check in checks}


def gateway(settings: Settings) -> PolarGateway:
    return PolarGateway(settings, budget=LocalRateBudget(100_000))


def failed(checks: dict[str, Check]) -> dict[str, str]:
    """The ✗ lines: each failed check's fix."""
    return {name: c.fix for name, c in checks.items() if not c.ok and not c.skipped}


def test_a_complete_setup_passes_every_check_with_nothing_to_fix(complete: dict[str, Any]) -> None:
    checks = doctor(**complete)
    assert failed(checks) == {}
    assert all(check.fix == "" for check in checks.values())
    assert checks["meter credits benefit"].detail == "20 credits per cycle"


def test_redis_down_is_named_with_its_fix(complete: dict[str, Any]) -> None:
    checks = doctor(**{**complete, "redis_url": "redis://127.0.0.1:1/0"})
    assert failed(checks) == {"redis": "check REDIS_URL"}
    assert checks["redis"].detail == "unreachable: ConnectionError"


def test_sqlite_needs_no_redis(complete: dict[str, Any], sqlite_engine: Engine) -> None:
    url = sqlite_engine.url.render_as_string(hide_password=False)
    checks = doctor(**{**complete, "database_url": url, "redis_url": "redis://127.0.0.1:1/0"})
    assert failed(checks) == {}
    assert checks["redis"].detail == "not needed with SQLite (outbox dev)"
    assert checks["database"].detail.startswith("reachable (SQLite ")


def test_without_a_token_polar_is_not_asked_anything(complete: dict[str, Any]) -> None:
    checks = doctor(**{**complete, "polar_access_token": None})
    assert failed(checks) == {
        "polar token": "create an organization access token in Polar and set POLAR_ACCESS_TOKEN"
    }
    assert list(checks)[-1] == "polar token"  # no meter nor product check after it


def test_a_meter_id_that_names_no_meter_of_ours_is_named(complete: dict[str, Any]) -> None:
    checks = doctor(**{**complete, "polar_meter_id": "meter_of_another_org"})
    meter = checks["meter"]
    assert not meter.ok and meter.detail.endswith("with id meter_of_another_org")
    assert meter.fix == (
        "in Polar: Products → Meters → Create: filter name = ai_generation, "
        "aggregation sum of credits_used"
    )


def test_a_product_polar_does_not_know_is_named(complete: dict[str, Any]) -> None:
    checks = doctor(**{**complete, "polar_product_id": "prod_typo"})
    assert failed(checks) == {"product": "set POLAR_PRODUCT_ID to the Pro product's id"}
    assert checks["product"].detail == "POLAR_PRODUCT_ID prod_typo: not found"
    assert "metered price" not in checks


def test_a_product_without_its_metered_price_and_credits_names_both(
    complete: dict[str, Any], emulator: polar_emulator.RunningEmulator
) -> None:
    bare = {"id": polar_emulator.PRODUCT_ID, "name": "Homeify Pro", "prices": [], "benefits": []}
    emulator.configure(products={polar_emulator.PRODUCT_ID: bare})
    checks = doctor(**complete)
    assert failed(checks) == {
        "metered price": "add a Metered Price linked to the meter to the product",
        "meter credits benefit": "create a Meter Credits benefit on the meter and attach it",
    }
    assert checks["product"].ok and checks["product"].detail == (
        f"'Homeify Pro' ({polar_emulator.PRODUCT_ID})"
    )


@pytest.mark.parametrize(
    ("environment", "target"),
    [
        ("sandbox", "Polar sandbox (https://sandbox-api.polar.sh)"),
        ("production", "Polar production (https://api.polar.sh)"),
    ],
)
def test_doctor_says_which_polar_it_talks_to(environment: str, target: str) -> None:
    settings = load_settings(polar_environment=environment, polar_base_url=None)
    assert polar_target(settings) == target


def test_a_check_reads_the_same_in_json() -> None:
    check = Check("redis", False, "unreachable: ConnectionError", "check REDIS_URL")
    assert check.as_dict() == {
        "check": "redis",
        "ok": False,
        "detail": "unreachable: ConnectionError",
        "fix": "check REDIS_URL",
        "skipped": False,
    }
