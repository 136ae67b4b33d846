"""Targets of the contract suite: the project's emulator always; Polar's own server when
CONTRACT_POLAR_URL, CONTRACT_POLAR_TOKEN and CONTRACT_POLAR_METER_ID are set (see
tests/contract/test_polar_contract.py). The names do not start with POLAR_: the project's
settings refuse unknown POLAR_* variables as typos."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

import polar_emulator

ENV_URL = "CONTRACT_POLAR_URL"
ENV_TOKEN = "CONTRACT_POLAR_TOKEN"
ENV_METER = "CONTRACT_POLAR_METER_ID"
ENV_RECORD = "CONTRACT_POLAR_RECORD"


@dataclass
class Target:
    """One Polar to run a case against."""

    kind: str  # "emulator" or "polar"
    url: str
    token: str
    meter_id: str
    run: str  # unique per test: external ids, customers and time windows never collide
    http: httpx.Client
    emulator: polar_emulator.RunningEmulator | None = None

    @property
    def record(self) -> bool:
        """Write the fixtures from this target's answers (Polar's server only)."""
        return self.kind == "polar" and os.environ.get(ENV_RECORD, "") == "1"


@pytest.fixture(scope="module")
def _emulator() -> Iterator[polar_emulator.RunningEmulator]:
    running = polar_emulator.serve_in_thread(config=polar_emulator.EmulatorConfig(seed=11))
    yield running
    running.stop()


@pytest.fixture(params=["emulator", "polar"])
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    run = f"ct{uuid.uuid4().hex[:10]}"
    if request.param == "emulator":
        emulator: polar_emulator.RunningEmulator = request.getfixturevalue("_emulator")
        url, token, meter, running = emulator.url, emulator.token, polar_emulator.METER_ID, emulator
    else:
        missing = [name for name in (ENV_URL, ENV_TOKEN, ENV_METER) if not os.environ.get(name)]
        if missing:
            pytest.skip(f"Polar's server: set {', '.join(missing)} (docs/howto/contract-tests.md)")
        url, token, meter = os.environ[ENV_URL], os.environ[ENV_TOKEN], os.environ[ENV_METER]
        running = None
    http = httpx.Client(
        base_url=url.rstrip("/"), headers={"Authorization": f"Bearer {token}"}, timeout=30
    )
    yield Target(request.param, url, token, meter, run, http, running)
    http.close()
