"""uvicorn's HTTP protocol with a bound on the request head, for `outbox serve`.

httptools (uvicorn's default parser) buffers a request's headers without limit: an 8 MB header
was read whole before the app could refuse it (api.middleware.HeaderLimit answers 431 only once
uvicorn has parsed everything). This protocol counts the bytes that arrive while a request's
head is incomplete and, past MAX_HEAD_BYTES, answers 431 and closes the connection: a client
can make the server hold at most that plus one socket read.
"""

from __future__ import annotations

import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from api.middleware import MAX_HEADER_BYTES

# Well above the app's own limit, so a request just over it still gets the app's answer (the
# same 431 body), and this one is only the backstop against a head that never ends.
MAX_HEAD_BYTES = 4 * MAX_HEADER_BYTES
_BODY = json.dumps(
    {
        "code": "headers_too_large",
        "detail": f"the request head (request line and headers) must be at most "
        f"{MAX_HEAD_BYTES} bytes",
    }
).encode()
REFUSAL = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"content-type: application/json\r\n"
    b"content-length: " + str(len(_BODY)).encode() + b"\r\n"
    b"connection: close\r\n\r\n" + _BODY
)


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """`uvicorn --http api.server:BoundedHttpToolsProtocol`: see the module docstring."""

    _in_head = True
    _head_bytes = 0

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = 0

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._in_head and not self.transport.is_closing():
            # Still inside a head after this read: count it (an over-count by the tail of a
            # previous request in the same read at most).
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self.logger.warning("request head over %d bytes: 431", MAX_HEAD_BYTES)
                self.transport.write(REFUSAL)
                self.transport.close()
