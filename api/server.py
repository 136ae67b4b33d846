"""uvicorn's HTTP protocol with bounds on how much and how long a client may send, for
`outbox serve`.

httptools (uvicorn's default parser) buffers a request's headers without limit: an 8 MB header
was read whole before the app could refuse it (api.middleware.HeaderLimit answers 431 only once
uvicorn has parsed everything). This protocol counts the bytes that arrive while a request's
head is incomplete and, past MAX_HEAD_BYTES, answers 431 and closes the connection: a client
can make the server hold at most that plus one socket read.

uvicorn has no read timeout either: a client that sends its head or its body a byte at a time
held a connection (and the route's task) as long as it liked. Here the head must be complete
within OUTBOX_API_HEAD_TIMEOUT_SECONDS of the connection (or of the previous response) — else
408 and the connection is closed — and the body within OUTBOX_API_BODY_TIMEOUT_SECONDS of the
head — else the connection is closed and the route sees the client gone.
"""

from __future__ import annotations

import asyncio
import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from api.middleware import MAX_HEADER_BYTES
from outbox.settings import get_settings

# Well above the app's own limit, so a request just over it still gets the app's answer (the
# same 431 body), and this one is only the backstop against a head that never ends.
MAX_HEAD_BYTES = 4 * MAX_HEADER_BYTES


def _refusal(status: bytes, code: str, detail: str) -> bytes:
    body = json.dumps({"code": code, "detail": detail}).encode()
    return (
        b"HTTP/1.1 " + status + b"\r\n"
        b"content-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n"
        b"connection: close\r\n\r\n" + body
    )


REFUSAL = _refusal(
    b"431 Request Header Fields Too Large",
    "headers_too_large",
    f"the request head (request line and headers) must be at most {MAX_HEAD_BYTES} bytes",
)


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """`uvicorn --http api.server:BoundedHttpToolsProtocol`: see the module docstring. The
    timeouts are the process's settings (`get_settings`), unless a subclass sets them."""

    head_timeout: float | None = None
    body_timeout: float | None = None
    _in_head = True
    _head_bytes = 0
    _head_timer: asyncio.TimerHandle | None = None
    _body_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.head_timeout is None or self.body_timeout is None:
            settings = get_settings()
            self._head_timeout = settings.outbox_api_head_timeout_seconds
            self._body_timeout = settings.outbox_api_body_timeout_seconds
        else:
            self._head_timeout, self._body_timeout = self.head_timeout, self.body_timeout
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = 0
        if self._head_timer is None:
            self._arm_head_timer()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_timers()
        self._body_timer = self.loop.call_later(self._body_timeout, self._body_timed_out)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._cancel_timers()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # uvicorn's keep-alive timeout closes an idle connection; this one bounds the next
        # head once its first byte has come (armed again at `on_message_begin`).

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._in_head and not self.transport.is_closing():
            # Still inside a head after this read: count it (an over-count by the tail of a
            # previous request in the same read at most).
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self.logger.warning("request head over %d bytes: 431", MAX_HEAD_BYTES)
                self._cancel_timers()
                self.transport.write(REFUSAL)
                self.transport.close()

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self._head_timeout, self._head_timed_out)

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or not self._in_head:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a response is being sent on this connection: not ours to interrupt
        if self._head_bytes:
            self.logger.info("request head not complete in %.0f s: 408", self._head_timeout)
            self.transport.write(
                _refusal(
                    b"408 Request Timeout",
                    "request_timeout",
                    f"the request head must arrive within {self._head_timeout:g} s",
                )
            )
        self.transport.close()

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if self.transport.is_closing():
            return
        self.logger.info(
            "request body not complete %.0f s after its head: connection closed",
            self._body_timeout,
        )
        # The route may be reading it: it sees the client gone (http.disconnect).
        self.transport.close()
