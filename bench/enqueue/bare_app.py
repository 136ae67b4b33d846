"""The floor for POST /v1/usage (bench/enqueue.py, scenario c-bare): the same transaction behind
the thinnest endpoint this stack allows.

One Starlette route, async, under the same uvicorn (workers, loop, parser) and the same load as
scenario c: the bearer token checked by its SHA-256 (looked up once, then from a dict, as the
API's revocation-watched token cache answers a hit), the body parsed with `json.loads` and
checked by hand (a string customer id, a positive integer credits), the SAME spend statement as
`outbox.ledger.record_usage` on PostgreSQL (compiled from `outbox.ledger._SPEND`) through psycopg's
async pool, committed before the response is sent. No SQLAlchemy, no FastAPI, no middleware,
no idempotency, no schema check: whatever this row costs, no endpoint on this stack can cost
less, and scenario c is reported as a share of it.

    uvicorn --factory bench.enqueue.bare_app:create_app --workers 2   (DATABASE_URL as for the API)
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool
from sqlalchemy.dialects.postgresql import psycopg as pg_psycopg
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from outbox.ledger import _SPEND

_COMPILED = _SPEND.compile(dialect=pg_psycopg.dialect())
SPEND_SQL: str = _COMPILED.string
# The constants SQLAlchemy bound (status 'pending', attempts 0, kind 'usage').
CONSTANTS = {k: v for k, v in _COMPILED.params.items() if not k.startswith("p_")}
TOKEN_SQL = "SELECT id, scope FROM api_tokens WHERE token_hash = %s AND revoked_at IS NULL"


def _json(status: int, body: dict[str, Any]) -> Response:
    return Response(json.dumps(body), status_code=status, media_type="application/json")


def create_app() -> Starlette:
    url = os.environ["DATABASE_URL"].replace("postgresql+psycopg://", "postgresql://", 1)
    pool = AsyncConnectionPool(url, min_size=2, max_size=10, open=False)
    tokens: dict[str, int] = {}

    async def post_usage(request: Request) -> Response:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return _json(401, {"code": "unauthorized", "detail": "missing token"})
        digest = hashlib.sha256(token.strip().encode()).hexdigest()
        token_id = tokens.get(digest)
        if token_id is None:
            async with pool.connection() as conn:
                row = await (await conn.execute(TOKEN_SQL, (digest,))).fetchone()
            if row is None or row[1] not in ("usage", "admin"):
                return _json(401, {"code": "unauthorized", "detail": "invalid token"})
            token_id = tokens[digest] = int(row[0])
        try:
            body = json.loads(await request.body())
            customer_id, credits = body["customer_id"], body.get("credits", 1)
            if not isinstance(customer_id, str) or type(credits) is not int or credits < 1:
                raise ValueError
        except (ValueError, KeyError, TypeError):
            return _json(422, {"code": "invalid_request", "detail": "bad body"})
        now = datetime.now(UTC)
        external_id = f"usage_{uuid.uuid4().hex}"
        params = {
            **CONSTANTS,
            "p_customer_id": customer_id,
            "p_credits": credits,
            "p_now": now,
            "p_external_id": external_id,
            "p_name": "ai_generation",
            "p_metadata": Jsonb({}),
            "p_idempotency_key": None,
        }
        async with pool.connection() as conn:  # commits on leaving, before the response
            row = await (await conn.execute(SPEND_SQL, params)).fetchone()
        if row is None:
            return _json(402, {"code": "insufficient_credits", "detail": "not enough credits"})
        return _json(201, {"event_id": row[1], "external_id": external_id, "balance": row[0]})

    async def healthz(_: Request) -> Response:
        return _json(200, {"status": "ok"})

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await pool.open()
        try:
            yield
        finally:
            await pool.close()

    return Starlette(
        routes=[
            Route("/v1/usage", post_usage, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
