"""Configuration: one `Settings` object read from the environment (and a `.env` file).

Malformed values fail at start-up with a message naming the variable (`load_settings`).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Literal

from dotenv import dotenv_values
from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from outbox.errors import ConfigError

DEFAULT_REQUESTS_PER_MINUTE = {"sandbox": 100, "production": 500}


class Settings(BaseSettings):
    """Every variable of DESIGN.md's configuration table, plus a few documented extras."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False
    )

    database_url: str = Field("sqlite:///./outbox.db", min_length=1)
    redis_url: str = Field("redis://localhost:6379/0", min_length=1)
    polar_access_token: str | None = None
    polar_environment: Literal["sandbox", "production"] = "sandbox"
    polar_base_url: str | None = None
    polar_webhook_secret: str | None = None
    polar_product_id: str | None = None
    polar_meter_id: str | None = None
    polar_requests_per_minute: int | None = Field(None, ge=1, le=100_000)
    usage_event_name: str = Field("ai_generation", min_length=1, max_length=100)
    usage_credits_field: str = Field("credits_used", min_length=1, max_length=40)
    outbox_batch_size: int = Field(500, ge=1, le=5000)
    outbox_max_attempts: int = Field(25, ge=1, le=1000)
    outbox_lease_seconds: int = Field(60, ge=5, le=86_400)
    hold_ttl_seconds: int = Field(900, ge=1, le=7 * 86_400)
    # Extras (documented in docs/reference/configuration.md).
    outbox_clock_margin_seconds: float = Field(2.0, ge=0, le=600)
    outbox_drain_interval_seconds: float = Field(5.0, gt=0, le=3600)
    outbox_retention_days: int = Field(30, ge=1, le=3650)
    polar_timeout_seconds: float = Field(10.0, gt=0, le=300)
    outbox_metrics_port: int | None = Field(None, ge=1, le=65535)
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @model_validator(mode="after")
    def _default_rate_budget(self) -> Settings:
        if self.polar_requests_per_minute is None:
            self.polar_requests_per_minute = DEFAULT_REQUESTS_PER_MINUTE[self.polar_environment]
        return self

    @property
    def requests_per_minute(self) -> int:
        """The organization's Polar request budget (never None after validation)."""
        assert self.polar_requests_per_minute is not None
        return self.polar_requests_per_minute

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        name = "_".join(str(part) for part in error["loc"]).upper() or "configuration"
        problems.append(f"{name}: {error['msg']}")
    return "invalid configuration: " + "; ".join(problems)


OUR_PREFIXES = ("OUTBOX_", "POLAR_", "USAGE_", "HOLD_")


def unknown_variables(names: Iterable[str]) -> list[str]:
    """Names that look like ours (OUTBOX_*, POLAR_*, USAGE_*, HOLD_*) but are not settings:
    almost always a typo that would otherwise silently fall back to a default."""
    known = {name.upper() for name in Settings.model_fields}
    problems = []
    for name in sorted({n.upper() for n in names}):
        if name.startswith(OUR_PREFIXES) and name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            problems.append(name + (f" (did you mean {close[0]}?)" if close else ""))
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
