"""`outbox dev`: the embedded default — SQLite, the API, an in-process drainer and the local
Polar emulator, in one process. No Redis, no PostgreSQL.

It never uses the deployment's DATABASE_URL or POLAR_ACCESS_TOKEN (a `.env` made for docker
compose, a production token in the shell): its database is `--database-url` (default
`./outbox.db`), and it sends to Polar's sandbox only when asked with `--polar sandbox`.
It prints the `export` lines that point a second terminal's `outbox` commands at the same
database and emulator.

Stopping (Ctrl-C) finishes the batch in flight; rows not yet delivered stay `pending` in the
database and the next start carries on.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import logging
import os
import secrets
import shlex
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TextIO

from sqlalchemy import select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from outbox.db import get_engine, session_scope, sqlite_file
from outbox.errors import ConfigError
from outbox.ledger import grant_credits
from outbox.migrate import upgrade
from outbox.models import ApiToken, Customer
from outbox.settings import Settings, get_settings
from outbox.tokens import create_token, revoke_token

log = logging.getLogger("outbox.dev")

DEMO_CUSTOMER = "demo_customer"
DEMO_CREDITS = 100
DEV_DATABASE_URL = "sqlite:///./outbox.db"
DEV_TOKEN_NAME = "outbox dev"  # noqa: S105 - a label, not a secret


@dataclass(frozen=True)
class DevOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    emulator_port: int = 8765
    demo_customer: str = DEMO_CUSTOMER
    demo_credits: int = DEMO_CREDITS
    database_url: str = DEV_DATABASE_URL
    polar: Literal["emulator", "sandbox"] = "emulator"


def dev_database_url(url: str) -> str:
    """`url` with a relative SQLite path made absolute, so the printed `export DATABASE_URL`
    works from any directory; `ConfigError` if it is not a database URL."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(f"--database-url: not a database URL: {url!r}") from None
    database = parsed.database
    if parsed.get_backend_name() == "sqlite" and database and database != ":memory:":
        parsed = parsed.set(database=str(Path(database).resolve()))
    return parsed.render_as_string(hide_password=False)


def shown_url(url: str) -> str:
    """The URL as it may be printed: the password replaced by ***."""
    return make_url(url).render_as_string(hide_password=True)


def dev_webhook_secret() -> str:
    """A new webhook secret for the dev API beside the emulator, on each start: a second
    terminal's `outbox doctor` passes and local webhooks can be signed with it (it is printed
    in the exports), yet no one else can sign webhooks that grant credits, even with
    `--host 0.0.0.0`."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def bind_port(host: str, port: int, flag: str) -> socket.socket:
    """The listening socket the server will serve on, bound here (so nothing can take the port
    between a check and the server's own bind); `ConfigError` naming the port and the flag to
    change it if something listens there. The caller passes it to uvicorn (`sockets=[...]`)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise ConfigError(
            f"port {port} on {host} is already in use: stop what is using it, "
            f"or choose another port with {flag} N"
        ) from None
    sock.set_inheritable(True)  # uvicorn's worker processes serve on it too
    return sock


def dev_files(database_url: str) -> tuple[Path, Path | None]:
    """(the lock held while a dev server runs on this database, the file its emulator's
    events are kept in between starts): beside a SQLite database; for another database, the
    lock in the temporary directory and no kept events."""
    path = sqlite_file(database_url)
    if path is not None:
        return path.with_name(path.name + ".dev-lock"), path.with_name(
            path.name + ".polar-emulator.json"
        )
    digest = hashlib.sha256(database_url.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"outbox-dev-{digest}.lock", None


def lock_database(lock_path: Path) -> TextIO:
    """Hold `lock_path` for as long as this process runs (the returned file), or `ConfigError`
    if another `outbox dev` holds it: a second dev server on the same database would revoke
    the first one's token (each start mints its own) and drain the same rows."""
    try:
        handle = lock_path.open("a+")
    except OSError as exc:
        raise ConfigError(f"--database-url: cannot write {lock_path}: {exc.strerror}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise ConfigError(
            f"another `outbox dev` (pid {holder}) is running on this database: use its "
            "terminal's export lines, or stop it, or give this one --database-url"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def seed_demo(settings: Settings, options: DevOptions) -> str:
    """Create the demo customer (once) and a fresh usage token, revoking the tokens earlier
    starts minted (only one dev token is ever valid); return the token."""
    with session_scope(get_engine(settings.database_url)) as session:
        earlier = session.scalars(
            select(ApiToken.id).where(
                ApiToken.name == DEV_TOKEN_NAME, ApiToken.revoked_at.is_(None)
            )
        )
        for token_id in list(earlier):
            revoke_token(session, token_id)
        if session.get(Customer, options.demo_customer) is None:
            grant_credits(
                session,
                options.demo_customer,
                options.demo_credits,
                reason="outbox dev: demo credits",
                idempotency_key="outbox-dev-demo",
            )
        token, _ = create_token(session, "usage", name=DEV_TOKEN_NAME)
    return token


def export_lines(settings: Settings, token: str, emulated: bool) -> list[str]:
    """The shell lines that make `outbox` commands in another terminal use this server's
    database and Polar (the emulator's token is no secret, the webhook secret is this start's
    own; a real token is never printed)."""
    lines = []
    if make_url(settings.database_url).password is None:
        lines.append(f"export DATABASE_URL={shlex.quote(settings.database_url)}")
    else:
        lines.append(
            f"export DATABASE_URL={shlex.quote(shown_url(settings.database_url))}"
            "  # put the password back in place of ***"
        )
    lines.append(f"export POLAR_ENVIRONMENT={settings.polar_environment}")
    if settings.polar_base_url:
        lines.append(f"export POLAR_BASE_URL={shlex.quote(settings.polar_base_url)}")
    if emulated:
        assert settings.polar_access_token is not None
        lines.append(f"export POLAR_ACCESS_TOKEN={shlex.quote(settings.polar_access_token)}")
        for name in ("polar_product_id", "polar_meter_id", "polar_webhook_secret"):
            value = getattr(settings, name)
            if value:
                lines.append(f"export {name.upper()}={shlex.quote(value)}")
    else:
        lines.append("# POLAR_ACCESS_TOKEN: your sandbox token, as in this shell (not printed)")
    lines.append(f"export TOKEN={shlex.quote(token)}")
    return lines


def ignored_settings(settings: Settings, options: DevOptions) -> list[str]:
    """The deployment's variables (shell or `.env`) that dev does not use, to say so."""
    ignored = []
    if settings.database_url and settings.database_url not in (
        DEV_DATABASE_URL,
        options.database_url,
    ):
        ignored.append("DATABASE_URL")
    if options.polar == "emulator":
        ignored += [
            name.upper()
            for name in ("polar_access_token", "polar_base_url", "polar_product_id")
            if getattr(settings, name)
        ]
        if settings.polar_environment != "sandbox":
            ignored.append("POLAR_ENVIRONMENT")
    return ignored


def banner(
    settings: Settings,
    options: DevOptions,
    token: str,
    emulated: bool,
    ignored: list[str] | None = None,
) -> str:
    base = f"http://{options.host}:{options.port}"
    note = (
        f"  not used   {', '.join(ignored)} (the deployment's; see --database-url, --polar)\n"
        if ignored
        else ""
    )
    exports = "\n".join("  " + line for line in export_lines(settings, token, emulated))
    polar = (
        f"the local Polar emulator at {settings.polar_base_url} (events: "
        f"{settings.polar_base_url}/_emulator/events)"
        if emulated
        else f"Polar {settings.polar_environment}"
        + (f" at {settings.polar_base_url}" if settings.polar_base_url else "")
    )
    webhook = (
        f"""  # credits bought in Polar: the emulator sends a signed Meter Credits webhook here
  curl -s -X POST {settings.polar_base_url}/_emulator/webhooks/meter-credits \\
    -d '{{"customer_id": "{options.demo_customer}", "units": 50}}'
"""
        if emulated
        else ""
    )
    return f"""
polar-usage-outbox dev is running
  API        {base}   (docs: {base}/docs)
  console    {base}/console   (sign in with a token from `outbox token create --scope admin`)
  database   {shown_url(settings.database_url)}
  Polar      {polar}
  customer   {options.demo_customer} (granted {options.demo_credits} credits on first start)
{note}
in a second terminal, paste these so `outbox status`, `outbox doctor`, `outbox reconcile`...
use this database and this Polar (TOKEN is a usage token, shown once; a restart mints a new
one and revokes this one):
{exports}

try it:
  curl -s -X POST {base}/v1/usage \\
    -H "Authorization: Bearer $TOKEN" -H "Content-Type: application/json" \\
    -H "Idempotency-Key: demo-1" \\
    -d '{{"customer_id": "{options.demo_customer}", "credits": 3, "metadata": {{"plan_id": "fp_42"}}}}'
  curl -s -H "Authorization: Bearer $TOKEN" {base}/v1/customers/{options.demo_customer}/usage
{webhook}
Ctrl-C stops cleanly; undelivered rows are kept and sent on the next start.
"""


def run_dev(options: DevOptions, *, echo: Callable[[str], Any] = print) -> None:
    """Run everything until interrupted."""
    emulator: Any = None
    settings = get_settings()
    ignored = ignored_settings(settings, options)
    # The whole process (API, drainer, ledger) reads get_settings(): the environment is where
    # dev's choices override the shell's and `.env`'s (an environment variable beats `.env`).
    os.environ["DATABASE_URL"] = dev_database_url(options.database_url)
    lock_path, kept_events = dev_files(os.environ["DATABASE_URL"])
    lock = lock_database(lock_path)
    if options.polar == "sandbox":
        if not settings.polar_access_token:
            raise ConfigError("--polar sandbox needs POLAR_ACCESS_TOKEN (a sandbox token)")
        if settings.polar_environment != "sandbox":
            raise ConfigError(
                "--polar sandbox: POLAR_ENVIRONMENT is production; outbox dev never bills it"
            )
    api_socket = bind_port(options.host, options.port, "--port")
    if options.polar == "emulator":
        emulator_socket = bind_port("127.0.0.1", options.emulator_port, "--emulator-port")
        import polar_emulator

        emulator = polar_emulator.serve_in_thread(sock=emulator_socket)
        if kept_events is not None and kept_events.is_file():
            # What the last start delivered is still in Polar, as with the real one (reconcile
            # would otherwise report it missing).
            emulator.state.load(kept_events)
        os.environ["POLAR_BASE_URL"] = emulator.url
        os.environ["POLAR_ACCESS_TOKEN"] = emulator.token
        os.environ["POLAR_ENVIRONMENT"] = "sandbox"
        # The emulator's own product and meter, not the deployment's (doctor checks them).
        os.environ["POLAR_PRODUCT_ID"] = polar_emulator.PRODUCT_ID
        os.environ["POLAR_METER_ID"] = polar_emulator.METER_ID
        os.environ["POLAR_WEBHOOK_SECRET"] = dev_webhook_secret()
        # `POST /_emulator/webhooks/meter-credits` sends a signed grant to this API, as Polar.
        api_host = "127.0.0.1" if options.host in ("0.0.0.0", "::") else options.host
        emulator.configure(
            webhook_url=f"http://{api_host}:{options.port}/v1/polar/webhooks",
            webhook_secret=os.environ["POLAR_WEBHOOK_SECRET"],
        )
    try:
        serve(options, api_socket, emulator, echo, ignored)
    finally:
        if emulator is not None:
            emulator.stop()
            if kept_events is not None:
                emulator.state.save(kept_events)
        lock.close()


def serve(
    options: DevOptions,
    api_socket: socket.socket,
    emulator: Any,
    echo: Callable[[str], Any],
    ignored: list[str],
) -> None:
    """Migrate, seed, then run the API and the drainer until Ctrl-C."""
    import uvicorn

    from api.app import create_app  # the CLI's dev command is the one place both rooms meet
    from outbox.delivery.runner import BackgroundDrainer, close

    get_settings.cache_clear()
    settings = get_settings()
    try:
        upgrade(settings.database_url)
    except Exception as exc:  # unreachable server, wrong password: one line, no traceback
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(
            f"--database-url {shown_url(settings.database_url)}: cannot migrate: {reason}"
        ) from None
    token = seed_demo(settings, options)
    drainer = BackgroundDrainer(settings, interval=1.0)
    drainer.start()
    app = create_app(settings, nudge=drainer.poke)
    echo(banner(settings, options, token, emulated=emulator is not None, ignored=ignored))
    server = uvicorn.Server(
        uvicorn.Config(app, host=options.host, port=options.port, log_level="warning")
    )
    try:
        server.run(sockets=[api_socket])
    except KeyboardInterrupt:
        pass  # uvicorn re-raises the Ctrl-C it handled; we have shut down cleanly
    finally:
        log.info("stopping: finishing the batch in flight")
        drainer.stop()
        close()
        log.info("stopped")
