"""Customers: credits, usage history and grants."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.convertors import Convertor, register_url_convertor

from api.deps import AdminToken, SessionDep, UsageToken, respond
from api.errors import run_keyed
from api.routes.usage import IdempotencyKey
from api.schemas import (
    ERROR_RESPONSES,
    CreditsOut,
    Cursor,
    CustomerIdPath,
    DebitIn,
    DebitOut,
    ErrorOut,
    GrantIn,
    GrantOut,
    Limit,
    UsageEventOut,
    UsagePage,
)
from outbox.events import list_events
from outbox.idempotency import StoredResponse
from outbox.ledger import debit_by_operator, get_credits, grant_by_operator
from outbox.models import OutboxEvent
from outbox.validation import (
    MAX_REASON_LENGTH,
    check_customer_id,
    check_idempotency_key,
    check_text,
)

router = APIRouter(prefix="/v1/customers", tags=["customers"])


class CustomerIdConvertor(Convertor[str]):
    """`{customer_id:customer}`: any characters, `/` and newlines included (a customer id may
    hold `/`, as Polar's external ids may; check_customer_id refuses control characters with a
    422). The route's fixed suffix (`/credits`, ...) keeps the match unambiguous."""

    regex = r"[\s\S]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("customer", CustomerIdConvertor())
CustomerId = CustomerIdPath
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorOut, "description": "customer_not_found"}
}


@router.get(
    "/{customer_id:customer}/credits",
    response_model=CreditsOut,
    responses={**ERROR_RESPONSES, **NOT_FOUND},
)
def get_customer_credits(
    customer_id: CustomerId, session: SessionDep, _: UsageToken
) -> JSONResponse:
    """The customer's real-time balance, credits held by open holds, granted and used totals."""
    summary = get_credits(session, customer_id)
    return respond(
        CreditsOut(
            customer_id=summary.customer_id,
            balance=summary.balance,
            held=summary.held,
            granted=summary.granted,
            used=summary.used,
        )
    )


def usage_event_out(event: OutboxEvent) -> UsageEventOut:
    return UsageEventOut(
        event_id=event.id,
        external_id=event.external_id,
        credits=event.credits,
        metadata=event.event_metadata,
        status=event.status,
        attempts=event.attempts,
        last_error=event.last_error,
        created_at=event.created_at,
        delivered_at=event.delivered_at,
        refund_of=event.refund_of,
    )


@router.get(
    "/{customer_id:customer}/usage",
    response_model=UsagePage,
    responses={**ERROR_RESPONSES, **NOT_FOUND},
)
def get_customer_usage(
    customer_id: CustomerId,
    session: SessionDep,
    _: UsageToken,
    cursor: Cursor = None,
    limit: Limit = 50,
) -> JSONResponse:
    """The customer's usage events with their delivery status, newest first (cursor pages).
    Delivered events older than the retention (`outbox prune`) are no longer listed."""
    get_credits(session, customer_id)  # 404 for an unknown customer
    rows, next_cursor = list_events(session, customer_id=customer_id, cursor=cursor, limit=limit)
    return respond(UsagePage(items=[usage_event_out(row) for row in rows], next_cursor=next_cursor))


@router.post(
    "/{customer_id:customer}/grants",
    status_code=201,
    response_model=GrantOut,
    responses={
        **ERROR_RESPONSES,
        409: {"model": ErrorOut, "description": "idempotency_key_reused"},
    },
)
def post_grant(
    customer_id: CustomerId,
    body: GrantIn,
    request: Request,
    session: SessionDep,
    token: AdminToken,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """Admin: add credits to a customer (created if new)."""
    check_customer_id(customer_id)
    key = check_idempotency_key(idempotency_key)

    def action() -> StoredResponse:
        result = grant_by_operator(
            session,
            customer_id,
            body.credits,
            body.reason,
            actor=f"api-token:{token.name or token.id}",
        )
        return StoredResponse(201, {"grant_id": result.grant_id, "balance": result.balance})

    return run_keyed(
        session,
        token_id=token.id,
        key=key,
        path=f"/v1/customers/{customer_id}/grants",
        body=body,
        action=action,
    )


@router.post(
    "/{customer_id:customer}/debits",
    status_code=201,
    response_model=DebitOut,
    responses={
        **ERROR_RESPONSES,
        402: {"model": ErrorOut, "description": "insufficient_credits: never below zero"},
        404: {"model": ErrorOut, "description": "customer_not_found"},
        409: {"model": ErrorOut, "description": "idempotency_key_reused"},
    },
)
def post_debit(
    customer_id: CustomerId,
    body: DebitIn,
    request: Request,
    session: SessionDep,
    token: AdminToken,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """Admin: take credits back from a customer's balance, with a reason; refused (402) if the
    balance does not cover them (docs/explanation/corrections.md)."""
    check_customer_id(customer_id)
    check_text(body.reason, field="reason", max_length=MAX_REASON_LENGTH, required=True)
    key = check_idempotency_key(idempotency_key)

    def action() -> StoredResponse:
        result = debit_by_operator(
            session,
            customer_id,
            body.credits,
            body.reason,
            actor=f"api-token:{token.name or token.id}",
        )
        return StoredResponse(201, {"debit_id": result.grant_id, "balance": result.balance})

    return run_keyed(
        session,
        token_id=token.id,
        key=key,
        path=f"/v1/customers/{customer_id}/debits",
        body=body,
        action=action,
    )
