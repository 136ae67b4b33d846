"""Liveness, readiness and metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from sqlalchemy.orm import Session

from outbox.service_state import (
    CREDENTIALS_REJECTED,
    INGEST_UNATTRIBUTED_422,
    POLAR_CREDENTIALS,
    POLAR_INGEST,
    get_state,
)

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """Liveness only: the process answers."""
    return {"status": "ok"}


# Reported in the body, left out of readiness: Polar refusing our batches is the worker's
# problem (metric, log, alert), and the request path never depends on Polar (DESIGN 4).
_REPORTED_ONLY = frozenset({"polar_ingest"})


@router.get("/readyz")
def readyz(request: Request) -> JSONResponse:
    """Readiness: the database answers, its schema is at head (`outbox db upgrade`) and Polar
    has not rejected our access token. The `polar_ingest` check reports a Polar refusal of a
    batch that named no event; it does not make the API unready."""
    checks: dict[str, str] = {}
    step = "database"
    try:
        with Session(request.app.state.engine) as session:
            session.execute(text("SELECT 1"))
            checks["database"] = "ok"
            step = "schema"
            schema = request.app.state.schema_cache.state(session.connection())
            checks["schema"] = "ok" if schema.ok else schema.describe()
            if not schema.ok:
                return _not_ready(checks, "schema_not_migrated")
            step = "polar_credentials"
            credentials = get_state(session, POLAR_CREDENTIALS)
            step = "polar_ingest"
            ingest = get_state(session, POLAR_INGEST)
        if credentials is not None and credentials.value == CREDENTIALS_REJECTED:
            checks["polar_credentials"] = (
                f"rejected by Polar since {credentials.updated_at.isoformat()}: "
                f"{credentials.detail or 'check POLAR_ACCESS_TOKEN'}"
            )
        else:
            checks["polar_credentials"] = "ok"
        if ingest is not None and ingest.value == INGEST_UNATTRIBUTED_422:
            checks["polar_ingest"] = (
                f"Polar refused a batch with a 422 naming no event (last at "
                f"{ingest.updated_at.isoformat()}); retrying with backoff: {ingest.detail}"
            )
        else:
            checks["polar_ingest"] = "ok"
    except Exception as exc:
        # Whatever raised is not ready, even after `SELECT 1` answered: name the check.
        reason = "unreachable" if step == "database" else "failed"
        checks[step] = f"{reason}: {type(exc).__name__}"
        failed = True
    else:
        failed = False
    ready = not failed and all(
        value == "ok" for name, value in checks.items() if name not in _REPORTED_ONLY
    )
    return JSONResponse(
        {"status": "ready" if ready else "not_ready", "checks": checks},
        status_code=200 if ready else 503,
    )


def _not_ready(checks: dict[str, str], code: str) -> JSONResponse:
    return JSONResponse({"status": "not_ready", "code": code, "checks": checks}, status_code=503)


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    """Prometheus exposition: database-derived outbox gauges and this process's metrics."""
    return Response(
        generate_latest(request.app.state.metrics_registry), media_type=CONTENT_TYPE_LATEST
    )
