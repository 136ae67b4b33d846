"""`outbox doctor`: the production checklist as a command. Each check says ✓ or ✗ and, when it
fails, the fix in one line; a check that cannot run says - and why (it does not fail)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text

from outbox.errors import OutboxError
from outbox.polar.meters import sums_our_field
from outbox.settings import Settings


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    skipped: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "check": self.name,
            "ok": self.ok,
            "detail": self.detail,
            "fix": self.fix,
            "skipped": self.skipped,
        }


def check_database(settings: Settings) -> Check:
    """Reachable, without creating a SQLite file that is not there."""
    from outbox.db import open_database, safe_url, sqlite_file

    try:
        engine = open_database(settings.database_url, migrated=False)
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except OutboxError as exc:
        return Check("database", False, exc.detail, "check DATABASE_URL")
    except Exception as exc:
        return Check("database", False, f"unreachable: {type(exc).__name__}", "check DATABASE_URL")
    path = sqlite_file(settings.database_url)
    where = f"SQLite {path}" if path else safe_url(settings.database_url)
    return Check("database", True, f"reachable ({where})")


def check_schema(settings: Settings) -> Check:
    """Migrated to this code's head (pending migrations fail)."""
    from outbox.db import first_line, get_engine
    from outbox.migrate import schema_state

    try:
        with get_engine(settings.database_url).connect() as conn:
            state = schema_state(conn)
    except Exception as exc:
        return Check("schema", False, f"cannot read: {first_line(exc)}", "outbox db upgrade")
    return Check("schema", state.ok, state.describe(), "" if state.ok else "outbox db upgrade")


def check_production_database(settings: Settings) -> Check | None:
    """SQLite is `outbox dev`'s database; production billing needs PostgreSQL."""
    if not (settings.is_sqlite and settings.polar_environment == "production"):
        return None
    return Check(
        "production database",
        False,
        "SQLite with POLAR_ENVIRONMENT=production: SQLite is for `outbox dev` (one process, "
        "no worker, no backups of its own)",
        "set DATABASE_URL to PostgreSQL (postgresql+psycopg://...) and run `outbox db upgrade`",
    )


def check_webhook_secret(settings: Settings) -> Check:
    """Without the secret every webhook is refused, so no grant ever becomes credits."""
    if settings.polar_webhook_secret:
        return Check("webhook secret", True, "POLAR_WEBHOOK_SECRET is set")
    return Check(
        "webhook secret",
        False,
        "POLAR_WEBHOOK_SECRET is not set: every Polar webhook is answered 503, so no grant "
        "becomes credits",
        "in Polar: Settings → Webhooks → your endpoint → copy its secret into POLAR_WEBHOOK_SECRET",
    )


def polar_target(settings: Settings) -> str:
    """Which server the Polar checks talk to, for people: the URL and where it comes from."""
    if settings.polar_base_url:
        environment = settings.polar_environment
        return (
            f"{settings.polar_base_url} (POLAR_BASE_URL: not Polar's own {environment} API; "
            "the local emulator?)"
        )
    from polar.v2026_10.client import SERVERS

    return f"Polar {settings.polar_environment} ({SERVERS[settings.polar_environment]})"


def check_redis(settings: Settings) -> Check:
    if settings.is_sqlite:
        return Check("redis", True, "not needed with SQLite (outbox dev)")
    import redis

    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
        return Check("redis", True, "reachable")
    except redis.RedisError as exc:
        return Check("redis", False, f"unreachable: {type(exc).__name__}", "check REDIS_URL")
    finally:
        client.close()


def run_checks(settings: Settings, gateway_factory: Callable[[], Any]) -> list[Check]:
    """Every check, in order; Polar checks are skipped (✗) when the token is refused."""
    checks = [check_database(settings)]
    if checks[0].ok:
        checks.append(check_schema(settings))
    production = check_production_database(settings)
    checks.extend([production] if production else [])
    checks.extend([check_redis(settings), check_webhook_secret(settings)])
    if not settings.polar_access_token:
        checks.append(
            Check(
                "polar token",
                False,
                "POLAR_ACCESS_TOKEN is not set",
                "create an organization access token in Polar and set POLAR_ACCESS_TOKEN",
            )
        )
        return checks
    gateway = gateway_factory()
    try:
        meters = gateway.list_meters()
    except Exception as exc:
        checks.append(
            Check(
                "polar token",
                False,
                f"{polar_target(settings)} refused or failed: {exc}",
                "check POLAR_ACCESS_TOKEN and POLAR_ENVIRONMENT (sandbox tokens only work "
                "in sandbox)",
            )
        )
        return checks
    checks.append(Check("polar token", True, f"accepted by {polar_target(settings)}"))
    ours = [m for m in meters if sums_our_field(m, settings)]
    if settings.polar_meter_id:
        ours = [m for m in ours if m.get("id") == settings.polar_meter_id]
    if ours:
        meter = ours[0]
        checks.append(
            Check(
                "meter",
                True,
                f"{meter.get('name')!r} ({meter.get('id')}) sums "
                f"{settings.usage_credits_field} over {settings.usage_event_name}",
            )
        )
    else:
        checks.append(
            Check(
                "meter",
                False,
                f"no meter sums metadata.{settings.usage_credits_field} over events named "
                f"{settings.usage_event_name!r}"
                + (f" with id {settings.polar_meter_id}" if settings.polar_meter_id else ""),
                "in Polar: Products → Meters → Create: filter name = "
                f"{settings.usage_event_name}, aggregation sum of {settings.usage_credits_field}",
            )
        )
    if settings.polar_product_id:
        checks.extend(_product_checks(gateway, settings, ours))
    else:
        checks.append(
            Check(
                "product",
                True,
                "not checked: POLAR_PRODUCT_ID is not set (with it, doctor checks the "
                "product's metered price and Meter Credits benefit)",
                "set POLAR_PRODUCT_ID to the Pro product's id",
                skipped=True,
            )
        )
    return checks


def _product_checks(gateway: Any, settings: Settings, meters: list[dict[str, Any]]) -> list[Check]:
    product_id = settings.polar_product_id
    try:
        product = gateway.get_product(product_id)
    except Exception as exc:
        product = None
        error = str(exc)
    else:
        error = "not found"
    if not product:
        return [
            Check(
                "product",
                False,
                f"POLAR_PRODUCT_ID {product_id}: {error}",
                "set POLAR_PRODUCT_ID to the Pro product's id",
            )
        ]
    meter_ids = {m.get("id") for m in meters}
    prices = product.get("prices") or []
    metered = [p for p in prices if isinstance(p, dict) and p.get("meter_id") in meter_ids]
    benefits = [
        b
        for b in product.get("benefits") or []
        if isinstance(b, dict)
        and b.get("type") == "meter_credit"
        and (b.get("properties") or {}).get("meter_id") in meter_ids
    ]
    return [
        Check("product", True, f"{product.get('name')!r} ({product_id})"),
        Check(
            "metered price",
            bool(metered),
            "a metered price on the meter" if metered else "no metered price on the meter",
            "" if metered else "add a Metered Price linked to the meter to the product",
        ),
        Check(
            "meter credits benefit",
            bool(benefits),
            (
                f"{(benefits[0].get('properties') or {}).get('units')} credits per cycle"
                if benefits
                else "no Meter Credits benefit on the meter"
            ),
            "" if benefits else "create a Meter Credits benefit on the meter and attach it",
        ),
    ]
