"""The `outbox` command: operators' and developers' entry point (Typer).

Exit codes: 0 done, 1 a check found a difference, 2 the command could not do its work: bad
usage or configuration, a database that cannot be reached or is not migrated. Every failure is
one line on stderr naming the problem, never a traceback, never a password.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import timedelta
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from sqlalchemy.exc import DBAPIError
from typer.core import TyperGroup

from outbox.errors import ConfigError, OutboxError
from outbox.settings import Settings, get_settings
from outbox.validation import MAX_GRANT_CREDITS, MAX_ID  # ids, limits, counts: 64-bit

if TYPE_CHECKING:
    from sqlalchemy import Engine

out = Console()
err = Console(stderr=True)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("polar-usage-outbox")
    except PackageNotFoundError:  # a checkout that is not installed
        return "unknown"


_debug = False


class OneLineErrors(TyperGroup):
    """The root command: every expected failure (Click's usage errors, the domain's and the
    database's) becomes one line on stderr and exit 2, here, for every command."""

    def main(  # type: ignore[override]
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        from typer._click.exceptions import ClickException, NoArgsIsHelpError

        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except NoArgsIsHelpError as exc:  # the help was printed
            sys.exit(exc.exit_code)
        except ClickException as exc:
            ctx = getattr(exc, "ctx", None)
            hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            _print_error(" ".join(exc.format_message().split()) + hint)
            sys.exit(2)
        except typer.Abort:
            _print_error("aborted")
            sys.exit(1)
        except (OutboxError, DBAPIError) as exc:
            _print_error(describe_failure(exc))
            sys.exit(2)
        sys.exit(result if isinstance(result, int) else 0)


app = typer.Typer(
    name="outbox",
    help="polar-usage-outbox: credit ledger + transactional outbox that bills usage via Polar.",
    cls=OneLineErrors,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Click's plain help: a flag is shown as a flag (`--json`, `--beat / --no-beat`), not
    # as an option taking a `<bool>`.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
db_app = typer.Typer(
    help="Database schema (Alembic migrations).", no_args_is_help=True, rich_markup_mode=None
)
token_app = typer.Typer(help="API tokens.", no_args_is_help=True, rich_markup_mode=None)
events_app = typer.Typer(
    help="Outbox events: one event's payload and history.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
customers_app = typer.Typer(
    help="Customers: credits, ledger, holds, usage.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(db_app, name="db")
app.add_typer(token_app, name="token")
app.add_typer(events_app, name="events")
app.add_typer(customers_app, name="customers")

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def _show_version(value: bool) -> None:
    if value:
        sys.stdout.write(f"outbox (polar-usage-outbox) {_version()}\n")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_show_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the Python traceback of an unexpected error.")
    ] = False,
) -> None:
    global _debug
    _debug = debug


def _redact(text: str) -> str:
    """`text` without the passwords of DATABASE_URL and REDIS_URL (environment or settings),
    even when a URL cannot be parsed."""
    from outbox.db import redact

    urls = [os.environ.get("DATABASE_URL", ""), os.environ.get("REDIS_URL", "")]
    if _settings is not None:
        urls += [_settings.database_url, _settings.redis_url]
    return redact(text, *urls)


def _print_error(message: str) -> None:
    err.print(f"[red]error:[/red] {escape(_redact(message))}", highlight=False, soft_wrap=True)


def describe_failure(exc: BaseException) -> str:
    """One line for an expected failure: a domain refusal, a database error."""
    if isinstance(exc, DBAPIError):
        from outbox.db import describe_database_error

        url = _settings.database_url if _settings is not None else ""
        return describe_database_error(exc, url)
    if isinstance(exc, OutboxError):
        field = str(exc.context.get("field") or "")
        return exc.detail + (f" ({field})" if field and field not in exc.detail else "")
    return f"{type(exc).__name__}: {exc}"


def fail(message: str, code: int = 2) -> NoReturn:
    """Print `message` to stderr (one line, passwords hidden) and exit (2: could not do it)."""
    _print_error(message)
    raise typer.Exit(code)


_settings: Settings | None = None


def _cli_actor() -> str:
    """Who runs this command, for the audit log."""
    return f"cli:{os.environ.get('USER') or os.environ.get('LOGNAME') or 'unknown'}"


def settings_or_exit() -> Settings:
    global _settings
    try:
        _settings = get_settings()
    except ConfigError as exc:
        fail(str(exc))
    return _settings


@contextmanager
def domain_errors() -> Iterator[None]:
    """Domain refusals become a clear message and exit code 2, never a traceback."""
    try:
        yield
    except (OutboxError, DBAPIError) as exc:
        fail(describe_failure(exc))


@contextmanager
def progress_lines(first: str) -> Iterator[Callable[[str], None]]:
    """Where a long command says what it is doing: a spinner on a terminal; elsewhere (a log,
    a CI job, cron) one line per step on stderr, as it happens."""
    if err.is_terminal:
        with err.status(first) as status:
            yield status.update
        return

    def line(text: str) -> None:
        err.print(text, highlight=False, markup=False, soft_wrap=True)

    line(first)
    yield line


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, default=str, indent=2) + "\n")


def database(*, migrated: bool = True) -> Engine:
    """The checked engine of DATABASE_URL: exit 2 with one line if the URL is unusable, a SQLite
    file is missing (none is created), the database does not answer or is not migrated."""
    from outbox.db import open_database

    settings = settings_or_exit()
    with domain_errors():
        return open_database(settings.database_url, migrated=migrated)


def with_session(fn: Callable[..., Any]) -> Any:
    from outbox.db import session_scope

    engine = database()
    with domain_errors(), session_scope(engine) as session:
        return fn(session)


@db_app.command("upgrade")
def db_upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
) -> None:
    """Apply the migrations (Alembic) to DATABASE_URL (a new SQLite file is created)."""
    from outbox.db import first_line, open_database
    from outbox.migrate import schema_state, upgrade

    settings = settings_or_exit()
    with domain_errors():
        engine = open_database(settings.database_url, create=True, migrated=False)
    try:
        upgrade(settings.database_url, revision)
    except Exception as exc:
        fail(f"migration to {revision} failed: {first_line(exc)}")
    with domain_errors(), engine.connect() as connection:
        state = schema_state(connection)
    head = " (head)" if state.ok else f" (head is {', '.join(sorted(state.head))})"
    err.print(f"database at revision {', '.join(sorted(state.current))}{head}", highlight=False)


@token_app.command("create")
def token_create(
    scope: Annotated[
        str,
        typer.Option(
            help="usage (record usage, read balances), viewer (read everything, change "
            "nothing: the console's read-only role) or admin."
        ),
    ],
    name: Annotated[str | None, typer.Option(help="A label for the token.")] = None,
) -> None:
    """Create an API token and print it alone on stdout (it is stored hashed, shown once)."""
    from outbox.tokens import create_token

    token = with_session(lambda s: create_token(s, scope, name)[0])
    sys.stdout.write(token + "\n")


@token_app.command("list")
def token_list(json_out: JsonFlag = False) -> None:
    """List tokens (id, name, scope, created, revoked); the secrets themselves are not stored."""
    from outbox.tokens import list_tokens

    rows = with_session(
        lambda s: [
            {
                "id": t.id,
                "name": t.name,
                "scope": t.scope,
                "created_at": t.created_at.isoformat(),
                "revoked_at": t.revoked_at.isoformat() if t.revoked_at else None,
            }
            for t in list_tokens(s)
        ]
    )
    if json_out:
        print_json(rows)
        return
    for row in rows:
        state = f"revoked {row['revoked_at']}" if row["revoked_at"] else "active"
        out.print(f"{row['id']:>5}  {row['scope']:<6} {row['name'] or '-':<24} {state}")


@token_app.command("revoke")
def token_revoke(
    token_id: Annotated[
        int,
        typer.Argument(
            help="The token's id (see `outbox token list`).",
            metavar="TOKEN_ID",
            min=1,
            max=MAX_ID,
        ),
    ],
) -> None:
    """Revoke a token; every API process refuses it within a second."""
    from outbox.tokens import revoke_token

    if not with_session(lambda s: revoke_token(s, token_id)):
        fail(f"no active token with id {token_id}")
    out.print(f"token {token_id} revoked")


IdempotencyKeyOption = Annotated[
    str | None,
    typer.Option(
        "--idempotency-key",
        help="Run it again with the same key and nothing more happens: the first result is "
        "shown (the key is per customer).",
    ),
]


@app.command()
def grant(
    customer: Annotated[str, typer.Argument(help="The customer id (Polar external id).")],
    credits: Annotated[int, typer.Argument(help="Credits to add (>= 1).")],
    reason: Annotated[str, typer.Option(help="Why (kept in the ledger).")],
    idempotency_key: IdempotencyKeyOption = None,
    json_out: JsonFlag = False,
) -> None:
    """Grant credits to a customer (created if new)."""
    from outbox.ledger import grant_by_operator

    result = with_session(
        lambda s: grant_by_operator(
            s, customer, credits, reason, actor=_cli_actor(), idempotency_key=idempotency_key
        )
    )
    if json_out:
        print_json(
            {"grant_id": result.grant_id, "balance": result.balance, "replayed": result.replayed}
        )
    elif result.replayed:
        out.print(
            f"already granted with this key (grant {result.grant_id}): nothing added; "
            f"balance then {result.balance}"
        )
    else:
        out.print(f"granted {credits} credits to {customer}: balance {result.balance}")


@app.command()
def refund(
    event_id: Annotated[
        int,
        typer.Argument(help="The usage's event id.", metavar="EVENT_ID", min=1, max=MAX_ID),
    ],
    reason: Annotated[str, typer.Option(help="Why (kept in the ledger).")],
    credits: Annotated[
        int | None,
        typer.Option(help="Credits to give back (default: all not yet refunded).", min=1),
    ] = None,
    json_out: JsonFlag = False,
) -> None:
    """Give back a usage's credits: cancelled if Polar cannot hold it yet, otherwise a
    compensating event (negative credits) follows it to Polar (docs/explanation/corrections.md)."""
    from outbox.refunds import refund_by

    settings = settings_or_exit()
    result = with_session(
        lambda s: refund_by(
            s, event_id, credits, reason=reason, actor=_cli_actor(), settings=settings
        )
    )
    if json_out:
        print_json(result.as_dict())
        return
    if result.action == "cancelled":
        what = "the usage was cancelled: nothing reaches Polar"
    else:
        what = (
            f"compensating event {result.compensation_event_id} "
            f"({result.compensation_external_id}) queued for Polar"
        )
    out.print(
        f"refunded {result.credits} credits of usage {event_id}: balance {result.balance}; {what}",
        highlight=False,
        markup=False,
    )


@app.command()
def debit(
    customer: Annotated[str, typer.Argument(help="The customer id (Polar external id).")],
    credits: Annotated[int, typer.Argument(help="Credits to take back (>= 1).")],
    reason: Annotated[str, typer.Option(help="Why (kept in the ledger).")],
    idempotency_key: IdempotencyKeyOption = None,
    json_out: JsonFlag = False,
) -> None:
    """Take credits back from a customer's balance (never below zero: refused if the balance
    does not cover them)."""
    from outbox.ledger import debit_by_operator

    result = with_session(
        lambda s: debit_by_operator(
            s, customer, credits, reason, actor=_cli_actor(), idempotency_key=idempotency_key
        )
    )
    if json_out:
        print_json(
            {"debit_id": result.grant_id, "balance": result.balance, "replayed": result.replayed}
        )
    elif result.replayed:
        out.print(
            f"already debited with this key (debit {result.grant_id}): nothing taken; "
            f"balance then {result.balance}"
        )
    else:
        out.print(f"debited {credits} credits from {customer}: balance {result.balance}")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.", min=1, max=65535)] = 8000,
    workers: Annotated[int, typer.Option(help="Worker processes.", min=1, max=64)] = 1,
    console_only: Annotated[
        bool,
        typer.Option(
            "--console-only",
            help="Serve the operator console (/console) and /healthz only, not the API "
            "(OUTBOX_CONSOLE=only): e.g. on an internal port.",
        ),
    ] = False,
    no_console: Annotated[
        bool,
        typer.Option(
            "--no-console", help="Serve the API without the console (OUTBOX_CONSOLE=off)."
        ),
    ] = False,
) -> None:
    """Run the HTTP API and the operator console at /console (uvicorn). On SIGTERM, requests
    in flight get OUTBOX_API_SHUTDOWN_GRACE_SECONDS to finish, then the process exits.

    Refuses to start (exit 2, one line) on a database that does not answer, a SQLite file that
    does not exist (none is created) or a port already in use."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    from cli.dev import bind_port
    from outbox.db import dispose_engines

    if console_only and no_console:
        fail("give --console-only or --no-console, not both")
    if console_only or no_console:
        os.environ["OUTBOX_CONSOLE"] = "only" if console_only else "off"
        get_settings.cache_clear()  # the app factory (and its worker processes) read it
    from outbox.logs import configure_logging

    database(migrated=False)  # /readyz says when it is not migrated; no SQLite file is made
    dispose_engines()  # the API makes its own engine
    with domain_errors():
        sock = bind_port(host, port, "--port")  # served as bound: no race for the port
    settings = settings_or_exit()
    configure_logging(settings.log_format, settings.log_level)
    config = uvicorn.Config(
        "api.app:create_served_app",
        factory=True,
        workers=workers,
        log_level=settings.log_level.lower(),
        access_log=False,
        http="api.server:BoundedHttpToolsProtocol",  # a request head is bounded (431)
        timeout_graceful_shutdown=settings.outbox_api_shutdown_grace_seconds,
    )
    if workers > 1:
        Multiprocess(config, sockets=[sock]).run()
        return
    config.load_app()
    server = uvicorn.Server(config)
    with suppress(KeyboardInterrupt):
        server.run(sockets=[sock])
    if not server.started:
        sys.exit(1)  # uvicorn logged why (the app failed to start)


@app.command()
def worker(
    concurrency: Annotated[int, typer.Option(help="Worker processes.", min=1, max=64)] = 2,
    beat: Annotated[bool, typer.Option(help="Also run the beat schedule (-B).")] = True,
    loglevel: Annotated[
        str | None, typer.Option(help="Log level (default: LOG_LEVEL's, INFO unless set).")
    ] = None,
) -> None:
    """Run a Celery worker with its beat schedule (same as `celery -A worker worker -B`).

    Refuses to start (exit 2, one line) without POLAR_ACCESS_TOKEN, on a database that does
    not answer or is not migrated, or when Redis (REDIS_URL) does not answer."""
    from outbox.delivery.runner import check_broker, check_can_deliver

    settings = settings_or_exit()
    with domain_errors():
        check_can_deliver(settings)
        check_broker(settings)
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker",
        "worker",
        f"--concurrency={concurrency}",
        f"--loglevel={loglevel or settings.log_level}",
        "--without-gossip",  # unused, and fragile after a lost Redis (worker/celery_app.py)
        "--without-mingle",
    ]
    if beat:
        argv.append("-B")
    os.execv(sys.executable, argv)


def _event_row(event: Any) -> dict[str, Any]:
    return {
        "event_id": event.id,
        "customer_id": event.customer_id,
        "credits": event.credits,
        "attempts": event.attempts,
        "last_error": event.last_error,
        "external_id": event.external_id,
        "created_at": event.created_at.isoformat(),
        "updated_at": event.updated_at.isoformat(),
        "last_replay_id": event.last_replay_id,
    }


WORKERS_SEEN_WITHIN = timedelta(minutes=5)  # `status`: a worker silent longer is not counted


def _say(text: str) -> None:
    out.print(text, highlight=False, markup=False, soft_wrap=True)


@app.command()
def status(json_out: JsonFlag = False) -> None:
    """What is pending, inflight, delivered and failed; the lag; the money at risk."""
    from outbox.events import outbox_stats
    from outbox.models import utcnow
    from outbox.service_state import delivery_liveness

    stats, alive = with_session(
        lambda s: (outbox_stats(s), delivery_liveness(s, seen_within=WORKERS_SEEN_WITHIN))
    )
    if json_out:
        print_json({**stats.as_dict(), "delivery": alive.as_dict()})
        return
    from rich.table import Table

    table = Table(title="outbox", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, count in stats.counts.items():
        style = "red" if name == "failed" and count else ""
        table.add_row(f"events {name}", f"[{style}]{count}[/{style}]" if style else str(count))
    table.add_row("oldest pending (s)", f"{stats.oldest_pending_seconds:.1f}")
    table.add_row("delivered last minute", str(stats.delivered_last_minute))
    table.add_row("credits undelivered", str(stats.credits_undelivered))
    table.add_row("compensations undelivered", str(stats.compensations_undelivered))
    table.add_row("credits refunded", str(stats.credits_refunded))
    if alive.last_drain_at is None:
        table.add_row("last drain", "[red]never[/red]")
    else:
        ago = (utcnow() - alive.last_drain_at) / timedelta(seconds=1)
        style = "red" if ago > WORKERS_SEEN_WITHIN.total_seconds() else ""
        text = f"{ago:.0f} s ago by {escape(alive.last_drain_worker or '?')}"
        table.add_row("last drain", f"[{style}]{text}[/{style}]" if style else text)
    workers = ", ".join(escape(w) for w, _ in alive.workers) or "[red]none[/red]"
    table.add_row(f"workers seen (last {WORKERS_SEEN_WITHIN.seconds // 60} min)", workers)
    out.print(table)
    if stats.counts["failed"]:
        out.print("see `outbox failed`, then `outbox replay --all-failed` once the cause is fixed")


@app.command()
def failed(
    customer: Annotated[str | None, typer.Option(help="Only this customer.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many rows.", min=1, max=MAX_ID)] = 1000,
    json_out: JsonFlag = False,
) -> None:
    """Failed events: id, customer, credits, attempts, last error, when."""
    from outbox.events import list_failed

    events = with_session(lambda s: list_failed(s, customer_id=customer, limit=limit))
    if json_out:
        print_json([_event_row(e) for e in events])
        return
    if not events:
        out.print("no failed events")
        return
    out.print(f"{len(events)} failed event(s)")
    for e in events:
        replayed = f"  (replayed in #{e.last_replay_id})" if e.last_replay_id else ""
        out.print(
            f"\n#{e.id}  {e.customer_id}  {e.credits} credits  {e.attempts} attempt(s)"
            f"  failed {e.updated_at:%Y-%m-%d %H:%M:%S} UTC{replayed}",
            highlight=False,
            markup=False,
        )
        out.print(f"  {e.last_error or '(no error recorded)'}", highlight=False, markup=False)


@app.command("replay")
def replay_cmd(
    event_id: Annotated[
        list[int] | None,
        typer.Option(
            "--event-id", help="A failed event to replay (repeatable).", min=1, max=MAX_ID
        ),
    ] = None,
    all_failed: Annotated[bool, typer.Option("--all-failed", help="Every failed event.")] = False,
    customer: Annotated[
        str | None, typer.Option(help="With --all-failed: only this customer.")
    ] = None,
    reason: Annotated[str | None, typer.Option(help="Why (kept with the replay).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would move.")] = False,
    json_out: JsonFlag = False,
) -> None:
    """failed → pending with the same external_id: Polar dedups, so nothing is billed twice."""
    from outbox.ops.replay import replay

    if not event_id and not all_failed:
        fail("say which failed events to replay: --event-id ID (repeatable) or --all-failed")
    if event_id and all_failed:
        fail("give --event-id ID (repeatable) or --all-failed, not both")
    if customer is not None and not all_failed:
        fail("--customer only goes with --all-failed")
    actor = _cli_actor()
    result = with_session(
        lambda s: replay(
            s,
            event_ids=event_id or None,
            all_failed=all_failed,
            customer_id=customer,
            dry_run=dry_run,
            actor=actor,
            reason=reason,
        )
    )
    if json_out:
        print_json(result.as_dict())
        return
    if not result.replayed:
        out.print("no failed event to replay: nothing changed")
        return
    if dry_run:
        out.print(
            f"would replay {result.replayed} failed event(s), {result.credits} credits "
            "(dry run: nothing changed)"
        )
    else:
        out.print(
            f"replayed {result.replayed} event(s), {result.credits} credits, as replay "
            f"#{result.replay_id}: they are pending again and will be resent with the same "
            "external_id"
        )
    for detail in result.details[:50]:
        out.print(
            f"  #{detail['event_id']}  {detail['customer_id']}  {detail['credits']} credits"
            f"  (it had failed with: {detail['last_error']})",
            highlight=False,
            markup=False,
        )
    if len(result.details) > 50:
        out.print(f"  ... and {len(result.details) - 50} more")
    if not dry_run:
        out.print(
            "follow them with `outbox events show ID` (its attempts, this replay) or "
            "`outbox status`",
            highlight=False,
        )


@events_app.command("show")
def events_show(
    event_id: Annotated[
        int, typer.Argument(help="The event's id.", metavar="EVENT_ID", min=1, max=MAX_ID)
    ],
    json_out: JsonFlag = False,
) -> None:
    """What was sent to Polar for one event, and every attempt, rescue, replay and re-queue."""
    from outbox.ops.inspect import event_detail

    settings = settings_or_exit()
    data = with_session(lambda s: event_detail(s, event_id, settings).as_dict())
    if json_out:
        print_json(data)
        return
    _say(
        f"event #{data['event_id']}  {data['status']}  customer {data['customer_id']}  "
        f"{data['credits']} credits  created {data['created_at']}"
    )
    if data["last_error"]:
        _say(f"last error: {data['last_error']}")
    _say("sent to Polar:")
    _say("  " + json.dumps(data["sent"], default=str))
    _say(f"history ({len(data['history'])} step(s), oldest first):")
    if not data["history"]:
        _say("  (none yet)")
    for step in data["history"]:
        by = f"by {step['worker']} (claim {step['claim_token']})" if step["claim_token"] else ""
        if step["replay_id"]:
            by = f"replay #{step['replay_id']} by {step['replay_actor']}: {step['replay_reason']}"
        status = f"Polar {step['polar_status']}" if step["polar_status"] else ""
        _say(f"  {step['at']}  {step['decision']:<9} attempt {step['attempt']}  {status}  {by}")
        if step["message"]:
            _say(f"      {step['message']}")


@customers_app.command("show")
def customers_show(
    customer: Annotated[str, typer.Argument(help="The customer id (Polar external id).")],
    limit: Annotated[int, typer.Option(help="Rows of each list.", min=1, max=1000)] = 20,
    json_out: JsonFlag = False,
) -> None:
    """A customer's balance, held, granted and used; its latest ledger entries, holds, usage
    events and Polar grants."""
    from outbox.ops.inspect import customer_detail

    data = with_session(lambda s: customer_detail(s, customer, limit=limit).as_dict())
    if json_out:
        print_json(data)
        return
    _say(
        f"customer {data['customer_id']}: balance {data['balance']}, held {data['held']}, "
        f"granted {data['granted']}, used {data['used']}"
    )
    _say(f"ledger (latest {len(data['ledger'])}):")
    for e in data["ledger"]:
        _say(
            f"  #{e['id']}  {e['created_at']}  {e['kind']:<8} {e['delta']:>+8}  balance "
            f"{e['balance_after']}  {e['reason'] or ''}"
        )
    _say(f"holds (latest {len(data['holds'])}):")
    for h in data["holds"]:
        _say(f"  #{h['id']}  {h['status']:<9} {h['credits']} credits  expires {h['expires_at']}")
    _say(f"usage events (latest {len(data['usage_events'])}):")
    for u in data["usage_events"]:
        error = f"  {u['last_error']}" if u["last_error"] else ""
        _say(f"  #{u['event_id']}  {u['status']:<9} {u['credits']} credits{error}")
    if data["polar_grants"]:
        _say("Polar grants (from webhooks):")
        for g in data["polar_grants"]:
            _say(f"  {g['grant_id']} cycle {g['cycle']}: {g['state']}, {g['units']} credits")


@app.command()
def prune(
    older_than: Annotated[
        str, typer.Option(help="Retention: delivered rows older than this go (e.g. 30d, 12h).")
    ] = "30d",
    batch_size: Annotated[
        int, typer.Option(help="Rows per transaction.", min=1, max=1_000_000)
    ] = 1000,
    json_out: JsonFlag = False,
) -> None:
    """Delete delivered rows past the retention, in small batches; ledger entries are kept."""
    from rich.progress import Progress, SpinnerColumn, TextColumn

    from outbox.events import prune_delivered
    from outbox.validation import parse_duration

    with domain_errors():
        retention = parse_duration(older_than)
    engine = database()
    with domain_errors():  # noqa: SIM117 (the progress bar must close before the error prints)
        with Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            console=err,
            disable=json_out or not err.is_terminal,  # a log file gets no spinner frame
        ) as progress:
            task = progress.add_task("pruning delivered rows: 0", total=None)
            done = 0

            def advance(count: int) -> None:
                nonlocal done
                done += count
                progress.update(task, description=f"pruning delivered rows: {done}")

            result = prune_delivered(
                engine, older_than=retention, batch_size=batch_size, progress=advance
            )
    if json_out:
        print_json(
            {
                "deleted": result.deleted,
                "cutoff": result.cutoff.isoformat(),
                "batches": result.batches,
            }
        )
    else:
        out.print(
            f"deleted {result.deleted} delivered row(s) delivered before "
            f"{result.cutoff.isoformat()} in {result.batches} batch(es); ledger untouched"
        )


@app.command()
def dev(
    host: Annotated[str, typer.Option(help="Interface for the API.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port for the API.", min=1, max=65535)] = 8000,
    emulator_port: Annotated[
        int, typer.Option(help="Port for the local Polar emulator.", min=1, max=65535)
    ] = 8765,
    demo_customer: Annotated[str, typer.Option(help="The demo customer's id.")] = "demo_customer",
    demo_credits: Annotated[
        int, typer.Option(help="Credits granted on first start.", min=1, max=MAX_GRANT_CREDITS)
    ] = 100,
    database_url: Annotated[
        str, typer.Option(help="dev's database (never DATABASE_URL: that is the deployment's).")
    ] = "sqlite:///./outbox.db",
    polar: Annotated[
        str,
        typer.Option(
            help="emulator, or sandbox: Polar's sandbox with POLAR_ACCESS_TOKEN (never production)."
        ),
    ] = "emulator",
) -> None:
    """The embedded default: SQLite, the API, an in-process drainer and the Polar emulator;
    prints the `export` lines for a second terminal."""
    from cli.dev import DevOptions, run_dev
    from outbox.logs import configure_logging

    if polar not in ("emulator", "sandbox"):
        fail(f"--polar must be emulator or sandbox; got {polar!r}")
    settings = settings_or_exit()
    configure_logging(settings.log_format, settings.log_level)
    with domain_errors():
        run_dev(
            DevOptions(
                host=host,
                port=port,
                emulator_port=emulator_port,
                demo_customer=demo_customer,
                demo_credits=demo_credits,
                database_url=database_url,
                polar="sandbox" if polar == "sandbox" else "emulator",
            ),
            echo=lambda text: out.print(text, highlight=False, markup=False, soft_wrap=True),
        )


def _parse_time(value: str | None, option: str) -> Any:
    if value is None:
        return None
    from datetime import UTC, datetime

    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        fail(f"{option} must be an ISO 8601 time, e.g. 2026-11-24T00:00:00Z; got {value!r}")
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _reconcile_recorded(session: Any, fix: bool, run: Callable[[], Any]) -> Any:
    """Run a reconcile; a --fix that changed something is recorded in the audit log, in the
    same transaction as its changes."""
    report = run()
    if fix and (report.requeued or report.recreated or report.resent):
        from outbox import audit

        audit.record(
            session,
            actor=_cli_actor(),
            action=audit.RECONCILE_FIX,
            reason=None,
            detail={
                "since": report.since.isoformat(),
                "until": report.until.isoformat(),
                "requeued": report.requeued[:100],
                "recreated": report.recreated[:100],
                "resent": len(report.resent),
            },
        )
    return report


@app.command()
def reconcile(
    customer: Annotated[str | None, typer.Option(help="Only this customer.")] = None,
    since: Annotated[
        str | None, typer.Option(help="Start (ISO 8601); default 24 h before --until.")
    ] = None,
    until: Annotated[str | None, typer.Option(help="End (ISO 8601); default now.")] = None,
    fix: Annotated[
        bool,
        typer.Option(
            "--fix",
            help="Re-queue what Polar lacks; where Polar cannot list its events, resend the "
            "hour's delivered events (Polar dedups the ones it has).",
        ),
    ] = False,
    deadline: Annotated[
        str,
        typer.Option(
            help="Give up (exit 2, nothing re-queued) if not done within this (e.g. 15m, 90s)."
        ),
    ] = "15m",
    json_out: JsonFlag = False,
) -> None:
    """Ledger vs Polar: meter totals per hour first, events only where they differ.

    Reports missing, unknown and mismatched events; exit 1 when they differ, 2 when Polar
    cannot answer or the deadline passes. The window is widened to whole hours (days past 7
    days). Off a terminal, each step is one line on stderr, and so is a long wait for a Polar
    request slot (delivery goes first), with why."""
    settings = settings_or_exit()
    start, end = _parse_time(since, "--since"), _parse_time(until, "--until")
    if start and end and start >= end:
        fail("--since must be before --until")
    from datetime import UTC, datetime

    if start and start >= datetime.now(UTC):
        fail(f"--since {since} is in the future: nothing can have been billed after it yet")
    import time

    from outbox.ops.reconcile import reconcile as run
    from outbox.polar.gateway import PolarGateway
    from outbox.validation import parse_duration

    started = time.monotonic()
    with domain_errors():
        seconds = parse_duration(deadline, field="--deadline").total_seconds()
        gateway = PolarGateway(settings, budget_share=settings.reconcile_budget_share)
        try:
            with progress_lines("comparing meter totals with Polar...") as progress:
                report = with_session(
                    lambda s: _reconcile_recorded(
                        s,
                        fix,
                        lambda: run(
                            s,
                            gateway,
                            settings,
                            customer_id=customer,
                            since=start,
                            until=end,
                            fix=fix,
                            progress=progress,
                            deadline=seconds,
                        ),
                    )
                )
        finally:
            gateway.close()
    data = report.as_dict()
    if json_out:
        print_json(data)
    else:
        totals = data["totals"]
        out.print(
            f"{report.since.isoformat()} → {report.until.isoformat()} ({report.window_note})",
            highlight=False,
            soft_wrap=True,
        )
        out.print(
            f"ledger {totals['ledger_credits']} credits, Polar {totals['polar_credits']}; "
            f"missing {totals['missing']}, unknown {totals['unknown']}, mismatched "
            f"{totals['mismatched']}, unsettled {totals['unsettled']}, in flight "
            f"{totals['in_flight']}; {report.requests} Polar request(s)",
            highlight=False,
        )
        for c in report.customers:
            if c.differs:
                out.print(
                    f"  {c.customer_id}: missing {c.missing[:20]} unknown {c.unknown[:20]} "
                    f"mismatched {c.mismatched[:20]}"
                    + "".join(
                        f"\n    hour {u['hour']}: ledger {u['ledger_credits']}, Polar "
                        f"{u['polar_credits']}: {u['reason']}"
                        + (f" ({u['fix']})" if u.get("fix") else "")
                        for u in c.unsettled[:20]
                    ),
                    highlight=False,
                    soft_wrap=True,
                )
        for r in report.resent:
            out.print(
                f"resent {r['sent']} event(s) of {r['customer_id']} in the hour {r['hour']}: "
                f"Polar stored {r['inserted']} it lacked (now {r['polar_credits_after']} "
                "credits)",
                highlight=False,
            )
        failed_ids = [i for c in report.customers for i in c.failed]
        fixable = any(
            len(c.missing) > len(c.failed) or c.unknown or c.mismatched or c.unsettled
            for c in report.customers
        )
        if report.requeued or report.recreated:
            out.print(
                f"re-queued {len(report.requeued) + len(report.recreated)} event(s) "
                "(same external_id: Polar dedups)"
            )
        elif fixable and not fix:
            out.print(
                "run again with --fix to re-queue the missing events (and resend the hours "
                "Polar cannot list)",
                highlight=False,
            )
        if failed_ids:
            out.print(
                f"{len(failed_ids)} of the missing event(s) failed here ({failed_ids[:20]}): "
                "see `outbox failed`, then `outbox replay --all-failed` (or --event-id ID) once "
                "the cause is fixed; --fix does not send failed events",
                highlight=False,
                soft_wrap=True,
            )
        verdict = "DIFFERS" if report.differs else "matches"
        out.print(
            f"reconcile {verdict}: {len(report.customers)} customer(s) to look at, missing "
            f"{totals['missing']}, unknown {totals['unknown']}, mismatched "
            f"{totals['mismatched']}; {report.requests} Polar request(s) in "
            f"{time.monotonic() - started:.1f} s",
            highlight=False,
        )
    raise typer.Exit(1 if report.differs else 0)


@app.command()
def doctor(json_out: JsonFlag = False) -> None:
    """Check the setup before going live; exit 1 if any check fails."""
    from outbox.ops.doctor import run_checks
    from outbox.polar.gateway import get_gateway

    settings = settings_or_exit()
    with domain_errors():
        checks = run_checks(settings, lambda: get_gateway(settings))
    if json_out:
        print_json([{**c.as_dict(), "detail": _redact(c.detail)} for c in checks])
    else:
        for c in checks:
            mark = "-" if c.skipped else "[green]✓[/green]" if c.ok else "[red]✗[/red]"
            line = f"{mark} {c.name}: {escape(_redact(c.detail))}"
            out.print(line, highlight=False, soft_wrap=True)
            if (not c.ok or c.skipped) and c.fix:
                out.print(f"    fix: {c.fix}", highlight=False, soft_wrap=True)
    raise typer.Exit(0 if all(c.ok for c in checks) else 1)


@app.command("polar-emulator")
def polar_emulator(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.", min=1, max=65535)] = 8765,
) -> None:
    """Run the local fake Polar (used by `outbox dev` and the tests). A port already in use:
    exit 2, one line."""
    import polar_emulator as emulator
    from cli.dev import bind_port

    with domain_errors():
        sock = bind_port(host, port, "--port")
    emulator.main(sock)


def main() -> None:
    """Console-script entry point: an unexpected error is one line too (`--debug` shows the
    traceback); tests that call `app` directly see the exception itself."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        app()
    except Exception as exc:
        if _debug:
            raise
        _print_error(
            f"unexpected {type(exc).__name__}: {' '.join(str(exc).split())[:300]} "
            "(rerun with `outbox --debug ...` for the traceback, and report it)"
        )
        sys.exit(2)


if __name__ == "__main__":
    main()
