"""The naive sender of bench/drain.py (scenario c): what delivery looks like without batching.

One Celery task per usage event; the task reads its outbox row, sends ONE event to Polar's
ingest endpoint with polar-sdk (a batch of one), and marks that row delivered. No claim, no
lease, no rate budget: the code people write first. It is a Celery app of its own (task name
`bench.naive_send`), run by `bench/drain.py` from the repository's root as

    celery -A bench.drain.naive_sender worker --concurrency=K

with DATABASE_URL, REDIS_URL, POLAR_ACCESS_TOKEN and POLAR_BASE_URL in its environment.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from celery import Celery
from celery.signals import worker_process_init
from polar.v2026_10 import Polar
from sqlalchemy import Engine, select, update

from outbox.db import make_engine, session_scope
from outbox.models import OutboxEvent, utcnow
from outbox.polar.gateway import build_event
from outbox.states import EventStatus

TASK_NAME = "bench.naive_send"

app = Celery("naive_sender", broker=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/14"))
# Celery's defaults otherwise (prefetch 4, early ack): the naive sender is not handicapped.
app.conf.update(
    task_ignore_result=True,
    result_backend=None,
    task_serializer="json",
    accept_content=["json"],
    worker_hijack_root_logger=False,
    worker_send_task_events=False,
    broker_connection_retry_on_startup=True,
)

_lock = threading.Lock()
_process: dict[str, Any] = {}


@worker_process_init.connect
def _after_fork(**_: Any) -> None:
    # Connections and the HTTP client are made on first use in each prefork child.
    _process.clear()


def _resources() -> tuple[Engine, Polar]:
    with _lock:
        if "engine" not in _process:
            _process["engine"] = make_engine(os.environ["DATABASE_URL"])
            _process["polar"] = Polar(
                os.environ["POLAR_ACCESS_TOKEN"], base_url=os.environ["POLAR_BASE_URL"]
            )
        return _process["engine"], _process["polar"]


@app.task(name=TASK_NAME, ignore_result=True)
def naive_send(event_id: int) -> None:
    """Send one outbox row to Polar in its own request, then mark it delivered."""
    engine, polar = _resources()
    with session_scope(engine) as session:
        row = session.execute(
            select(
                OutboxEvent.external_id,
                OutboxEvent.customer_id,
                OutboxEvent.name,
                OutboxEvent.credits,
                OutboxEvent.event_metadata,
                OutboxEvent.occurred_at,
            ).where(OutboxEvent.id == event_id, OutboxEvent.status == EventStatus.PENDING)
        ).one_or_none()
    if row is None:
        return
    event = build_event(
        name=row.name,
        customer_id=row.customer_id,
        external_id=row.external_id,
        occurred_at=row.occurred_at,
        metadata=row.event_metadata or {},
        credits_field="credits_used",
        credits=row.credits,
        usage_id=str(event_id),
    )
    polar.events.ingest(events=[event])
    now = utcnow()
    with session_scope(engine) as session:
        session.execute(
            update(OutboxEvent)
            .where(OutboxEvent.id == event_id, OutboxEvent.status == EventStatus.PENDING)
            .values(status=EventStatus.DELIVERED, delivered_at=now, updated_at=now)
        )
