"""The project's own Polar emulator: the Polar of the tests, the benchmarks and `outbox dev`.

running = serve_in_thread(port=0)          # in-process, ephemeral port
running.configure(error_5xx_rate=0.3)      # faults at run time
running.state.totals()                     # dedup'd credits_used per customer
EmulatorClient(url).configure(...)         # the same over HTTP (another process)
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn

from polar_emulator.app import create_app
from polar_emulator.state import DEFAULT_TOKEN, METER_ID, PRODUCT_ID, EmulatorConfig, EmulatorState

__all__ = [
    "DEFAULT_TOKEN",
    "METER_ID",
    "PRODUCT_ID",
    "EmulatorClient",
    "EmulatorConfig",
    "EmulatorState",
    "RunningEmulator",
    "create_app",
    "main",
    "serve_in_thread",
]


@dataclass
class RunningEmulator:
    url: str
    state: EmulatorState
    server: uvicorn.Server
    thread: threading.Thread
    token: str = DEFAULT_TOKEN

    def configure(self, **changes: Any) -> None:
        self.state.configure(changes)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def serve_in_thread(
    host: str = "127.0.0.1",
    port: int = 0,
    config: EmulatorConfig | None = None,
    *,
    sock: socket.socket | None = None,
) -> RunningEmulator:
    """Run the emulator in a background thread, on `sock` if given (already bound) or else on
    `host`:`port`; return once it accepts connections."""
    app = create_app(config)
    if sock is None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    host, bound_port = sock.getsockname()[:2]
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    )
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="polar-emulator", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the Polar emulator did not start")
        time.sleep(0.01)
    return RunningEmulator(
        url=f"http://{host}:{bound_port}",
        state=app.state.emulator,
        server=server,
        thread=thread,
    )


def main(sock: socket.socket, config: EmulatorConfig | None = None) -> None:
    """Run the emulator in the foreground on `sock`, already bound (`outbox polar-emulator`)."""
    host, port = sock.getsockname()[:2]
    print(f"Polar emulator on http://{host}:{port}  (token: {DEFAULT_TOKEN})", flush=True)
    server = uvicorn.Server(
        uvicorn.Config(create_app(config), log_level="warning", access_log=False)
    )
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=[sock])


class EmulatorClient:
    """The control API over HTTP, for tests whose emulator runs in another process."""

    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=10)

    def configure(self, **changes: Any) -> dict[str, Any]:
        response = self.http.post("/_emulator/config", json=changes)
        response.raise_for_status()
        return dict(response.json())

    def reset(self) -> None:
        self.http.post("/_emulator/reset").raise_for_status()

    def stats(self) -> dict[str, Any]:
        return dict(self.http.get("/_emulator/stats").json())

    def events(self) -> list[dict[str, Any]]:
        return list(self.http.get("/_emulator/events").json())

    def totals(self) -> dict[str, float]:
        return dict(self.http.get("/_emulator/totals").json())

    def delete_event(self, external_id: str) -> bool:
        return self.http.delete(f"/_emulator/events/{external_id}").status_code == 200
