"""Thin tasks with stable dotted names; the work is in `outbox/`."""

from __future__ import annotations

import logging
import sys
from typing import Any

from celery.signals import worker_init, worker_process_init, worker_process_shutdown

from outbox.db import dispose_engines, redact
from outbox.delivery import runner
from outbox.errors import OutboxError
from outbox.settings import get_settings
from worker.celery_app import app

log = logging.getLogger("worker")

DRAIN_SECONDS = 50.0


@worker_init.connect
def _refuse_to_start_unable_to_deliver(**_: Any) -> None:
    """Fail at start, one line and exit 2, rather than log "ready" and fail every drain: no
    Polar token, a database that does not answer, a schema not at head."""
    try:
        runner.check_can_deliver(get_settings())
    except OutboxError as exc:
        settings = get_settings()
        detail = redact(exc.detail, settings.database_url, settings.redis_url)
        sys.stderr.write(f"error: {detail}\n")
        sys.stderr.flush()
        raise SystemExit(2) from None
    finally:
        # The check ran in the parent: prefork children must not inherit its connection.
        dispose_engines()


@worker_init.connect
def _serve_metrics(**_: Any) -> None:
    """Expose the worker's delivery metrics (all prefork children summed) on
    OUTBOX_METRICS_PORT."""
    port = get_settings().outbox_metrics_port
    if not port:
        return
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    start_http_server(port, registry=registry)
    log.info("worker metrics on :%d/metrics", port)


@worker_process_init.connect
def _after_fork(**_: Any) -> None:
    # Engines, the Polar client and Redis clients are made on first use in each child.
    runner.reset_after_fork()


@worker_process_shutdown.connect
def _on_shutdown(pid: int | None = None, **_: Any) -> None:
    runner.close()
    if get_settings().outbox_metrics_port and pid is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


@app.task(name="outbox.drain", ignore_result=True)
def drain() -> dict[str, Any]:
    """Deliver due outbox rows for up to ~50 s; ask a sibling to help while there's a backlog."""
    report = runner.drain_once(max_seconds=DRAIN_SECONDS, on_backlog=_ask_for_help)
    return {"delivered": report.delivered, "failed": report.failed, "batches": report.batches}


def _ask_for_help() -> None:
    drain.apply_async(expires=30)


@app.task(name="outbox.rescue", ignore_result=True)
def rescue() -> int:
    """Make rows of lost workers (expired leases) claimable again."""
    return runner.rescue_once()


@app.task(name="outbox.expire_holds", ignore_result=True)
def expire_holds() -> int:
    """Release holds not captured within HOLD_TTL_SECONDS."""
    return runner.expire_holds_once()


@app.task(name="outbox.prune", ignore_result=True)
def prune() -> int:
    """Delete delivered rows older than OUTBOX_RETENTION_DAYS (the ledger is kept)."""
    return runner.prune_once()
