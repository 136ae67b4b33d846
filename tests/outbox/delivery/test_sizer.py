"""outbox/delivery/sizer.py: a worker process halves its batches while Polar's server answers
500 to them (past its meter-row limit it fails the whole request, stores nothing), and grows
them back once batches are accepted again; the gauge shows the smallest of the live processes'."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, multiprocess
from sqlalchemy import Engine

import polar_emulator
from outbox.delivery.sizer import PROBE_AFTER, BatchSizer
from tests.outbox.delivery.test_deliverer import (
    counts,
    drain_until_settled,
    make_deliverer,
    make_settings,
    spend,
)


def test_a_500_halves_the_cap_and_accepted_batches_double_it_back_up_to_the_setting() -> None:
    sizer = BatchSizer(1000)
    sizer.server_error(1000)
    assert sizer.cap == 500
    sizer.server_error(500)
    assert sizer.cap == 250
    sizer.server_error(900)  # a bigger batch than the cap (in flight before): no growth
    assert sizer.cap == 250
    for _ in range(PROBE_AFTER - 1):
        sizer.accepted()
    assert sizer.cap == 250
    sizer.accepted()
    assert sizer.cap == 500
    sizer.server_error(500)  # the probe failed: back down, and the count starts again
    assert sizer.cap == 250
    for _ in range(PROBE_AFTER * 10):
        sizer.accepted()
    assert sizer.cap == 1000  # never above OUTBOX_BATCH_SIZE
    assert REGISTRY.get_sample_value("outbox_batch_cap") == 1000


def test_a_500_to_a_single_event_says_nothing_about_size() -> None:
    sizer = BatchSizer(1)
    sizer.server_error(1)
    assert sizer.cap == 1
    sizer = BatchSizer(10)
    for size in (10, 5, 2, 1, 1):
        sizer.server_error(size)
    assert sizer.cap == 1
    sizer.accepted()
    assert sizer.cap == 1  # not before PROBE_AFTER accepted in a row


@pytest.fixture
def emulator() -> Iterator[polar_emulator.RunningEmulator]:
    running = polar_emulator.serve_in_thread(config=polar_emulator.EmulatorConfig(seed=17))
    yield running
    running.stop()


def test_an_organization_with_five_meters_gets_every_row_delivered_at_batch_size_1000(
    pg_url: str, clean_tables: Engine, emulator: polar_emulator.RunningEmulator
) -> None:
    """Five meters on the usage event: Polar's server fails any batch past 936 events (4,681
    meter-event rows) with a 500. Without the sizer every full batch of 1,000 fails, again
    and again, until the rows have spent their attempts."""
    meters = emulator.state.config.meters
    counting = [
        {**meters[0], "id": str(uuid.uuid4()), "aggregation": {"func": "count"}} for _ in range(4)
    ]
    emulator.state.configure({"meters": [*meters, *counting]})
    settings = make_settings(pg_url, emulator, outbox_batch_size=1000, outbox_max_attempts=3)
    spent = spend(clean_tables, customers=7, events=2000)
    deliverer = make_deliverer(clean_tables, settings)

    drain_until_settled(deliverer, clean_tables, timeout=120)

    assert counts(clean_tables) == {"delivered": 2000}
    assert emulator.state.totals() == spent
    assert deliverer.sizer.cap == 500
    stats = emulator.state.stats
    assert stats.events_inserted == 2000
    assert (
        0 < stats.meter_event_overflows <= 3
    )  # the first batch of 1,000 (tried 3 times in the call)


_CAP_OF_A_PROCESS = """
import sys
from outbox.delivery.sizer import BatchSizer
sizer = BatchSizer(1000)
for _ in range(int(sys.argv[1])):
    sizer.server_error(sizer.cap)
print(sizer.cap)
"""


def test_the_gauge_shows_the_smallest_cap_of_the_live_processes_only(tmp_path: Path) -> None:
    """The worker's processes share one gauge (prometheus multiprocess mode): the smallest
    cap of those alive; a process that exited with a halved cap (its pid marked dead, as
    worker/tasks.py does) no longer drags it down."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}

    def process_with_cap_halved(times: int) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [sys.executable, "-c", _CAP_OF_A_PROCESS, str(times)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert process.stdout is not None
        return process

    halved, whole = process_with_cap_halved(2), process_with_cap_halved(0)
    assert [p.communicate(timeout=60)[0].strip() for p in (halved, whole)] == ["250", "1000"]

    def gauge() -> float | None:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, str(tmp_path))  # type: ignore[no-untyped-call]
        return registry.get_sample_value("outbox_batch_cap")

    assert gauge() == 250  # both count as alive until marked dead
    multiprocess.mark_process_dead(halved.pid, str(tmp_path))  # type: ignore[no-untyped-call]
    assert gauge() == 1000
