"""Process-level wiring for drainers (Celery tasks, `outbox dev`, the CLI): one engine, one
Polar client, one rate budget per process, made on first use after fork."""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable

from sqlalchemy.orm import Session, sessionmaker

from outbox.db import dispose_engines, get_engine, open_database, session_factory
from outbox.delivery.deliverer import Deliverer, DrainReport, drain
from outbox.errors import BrokerUnavailable, ConfigError
from outbox.polar.gateway import close_gateway, get_gateway
from outbox.settings import Settings, get_settings

log = logging.getLogger("outbox.runtime")

_lock = threading.Lock()
_deliverer: tuple[int, Deliverer] | None = None


def worker_id() -> str:
    """`<host>:<pid>`: shows in lease owners, so operators can tell whose rows are inflight."""
    return f"{socket.gethostname()}:{os.getpid()}"


def check_can_deliver(settings: Settings) -> None:
    """Refuse to start a drainer that could only fail: a Polar token, a database that answers
    and a schema at head (`ConfigError`, `DatabaseUnavailable`, `SchemaNotMigrated`)."""
    if not settings.polar_access_token:
        raise ConfigError(
            "POLAR_ACCESS_TOKEN is not set: the worker cannot deliver usage to Polar "
            "(create an organization access token in Polar and set it)"
        )
    open_database(settings.database_url)


def check_broker(settings: Settings, timeout: float = 3.0) -> None:
    """`BrokerUnavailable` unless Redis at REDIS_URL answers within `timeout` seconds: a worker
    started without it would print its banner and retry forever, receiving nothing."""
    import redis

    from outbox.db import redact, safe_url

    client = redis.Redis.from_url(
        settings.redis_url, socket_connect_timeout=timeout, socket_timeout=timeout
    )
    try:
        client.ping()
    except (redis.RedisError, OSError, ValueError) as exc:
        reason = redact(" ".join(str(exc).split()), settings.redis_url)
        raise BrokerUnavailable(
            f"Redis at {safe_url(settings.redis_url)} does not answer ({reason}): a worker "
            "gets its tasks from it; start it or check REDIS_URL"
        ) from None
    finally:
        client.close()


def sessions(settings: Settings | None = None) -> sessionmaker[Session]:
    settings = settings or get_settings()
    return session_factory(get_engine(settings.database_url))


def get_deliverer(settings: Settings | None = None) -> Deliverer:
    """This process's deliverer (re-made after fork)."""
    global _deliverer
    with _lock:
        if _deliverer is None or _deliverer[0] != os.getpid():
            settings = settings or get_settings()
            _deliverer = (
                os.getpid(),
                Deliverer(
                    sessions(settings), get_gateway(settings), settings, worker_id=worker_id()
                ),
            )
        return _deliverer[1]


def drain_once(
    *, max_seconds: float = 50.0, on_backlog: Callable[[], None] | None = None
) -> DrainReport:
    """Drain due rows for up to `max_seconds`; call `on_backlog` once if a full batch came."""
    deliverer = get_deliverer()
    asked = False

    report = DrainReport()
    first = drain(deliverer, max_seconds=max_seconds, max_batches=1)
    _merge(report, first)
    if first.batches and first.pause_seconds == 0:
        if on_backlog is not None and first.delivered + first.failed + first.retried >= (
            deliverer.settings.outbox_batch_size
        ):
            asked = True
            try:
                on_backlog()
            except Exception as exc:  # best effort: the beat schedule catches up anyway
                log.warning("could not ask for a helper drain: %s", exc)
        rest = drain(deliverer, max_seconds=max_seconds)
        _merge(report, rest)
    if report.delivered or report.failed:
        log.info(
            "drain finished",
            extra={
                "delivered": report.delivered,
                "failed": report.failed,
                "retried": report.retried,
                "batches": report.batches,
                "helper_asked": asked,
            },
        )
    return report


def _merge(total: DrainReport, part: DrainReport) -> None:
    total.batches += part.batches
    total.delivered += part.delivered
    total.failed += part.failed
    total.retried += part.retried
    total.rescued += part.rescued
    total.pause_seconds = max(total.pause_seconds, part.pause_seconds)


def rescue_once() -> int:
    """Rescue expired leases now."""
    return get_deliverer().rescue()


def expire_holds_once() -> int:
    """Release expired holds now."""
    from outbox.db import session_scope
    from outbox.holds import expire_holds

    with session_scope(get_engine(get_settings().database_url)) as session:
        return expire_holds(session)


def prune_once() -> int:
    """Delete delivered rows past the retention now."""
    from datetime import timedelta

    from outbox.events import prune_delivered

    settings = get_settings()
    result = prune_delivered(
        get_engine(settings.database_url),
        older_than=timedelta(days=settings.outbox_retention_days),
    )
    if result.deleted:
        log.info("pruned delivered rows", extra={"deleted": result.deleted})
    return result.deleted


def reset_after_fork() -> None:
    """Forget connections inherited from a parent process."""
    global _deliverer
    _deliverer = None


def close() -> None:
    """Close this process's pooled connections and Polar client."""
    close_gateway()
    dispose_engines()


class BackgroundDrainer:
    """The in-process drainer of `outbox dev` (no Celery, no Redis): a thread that drains
    every `interval` seconds, or at once when `poke()`d after a commit."""

    def __init__(self, settings: Settings, *, interval: float | None = None) -> None:
        self.settings = settings
        self.interval = interval or settings.outbox_drain_interval_seconds
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outbox-drainer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def poke(self) -> None:
        """Ask for a drain now (called after a usage commits)."""
        self._wake.set()

    def stop(self, timeout: float = 15.0) -> None:
        """Finish the current batch and stop (rows in flight are settled, none is lost)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        deliverer = get_deliverer(self.settings)
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            try:
                drain(deliverer, max_seconds=30.0, should_stop=self._stop.is_set)
            except Exception:
                log.exception("drain failed; retrying in %.0f s", self.interval)
