"""The console's pages: each route parses, authorizes and calls the domain, then renders one
template (docs/howto/console.md). Reads are GETs that work without JavaScript; every change
is a POST with a CSRF token, by an admin token, with a reason, recorded in the audit log."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy.orm import Session

from api.console import auth
from api.console.auth import Operator
from api.console.render import page, svg_bars
from api.deps import SessionDep, after_commit, in_transaction
from outbox import audit, events
from outbox.errors import InvalidRequest
from outbox.ledger import grant_by_operator
from outbox.models import Replay
from outbox.ops import inspect, overview, reconcile_runs
from outbox.ops.replay import replay
from outbox.pagination import decode_cursor
from outbox.refunds import COMPENSATED, refund_by
from outbox.states import EventStatus
from outbox.validation import MAX_ID, check_customer_id, check_text
from outbox.webhooks import list_received

router = APIRouter(prefix="/console", include_in_schema=False)
Id = Annotated[int, Path(ge=1, le=MAX_ID)]
PREVIEW_ROWS = 50


def _see_other(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


# -- signing in and out ----------------------------------------------------------------------


@router.get("/login")
def login_form(request: Request, error: str | None = None) -> Response:
    response = HTMLResponse("")
    csrf = auth.login_csrf(request, response)
    rendered = page(request, "login.html", None, csrf=csrf, error=error)
    rendered.raw_headers.extend(h for h in response.raw_headers if h[0] == b"set-cookie")
    return rendered


@router.post("/login")
async def login(request: Request) -> Response:
    form = await auth.read_form(request)
    auth.check_login_csrf(request, form)
    token = await run_in_threadpool(auth.authenticate_plaintext, request, auth.first(form, "token"))
    if token is None:
        return _see_other("/console/login?error=1")
    response = _see_other("/console")
    auth.start_session(request, response, token)
    return response


@router.post("/logout")
async def logout(request: Request, operator: Operator) -> Response:
    form = await auth.read_form(request)
    if not auth.csrf_ok(operator, form):
        raise auth.Forbidden("the form's CSRF token is missing or wrong")
    response = _see_other("/console/login")
    auth.end_session(response)
    return response


# -- reading -----------------------------------------------------------------------------------


@router.get("")
def overview_page(request: Request, session: SessionDep, operator: Operator) -> Response:
    data = overview.overview(session, budget=request.app.state.console_budget)
    return page(
        request,
        "overview.html",
        operator,
        o=data,
        chart=svg_bars(data.per_minute),
        audit_entries=audit.latest(session, limit=10),
    )


@router.get("/failed")
def failed_page(request: Request, session: SessionDep, operator: Operator) -> Response:
    groups = events.failed_groups(session)
    rows, _ = events.search_events(session, status=EventStatus.FAILED, limit=200)
    return page(request, "failed.html", operator, groups=groups, rows=rows)


def _selection(
    session: Session, event_ids: list[int], message: str | None, everything: bool
) -> dict[str, Any]:
    """The replay a form asks for: explicit ids, one group (by its message), or all."""
    if everything:
        return {"all_failed": True}
    if message is not None:
        ids = events.failed_ids_with_message(session, message)
        if not ids:
            raise InvalidRequest("no failed event has this message any more", field="message")
        return {"event_ids": ids}
    if not event_ids:
        raise InvalidRequest("select at least one failed event to replay", field="event_id")
    if not all(1 <= i <= MAX_ID for i in event_ids):
        raise InvalidRequest("event ids are positive 64-bit numbers", field="event_id")
    return {"event_ids": event_ids}


@router.get("/replay/preview")
def replay_preview(
    request: Request,
    session: SessionDep,
    operator: Operator,
    event_id: Annotated[list[int] | None, Query()] = None,
    message: str | None = None,
    all: bool = False,
) -> Response:
    """The dry run: what a replay would move and send, before anything moves. Chosen events
    are checked as the replay will check them; a group or everything is counted, and its
    first rows shown, without reading (or locking) every row."""
    if all or message is not None:
        selection = events.preview_failed(
            session, message=None if all else message, limit=PREVIEW_ROWS
        )
        count, credits, rows = selection.count, selection.credits, selection.first
    else:
        ids = _selection(session, event_id or [], None, False)["event_ids"]
        result = replay(session, event_ids=ids, dry_run=True)
        count, credits = result.replayed, result.credits
        rows = events.get_events(session, result.event_ids[:PREVIEW_ROWS])
    settings = request.app.state.settings
    return page(
        request,
        "replay_preview.html",
        operator,
        count=count,
        credits=credits,
        rows=rows,
        payloads=[inspect.sent_payload(row, settings) for row in rows[:10]],
        message=message,
        everything=all,
        event_ids=event_id or [],
    )


@router.post("/replay")
async def replay_post(request: Request, operator: Operator) -> Response:
    form = await auth.read_form(request)
    auth.check_change(operator, form)
    reason = auth.first(form, "reason")
    if not reason:
        raise InvalidRequest("a replay needs a reason (kept with it and in the audit log)")
    if auth.first(form, "confirm") != "yes":
        raise InvalidRequest("confirm the replay (tick the box) to go ahead")
    try:
        ids = [int(v) for v in form.get("event_id", [])]
    except ValueError:
        raise InvalidRequest("event ids must be numbers", field="event_id") from None
    message = form["message"][0] if "message" in form else None
    everything = auth.first(form, "all") == "1"

    expected = auth.first(form, "expect")

    def work(session: Session) -> int | None:
        selection = _selection(session, ids, message, everything)
        if expected and (message is not None or everything):
            now = (
                len(selection["event_ids"])
                if "event_ids" in selection
                else events.preview_failed(session, limit=0).count
            )
            if str(now) != expected:
                raise InvalidRequest(
                    f"the selection changed since its preview ({expected} then, {now} now): "
                    "nothing was replayed; preview it again"
                )
        return replay(session, actor=operator.actor, reason=reason, **selection).replay_id

    replay_id = await in_transaction(request, work)
    if replay_id is None:
        return _see_other("/console/failed")
    return _see_other(f"/console/replays/{replay_id}")


@router.get("/replays/{replay_id}")
def replay_page(
    request: Request, session: SessionDep, operator: Operator, replay_id: Id
) -> Response:
    record = session.get(Replay, replay_id)
    if record is None:
        raise InvalidRequest(f"no replay #{replay_id}", field="replay_id")
    rows = events.get_events(session, record.event_ids[:200])
    return page(request, "replay.html", operator, replay=record, rows=rows)


def _time(value: str | None, field: str) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(
            f"{field} must be a time like 2026-12-01T10:00 (UTC)", field=field
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@router.get("/events")
def events_page(
    request: Request,
    session: SessionDep,
    operator: Operator,
    status: str | None = None,
    customer: str | None = None,
    error: str | None = None,
    since: str | None = None,
    until: str | None = None,
    cursor: str | None = None,
) -> Response:
    if status and status not in {s.value for s in EventStatus}:
        raise InvalidRequest(f"unknown state {status!r}", field="status")
    rows, next_cursor = events.search_events(
        session,
        status=status or None,
        customer_id=check_customer_id(customer) if customer else None,
        error_text=check_text(error, field="error", max_length=500) or None,
        since=_time(since, "since"),
        until=_time(until, "until"),
        cursor=cursor,
    )
    query = {
        k: v
        for k, v in {
            "status": status,
            "customer": customer,
            "error": error,
            "since": since,
            "until": until,
        }.items()
        if v
    }
    return page(request, "events.html", operator, rows=rows, next_cursor=next_cursor, query=query)


@router.get("/events/{event_id}")
def event_page(request: Request, session: SessionDep, operator: Operator, event_id: Id) -> Response:
    detail = inspect.event_detail(session, event_id, request.app.state.settings)
    return page(request, "event.html", operator, d=detail)


@router.post("/events/{event_id}/refund")
async def refund_post(request: Request, operator: Operator, event_id: Id) -> Response:
    """Give back a usage's credits (default: all not yet refunded), with a reason, recorded in
    the audit log in the refund's transaction (docs/explanation/corrections.md)."""
    form = await auth.read_form(request)
    auth.check_change(operator, form)
    reason = auth.first(form, "reason")
    if not reason:
        raise InvalidRequest(
            "a refund needs a reason (kept in the ledger and the audit log)", field="reason"
        )
    raw = auth.first(form, "credits")
    try:
        credits = int(raw) if raw else None
    except ValueError:
        raise InvalidRequest("credits must be a whole number", field="credits") from None
    settings = request.app.state.settings

    def work(session: Session) -> None:
        result = refund_by(
            session, event_id, credits, reason=reason, actor=operator.actor, settings=settings
        )
        if result.action == COMPENSATED:
            after_commit(session, request.app.state.nudge)

    await in_transaction(request, work)
    return _see_other(f"/console/events/{event_id}")


@router.get("/customers")
def customers_page(
    request: Request, session: SessionDep, operator: Operator, q: str | None = None
) -> Response:
    found = inspect.find_customers(session, q) if q else []
    return page(request, "customers.html", operator, q=q or "", found=found)


@router.get("/customers/{customer_id:path}")
def customer_page(
    request: Request,
    session: SessionDep,
    operator: Operator,
    customer_id: str,
    cursor: str | None = None,
) -> Response:
    decode_cursor(cursor)
    detail = inspect.customer_detail(session, customer_id, ledger_cursor=cursor, limit=20)
    return page(request, "customer.html", operator, d=detail)


@router.post("/grant")
async def grant_post(request: Request, operator: Operator) -> Response:
    form = await auth.read_form(request)
    auth.check_change(operator, form)
    customer_id = check_customer_id(auth.first(form, "customer_id"))
    reason = auth.first(form, "reason")
    if not reason:
        raise InvalidRequest("a grant needs a reason (kept in the ledger and the audit log)")
    try:
        credits = int(auth.first(form, "credits"))
    except ValueError:
        raise InvalidRequest("credits must be a whole number", field="credits") from None

    def work(session: Session) -> None:
        grant_by_operator(session, customer_id, credits, reason, actor=operator.actor)

    await in_transaction(request, work)
    return _see_other(f"/console/customers/{quote(customer_id, safe='')}")


@router.get("/reconcile")
def reconcile_page(request: Request, session: SessionDep, operator: Operator) -> Response:
    return page(request, "reconcile.html", operator, runs=reconcile_runs.latest_runs(session))


@router.post("/reconcile")
async def reconcile_post(request: Request, operator: Operator) -> Response:
    form = await auth.read_form(request)
    auth.check_change(operator, form)
    since, until = (
        _time(auth.first(form, "since"), "since"),
        _time(auth.first(form, "until"), "until"),
    )
    customer = auth.first(form, "customer") or None
    fix = auth.first(form, "fix") == "yes"
    reason = auth.first(form, "reason") or None

    def work(session: Session) -> int:
        return reconcile_runs.start_run(
            session,
            actor=operator.actor,
            since=since,
            until=until,
            customer_id=customer,
            fix=fix,
            reason=reason,
        )

    run_id = await in_transaction(request, work)
    reconcile_runs.run_in_background(
        request.app.state.sessionmaker, request.app.state.settings, run_id
    )
    return _see_other(f"/console/reconcile/{run_id}")


@router.get("/reconcile/{run_id}")
def reconcile_run_page(
    request: Request, session: SessionDep, operator: Operator, run_id: Id
) -> Response:
    run = reconcile_runs.get_run(session, run_id)
    if run is None:
        raise InvalidRequest(f"no reconcile run #{run_id}", field="run_id")
    return page(request, "reconcile_run.html", operator, run=run)


@router.get("/webhooks")
def webhooks_page(
    request: Request, session: SessionDep, operator: Operator, before: int | None = None
) -> Response:
    rows = list_received(session, before=before)
    return page(request, "webhooks.html", operator, rows=rows)


@router.get("/audit")
def audit_page(
    request: Request, session: SessionDep, operator: Operator, before: int | None = None
) -> Response:
    return page(request, "audit.html", operator, entries=audit.latest(session, before=before))
