"""tests/services.py: a test run killed before its fixtures cleaned up leaves its private
PostgreSQL cluster running in the temporary directory; the next run that makes a cluster stops
and deletes it, and never one whose run is still going."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.services import OWNER_FILE, PrivatePostgres, can_run_private_postgres
from tests.services import reap_abandoned_clusters as reap

pytestmark = pytest.mark.skipif(
    not can_run_private_postgres(), reason="no PostgreSQL server binaries here"
)


def _answers(url: str) -> bool:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool, connect_args={"connect_timeout": 2})
    try:
        with engine.connect():
            return True
    except sa.exc.OperationalError:
        return False
    finally:
        engine.dispose()


def test_a_cluster_whose_run_is_gone_is_stopped_and_deleted_and_a_live_runs_is_kept() -> None:
    abandoned, live = PrivatePostgres(), PrivatePostgres()
    try:
        abandoned.start()
        live.start()
        # The abandoned one's owner: a process that has exited (its pid is free).
        gone = subprocess.Popen(["true"])
        gone.wait()
        (abandoned.dir / OWNER_FILE).write_text(f"{gone.pid} 1\n")

        removed = reap(abandoned.dir.parent)

        assert abandoned.dir in removed and not abandoned.dir.exists()
        assert not _answers(abandoned.url())
        assert live.dir not in removed and _answers(live.url())
    finally:
        live.destroy()
        abandoned.destroy()


def test_a_directory_without_an_owner_is_left_alone(tmp_path: Path) -> None:
    stranger = tmp_path / "outbox-test-pg-stranger"
    stranger.mkdir()
    assert reap(tmp_path) == [] and stranger.exists()
