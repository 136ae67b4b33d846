"""The FastAPI application factory: `uvicorn --factory api.app:create_app`."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine
from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from api.asyncdb import AsyncDatabase
from api.deadline import RequestDeadlines, install_request_deadlines
from api.deps import TokenCache
from api.errors import install_error_handlers
from api.middleware import HeaderLimit
from api.openapi import install_openapi
from api.routes import admin, customers, health, holds, refunds, usage, webhooks
from api.schemas import error_body
from outbox.db import make_request_engine, session_factory
from outbox.migrate import SchemaCache
from outbox.ops.collector import OutboxCollector
from outbox.settings import Settings, get_settings
from outbox.tokens import RevocationWatcher

MAX_BODY_BYTES = 256 * 1024
# Polar documents no size limit for the webhooks it sends; a refused one is retried and, ten
# in a row, disables the endpoint. So this route takes what Polar itself accepts on ingest.
WEBHOOK_PATH = "/v1/polar/webhooks"
MAX_WEBHOOK_BODY_BYTES = 10 * 1024 * 1024


def body_limit(path: str) -> int:
    """The most bytes a request body to `path` may have."""
    return MAX_WEBHOOK_BODY_BYTES if path == WEBHOOK_PATH else MAX_BODY_BYTES


def _no_nudge() -> None:
    return None


class ContentLengthLimit:
    """Refuse an oversized body at once by its Content-Length, with the JSON error shape."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            max_bytes = body_limit(scope["path"])
            for name, value in scope.get("headers", ()):
                if name == b"content-length":
                    if not value.isdigit() or int(value) > max_bytes:
                        response = JSONResponse(
                            error_body(
                                "request_too_large",
                                f"the request body must be at most {max_bytes} bytes",
                            ),
                            status_code=413,
                        )
                        await response(scope, receive, send)
                        return
                    break
        await self.app(scope, receive, send)


class BodyLimit:
    """Starlette's count of a body as it arrives (no Content-Length), with the path's limit."""

    def __init__(self, app: ASGIApp) -> None:
        self.limited = {
            limit: RequestBodyLimitMiddleware(app, max_body_size=limit)
            for limit in (MAX_BODY_BYTES, MAX_WEBHOOK_BODY_BYTES)
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.limited[body_limit(scope.get("path", ""))](scope, receive, send)


def create_app(
    settings: Settings | None = None,
    *,
    engine: Engine | None = None,
    nudge: Callable[[], None] | None = None,
) -> FastAPI:
    """Build the API. `nudge` is called after each committed usage (a best-effort wake-up of
    the delivery worker); the default does nothing and the periodic drain catches up."""
    settings = settings or get_settings()
    owns_engine = engine is None
    engine = engine or make_request_engine(settings)
    token_cache = TokenCache()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Token lookups are cached only while this process hears every revocation.
        if engine.dialect.name == "postgresql":
            token_cache.watcher = RevocationWatcher(engine, token_cache.forget).start()
            # POST /v1/usage runs on async connections of this event loop (api.asyncdb).
            app.state.async_database = AsyncDatabase(settings)
        # Everything built so far (modules, the app, its models) lives as long as the process:
        # keep it out of the cyclic collector's full passes, which otherwise walk it again and
        # again under load (docs/benchmarks.md).
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()  # collectable again (tests start and stop many apps in one process)
            database, app.state.async_database = app.state.async_database, None
            if database is not None:
                await database.close()
            if token_cache.watcher is not None:
                token_cache.watcher.stop()
                token_cache.watcher = None
            if owns_engine:
                engine.dispose()

    app = FastAPI(
        title="polar-usage-outbox",
        version="0.1.0",
        description="Credit ledger + transactional outbox that bills AI usage through Polar.",
        # No redirect from `/path/` to `/path`: Starlette builds it from the Host header.
        redirect_slashes=False,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessionmaker = session_factory(engine)
    app.state.async_database = None  # set by the lifespan (PostgreSQL)
    app.state.token_cache = token_cache
    app.state.schema_cache = SchemaCache()
    app.state.nudge = nudge or _no_nudge
    app.state.unverified_bodies = webhooks.UnverifiedBodies()
    registry = CollectorRegistry()
    registry.register(OutboxCollector(engine))
    app.state.metrics_registry = registry
    # Bodies without a Content-Length are counted as they arrive (Starlette), inside the
    # exception middleware so the 413 keeps the JSON error shape.
    app.add_middleware(BodyLimit)
    app.add_middleware(ContentLengthLimit)
    app.add_middleware(HeaderLimit)
    if engine.dialect.name == "postgresql":
        # Every request's database work ends by its deadline, whatever the network does.
        install_request_deadlines(engine)
        app.add_middleware(
            RequestDeadlines, seconds=lambda: settings.outbox_api_request_deadline_seconds
        )
    install_error_handlers(app)
    if settings.outbox_console != "only":
        app.include_router(usage.router)
        app.include_router(refunds.router)
        app.include_router(customers.router)
        app.include_router(holds.router)
        app.include_router(webhooks.router)
        app.include_router(admin.router)
    app.include_router(health.router)
    if settings.outbox_console != "off":
        from api.console import install_console

        install_console(app, settings)
    install_openapi(app, settings)
    return app


def create_served_app() -> FastAPI:
    """The app `outbox serve` and the containers run: nudges the Celery worker after each
    committed usage (with SQLite there is no broker: the in-process drainer of `outbox dev`)."""
    settings = get_settings()
    nudge: Callable[[], None] | None = None
    if not settings.is_sqlite:
        from api.nudge import celery_nudger

        nudge = celery_nudger(delay=settings.outbox_clock_margin_seconds)
    return create_app(settings, nudge=nudge)
