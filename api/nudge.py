"""The after-commit nudge: wake a Celery drain soon after usage commits (best effort).

Requests never wait on Redis: calling the nudger only sets a flag; a background thread sends at
most one `outbox.drain` message per `min_interval`, to run once the new row is past the clock
margin. Redis down → the message is dropped with a warning (at most one a minute) and the beat
schedule's periodic drain catches up.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("api.nudge")


class Nudger:
    def __init__(self, send: Callable[[], None], *, min_interval: float = 0.1) -> None:
        self._send = send
        self._min_interval = min_interval
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._last_warning = 0.0
        self.sent = 0
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="outbox-nudger", daemon=True)
        self._thread.start()

    def __call__(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()

    def _run(self) -> None:
        while not self._stopped.is_set():
            self._wake.wait()
            if self._stopped.is_set():
                return
            self._wake.clear()
            try:
                self._send()
                self.sent += 1
            except Exception as exc:
                self.dropped += 1
                now = time.monotonic()
                if now - self._last_warning > 60:
                    self._last_warning = now
                    log.warning("could not nudge the worker (beat will catch up): %s", exc)
            time.sleep(self._min_interval)


def celery_nudger(delay: float) -> Nudger:
    """A nudger that sends `outbox.drain` through the Celery broker (Redis), to run `delay`
    seconds later: the clock margin (OUTBOX_CLOCK_MARGIN_SECONDS), so that the row just
    committed is due when the drain claims. Sent at once, it would find the row held back and
    end, and a lone usage would wait for beat's next drain."""
    from worker.celery_app import app

    def send() -> None:
        app.send_task("outbox.drain", countdown=delay, expires=30 + delay, retry=False)

    return Nudger(send)
