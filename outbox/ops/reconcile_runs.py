"""Reconciles started from the console: recorded in `reconcile_runs` (every statement on that
table), run in a background thread that writes its progress as it goes, so the page can
show it while it runs and keep the result (docs/howto/console.md)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from outbox import audit
from outbox.db import session_scope
from outbox.errors import InvalidRequest, OutboxError
from outbox.models import ReconcileRun, utcnow
from outbox.settings import Settings
from outbox.states import ReconcileRunStatus
from outbox.validation import check_customer_id, check_text

log = logging.getLogger("outbox.reconcile")
PROGRESS_EVERY_SECONDS = 0.5


def start_run(
    session: Session,
    *,
    actor: str,
    since: datetime | None,
    until: datetime | None,
    customer_id: str | None,
    fix: bool,
    reason: str | None,
) -> int:
    """Record a run about to start (and, with `fix`, its audit entry: a change needs a
    reason); returns its id. Run it with `run_in_background` once this commits."""
    if since is not None and until is not None and since >= until:
        raise InvalidRequest("the start must be before the end", field="since")
    if customer_id is not None:
        customer_id = check_customer_id(customer_id)
    reason = check_text(reason, field="reason", max_length=500)
    if fix and not reason:
        raise InvalidRequest("a reconcile with --fix changes rows: give a reason", field="reason")
    run = ReconcileRun(
        actor=actor[:200],
        customer_id=customer_id,
        since=since,
        until=until,
        fix=fix,
        status=ReconcileRunStatus.RUNNING,
        progress="starting",
        started_at=utcnow(),
    )
    session.add(run)
    session.flush()
    action = audit.RECONCILE_FIX if fix else audit.RECONCILE
    audit.record(
        session,
        actor=actor,
        action=action,
        reason=reason,
        detail={
            "run_id": run.id,
            "customer_id": customer_id,
            "since": since.isoformat() if since else None,
            "until": until.isoformat() if until else None,
        },
    )
    return run.id


def _update(sessions: sessionmaker[Session], run_id: int, **values: object) -> None:
    with session_scope(sessions) as session:
        session.execute(update(ReconcileRun).where(ReconcileRun.id == run_id).values(**values))


def execute_run(sessions: sessionmaker[Session], settings: Settings, run_id: int) -> None:
    """Run the recorded reconcile to its end, writing progress, then its result or error."""
    from outbox.ops.reconcile import reconcile
    from outbox.polar.gateway import PolarGateway

    with session_scope(sessions) as session:
        run = session.get(ReconcileRun, run_id)
        assert run is not None
        window = (run.customer_id, run.since, run.until, run.fix)
    last = 0.0

    def progress(text: str) -> None:
        nonlocal last
        if time.monotonic() - last >= PROGRESS_EVERY_SECONDS:
            last = time.monotonic()
            _update(sessions, run_id, progress=text[:500])

    try:
        if not settings.polar_access_token:
            raise InvalidRequest("POLAR_ACCESS_TOKEN is not set: reconcile cannot ask Polar")
        gateway = PolarGateway(settings, budget_share=settings.reconcile_budget_share)
        try:
            with session_scope(sessions) as session:
                report = reconcile(
                    session,
                    gateway,
                    settings,
                    customer_id=window[0],
                    since=window[1],
                    until=window[2],
                    fix=window[3],
                    progress=progress,
                )
        finally:
            gateway.close()
        _update(
            sessions,
            run_id,
            status=ReconcileRunStatus.DONE,
            progress="done",
            result=report.as_dict(),
            finished_at=utcnow(),
        )
    except Exception as exc:
        if not isinstance(exc, OutboxError):
            log.exception("a console reconcile failed")
        detail = exc.detail if isinstance(exc, OutboxError) else f"{type(exc).__name__}: {exc}"
        _update(
            sessions,
            run_id,
            status=ReconcileRunStatus.FAILED,
            progress=detail[:500],
            finished_at=utcnow(),
        )


def run_in_background(
    sessions: sessionmaker[Session], settings: Settings, run_id: int
) -> threading.Thread:
    """`execute_run` in a daemon thread (a process that stops mid-run leaves it `running`)."""
    thread = threading.Thread(
        target=execute_run, args=(sessions, settings, run_id), name=f"reconcile-{run_id}"
    )
    thread.daemon = True
    thread.start()
    return thread


def get_run(session: Session, run_id: int) -> ReconcileRun | None:
    return session.get(ReconcileRun, run_id)


def latest_runs(session: Session, *, limit: int = 20) -> Sequence[ReconcileRun]:
    """The newest runs first."""
    return session.scalars(select(ReconcileRun).order_by(ReconcileRun.id.desc()).limit(limit)).all()
