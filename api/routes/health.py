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


@router.get("/readyz")
def readyz(request: Request) -> JSONResponse:
    """Readiness: the database answers, its schema is at head (`outbox db upgrade`), Polar has
    not rejected our access token, and Polar's last refusal of a batch named the events it
    refused."""
    checks: dict[str, str] = {}
    try:
        with Session(request.app.state.engine) as session:
            session.execute(text("SELECT 1"))
            checks["database"] = "ok"
            schema = request.app.state.schema_cache.state(session.connection())
            checks["schema"] = "ok" if schema.ok else schema.describe()
            if not schema.ok:
                return _not_ready(checks, "schema_not_migrated")
            credentials = get_state(session, POLAR_CREDENTIALS)
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
        checks.setdefault("database", f"unreachable: {type(exc).__name__}")
    ready = all(value == "ok" for value in checks.values())
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
