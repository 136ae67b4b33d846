"""Admin: outbox stats, events, replay (admin scope only)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from api.deps import AdminToken, SessionDep, respond
from api.schemas import (
    CUSTOMER_ID_SCHEMA,
    ERROR_RESPONSES,
    NO_NUL_SCHEMA,
    Cursor,
    ErrorOut,
    Limit,
    RowId,
    Strict,
)
from outbox.errors import InvalidRequest
from outbox.operations import MAX_REPLAY_IDS, outbox_stats, replay
from outbox.queries import list_events
from outbox.states import EventStatus
from outbox.validation import MAX_CUSTOMER_ID_LENGTH, check_customer_id

router = APIRouter(prefix="/v1/admin/outbox", tags=["admin"])


class StatsOut(BaseModel):
    counts: dict[str, int]
    oldest_pending_seconds: float
    delivered_last_minute: int
    credits_undelivered: int


class EventOut(BaseModel):
    event_id: int
    external_id: str
    customer_id: str
    credits: int
    metadata: dict[str, object]
    status: str
    attempts: int
    next_attempt_at: datetime
    lease_owner: str | None
    lease_expires_at: datetime | None
    last_error: str | None
    last_replay_id: int | None
    created_at: datetime
    delivered_at: datetime | None


class EventPage(BaseModel):
    items: list[EventOut]
    next_cursor: str | None


class ReplayIn(Strict):
    """Either `event_ids`, or `status: "failed"` (optionally with `customer_id`); not both."""

    # The schema states the choice the API makes: ids, or every failed event (of one customer).
    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [
                {
                    "required": ["event_ids"],
                    "properties": {
                        "event_ids": {"type": "array"},
                        "status": {"type": "null"},
                        "customer_id": {"type": "null"},
                    },
                },
                {
                    "required": ["status"],
                    "properties": {"status": {"const": "failed"}, "event_ids": {"type": "null"}},
                },
            ]
        }
    )

    event_ids: list[RowId] | None = Field(
        None, min_length=1, max_length=MAX_REPLAY_IDS, description="These failed events."
    )
    status: Literal["failed"] | None = Field(None, description="Every failed event.")
    customer_id: StrictStr | None = Field(
        None,
        min_length=1,
        max_length=MAX_CUSTOMER_ID_LENGTH,
        description='With `status: "failed"`: only this customer\'s.',
        json_schema_extra=CUSTOMER_ID_SCHEMA,
    )
    dry_run: StrictBool = Field(False, description="Move nothing; answer what would move.")
    reason: StrictStr | None = Field(
        None, max_length=500, description="Kept with the replay.", json_schema_extra=NO_NUL_SCHEMA
    )


class ReplayOut(BaseModel):
    """The same object as `outbox replay --json`."""

    replayed: int = Field(description="Events moved failed → pending (0 in a dry run).")
    would_replay: int | None = Field(description="In a dry run: events that would move.")
    event_ids: list[int] = Field(description="The events moved (or that would move).")
    credits: int = Field(description="Their credits.")
    dry_run: bool
    replay_id: int | None = Field(description="The recorded replay (null in a dry run).")


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
def get_stats(session: SessionDep, _: AdminToken) -> JSONResponse:
    """Counts by status, oldest pending age, deliveries in the last minute, money at risk."""
    return respond(StatsOut(**outbox_stats(session).as_dict()))


@router.get("/events", response_model=EventPage, responses=ERROR_RESPONSES)
def get_events(
    session: SessionDep,
    _: AdminToken,
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
            )
            for row in rows
        ],
        next_cursor=next_cursor,
    )
    return respond(page)


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
