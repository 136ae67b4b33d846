"""Admin: outbox stats, events and their history (admin or viewer), replay (admin only)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse

from api.deps import AdminToken, ReaderToken, SessionDep, respond
from api.schemas import (
    CUSTOMER_ID_SCHEMA,
    ERROR_RESPONSES,
    Cursor,
    ErrorOut,
    EventDetailOut,
    EventOut,
    EventPage,
    Limit,
    ReplayIn,
    ReplayOut,
    StatsOut,
)
from outbox.errors import InvalidRequest
from outbox.events import list_events, outbox_stats
from outbox.ops.inspect import event_detail
from outbox.ops.replay import replay
from outbox.states import EventStatus
from outbox.validation import MAX_CUSTOMER_ID_LENGTH, MAX_ID, check_customer_id

router = APIRouter(prefix="/v1/admin/outbox", tags=["admin"])


def _check_replay_target(body: ReplayIn) -> None:
    if body.event_ids is not None and body.status is not None:
        raise InvalidRequest(
            'give either "event_ids" or "status": "failed", not both', field="status"
        )
    if body.customer_id is not None and body.status is None:
        raise InvalidRequest('"customer_id" only goes with "status": "failed"', field="customer_id")
    if body.event_ids is None and body.status is None:
        raise InvalidRequest(
            'give "event_ids": [...], or "status": "failed" (optionally with "customer_id")',
            field="event_ids",
        )


@router.get("/stats", response_model=StatsOut, responses=ERROR_RESPONSES)
def get_stats(session: SessionDep, _: ReaderToken) -> JSONResponse:
    """Counts by status, oldest pending age, deliveries in the last minute, money at risk."""
    return respond(StatsOut(**outbox_stats(session).as_dict()))


@router.get("/events", response_model=EventPage, responses=ERROR_RESPONSES)
def get_events(
    session: SessionDep,
    _: ReaderToken,
    status: Annotated[EventStatus | None, Query()] = None,
    customer_id: Annotated[
        str | None,
        Query(
            min_length=1, max_length=MAX_CUSTOMER_ID_LENGTH, json_schema_extra=CUSTOMER_ID_SCHEMA
        ),
    ] = None,
    cursor: Cursor = None,
    limit: Limit = 50,
) -> JSONResponse:
    """Outbox events, newest first, filtered by status and customer (cursor pages)."""
    if customer_id is not None:
        check_customer_id(customer_id)
    rows, next_cursor = list_events(
        session, customer_id=customer_id, status=status, cursor=cursor, limit=limit
    )
    page = EventPage(
        items=[
            EventOut(
                event_id=row.id,
                external_id=row.external_id,
                customer_id=row.customer_id,
                credits=row.credits,
                metadata=row.event_metadata,
                status=row.status,
                attempts=row.attempts,
                next_attempt_at=row.next_attempt_at,
                lease_owner=row.lease_owner,
                lease_expires_at=row.lease_expires_at,
                last_error=row.last_error,
                last_replay_id=row.last_replay_id,
                created_at=row.created_at,
                delivered_at=row.delivered_at,
                refund_of=row.refund_of,
            )
            for row in rows
        ],
        next_cursor=next_cursor,
    )
    return respond(page)


@router.get(
    "/events/{event_id}",
    response_model=EventDetailOut,
    responses={**ERROR_RESPONSES, 404: {"model": ErrorOut, "description": "event_not_found"}},
)
def get_event(
    session: SessionDep,
    request: Request,
    _: ReaderToken,
    event_id: Annotated[int, Path(ge=1, le=MAX_ID)],
) -> JSONResponse:
    """One event: what is sent to Polar, and every attempt, rescue, replay and re-queue."""
    detail = event_detail(session, event_id, request.app.state.settings)
    return respond(EventDetailOut.model_validate(detail.as_dict()))


@router.post(
    "/replay",
    response_model=ReplayOut,
    responses={
        **ERROR_RESPONSES,
        404: {"model": ErrorOut, "description": "event_not_found"},
        409: {"model": ErrorOut, "description": "not_replayable: an event is not failed"},
    },
)
def post_replay(body: ReplayIn, session: SessionDep, token: AdminToken) -> JSONResponse:
    """failed → pending with the same `external_id` (a resend Polar already has is free).
    Either `event_ids`, or `status: "failed"` (optionally with `customer_id`), not both; 422
    otherwise. A dry run moves nothing and answers `would_replay`."""
    _check_replay_target(body)
    result = replay(
        session,
        event_ids=body.event_ids,
        all_failed=body.status == "failed",
        customer_id=body.customer_id,
        dry_run=body.dry_run,
        actor=f"api-token:{token.name or token.id}",
        reason=body.reason,
    )
    return respond(ReplayOut.model_validate(result.as_dict()))
