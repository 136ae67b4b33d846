"""Read-side queries shared by the API and the CLI (cursor pagination, listings)."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from outbox.errors import InvalidRequest
from outbox.models import OutboxEvent

MAX_PAGE_SIZE = 200


def encode_cursor(last_id: int) -> str:
    """An opaque cursor: the id of the last row of the page."""
    return base64.urlsafe_b64encode(f"id:{last_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> int | None:
    """The id a cursor points after; `InvalidRequest` if it was not made by `encode_cursor`."""
    if cursor is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        prefix, _, value = raw.partition(":")
        if prefix != "id" or not value.isdigit():
            raise ValueError(raw)
        return int(value)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidRequest(
            "cursor is not valid: pass next_cursor as returned", field="cursor"
        ) from None


def check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise InvalidRequest(f"limit must be between 1 and {MAX_PAGE_SIZE}", field="limit")
    return limit


def list_events(
    session: Session,
    *,
    customer_id: str | None = None,
    status: str | None = None,
    cursor: str | None = None,
    limit: int = 50,
) -> tuple[Sequence[OutboxEvent], str | None]:
    """Outbox events, newest first, filtered; returns the page and the next cursor (or None)."""
    limit = check_limit(limit)
    after = decode_cursor(cursor)
    query = select(OutboxEvent).order_by(OutboxEvent.id.desc()).limit(limit + 1)
    if customer_id is not None:
        query = query.where(OutboxEvent.customer_id == customer_id)
    if status is not None:
        query = query.where(OutboxEvent.status == status)
    if after is not None:
        query = query.where(OutboxEvent.id < after)
    rows = list(session.scalars(query))
    next_cursor = encode_cursor(rows[limit - 1].id) if len(rows) > limit else None
    return rows[:limit], next_cursor
