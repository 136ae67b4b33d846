"""--trace: the round trips of one usage, three ways (library, HTTP, HTTP + Idempotency-Key),
from libpq's protocol trace: every Query and every Sync the client sends."""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Callable
from typing import Any

from bench.common import (
    HOT_CUSTOMER,
    HUGE_BALANCE,
    create_usage_token,
    reset_tables,
    seed_customers,
)


def trace_round_trips(url: str) -> str:
    """The wire protocol of one usage, from libpq's trace: every Query and every Sync the
    client sends costs one round trip to PostgreSQL."""
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from fastapi.testclient import TestClient
    from psycopg.pq import Trace
    from sqlalchemy import event

    from api.app import create_app
    from outbox.db import make_engine, session_scope
    from outbox.ledger import record_usage
    from outbox.settings import load_settings

    settings = load_settings(database_url=url)
    trace_file = tempfile.NamedTemporaryFile("w+", suffix=".trace", delete=False)  # noqa: SIM115
    engine = make_engine(url, pool_size=1, max_overflow=0)

    def trace(connection: Any) -> None:
        connection.pgconn.trace(trace_file.fileno())
        connection.pgconn.set_trace_flags(Trace.SUPPRESS_TIMESTAMPS | Trace.REGRESS_MODE)

    @event.listens_for(engine, "connect")
    def _trace(dbapi_connection: Any, _record: Any) -> None:
        trace(dbapi_connection)

    reset_tables(url)
    seed_customers(url, 1, HUGE_BALANCE)
    token = create_usage_token(url)
    # Entered, so that the lifespan runs as under uvicorn: the token cache (with its revocation
    # listener) and POST /v1/usage's async connections, whose round trips are traced too.
    client = TestClient(create_app(settings, engine=engine)).__enter__()
    database = client.app.state.async_database  # type: ignore[attr-defined]
    connect = database._connect

    async def traced_connect() -> Any:
        connection = await connect()
        trace(connection)
        return connection

    database._connect = traced_connect
    cases: list[tuple[str, Callable[[], object]]] = [
        (
            "record_usage in session_scope",
            lambda: record_usage_once(session_scope, engine, record_usage, settings),
        ),
        (
            "POST /v1/usage",
            lambda: client.post(
                "/v1/usage",
                json={"customer_id": HOT_CUSTOMER, "credits": 1},
                headers={"Authorization": f"Bearer {token}"},
            ),
        ),
        (
            "POST /v1/usage + Idempotency-Key",
            lambda: client.post(
                "/v1/usage",
                json={"customer_id": HOT_CUSTOMER, "credits": 1},
                headers={
                    "Authorization": f"Bearer {token}",
                    "Idempotency-Key": f"k{time.monotonic_ns()}",
                },
            ),
        ),
    ]
    report = []
    for name, call in cases:
        for _ in range(7):  # past psycopg's prepare threshold, the token cache warm
            call()
        trace_file.flush()
        offset = os.path.getsize(trace_file.name)
        call()
        trace_file.flush()
        with open(trace_file.name) as f:
            f.seek(offset)
            lines = [line.rstrip("\n").split("\t") for line in f]
        messages = _round_trips(lines, _prepared_names(trace_file.name))
        report.append(f"{name}: {len(messages)} round trips")
        report += [f"  {i + 1}. {m}" for i, m in enumerate(messages)]
    client.__exit__(None, None, None)
    engine.dispose()
    trace_file.close()
    os.unlink(trace_file.name)
    return "\n".join(report)


def record_usage_once(session_scope: Any, engine: Any, record_usage: Any, settings: Any) -> None:
    """One library usage, as scenario b runs it."""
    with session_scope(engine) as session:
        record_usage(session, HOT_CUSTOMER, 1, settings=settings)


def _prepared_names(path: str) -> dict[str, str]:
    names: dict[str, str] = {}
    with open(path) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) > 3 and parts[0] == "F" and parts[2] == "Parse":
                name = parts[3].strip().split(" ", 1)[0].strip('"')
                names[name] = _parse_sql(parts[3])
    return names


def _round_trips(lines: list[list[str]], prepared: dict[str, str]) -> list[str]:
    """One entry per Query or Sync sent, named by the statement it carried."""
    trips: list[str] = []
    current = ""
    for parts in lines:
        if len(parts) < 3 or parts[0] != "F":
            continue
        kind = parts[2]
        args = parts[3].strip() if len(parts) > 3 else ""
        if kind == "Query":
            trips.append(_short(args.strip('"')))
        elif kind == "Parse":
            current = _parse_sql(args)
        elif kind == "Bind":
            statement = args.split(" ")[1].strip('"') if " " in args else ""
            current = prepared.get(statement, current) if statement else current
        elif kind == "Sync":
            trips.append(_short(current))
            current = ""
    return trips


def _parse_sql(args: str) -> str:
    """The statement of a traced Parse message: `"name" "sql" nparams ...`."""
    match = re.match(r'\s*"[^"]*" "(.*)" \d+', args)
    return match.group(1) if match else args


def _short(sql: str) -> str:
    words = sql.split()
    if not words or words == [";"]:
        return "; (empty query: pool_pre_ping on checkout)"
    head = words[0].upper()
    if head in ("INSERT", "DELETE") and len(words) > 2:
        return f"{head} {words[2]}"
    if head == "UPDATE" and len(words) > 1:
        return f"UPDATE {words[1]}"
    if head == "SELECT":
        table = words[words.index("FROM") + 1] if "FROM" in words else ""
        return f"SELECT {table}".strip() if table else " ".join(words[:4])
    return " ".join(words[:3])
