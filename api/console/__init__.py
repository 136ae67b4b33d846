"""The operator console at /console: server-rendered pages over the domain, mounted in the API
process (or alone: OUTBOX_CONSOLE=only). docs/howto/console.md."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.console.auth import Forbidden, SignInRequired
from api.console.render import SECURITY_HEADERS, STATIC, page
from api.console.routes import router
from api.errors import response_for
from outbox.errors import OutboxError
from outbox.ops.overview import Budget
from outbox.settings import Settings

PREFIX = "/console"


class ConsoleHeaders:
    """Every /console response carries the console's security headers (a strict CSP)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PREFIX):
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                for name, value in SECURITY_HEADERS.items():
                    if name.lower().encode() not in present:
                        headers.append((name.lower().encode(), value.encode()))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, with_headers)


def _budget_reader(settings: Settings) -> Callable[[], Budget | None]:
    """The shared Polar budget's use this window (Redis), or None where there is none to see."""
    if settings.is_sqlite:
        return lambda: None
    made: list[Any] = []

    def read() -> Budget | None:
        try:
            if not made:
                from outbox.polar.ratelimit import make_budget

                made.append(make_budget(settings))
            return Budget(used=made[0].used_this_window(), allowed=settings.requests_per_minute)
        except Exception:
            return None

    return read


async def _call(handler: Any, request: Request, exc: Exception) -> Response:
    response: Response = await handler(request, exc)
    return response


def install_console(app: FastAPI, settings: Settings) -> None:
    """Mount the console's routes, its stylesheet and its HTML error pages."""
    app.state.console_budget = _budget_reader(settings)
    app.include_router(router)
    app.mount(f"{PREFIX}/static", StaticFiles(directory=STATIC), name="console-static")
    app.add_middleware(ConsoleHeaders)
    previous_domain = app.exception_handlers.get(OutboxError)
    previous_validation = app.exception_handlers.get(RequestValidationError)

    @app.exception_handler(SignInRequired)
    async def _sign_in(request: Request, exc: SignInRequired) -> Response:
        if request.method == "GET":
            return RedirectResponse(f"{PREFIX}/login", status_code=303)
        return page(request, "error.html", None, status_code=401, message="sign in first")

    @app.exception_handler(Forbidden)
    async def _forbidden(request: Request, exc: Forbidden) -> Response:
        return page(request, "error.html", None, status_code=403, message=exc.message)

    @app.exception_handler(OutboxError)
    async def _domain(request: Request, exc: OutboxError) -> Response:
        if request.url.path.startswith(PREFIX) and previous_domain is not None:
            stored = response_for(exc)
            return page(
                request, "error.html", None, status_code=stored.status_code, message=exc.detail
            )
        assert previous_domain is not None
        return await _call(previous_domain, request, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        if request.url.path.startswith(PREFIX):
            first = exc.errors()[0] if exc.errors() else {}
            where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "path"))
            message = f"{where}: {first.get('msg', 'invalid')}" if where else "invalid request"
            return page(request, "error.html", None, status_code=422, message=message)
        assert previous_validation is not None
        return await _call(previous_validation, request, exc)
