"""The `outbox` command: operators' and developers' entry point (Typer).

Exit codes: 0 done, 1 a check found a difference, 2 bad usage or configuration.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

from outbox.errors import ConfigError, OutboxError
from outbox.settings import Settings, get_settings

app = typer.Typer(
    name="outbox",
    help="polar-usage-outbox: credit ledger + transactional outbox that bills usage via Polar.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
db_app = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)
token_app = typer.Typer(help="API tokens.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(token_app, name="token")

out = Console()
err = Console(stderr=True)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def fail(message: str, code: int = 2) -> NoReturn:
    """Print `message` to stderr and exit (2: bad usage or configuration)."""
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def settings_or_exit() -> Settings:
    try:
        return get_settings()
    except ConfigError as exc:
        fail(str(exc))


@contextmanager
def domain_errors() -> Iterator[None]:
    """Domain refusals become a clear message and exit code 2, never a traceback."""
    try:
        yield
    except ConfigError as exc:
        fail(str(exc))
    except OutboxError as exc:
        field = exc.context.get("field")
        fail(f"{exc.detail}" + (f" ({field})" if field and field not in exc.detail else ""))


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, default=str, indent=2) + "\n")


def with_session(fn: Callable[..., Any]) -> Any:
    from outbox.db import session_scope

    settings = settings_or_exit()
    with domain_errors():
        from outbox.db import get_engine

        try:
            engine = get_engine(settings.database_url)
        except Exception as exc:  # bad URL
            fail(f"DATABASE_URL: cannot use {settings.database_url!r}: {exc}")
        with session_scope(engine) as session:
            return fn(session)


@db_app.command("upgrade")
def db_upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
) -> None:
    """Apply the migrations (Alembic) to DATABASE_URL."""
    from outbox.migrate import upgrade

    settings = settings_or_exit()
    try:
        upgrade(settings.database_url, revision)
    except Exception as exc:
        fail(f"migration failed: {exc}", code=1)
    err.print(f"database at revision {revision}")


@token_app.command("create")
def token_create(
    scope: Annotated[str, typer.Option(help="usage (record usage, read balances) or admin.")],
    name: Annotated[str | None, typer.Option(help="A label for the token.")] = None,
) -> None:
    """Create an API token and print it alone on stdout (it is stored hashed, shown once)."""
    from outbox.tokens import create_token

    token = with_session(lambda s: create_token(s, scope, name)[0])
    sys.stdout.write(token + "\n")


@app.command()
def grant(
    customer: Annotated[str, typer.Argument(help="The customer id (Polar external id).")],
    credits: Annotated[int, typer.Argument(help="Credits to add (>= 1).")],
    reason: Annotated[str, typer.Option(help="Why (kept in the ledger).")],
    json_out: JsonFlag = False,
) -> None:
    """Grant credits to a customer (created if new)."""
    from outbox.ledger import grant_credits

    result = with_session(lambda s: grant_credits(s, customer, credits, reason))
    if json_out:
        print_json({"grant_id": result.grant_id, "balance": result.balance})
    else:
        out.print(f"granted {credits} credits to {customer}: balance {result.balance}")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.", min=1, max=65535)] = 8000,
    workers: Annotated[int, typer.Option(help="Worker processes.", min=1, max=64)] = 1,
) -> None:
    """Run the HTTP API (uvicorn)."""
    import uvicorn

    settings = settings_or_exit()
    from outbox.logs import configure_logging

    configure_logging(settings.log_format, settings.log_level)
    uvicorn.run(
        "api.app:create_served_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=settings.log_level.lower(),
        access_log=False,
    )


@app.command()
def worker(
    concurrency: Annotated[int, typer.Option(help="Worker processes.", min=1, max=64)] = 2,
    beat: Annotated[bool, typer.Option(help="Also run the beat schedule (-B).")] = True,
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
) -> None:
    """Run a Celery worker with its beat schedule (same as `celery -A worker worker -B`)."""
    settings_or_exit()
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker",
        "worker",
        f"--concurrency={concurrency}",
        f"--loglevel={loglevel}",
    ]
    if beat:
        argv.append("-B")
    os.execv(sys.executable, argv)


@app.command("polar-emulator")
def polar_emulator(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.", min=1, max=65535)] = 8765,
) -> None:
    """Run the local fake Polar (used by `outbox dev` and the tests)."""
    import polar_emulator as emulator

    emulator.main(host=host, port=port)


def main() -> None:
    """Console-script entry point."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()
