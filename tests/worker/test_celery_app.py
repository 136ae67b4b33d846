"""The beat schedule: what runs by itself, and how often."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import Engine, select, update

from outbox.db import session_scope
from outbox.holds import place_hold
from outbox.ledger import get_credits
from outbox.models import Hold, utcnow
from tests.factories import make_customer


def test_beat_releases_expired_holds_at_least_every_minute(clean_tables: Engine) -> None:
    """Uncaptured holds are released by the beat entry `outbox.expire_holds` (nobody else
    sweeps them): running what that entry schedules gives an overdue hold's credits back."""
    import worker.tasks  # noqa: F401 - registers the tasks
    from worker.celery_app import app

    with session_scope(clean_tables) as session:
        customer = make_customer(session, credits=9)
        hold = place_hold(session, customer, 9).hold_id
        session.execute(
            update(Hold).where(Hold.id == hold).values(expires_at=utcnow() - timedelta(seconds=1))
        )
    entries = [
        entry for entry in app.conf.beat_schedule.values() if entry["task"] == "outbox.expire_holds"
    ]
    assert len(entries) == 1
    assert 0 < float(entries[0]["schedule"]) <= 60
    app.tasks[entries[0]["task"]].run()
    with session_scope(clean_tables) as session:
        assert session.scalar(select(Hold.status).where(Hold.id == hold)) == "expired"
        summary = get_credits(session, customer)
        assert (summary.balance, summary.held) == (9, 0)
