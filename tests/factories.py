"""Plain-function factories (no framework)."""

from __future__ import annotations

import uuid

from sqlalchemy.orm import Session

from outbox.ledger import grant_credits


def new_customer_id(prefix: str = "cust") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def make_customer(session: Session, credits: int = 10, customer_id: str | None = None) -> str:
    """A customer holding `credits` (0 means created with nothing spendable)."""
    customer_id = customer_id or new_customer_id()
    if credits > 0:
        grant_credits(session, customer_id, credits, reason="test")
    else:
        from outbox.ledger import ensure_customer

        ensure_customer(session, customer_id)
    return customer_id
