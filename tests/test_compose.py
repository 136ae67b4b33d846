"""docker-compose.yml is valid, and its shape is the production shape DESIGN.md describes:
workers scale without a host-port clash, each service gets only the secrets it needs, a missing
secret stops `docker compose` naming it, nothing but the API listens on every interface.

The same commands the containers run are exercised elsewhere: `outbox db upgrade`
(tests/test_cli.py), `outbox serve` and the Celery worker and beat (tests/acceptance/).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import skip_locally_fail_in_ci

ROOT = Path(__file__).resolve().parent.parent

# Distinct, real-looking values, so each can be traced to the services that receive it.
FILLED = {
    "POSTGRES_PASSWORD": "pgpw7f3a9c1e",
    "REDIS_PASSWORD": "rdpw2b8d4e6f",
    "POLAR_ACCESS_TOKEN": "polar_oat_tok4f9Q2xkz",
    "POLAR_ENVIRONMENT": "sandbox",
    "POLAR_WEBHOOK_SECRET": "whsec_hook9dK2",
    "POLAR_PRODUCT_ID": "prod_1",
    "POLAR_METER_ID": "meter_1",
    "FLOWER_BASIC_AUTH": "ops:flowerpw5c1",
}
REQUIRED = ["POSTGRES_PASSWORD", "REDIS_PASSWORD", "POLAR_ACCESS_TOKEN", "POLAR_WEBHOOK_SECRET"]
# Who may see which secret: a service missing here never receives it.
SECRET_HOLDERS = {
    "POSTGRES_PASSWORD": {"postgres", "migrate", "api", "console", "worker", "cli"},
    "REDIS_PASSWORD": {"redis", "api", "console", "worker", "beat", "flower", "cli"},
    "POLAR_ACCESS_TOKEN": {"worker", "console", "cli"},
    "POLAR_WEBHOOK_SECRET": {"api", "cli"},
    "FLOWER_BASIC_AUTH": {"flower"},
}
SCALED = {"worker": 3}  # `docker compose up --scale worker=3` (docs/howto/deploy.md)


def compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True)
        if probe.returncode == 0:
            return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    return [standalone] if standalone else None


def compose_config(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`docker compose config` on a copy of the files, with `env` as its `.env`."""
    command = compose_command()
    if command is None:
        skip_locally_fail_in_ci("neither `docker compose` nor `docker-compose` is installed")
    for name in ("docker-compose.yml", "Dockerfile", ".env.example"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "deploy", tmp_path / "deploy", dirs_exist_ok=True)
    (tmp_path / ".env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    return subprocess.run(
        [*command, "config"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin"},  # only `.env`, not this shell's variables
    )


def resolved(tmp_path: Path) -> dict[str, Any]:
    result = compose_config(tmp_path, FILLED)
    assert result.returncode == 0, result.stderr
    services: dict[str, Any] = yaml.safe_load(result.stdout)["services"]
    return services


def host_bindings(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(host interface, host port) of each published port; a port with no fixed host port
    (`"9108"`, `expose:`) gets a random one from Docker and cannot clash."""
    bindings = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            host_ip, published = port.get("host_ip") or "0.0.0.0", port.get("published")
        else:
            parts = str(port).split("/")[0].split(":")
            if len(parts) == 1:
                continue
            host_ip = parts[0] if len(parts) == 3 else "0.0.0.0"
            published = parts[-2]
        if published not in (None, ""):
            bindings.append((host_ip, str(published)))
    return bindings


def clashes(services: dict[str, Any], scale: dict[str, int]) -> list[tuple[str, str]]:
    """Host (interface, port) pairs that two containers would both bind with `scale`."""
    bound: Counter[tuple[str, str]] = Counter()
    for name, service in services.items():
        for binding in host_bindings(service):
            bound[binding] += scale.get(name, 1)
    wildcard = {port for ip, port in bound if ip == "0.0.0.0"}
    return [b for b, n in bound.items() if n > 1 or (b[0] != "0.0.0.0" and b[1] in wildcard)]


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def test_docker_compose_config_is_valid(tmp_path: Path) -> None:
    result = compose_config(tmp_path, FILLED)
    assert result.returncode == 0, result.stderr


def test_scaling_the_workers_binds_no_host_port_twice(tmp_path: Path) -> None:
    for services in (
        yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"],
        resolved(tmp_path),
    ):
        assert clashes(services, SCALED) == []
        for name in SCALED:
            assert host_bindings(services[name]) == [], f"{name} publishes a fixed host port"
    # The check itself sees the old clash: a worker publishing 9108, three times.
    old = {"worker": {"ports": ["9108:9108"]}, "api": {"ports": ["8000:8000"]}}
    assert clashes(old, SCALED) == [("0.0.0.0", "9108")]


def test_only_the_api_listens_on_every_interface(tmp_path: Path) -> None:
    services = resolved(tmp_path)
    public = {
        name for name, s in services.items() if any(ip == "0.0.0.0" for ip, _ in host_bindings(s))
    }
    assert public == {"api"}
    assert host_bindings(services["flower"]) == [("127.0.0.1", "5555")]
    assert host_bindings(services["console"]) == [("127.0.0.1", "8001")]


@pytest.mark.parametrize("missing", REQUIRED)
def test_a_missing_secret_stops_compose_naming_it(tmp_path: Path, missing: str) -> None:
    result = compose_config(tmp_path, {**FILLED, missing: ""})
    assert result.returncode != 0
    assert f"set {missing} in .env" in result.stderr


def test_no_secret_has_a_silent_default() -> None:
    """`${POSTGRES_PASSWORD:-outbox}` would start with a guessable password: every use of a
    secret in the file is `${VAR:?message}` (Flower checks its own at start, see below)."""
    text = (ROOT / "docker-compose.yml").read_text()
    for variable in SECRET_HOLDERS:
        uses = re.findall(r"\$\{" + variable + r"(:?[-?]?)", text)
        assert uses, variable
        allowed = {":-"} if variable == "FLOWER_BASIC_AUTH" else {":?"}
        assert set(uses) == allowed, (variable, uses)


def test_the_env_example_is_refused_until_filled_in(tmp_path: Path) -> None:
    example = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            example[key] = value
    assert {k for k, v in example.items() if v} <= {"POLAR_ENVIRONMENT"}  # no placeholders
    assert set(FILLED) == set(example)
    result = compose_config(tmp_path, example)
    assert result.returncode != 0 and "in .env" in result.stderr


def test_each_service_gets_only_the_secrets_it_needs(tmp_path: Path) -> None:
    services = resolved(tmp_path)
    for variable, holders in SECRET_HOLDERS.items():
        value = FILLED[variable]
        seen = {
            name
            for name, service in services.items()
            if any(value in v for v in environment(service).values())
        }
        assert seen == holders, variable
    for name, service in services.items():
        assert "env_file" not in service, f"{name} reads every secret from .env"


def test_redis_requires_the_password_the_apps_use(tmp_path: Path) -> None:
    services = resolved(tmp_path)
    redis = services["redis"]
    assert "--requirepass" in " ".join(redis["command"])
    assert environment(redis)["REDISCLI_AUTH"] == FILLED["REDIS_PASSWORD"]  # the healthcheck
    for name in ("api", "console", "worker", "beat", "flower", "cli"):
        assert environment(services[name])["REDIS_URL"] == (
            f"redis://:{FILLED['REDIS_PASSWORD']}@redis:6379/0"
        ), name


def test_flower_requires_basic_auth(tmp_path: Path) -> None:
    flower = resolved(tmp_path)["flower"]
    assert environment(flower)["FLOWER_BASIC_AUTH"] == FILLED["FLOWER_BASIC_AUTH"]
    script = flower["command"][-1].replace("$$", "$")
    without = subprocess.run(
        ["sh", "-c", script.replace("exec celery", "exec true")],
        env={"PATH": "/usr/bin:/bin", "FLOWER_BASIC_AUTH": ""},
        capture_output=True,
        text=True,
    )
    assert without.returncode == 2 and "FLOWER_BASIC_AUTH" in without.stderr
    with_auth = subprocess.run(
        ["sh", "-c", script.replace("exec celery", "exec true")],
        env={"PATH": "/usr/bin:/bin", "FLOWER_BASIC_AUTH": "ops:pw"},
    )
    assert with_auth.returncode == 0


def test_compose_has_the_production_shape() -> None:
    spec = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = spec["services"]
    assert {"postgres", "redis", "migrate", "api", "worker", "beat", "flower"} <= set(services)
    assert services["flower"]["profiles"] == ["monitoring"]
    redis_command = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_command and "noeviction" in redis_command
    for name in ("postgres", "redis", "api", "worker", "beat"):
        assert "healthcheck" in services[name], name
    assert "/readyz" in " ".join(services["api"]["healthcheck"]["test"])
    for name in ("api", "worker", "beat"):
        assert services[name]["depends_on"]["migrate"]["condition"] == (
            "service_completed_successfully"
        )
    assert services["migrate"]["command"] == ["outbox", "db", "upgrade"]
    assert services["worker"]["command"][:4] == ["celery", "-A", "worker", "worker"]
    assert services["beat"]["command"][:5] == ["celery", "-A", "worker", "--quiet", "beat"]
    assert services["worker"]["environment"]["OUTBOX_METRICS_PORT"] == "9108"
    # The console is its own process, on the loopback; the public API serves no console.
    assert services["console"]["profiles"] == ["console"]
    assert services["console"]["command"][-1] == "--console-only"
    assert services["api"]["command"][-1] == "--no-console"
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    assert jobs["outbox-worker"]["dns_sd_configs"] == [
        {"names": ["worker"], "type": "A", "port": 9108, "refresh_interval": "30s"}
    ]
