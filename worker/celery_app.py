"""The Celery app, its settings and the beat schedule.

Celery messages are only wake-up hints: the outbox table is the truth. Every task is idempotent
by design (a drain claims what is due; running it twice, or losing it, changes nothing). So
messages are acknowledged when a task starts, not when it ends, and Redis keeps no copy of a
message a worker has taken (no "ack emulation"): a message lost with a killed worker, or with
Redis, costs nothing (beat drains every few seconds and expired leases are rescued).

That is also what keeps a worker alive through a Redis outage. kombu 5.7 with ack emulation
ends the worker ("Unrecoverable error: AttributeError("'NoneType' object has no attribute
'hostname'")") when Redis goes away while the worker holds a message no pool process has
started yet and is still polling for more: Celery closes the lost connection twice, and the
second close restores that message through a transport that has already let go of its
connection; that restore raises an error that is not a connection error. Without ack emulation
a failed restore is logged ("UNABLE TO RESTORE 1 MESSAGES", and kombu dumps the message to a
temporary file) and dropped. tests/chaos/test_redis_outage.py makes exactly that case and
failed every run before; acknowledging late failed the same way more often.
"""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Any

from celery import Celery
from celery.signals import celeryd_init, setup_logging

from outbox.errors import ConfigError
from outbox.logs import configure_logging
from outbox.settings import get_settings

try:
    settings = get_settings()
except ConfigError as exc:  # one line naming the variable, exit 2 (as `outbox` does)
    sys.stderr.write(f"error: {exc.detail}\n")
    raise SystemExit(2) from None

if settings.outbox_metrics_port and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
    # Prefork children each count their own deliveries; multiprocess mode sums them for the
    # worker's /metrics. Must be set before prometheus_client is imported anywhere.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="outbox-metrics-")


@setup_logging.connect
def _log_as_configured(loglevel: int | str | None = None, **_: Any) -> None:
    """Celery's own lines (connected, ready, task received/succeeded with their fields) go
    through outbox.logs like ours: LOG_FORMAT=json gives one JSON object per line, and the
    text format keeps a record's fields (`extra`) instead of dropping them. The level is the
    command's --loglevel (`outbox worker`: LOG_LEVEL's unless given)."""
    configure_logging(settings.log_format, loglevel or settings.log_level)


@celeryd_init.connect
def _log_from_the_start(
    instance: Any = None, options: dict[str, Any] | None = None, **_: Any
) -> None:
    """The same, before the worker's first warnings (running as root, ...). With
    LOG_FORMAT=json the worker prints no banner however it is started (`celery -A worker
    worker` in compose, as `--quiet` would): every line is one JSON object."""
    _log_as_configured((options or {}).get("loglevel"))
    if settings.log_format == "json" and instance is not None:
        instance.quiet = True


app = Celery("outbox", broker=settings.redis_url, include=["worker.tasks"])
app.conf.update(
    task_acks_late=False,  # see the module docstring
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    result_backend=None,
    task_serializer="json",
    accept_content=["json"],
    # Redis going away must never end a worker: retry connecting forever, at start and after
    # a loss (tests/chaos/test_redis_outage.py stops and starts Redis under load). Workers run
    # without gossip and mingle (docker-compose.yml, `outbox worker`): the project uses
    # neither, and restarting Gossip after a lost connection is where kombu trips over its
    # closed connection ("'NoneType' object has no attribute 'hostname'" / 'connection_errors',
    # celery/kombu#582).
    broker_connection_retry_on_startup=True,
    broker_connection_retry=True,
    broker_connection_max_retries=None,
    # A drain running when Redis goes away needs no Redis to finish (the table is the truth,
    # the rate budget falls back to a local share): let it finish rather than kill it mid-batch
    # (its rows would wait for their lease and lose an attempt). Its message was acknowledged
    # when it started. (Explicit: Celery 6 changes the default.)
    worker_cancel_long_running_tasks_on_connection_loss=False,
    broker_transport_options={
        "ack_emulation": False,  # see the module docstring (and no visibility timeout)
        "socket_connect_timeout": 2,
        "socket_timeout": 5,
        # Ping idle connections, so a Redis that restarted is noticed within seconds.
        "health_check_interval": 10,
    },
    task_time_limit=300,
    task_soft_time_limit=240,
    worker_hijack_root_logger=False,
    worker_send_task_events=False,
    timezone="UTC",
    beat_schedule={
        "drain": {
            "task": "outbox.drain",
            "schedule": settings.outbox_drain_interval_seconds,
            "options": {"expires": max(settings.outbox_drain_interval_seconds * 2, 5.0)},
        },
        "expire-holds": {
            "task": "outbox.expire_holds",
            "schedule": 60.0,
            "options": {"expires": 60.0},
        },
        "prune": {
            "task": "outbox.prune",
            "schedule": 24 * 3600.0,
            "options": {"expires": 3600.0},
        },
        "rescue": {
            "task": "outbox.rescue",
            "schedule": max(settings.outbox_lease_seconds / 2, 5.0),
            "options": {"expires": 60.0},
        },
    },
)
