"""Settings refuse example placeholders for secrets at start, naming the variable (and never
printing the value); production also refuses well-known default passwords."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from outbox.errors import ConfigError
from outbox.settings import load_settings, unknown_variables

ROOT = Path(__file__).resolve().parents[2]

REFUSED = [
    ({"polar_access_token": "polar_oat_xxx"}, "POLAR_ACCESS_TOKEN"),
    ({"polar_webhook_secret": "whsec_xxx"}, "POLAR_WEBHOOK_SECRET"),
    ({"polar_access_token": "change-me"}, "POLAR_ACCESS_TOKEN"),
    ({"polar_access_token": "<your token>"}, "POLAR_ACCESS_TOKEN"),
    ({"polar_access_token": "polar_oat_XXXXXXXXXXXXXXXX"}, "POLAR_ACCESS_TOKEN"),
    ({"polar_access_token": "your-polar-token-here"}, "POLAR_ACCESS_TOKEN"),
    ({"polar_webhook_secret": "whsec_xxxxxxxx"}, "POLAR_WEBHOOK_SECRET"),
    ({"polar_webhook_secret": "<whsec_...>"}, "POLAR_WEBHOOK_SECRET"),
    ({"redis_url": "redis://:xxxxxx@redis:6379/0"}, "REDIS_URL"),
    ({"database_url": "postgresql+psycopg://outbox:change-me@db/outbox"}, "DATABASE_URL"),
    ({"redis_url": "redis://:CHANGEME@redis:6379/0"}, "REDIS_URL"),
    (
        {
            "database_url": "postgresql+psycopg://outbox:outbox@db/outbox",
            "polar_environment": "production",
        },
        "DATABASE_URL",
    ),
    (
        {"redis_url": "redis://:redis@redis:6379/0", "polar_environment": "production"},
        "REDIS_URL",
    ),
]

ACCEPTED = [
    {"polar_access_token": "polar_oat_4f9Q2xkz", "polar_webhook_secret": "whsec_9dK2"},
    # Real random tokens may end in "xxx" or start with "<": only whole placeholders are refused.
    {"polar_access_token": "polar_oat_7Hq2mZ0pLxxx", "polar_webhook_secret": "whsec_dGsxxx"},
    {"polar_access_token": "<Tq9v1xk2", "polar_webhook_secret": "whsec_yourxhere"},
    {
        "database_url": "postgresql+psycopg://outbox:Zk81qxxx@db/outbox",
        "polar_environment": "production",
    },
    {"database_url": "postgresql+psycopg://outbox:outbox@db/outbox"},  # sandbox: a local default
    {
        "database_url": "postgresql+psycopg://outbox:7f3a9c1e@db/outbox",
        "polar_environment": "production",
    },
    {"database_url": "sqlite:///./outbox.db", "polar_environment": "production"},
    {"redis_url": "redis://localhost:6379/0", "polar_environment": "production"},
]


@pytest.mark.parametrize(("values", "variable"), REFUSED)
def test_placeholder_secrets_are_refused_naming_the_variable(
    values: dict[str, str], variable: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(**values)
    message = str(refused.value)
    assert variable in message
    secret = next(iter(values.values()))
    assert secret not in message  # neither a URL with its password nor the token


@pytest.mark.parametrize("values", ACCEPTED)
def test_real_looking_secrets_are_accepted(values: dict[str, str]) -> None:
    settings = load_settings(**values)
    for name, value in values.items():
        assert getattr(settings, name) == value


@pytest.mark.slow
def test_a_placeholder_in_dotenv_stops_the_worker_command_with_one_line(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("POLAR_ACCESS_TOKEN=polar_oat_xxx\n")
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "status"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 2
    assert "POLAR_ACCESS_TOKEN" in result.stderr and "placeholder" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "outbox.db").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "command",
    [
        ["-m", "cli.main", "serve", "--port", "1"],
        ["-m", "celery", "-A", "worker", "worker", "--pool=solo"],
        ["-m", "celery", "-A", "worker", "beat"],
    ],
    ids=["serve", "worker", "beat"],
)
def test_production_processes_refuse_a_placeholder_at_start(
    tmp_path: Path, command: list[str]
) -> None:
    """What compose runs stops at once (never "ready" first), naming the variable."""
    result = subprocess.run(
        [sys.executable, *command],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(ROOT),
            "POLAR_ENVIRONMENT": "production",
            "POLAR_ACCESS_TOKEN": "polar_oat_AbCd1234",
            "DATABASE_URL": "postgresql+psycopg://outbox:outbox@127.0.0.1:1/outbox",
            "REDIS_URL": "redis://127.0.0.1:1/0",
        },
    )
    assert result.returncode != 0
    assert "DATABASE_URL's password is a well-known default" in result.stderr
    assert "outbox:outbox@" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("name", "meant"),
    [
        ("DATABSE_URL", "DATABASE_URL"),  # a letter left out
        ("DATABASE_URLL", "DATABASE_URL"),  # one added
        ("REDIS_ULR", "REDIS_URL"),  # two swapped
        ("POLAR_ACESS_TOKEN", "POLAR_ACCESS_TOKEN"),
        ("log_levle", "LOG_LEVEL"),
        ("OUTBOX_BACH_SIZE", "OUTBOX_BATCH_SIZE"),
    ],
)
def test_a_typo_of_a_variable_we_read_is_named_with_the_one_meant(name: str, meant: str) -> None:
    assert unknown_variables([name, "PATH"]) == [f"{name.upper()} (did you mean {meant}?)"]


def test_an_unknown_outbox_variable_is_a_typo_whatever_it_looks_like() -> None:
    assert [p.split()[0] for p in unknown_variables(["OUTBOX_FROBNICATE"])] == ["OUTBOX_FROBNICATE"]


@pytest.mark.parametrize(
    "name",
    [
        "POLAR_ORGANIZATION_ID",  # an application's own Polar setting
        "POLAR_CLIENT_SECRET",
        "DATABASE_URI",  # another program's name, one letter replaced
        "REDIS_HOST",
        "LOGLEVEL",  # only an underscore apart
        "USAGE_LIMIT",
        "HOLD_MUSIC",
        "PATH",
    ],
)
def test_variables_we_do_not_read_are_left_alone(name: str) -> None:
    assert unknown_variables([name]) == []


def test_a_typo_stops_loading_with_the_name_and_what_was_meant(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABSE_URL", "postgresql+psycopg://app@db/app")
    with pytest.raises(ConfigError, match=r"DATABSE_URL \(did you mean DATABASE_URL\?\)"):
        load_settings()


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"log_level": "debug"}, ("DEBUG", "text", "sandbox")),
        ({"log_level": "Warning", "log_format": "JSON"}, ("WARNING", "json", "sandbox")),
        ({"polar_environment": "Production "}, ("INFO", "text", "production")),
    ],
)
def test_names_of_levels_formats_and_environments_are_read_in_any_case(
    values: dict[str, str], expected: tuple[str, str, str]
) -> None:
    settings = load_settings(**values)
    assert (settings.log_level, settings.log_format, settings.polar_environment) == expected
