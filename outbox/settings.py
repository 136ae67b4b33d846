"""Configuration: one `Settings` object read from the environment (and a `.env` file).

Malformed values fail at start-up with a message naming the variable (`load_settings`).
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Literal

from dotenv import dotenv_values
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from outbox.errors import ConfigError

DEFAULT_REQUESTS_PER_MINUTE = {"sandbox": 100, "production": 500}
_LEVELS = ("debug", "info", "warning", "error")


class Settings(BaseSettings):
    """Every variable the service reads (docs/reference/configuration.md)."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False
    )

    database_url: str = Field(
        "",
        description="SQLAlchemy URL; production: `postgresql+psycopg://user:pass@host/db`. "
        "Every command but `outbox dev` needs it set: none falls back to a default database "
        "(dev's `./outbox.db` is chosen with `outbox dev --database-url`, and dev prints an "
        "`export DATABASE_URL=...` line for a second terminal).",
    )
    redis_url: str = Field(
        "redis://localhost:6379/0",
        min_length=1,
        description="Celery broker and the shared Polar rate budget.",
    )
    polar_access_token: str | None = Field(
        None, description="Polar organization access token (a secret; never logged)."
    )
    polar_environment: Literal["sandbox", "production"] = Field(
        "sandbox", description="`sandbox` or `production`."
    )
    polar_base_url: str | None = Field(
        None, description="Overrides the environment's URL (the local emulator, a proxy)."
    )
    polar_webhook_secret: str | None = Field(
        None, description="Webhook signing secret (`whsec_...`); webhooks get 503 without it."
    )
    polar_product_id: str | None = Field(
        None, description="The Pro product; `outbox doctor` checks its metered price and benefit."
    )
    polar_meter_id: str | None = Field(
        None, description="When set, only Meter Credits grants for this meter become credits."
    )
    polar_requests_per_minute: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="The organization's Polar request budget, shared by all workers "
        "(default 100 in sandbox, 500 in production; kept with a safety margin).",
    )
    polar_rate_window_seconds: int = Field(
        60,
        ge=1,
        le=3600,
        description="Length of Polar's fixed rate window (60; shorter only for tests).",
    )
    usage_event_name: str = Field(
        "ai_generation", min_length=1, max_length=100, description="The meter's event name."
    )
    usage_credits_field: str = Field(
        "credits_used",
        min_length=1,
        max_length=40,
        description="The metadata key the meter sums (always sent as an integer).",
    )
    outbox_batch_size: int = Field(
        1000,
        ge=1,
        le=2000,
        description="Events per ingest request, at most (also at most 5 MiB of body). Polar's "
        "server fails a request whose events times the meters each matches pass 4,681 "
        "(docs/scaling.md).",
    )
    outbox_max_attempts: int = Field(
        25, ge=1, le=1000, description="Attempts before a row goes to `failed` (days of backoff)."
    )
    outbox_lease_seconds: int = Field(
        60, ge=5, le=86_400, description="How long a claimed batch is leased to its worker."
    )
    hold_ttl_seconds: int = Field(
        900, ge=1, le=7 * 86_400, description="An uncaptured hold is released after this."
    )
    # Extras beyond the core table of docs/reference/configuration.md.
    outbox_clock_margin_seconds: float = Field(
        0.5,
        ge=0,
        le=600,
        description="Events younger than this are not sent yet: Polar refuses timestamps in "
        "its future, so a little clock skew is absorbed here (more is retried, never failed).",
    )
    outbox_backoff_base_seconds: float = Field(
        2.0,
        gt=0,
        le=3600,
        description="Retry backoff: full jitter over base * 2^attempts, capped below.",
    )
    outbox_backoff_cap_seconds: float = Field(
        6 * 3600.0, gt=0, le=7 * 86_400, description="The longest wait between two attempts."
    )
    outbox_drain_interval_seconds: float = Field(
        5.0, gt=0, le=3600, description="Beat drains this often (the nudge is faster)."
    )
    outbox_retention_days: int = Field(
        30, ge=1, le=3650, description="The daily prune deletes delivered rows older than this."
    )
    reconcile_budget_share: float = Field(
        0.2,
        gt=0,
        le=1,
        description="`outbox reconcile` takes at most this share of each window of the Polar "
        "request budget, and only while delivery leaves that much free (delivery goes first).",
    )
    polar_timeout_seconds: float = Field(
        10.0, gt=0, le=300, description="Timeout of one HTTP request to Polar."
    )
    outbox_api_lock_timeout_seconds: float = Field(
        5.0,
        gt=0,
        le=600,
        description="API (PostgreSQL): the longest a request waits for a row lock (a customer, "
        "a hold) before it is answered 503 `locked`, with nothing recorded.",
    )
    outbox_api_statement_timeout_seconds: float = Field(
        10.0,
        gt=0,
        le=600,
        description="API (PostgreSQL): the longest one SQL statement may run, and the longest a "
        "request's transaction may sit idle; past it: 503 `database_timeout`.",
    )
    outbox_api_pool_timeout_seconds: float = Field(
        5.0,
        gt=0,
        le=600,
        description="API: the longest a request waits for a free database connection before it "
        "is answered 503 `overloaded`.",
    )
    outbox_api_request_deadline_seconds: float = Field(
        15.0,
        gt=0,
        le=3600,
        description="API (PostgreSQL): the longest a request's database work may take from its "
        "first connection, whatever the network does: then its connections are cut and it is "
        "answered 503 (`database_timeout`, nothing recorded; or `outcome_unknown` if its "
        "commit was sent and never answered: retry with the same Idempotency-Key).",
    )
    outbox_api_database_connections: int = Field(
        41,
        ge=3,
        le=10_000,
        description="API (PostgreSQL): the most PostgreSQL connections one API process opens, "
        "all paths together: 1 for the token revocation listener, the rest halved between the "
        "pool of POST /v1/usage (async) and the pool of every other route (the larger half). "
        "A deployment opens at most this times its API processes (`outbox serve --workers`), "
        "plus what its workers open.",
    )
    outbox_api_head_timeout_seconds: float = Field(
        10.0,
        gt=0,
        le=600,
        description="`outbox serve`: a request's head (request line and headers) must arrive "
        "within this of the connection or of its first byte; else 408 and the connection is "
        "closed.",
    )
    outbox_api_body_timeout_seconds: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="`outbox serve`: a request's body must arrive within this of its head; "
        "else the connection is closed (a body is at most 256 KiB, 10 MiB for webhooks).",
    )
    outbox_api_shutdown_grace_seconds: int = Field(
        8,
        ge=0,
        le=3600,
        description="`outbox serve`: after SIGTERM, requests in flight get this long to finish; "
        "then they are cancelled and the process exits (keep it below the orchestrator's kill "
        "timeout: 10 s for Docker).",
    )
    outbox_metrics_port: int | None = Field(
        None, ge=1, le=65535, description="Port of a worker's Prometheus /metrics (unset: off)."
    )
    outbox_console: Literal["on", "off", "only"] = Field(
        "on",
        description="The operator console at /console: `on` (served with the API), `off`, or "
        "`only` (this process serves the console and /healthz but not the API; `outbox serve "
        "--console-only` / `--no-console` set it).",
    )
    outbox_console_secret: str | None = Field(
        None,
        min_length=32,
        description="Signs the console's session cookies and CSRF tokens (a secret, at least 32 "
        "characters). Unset: a random secret is made once and kept in the database, shared "
        "by every process.",
    )
    outbox_console_session_minutes: int = Field(
        480, ge=1, le=7 * 24 * 60, description="How long a console sign-in lasts."
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="`text` for people, `json` for log pipelines."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Log level."
    )

    @field_validator("log_level", "log_format", "polar_environment", mode="before")
    @classmethod
    def _any_case(cls, value: object) -> object:
        """`LOG_LEVEL=debug` and `LOG_FORMAT=JSON` mean what they say."""
        if not isinstance(value, str):
            return value
        return value.strip().upper() if value.strip().lower() in _LEVELS else value.strip().lower()

    @model_validator(mode="after")
    def _default_rate_budget(self) -> Settings:
        if self.polar_requests_per_minute is None:
            self.polar_requests_per_minute = DEFAULT_REQUESTS_PER_MINUTE[self.polar_environment]
        return self

    @model_validator(mode="after")
    def _no_placeholder_secrets(self) -> Settings:
        problems = placeholder_secrets(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def requests_per_minute(self) -> int:
        """The organization's Polar request budget (never None after validation)."""
        assert self.polar_requests_per_minute is not None
        return self.polar_requests_per_minute

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


# Values copied from examples and compose defaults: never a real secret. Matched whole (a real
# random token may well end in "xxx" or contain "change"), lower-cased, along with: only x's
# after a known token prefix (`polar_oat_xxxx`, `whsec_xxx`, `xxxxxx`), a whole value wrapped
# in <...> (`<your token>`) and `your-...-here`.
PLACEHOLDERS = frozenset({"change-me", "changeme", "change_me", "secret", "todo"})
_ONLY_XS = re.compile(r"(?:polar_oat_|polar_pat_|whsec_)?x{3,}")
_TEMPLATE = re.compile(r"<[^<>]*>|your[-_].*[-_]here")
# Passwords that are someone's default (docker images, the old compose file): refused only in
# production, where a guessable password is an open door; sandbox and tests may use them.
DEFAULT_PASSWORDS = frozenset({"outbox", "postgres", "password", "redis", "admin"})


def _is_placeholder(value: str) -> bool:
    value = value.strip().lower()
    return (
        value in PLACEHOLDERS
        or _ONLY_XS.fullmatch(value) is not None
        or _TEMPLATE.fullmatch(value) is not None
    )


def _url_password(url: str) -> str | None:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).password
    except (ArgumentError, ValueError):
        return None  # not a URL SQLAlchemy parses: its own check names it later


def placeholder_secrets(settings: Settings) -> list[str]:
    """Each secret (Polar token, webhook secret, database/Redis password) that is an example
    placeholder (`change-me`, `polar_oat_xxx`), or in production a well-known default."""
    production = settings.polar_environment == "production"
    secrets = {
        "POLAR_ACCESS_TOKEN": settings.polar_access_token,
        "POLAR_WEBHOOK_SECRET": settings.polar_webhook_secret,
        "DATABASE_URL's password": _url_password(settings.database_url),
        "REDIS_URL's password": _url_password(settings.redis_url),
    }
    problems = []
    for name, value in secrets.items():
        if not value:
            continue
        # The values are not shown: a real secret may look like a placeholder.
        if _is_placeholder(value):
            problems.append(
                f"{name} is still an example placeholder, not a real secret: set the real one"
            )
        elif production and "password" in name and value.lower() in DEFAULT_PASSWORDS:
            problems.append(
                f"{name} is a well-known default: POLAR_ENVIRONMENT=production needs a real one"
            )
    return problems


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        if not error["loc"]:  # a check across fields: its message names the variables
            problems.append(error["msg"].removeprefix("Value error, "))
            continue
        name = "_".join(str(part) for part in error["loc"]).upper()
        problems.append(f"{name}: {error['msg']}")
    return "invalid configuration: " + "; ".join(problems)


OUR_PREFIX = "OUTBOX_"


def _one_edit_apart(name: str, known: str) -> bool:
    """`name` is `known` with one character left out, one added, or two neighbours swapped
    (DATABSE_URL, REDIS_URLL, POLAR_ACESS_TOKEN); not one replaced, which is how other
    programs' names differ from ours (DATABASE_URI), and not only underscores apart."""
    if name.replace("_", "") == known.replace("_", ""):
        return False
    if abs(len(name) - len(known)) == 1:
        short, long = sorted((name, known), key=len)
        return any(long[:i] + long[i + 1 :] == short for i in range(len(long)))
    if len(name) == len(known):
        diff = [i for i, (a, b) in enumerate(zip(name, known, strict=True)) if a != b]
        return (
            len(diff) == 2
            and diff[1] == diff[0] + 1
            and name[diff[0]] == known[diff[1]]
            and name[diff[1]] == known[diff[0]]
        )
    return False


def unknown_variables(names: Iterable[str]) -> list[str]:
    """The variables that are almost certainly a typo of one of ours, which would otherwise
    silently leave the real one at its default: one edit from a setting's name (see
    `_one_edit_apart`), or an OUTBOX_* name that is not a setting. Anything else (an
    application's own POLAR_ORGANIZATION_ID, DATABASE_URI, ...) is not ours and left alone."""
    known = {name.upper() for name in Settings.model_fields}
    problems = []
    for name in sorted({n.upper() for n in names} - known):
        close = [k for k in sorted(known) if _one_edit_apart(name, k)]
        if close:
            problems.append(f"{name} (did you mean {close[0]}?)")
        elif name.startswith(OUR_PREFIX):
            similar = difflib.get_close_matches(name, known, n=1)
            problems.append(name + (f" (did you mean {similar[0]}?)" if similar else ""))
    return problems


def load_settings(**overrides: object) -> Settings:
    """Read and validate the configuration; raise `ConfigError` naming each bad variable."""
    names = set(os.environ)
    if Path(".env").is_file():
        names |= {k for k in dotenv_values(".env") if k}
    unknown = unknown_variables(names)
    if unknown:
        raise ConfigError("unknown configuration variable(s): " + ", ".join(unknown))
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()
