"""What starts a worker again if it exits anyway (it survives Redis and PostgreSQL outages by
itself: tests/chaos/): compose restarts its services, the systemd unit restarts `outbox
worker`, and compose runs the worker without gossip and mingle (worker/celery_app.py says
why; tests/chaos/test_redis_outage.py runs `outbox worker` itself)."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_compose_restarts_the_worker_and_beat_and_runs_workers_without_gossip() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    for name in ("worker", "beat", "api"):
        assert services[name].get("restart") == "unless-stopped", name
    command = services["worker"]["command"]
    assert command[:4] == ["celery", "-A", "worker", "worker"]
    assert "--without-gossip" in command and "--without-mingle" in command


def test_the_systemd_unit_restarts_outbox_worker() -> None:
    lines = (ROOT / "deploy" / "outbox-worker.service").read_text().splitlines()
    service: dict[str, str] = {}
    section = ""
    for line in lines:
        line = line.strip()
        if line.startswith("["):
            section = line
        elif "=" in line and not line.startswith("#") and section == "[Service]":
            key, _, value = line.partition("=")
            service[key] = value
    assert service["Restart"] == "always"
    assert service["ExecStart"].split()[1:3] == ["worker", "--concurrency"]
    assert service["ExecStart"].split()[0].endswith("/outbox")
