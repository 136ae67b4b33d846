"""Bounds on what a request may carry besides its body (the body: api.app.ContentLengthLimit)."""

from __future__ import annotations

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from api.schemas import error_body

# 16 KiB of headers, as h11 and nginx allow by default: a bearer token, an Idempotency-Key
# (<= 255), Polar's webhook signature headers and a proxy's X-Forwarded-* fit many times over.
MAX_HEADER_BYTES = 16 * 1024
MAX_HEADER_COUNT = 100


class HeaderLimit:
    """431 with the JSON error shape for a request whose headers exceed MAX_HEADER_BYTES in
    total (names and values) or number more than MAX_HEADER_COUNT, before any route runs."""

    def __init__(
        self, app: ASGIApp, max_bytes: int = MAX_HEADER_BYTES, max_count: int = MAX_HEADER_COUNT
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_count = max_count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = scope.get("headers", ())
            size = sum(len(name) + len(value) for name, value in headers)
            if size > self.max_bytes or len(headers) > self.max_count:
                response = JSONResponse(
                    error_body(
                        "headers_too_large",
                        f"the request headers must be at most {self.max_bytes} bytes in total "
                        f"and at most {self.max_count} headers",
                    ),
                    status_code=431,
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
