"""cli/dev.py, the pieces of `outbox dev` a person meets: the `--database-url` it prints is
absolute and its password hidden, a busy port is named with the flag that moves it, a restart
keeps the demo customer's balance and leaves valid only its newest token (and every token not
its own), and it says which of the deployment's variables it does not use.

`outbox dev` as a running process (the README's path, a busy --port, a deployment `.env`,
`--polar sandbox`): tests/acceptance/test_dev.py.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from sqlalchemy import Engine

from cli.dev import DevOptions, bind_port, dev_database_url, ignored_settings, seed_demo
from outbox.db import dispose_engines, session_scope
from outbox.errors import ConfigError
from outbox.ledger import get_credits, record_usage
from outbox.settings import load_settings
from outbox.tokens import authenticate, create_token


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("sqlite:///./outbox.db", "sqlite:///{cwd}/outbox.db"),
        ("sqlite:///data/dev.db", "sqlite:///{cwd}/data/dev.db"),
        ("sqlite:////var/lib/outbox.db", "sqlite:////var/lib/outbox.db"),
        (
            "postgresql+psycopg://app:pw@127.0.0.1:5432/dev",
            "postgresql+psycopg://app:pw@127.0.0.1:5432/dev",
        ),
    ],
)
def test_the_database_url_is_made_absolute_for_a_second_terminal(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, given: str, expected: str
) -> None:
    monkeypatch.chdir(tmp_path)
    assert dev_database_url(given) == expected.format(cwd=tmp_path.resolve())


def test_what_is_not_a_database_url_is_named() -> None:
    with pytest.raises(ConfigError) as refused:
        dev_database_url("outbox.db")
    assert refused.value.detail == "--database-url: not a database URL: 'outbox.db'"


def test_a_busy_port_is_named_with_the_flag_that_moves_it() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError) as refused:
            bind_port("127.0.0.1", port, "--emulator-port")
    assert refused.value.detail == (
        f"port {port} on 127.0.0.1 is already in use: stop what is using it, "
        "or choose another port with --emulator-port N"
    )
    with bind_port("127.0.0.1", port, "--emulator-port") as ours:  # free again: no complaint
        # The server is handed this bound socket: nobody can take the port in between.
        assert ours.getsockname()[1] == port
        with socket.socket() as late, pytest.raises(OSError):
            late.bind(("127.0.0.1", port))


def test_a_restart_keeps_the_balance_and_only_its_newest_token(sqlite_engine: Engine) -> None:
    settings = load_settings(database_url=str(sqlite_engine.url))
    options = DevOptions(demo_customer="demo_customer", demo_credits=100)
    first = seed_demo(settings, options)
    with session_scope(sqlite_engine) as session:
        record_usage(session, "demo_customer", 3)
        operators, _ = create_token(session, "admin", name="my own admin token")
    second = seed_demo(settings, options)
    dispose_engines()
    with session_scope(sqlite_engine) as session:
        assert get_credits(session, "demo_customer").balance == 97  # not granted again
        assert authenticate(session, first) is None
        assert authenticate(session, second) is not None
        assert authenticate(session, operators) is not None  # not dev's to revoke


@pytest.mark.parametrize(
    ("environment", "polar", "ignored"),
    [
        ({}, "emulator", []),
        (
            {
                "database_url": "postgresql+psycopg://outbox:pw@postgres/outbox",
                "polar_access_token": "polar_oat_real",
                "polar_base_url": "https://polar.internal",
                "polar_product_id": "prod_real",
            },
            "emulator",
            ["DATABASE_URL", "POLAR_ACCESS_TOKEN", "POLAR_BASE_URL", "POLAR_PRODUCT_ID"],
        ),
        (  # --polar sandbox uses the shell's token (and Polar settings)
            {"polar_access_token": "polar_oat_sandbox", "polar_product_id": "prod_sandbox"},
            "sandbox",
            [],
        ),
    ],
)
def test_dev_says_which_of_the_deployments_variables_it_does_not_use(
    environment: dict[str, str], polar: str, ignored: list[str]
) -> None:
    settings = load_settings(**{"database_url": "sqlite:///./outbox.db", **environment})
    assert ignored_settings(settings, DevOptions(polar=polar)) == ignored  # type: ignore[arg-type]


def test_banner_hides_the_password_of_a_database_url() -> None:
    from cli.dev import DevOptions, banner
    from outbox.settings import load_settings

    settings = load_settings(
        database_url="postgresql+psycopg://app:hunter2pw@db/homeify",
        polar_base_url="http://127.0.0.1:8765",
        polar_access_token="polar_emulator_token",
    )
    text = banner(settings, DevOptions(), "pou_x", emulated=True)
    assert "hunter2pw" not in text
    assert "export DATABASE_URL='postgresql+psycopg://app:***@db/homeify'" in text
