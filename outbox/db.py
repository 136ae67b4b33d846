"""Engine and sessions: one engine per process (re-made after fork), and `session_scope()`,
one of the only two places that commit (the other is the API's session dependency).

`open_database()` is how commands start: a usable URL, an existing SQLite file (never a new
empty one), a database that answers, a schema at head; each failure is one `OutboxError` line
with the password hidden.
"""

from __future__ import annotations

import math
import os
import re
import select
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

from sqlalchemy import (
    ARRAY,
    BigInteger,
    ColumnElement,
    Engine,
    bindparam,
    cast,
    create_engine,
    event,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.types import NullType

from outbox.errors import ConfigError, DatabaseUnavailable
from outbox.settings import Settings, get_settings

_lock = threading.Lock()
_engines: dict[tuple[int, str], Engine] = {}


def int_array(name: str, values: Iterable[int]) -> ColumnElement[Any]:
    """PostgreSQL: ONE parameter holding integers (ids of a batch), bound as the array's text
    (`'{1,2,3}'`) and cast to `bigint[]`. psycopg dumps a Python list element by element (about
    1 µs each); the text is a fifth of that, and the statement stays the same for any count."""
    text_form = "{" + ",".join(str(int(value)) for value in values) + "}"
    # Untyped (no `::VARCHAR`): PostgreSQL reads the text as `bigint[]` once, at bind. A text
    # parameter cast in the statement would be parsed again for every row it is compared to.
    return cast(bindparam(name, text_form, type_=NullType()), ARRAY(BigInteger))


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(url: str, **kwargs: Any) -> Engine:
    """A new engine for `url`; SQLite gets WAL, a busy timeout and serialized writes."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False}, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)

        # SQLite has one writer: take the write lock at BEGIN so a read-then-write
        # transaction never fails with "database is locked" half-way.
        @event.listens_for(engine, "connect")
        def _no_pysqlite_begin(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None

        @event.listens_for(engine, "begin")
        def _begin_immediate(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    if "poolclass" not in kwargs:
        kwargs.setdefault("pool_size", 20)
        kwargs.setdefault("max_overflow", 20)
    # No pre-ping on psycopg: its SELECT 1 is a round trip on every checkout (one of the four of
    # a `record_usage` in `session_scope`). A pooled connection whose backend is gone (a restart, or
    # `pg_terminate_backend`, sent a FATAL and closed it) is found from its socket instead,
    # and the pool replaces it (`_replace_if_backend_gone`). Other drivers keep the ping.
    psycopg = make_url(url).get_driver_name() == "psycopg"
    kwargs.setdefault("pool_pre_ping", not psycopg)
    engine = create_engine(url, **kwargs)
    if psycopg and not kwargs["pool_pre_ping"]:
        event.listen(engine, "checkout", _replace_if_backend_gone)
    return engine


def _milliseconds(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def make_request_engine(settings: Settings, **kwargs: Any) -> Engine:
    """The API's engine: every wait a request can make on the database is bounded.

    PostgreSQL sessions get `lock_timeout` (a row lock held elsewhere), `statement_timeout`
    and `idle_in_transaction_session_timeout` (a transaction left open, locks and all, by a
    request that is stuck: PostgreSQL ends it), set once per connection at connect time (no
    round trip per request); the pool gives up after OUTBOX_API_POOL_TIMEOUT_SECONDS. Each
    of these surfaces as a 503 (api/errors.py), never as a hang.
    """
    url = settings.database_url
    if url.startswith("sqlite"):
        return get_engine(url)  # `outbox dev`: one process, one engine (busy_timeout bounds it)
    connect_args = dict(kwargs.pop("connect_args", {}))
    options = request_session_options(settings)
    connect_args["options"] = f"{connect_args.get('options', '')} {options}".strip()
    connect_args.setdefault("application_name", API_APPLICATION_NAME)
    connect_args.setdefault("connect_timeout", api_connect_timeout(settings))
    kwargs.setdefault("pool_timeout", settings.outbox_api_pool_timeout_seconds)
    # Fixed size, no overflow: OUTBOX_API_DATABASE_CONNECTIONS bounds the process.
    kwargs.setdefault("pool_size", api_connection_split(settings)[0])
    kwargs.setdefault("max_overflow", 0)
    # No pre-ping (`make_engine`): its SELECT 1 would also be a wait nothing bounds (it runs
    # before a request's deadline watches the connection).
    kwargs.setdefault("pool_pre_ping", False)
    return make_engine(url, connect_args=connect_args, **kwargs)


def _replace_if_backend_gone(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    if backend_gone(dbapi_connection.pgconn.socket):
        raise DisconnectionError("the connection's backend is gone")  # the pool replaces it


def backend_gone(fd: int) -> bool:
    """Whether an idle connection's socket has something to read, without a round trip: it
    listens to nothing, so its backend is gone (a restart or `pg_terminate_backend` sent a
    FATAL and closed it)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def api_connect_timeout(settings: Settings) -> int:
    """libpq's connect_timeout for an API connection (whole seconds, at least 2)."""
    return max(2, math.ceil(settings.outbox_api_pool_timeout_seconds))


# What an API process's connections are called in pg_stat_activity (the listener has its own).
API_APPLICATION_NAME = "outbox-api"


def api_connection_split(settings: Settings) -> tuple[int, int]:
    """(the sync pool, the async pool of POST /v1/usage) of one API process: what
    OUTBOX_API_DATABASE_CONNECTIONS leaves after the token revocation listener's one
    connection (`outbox.tokens.RevocationWatcher`, detached from the sync pool), halved."""
    shared = settings.outbox_api_database_connections - 1
    return shared - shared // 2, shared // 2


def request_session_options(settings: Settings) -> str:
    """libpq `options` bounding every wait of an API connection (`make_request_engine`, and
    the async connections of POST /v1/usage: `api.asyncdb`)."""
    statement = _milliseconds(settings.outbox_api_statement_timeout_seconds)
    return (
        f"-c lock_timeout={_milliseconds(settings.outbox_api_lock_timeout_seconds)}"
        f" -c statement_timeout={statement}"
        f" -c idle_in_transaction_session_timeout={statement}"
    )


def get_engine(url: str | None = None) -> Engine:
    """The process-wide engine for `url` (default: DATABASE_URL), made on first use after fork."""
    url = url or get_settings().database_url
    key = (os.getpid(), url)
    engine = _engines.get(key)
    if engine is None:
        with _lock:
            engine = _engines.get(key)
            if engine is None:
                engine = make_engine(url)
                _engines[key] = engine
    return engine


def dispose_engines() -> None:
    """Close every pooled connection of this process (shutdown, tests)."""
    with _lock:
        for (pid, _), engine in list(_engines.items()):
            if pid == os.getpid():
                engine.dispose()
        _engines.clear()


def session_factory(engine: Engine | None = None) -> sessionmaker[Session]:
    """A sessionmaker bound to `engine` (default: the process engine)."""
    return sessionmaker(bind=engine or get_engine(), expire_on_commit=False)


@contextmanager
def session_scope(bind: Engine | sessionmaker[Session] | None = None) -> Iterator[Session]:
    """One transaction: commit on success, roll back on any exception. `bind` is an engine or
    a sessionmaker (default: the process engine)."""
    if isinstance(bind, sessionmaker):
        session = bind()
    else:
        # A plain Session, not a sessionmaker per call: each new sessionmaker makes a Session
        # subclass and sets up its event dispatch, which cost more than the SQL (bench/enqueue.py).
        session = Session(bind=bind or get_engine(), expire_on_commit=False)
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


# `scheme://user:password@host`: greedy up to the last "@" before the path, so a password
# with an unescaped "@" is masked whole (`u:***@host`) however a parser split it.
_USERINFO_PASSWORD = re.compile(r"(?P<keep>://[^/@\s:]*:)[^/\s]*@")
# `?password=...` / `&sslpassword=...`: SQLAlchemy and libpq take a password in the query too.
_QUERY_PASSWORD = re.compile(r"(?P<keep>[?&](?:ssl)?password=)[^&#\s]*", re.IGNORECASE)


def redact_urls(text: str) -> str:
    """`text` with the password of every `scheme://user:password@...` in it, and every
    `?password=` / `&sslpassword=` query value, replaced by ***."""
    text = _USERINFO_PASSWORD.sub(lambda m: m.group("keep") + "***@", text)
    return _QUERY_PASSWORD.sub(lambda m: m.group("keep") + "***", text)


def _with_decoded(values: set[str]) -> set[str]:
    return {form for value in values if value for form in (value, unquote_plus(value)) if form}


def url_passwords(*urls: str) -> list[str]:
    """The passwords in `urls` (userinfo and `password`/`sslpassword` query values, as written
    and percent-decoded), longest first, found even when a URL cannot be parsed."""
    found: set[str] = set()
    for url in urls:
        match = re.match(r"^[^:/]+://[^/@:]*:(?P<password>.+)@[^@]*$", url or "")
        if match:
            found.add(match.group("password"))
        found |= {m.group(0)[len(m.group("keep")) :] for m in _QUERY_PASSWORD.finditer(url or "")}
    return sorted(_with_decoded(found), key=len, reverse=True)


def _password_fragments(passwords: list[str]) -> list[str]:
    """The pieces of passwords with an unescaped "@": parsers take the tail for the host
    (libpq: "failed to resolve host 'tail@host'"), so each piece can be printed alone."""
    pieces = {piece for password in passwords if "@" in password for piece in password.split("@")}
    return sorted((piece for piece in pieces if piece), key=len, reverse=True)


def redact(text: str, *urls: str) -> str:
    """`text` with every URL's password in it replaced by *** (see `url_passwords`): the whole
    passwords first, then each piece of one with an "@" (anywhere if 4 characters or more,
    else where it comes before an "@"), then whatever still looks like a URL's password."""
    passwords = url_passwords(*urls)
    for password in passwords:
        text = text.replace(password, "***")
    for piece in _password_fragments(passwords):
        if len(piece) >= 4:
            text = text.replace(piece, "***")
        else:
            text = re.sub(rf"(?<![\w.~%+-]){re.escape(piece)}(?=@)", "***", text)
    return redact_urls(text)


def safe_url(url: str) -> str:
    """`url` for messages and logs: its password hidden, even when it cannot be parsed."""
    try:
        return redact(make_url(url).render_as_string(hide_password=True), url)
    except Exception:
        return redact(url, url)


def sqlite_file(url: str) -> Path | None:
    """The file a SQLite URL names (None: not SQLite, in memory, or a `file:` URI)."""
    if not url.startswith("sqlite"):
        return None
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).expanduser().resolve()


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (the DBAPI's own, for SQLAlchemy's errors)."""
    cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    lines = str(cause).strip().splitlines()
    return redact_urls(lines[0].strip() if lines else type(cause).__name__)


def describe_database_error(exc: DBAPIError, url: str) -> str:
    """One line for an error the database raised: a missing table means an unmigrated schema."""
    message = first_line(exc)
    if getattr(exc.orig, "sqlstate", None) == "42P01" or "no such table" in message:
        return f"the database schema is not migrated ({message}): run `outbox db upgrade`"
    return f"database error ({safe_url(url)}): {message}"


def open_database(url: str, *, create: bool = False, migrated: bool = True) -> Engine:
    """The process engine for `url`, checked: the URL is usable (`ConfigError`), a SQLite file
    exists unless `create` (`DatabaseUnavailable`: a typo in the path must not make a new empty
    database), the database answers (`DatabaseUnavailable`) and, if `migrated`, its schema is
    at head (`SchemaNotMigrated`). No URL is a `ConfigError` too: no command but `outbox dev`
    (which passes its own) falls back to a default database."""
    if not url:
        raise ConfigError(
            "DATABASE_URL is not set: set it to your database "
            "(PostgreSQL: postgresql+psycopg://user:pass@host/db); only `outbox dev` has one "
            "of its own (./outbox.db; the export lines it prints point a terminal at it)"
        )
    try:
        path = sqlite_file(url)
        engine = get_engine(url)
    except Exception as exc:
        hint = " (PostgreSQL: postgresql+psycopg://...)" if url.startswith("postgres") else ""
        raise ConfigError(
            f"DATABASE_URL {safe_url(url)} is not a usable SQLAlchemy URL: {first_line(exc)}{hint}"
        ) from None
    if path is not None and not create and not path.is_file():
        raise DatabaseUnavailable(
            f"no SQLite database at {path} (DATABASE_URL={safe_url(url)}): create it with "
            "`outbox db upgrade` (or `outbox dev`), or set DATABASE_URL to yours"
        )
    try:
        with engine.connect():
            pass
    except DBAPIError as exc:
        where = f"the SQLite database {path}" if path else safe_url(url)
        reason = first_line(exc)
        if path is not None and not path.parent.is_dir():
            reason = f"its directory {path.parent} does not exist"
        raise DatabaseUnavailable(f"cannot open {where}: {reason}") from None
    if migrated:
        from outbox.migrate import check_schema

        check_schema(engine)
    return engine
