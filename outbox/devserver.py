"""`outbox dev`: the embedded default — SQLite, the API, an in-process drainer and (unless
POLAR_ACCESS_TOKEN is set) the local Polar emulator, in one process. No Redis, no PostgreSQL.

Stopping (Ctrl-C) finishes the batch in flight; rows not yet delivered stay `pending` in the
database and the next start carries on.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from outbox.db import get_engine, session_scope
from outbox.errors import ConfigError
from outbox.ledger import grant_credits
from outbox.migrate import upgrade
from outbox.models import Customer
from outbox.settings import Settings, get_settings
from outbox.tokens import create_token

log = logging.getLogger("outbox.dev")

DEMO_CUSTOMER = "demo_customer"
DEMO_CREDITS = 100


@dataclass(frozen=True)
class DevOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    emulator_port: int = 8765
    demo_customer: str = DEMO_CUSTOMER
    demo_credits: int = DEMO_CREDITS


def check_port_free(host: str, port: int, flag: str) -> None:
    """`ConfigError` naming the port and the flag to change it, if something listens there."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            raise ConfigError(
                f"port {port} on {host} is already in use: stop what is using it, "
                f"or choose another port with {flag} N"
            ) from None


def seed_demo(settings: Settings, options: DevOptions) -> str:
    """Create the demo customer (once) and a fresh usage token; return the token."""
    with session_scope(get_engine(settings.database_url)) as session:
        if session.get(Customer, options.demo_customer) is None:
            grant_credits(
                session,
                options.demo_customer,
                options.demo_credits,
                reason="outbox dev: demo credits",
                idempotency_key="outbox-dev-demo",
            )
        token, _ = create_token(session, "usage", name="outbox dev")
    return token


def banner(settings: Settings, options: DevOptions, token: str, emulated: bool) -> str:
    base = f"http://{options.host}:{options.port}"
    polar = (
        f"the local Polar emulator at {settings.polar_base_url} (events: "
        f"{settings.polar_base_url}/_emulator/events)"
        if emulated
        else f"Polar {settings.polar_environment}"
        + (f" at {settings.polar_base_url}" if settings.polar_base_url else "")
    )
    return f"""
polar-usage-outbox dev is running
  API        {base}   (docs: {base}/docs)
  database   {settings.database_url}
  Polar      {polar}
  customer   {options.demo_customer} (granted {options.demo_credits} credits on first start)

usage token (shown once):
  export TOKEN={token}

try it:
  curl -s -X POST {base}/v1/usage \\
    -H "Authorization: Bearer $TOKEN" -H "Content-Type: application/json" \\
    -H "Idempotency-Key: demo-1" \\
    -d '{{"customer_id": "{options.demo_customer}", "credits": 3, "metadata": {{"plan_id": "fp_42"}}}}'
  curl -s -H "Authorization: Bearer $TOKEN" {base}/v1/customers/{options.demo_customer}/usage

Ctrl-C stops cleanly; undelivered rows are kept and sent on the next start.
"""


def run_dev(options: DevOptions, *, echo: Callable[[str], Any] = print) -> None:
    """Run everything until interrupted."""
    import uvicorn

    from api.app import create_app  # the CLI's dev command is the one place both rooms meet
    from outbox.runtime import BackgroundDrainer, close

    check_port_free(options.host, options.port, "--port")
    emulator: Any = None
    settings = get_settings()
    if not settings.polar_access_token:
        check_port_free("127.0.0.1", options.emulator_port, "--emulator-port")
        import polar_emulator

        emulator = polar_emulator.serve_in_thread(host="127.0.0.1", port=options.emulator_port)
        os.environ["POLAR_BASE_URL"] = emulator.url
        os.environ["POLAR_ACCESS_TOKEN"] = emulator.token
        get_settings.cache_clear()
        settings = get_settings()
    upgrade(settings.database_url)
    token = seed_demo(settings, options)
    drainer = BackgroundDrainer(settings, interval=1.0)
    drainer.start()
    app = create_app(settings, nudge=drainer.poke)
    echo(banner(settings, options, token, emulated=emulator is not None))
    server = uvicorn.Server(
        uvicorn.Config(app, host=options.host, port=options.port, log_level="warning")
    )
    try:
        server.run()
    except KeyboardInterrupt:
        pass  # uvicorn re-raises the Ctrl-C it handled; we have shut down cleanly
    finally:
        log.info("stopping: finishing the batch in flight")
        drainer.stop()
        close()
        if emulator is not None:
            emulator.stop()
        log.info("stopped")
