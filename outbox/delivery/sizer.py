"""How many rows the next claim takes: OUTBOX_BATCH_SIZE, unless Polar's server fails bigger
batches.

Polar's server inserts one meter-event row per ingested event and matching meter in ONE
statement, which holds at most 32,767 parameters: past about 4,681 events times matching meters it
answers 500 and stores nothing (docs/explanation/polar.md). An organization with more meters
than OUTBOX_BATCH_SIZE leaves room for would then fail every full batch, and its rows would
spend their attempts until they failed. So a 500 to a batch of n rows caps the next claims at
n // 2; after PROBE_AFTER accepted requests in a row at a cap, the cap doubles again (up to
OUTBOX_BATCH_SIZE). A cap that was too small grows back; one that is right costs one failed
request every PROBE_AFTER + 1. A 500 from an outage shrinks the cap too, and it grows back as
soon as Polar accepts requests again: log2(OUTBOX_BATCH_SIZE) doublings.

Only 500 counts: 502, 503, 504 and network errors say nothing about the batch's size. One per
worker process (in its `Deliverer`), as the lesson is Polar's, not a row's.
"""

from __future__ import annotations

import logging

from outbox import metrics

log = logging.getLogger("outbox.delivery")

PROBE_AFTER = 20
"""Accepted requests in a row at a cap before the cap doubles."""


class BatchSizer:
    """The claim limit of one worker process (see the module docstring)."""

    def __init__(self, configured: int) -> None:
        self.configured = configured
        self.cap = configured
        self._accepted_in_a_row = 0
        metrics.BATCH_CAP.set(self.cap)

    def server_error(self, size: int) -> None:
        """Polar answered 500 to a batch of `size` rows: claim at most half of that next."""
        self._accepted_in_a_row = 0
        if size <= 1 or size // 2 >= self.cap:
            return
        self.cap = size // 2
        metrics.BATCH_CAP.set(self.cap)
        log.warning(
            "Polar answered 500 to a batch of %d events; claiming at most %d until batches "
            "of that size are accepted %d times in a row",
            size,
            self.cap,
            PROBE_AFTER,
            extra={"batch_size": size, "batch_cap": self.cap},
        )

    def accepted(self) -> None:
        """Polar accepted a batch: after PROBE_AFTER in a row, try twice the cap."""
        if self.cap >= self.configured:
            return
        self._accepted_in_a_row += 1
        if self._accepted_in_a_row < PROBE_AFTER:
            return
        self._accepted_in_a_row = 0
        self.cap = min(self.configured, self.cap * 2)
        metrics.BATCH_CAP.set(self.cap)
        log.info("trying batches of up to %d events again", self.cap)
