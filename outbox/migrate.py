"""Apply the Alembic migrations shipped inside the package (`outbox db upgrade`), and check that a
database is at their head (every other command, `/readyz`, `outbox doctor`, the worker)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine

from outbox.errors import SchemaNotMigrated

ALEMBIC_INI = Path(__file__).resolve().parent.parent / "alembic.ini"
UPGRADE_HINT = "run `outbox db upgrade`"


def alembic_config(url: str) -> Config:
    """An Alembic config for `url` that works from a checkout or an installed package."""
    config = Config(str(ALEMBIC_INI)) if ALEMBIC_INI.exists() else Config()
    config.set_main_option("script_location", "outbox:migrations")
    config.attributes["url"] = url
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at `url` to `revision` (default: the newest)."""
    command.upgrade(alembic_config(url), revision)


@lru_cache(maxsize=1)
def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config("sqlite://"))


def head_revisions() -> frozenset[str]:
    """The newest revision(s) this code ships (read once per process)."""
    return frozenset(_script().get_heads())


@lru_cache(maxsize=1)
def known_revisions() -> frozenset[str]:
    """Every revision this code ships."""
    return frozenset(script.revision for script in _script().walk_revisions())


@dataclass(frozen=True)
class SchemaState:
    """Where a database's schema is, against this code's head."""

    current: frozenset[str]
    head: frozenset[str]

    @property
    def ok(self) -> bool:
        return self.current == self.head

    def describe(self) -> str:
        """One line for people: what is wrong and what to run (or 'at revision X (head)')."""
        at, head = _names(self.current), _names(self.head)
        if self.ok:
            return f"at revision {at} (head)"
        unknown = self.current - known_revisions()
        if unknown:
            return (
                f"the database schema is at {_names(frozenset(unknown))}, a revision this "
                f"version does not know (its head is {head}): a newer polar-usage-outbox "
                "migrated it; run that version"
            )
        where = f"at {at}" if self.current else "no revision"
        return f"the database schema is not migrated ({where}, head is {head}): {UPGRADE_HINT}"


def _names(revisions: frozenset[str]) -> str:
    return ", ".join(sorted(revisions)) or "none"


def schema_state(connection: Connection) -> SchemaState:
    """The revision(s) recorded in `alembic_version` (none if the table is missing) and the head;
    one `alembic_version` query, no error when the schema was never migrated."""
    current = frozenset(MigrationContext.configure(connection).get_current_heads())
    return SchemaState(current=current, head=head_revisions())


def check_schema(engine: Engine) -> SchemaState:
    """Raise `SchemaNotMigrated` unless the database at `engine` is at this code's head."""
    with engine.connect() as connection:
        state = schema_state(connection)
    if not state.ok:
        raise SchemaNotMigrated(state.describe(), current=sorted(state.current))
    return state


class SchemaCache:
    """`schema_state` for a process that asks often (`/readyz`): a schema found at head is
    trusted for `ttl` seconds; any other answer is asked again next time, so the end of
    `outbox db upgrade` shows at once."""

    def __init__(self, ttl: float = 30.0) -> None:
        self.ttl = ttl
        self._good: tuple[float, SchemaState] | None = None

    def state(self, connection: Connection) -> SchemaState:
        """The schema's state, from the cache while a check at head is younger than `ttl`."""
        good = self._good
        if good is not None and time.monotonic() < good[0]:
            return good[1]
        state = schema_state(connection)
        self._good = (time.monotonic() + self.ttl, state) if state.ok else None
        return state
