"""Chaos fixtures: the acceptance fixtures plus servers of the test's own (tests/services.py) that
tests may kill: a private Redis, a private PostgreSQL cluster."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.acceptance.conftest import (  # noqa: F401 - fixtures
    clean_redis,
    emulator,
    start_worker,
    worker_env,
)
from tests.services import PrivatePostgres, PrivateRedis, free_port

__all__ = ["PrivatePostgres", "PrivateRedis", "free_port"]


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()
