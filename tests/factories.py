"""Plain-function factories (no framework) and the few helpers tests share."""

from __future__ import annotations

import time
import uuid

from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session

from outbox.db import session_scope
from outbox.ledger import grant_credits
from outbox.models import LedgerEntry


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


def ledger_usage(engine: Engine) -> dict[str, int]:
    """Credits spent per customer according to the ledger (what Polar must have billed)."""
    with session_scope(engine) as session:
        rows = session.execute(
            select(LedgerEntry.customer_id, -func.sum(LedgerEntry.delta))
            .where(LedgerEntry.kind == "usage")
            .group_by(LedgerEntry.customer_id)
        )
        return {customer: int(total) for customer, total in rows}


def wait_for_a_lock_wait(engine: Engine, timeout: float = 20.0) -> None:
    """Until some backend of this PostgreSQL database waits for a lock (a second writer)."""
    deadline = time.monotonic() + timeout
    with engine.connect() as conn:
        while time.monotonic() < deadline:
            waiting = conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock'"
                )
            ).scalar_one()
            conn.rollback()
            if waiting:
                return
            time.sleep(0.02)
    raise AssertionError("the second request never waited for the first one's lock")


def ledger_net_usage(engine: Engine) -> dict[str, int]:
    """Credits billed per customer according to the ledger, refunds deducted (usage - refunds):
    what Polar's meter must sum once every event and compensating event is delivered."""
    with session_scope(engine) as session:
        rows = session.execute(
            select(LedgerEntry.customer_id, -func.sum(LedgerEntry.delta))
            .where(LedgerEntry.kind.in_(["usage", "refund"]))
            .group_by(LedgerEntry.customer_id)
        )
        return {customer: int(total) for customer, total in rows}
