"""outbox/logs.py: what an operator reads. `LOG_FORMAT=json` gives one JSON object per line with
the time, level, logger, message, every `extra` field and the traceback; the text format
carries the extras as `key=value`; secrets are masked by `redact`."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from outbox.logs import JsonFormatter, configure_logging, redact

NOISY = ("httpx", "httpcore", "sqlalchemy.engine", "alembic")


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """The root logger, given back as it was (configure_logging replaces its handlers)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    noisy = {name: logging.getLogger(name).level for name in NOISY}
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, noisy_level in noisy.items():
        logging.getLogger(name).setLevel(noisy_level)


def stderr_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().err.splitlines()


def test_json_logs_carry_ids_and_never_the_token() -> None:
    record = logging.LogRecord(
        "outbox.delivery", logging.INFO, __file__, 1, "batch settled", None, None
    )
    record.batch_id = "host:1:abc"
    record.event_ids = [1, 2]
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "batch settled" and line["batch_id"] == "host:1:abc"
    assert line["event_ids"] == [1, 2] and line["level"] == "info"
    from outbox.logs import redact

    assert redact("401 for token polar_oat_secret", "polar_oat_secret") == "401 for token ***"


def test_a_json_line_has_time_level_logger_message_and_every_extra(
    root_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("json", "INFO")
    before = datetime.now(UTC)
    logging.getLogger("outbox.runtime").warning(
        "drain finished after %d batches",
        3,
        extra={"delivered": 7, "helper_asked": False, "since": before, "_private": "x"},
    )
    [line] = stderr_lines(capsys)
    record = json.loads(line)
    assert record == {
        "ts": record["ts"],
        "level": "warning",
        "logger": "outbox.runtime",
        "msg": "drain finished after 3 batches",
        "delivered": 7,
        "helper_asked": False,
        "since": str(before),  # not JSON by itself: written as text, never dropped
    }
    stamped = datetime.fromisoformat(record["ts"])
    assert stamped.utcoffset() == timedelta(0)  # UTC, said so
    assert stamped >= before.replace(microsecond=0)


def test_a_json_line_carries_the_traceback_of_a_logged_exception(
    root_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("json")
    try:
        raise RuntimeError("Polar answered nonsense")
    except RuntimeError:
        logging.getLogger("outbox.runtime").exception("drain failed")
    [line] = stderr_lines(capsys)  # the traceback stays inside the one line
    record = json.loads(line)
    assert record["level"] == "error" and record["msg"] == "drain failed"
    assert record["exc"].startswith("Traceback (most recent call last):")
    assert "RuntimeError: Polar answered nonsense" in record["exc"]


def test_text_lines_carry_the_extras_as_key_value(
    root_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("text", "INFO")
    logging.getLogger("outbox.runtime").info("pruned delivered rows", extra={"deleted": 12})
    [line] = stderr_lines(capsys)
    assert line.endswith(" INFO outbox.runtime: pruned delivered rows deleted=12")


def test_the_level_is_obeyed_and_library_chatter_is_quieted(
    root_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("json", "WARNING")
    configure_logging("json", "WARNING")  # a second call does not print everything twice
    logging.getLogger("outbox.runtime").info("not shown")
    logging.getLogger("outbox.runtime").warning("shown")
    configure_logging("json", "DEBUG")
    logging.getLogger("httpx").info("HTTP Request: POST https://api.polar.sh/v1/events/ingest")
    logging.getLogger("sqlalchemy.engine").info("SELECT 1")
    assert [json.loads(line)["msg"] for line in stderr_lines(capsys)] == ["shown"]


@pytest.mark.parametrize(
    ("secrets", "expected"),
    [
        (("polar_oat_s3cret",), "401 for *** at *** and whsec_ab"),
        (("polar_oat_s3cret", "whsec_ab"), "401 for *** at *** and ***"),
        ((None, ""), "401 for polar_oat_s3cret at polar_oat_s3cret and whsec_ab"),
    ],
)
def test_redact_masks_each_secret_and_leaves_text_alone_without_one(
    secrets: tuple[str | None, ...], expected: str
) -> None:
    text = "401 for polar_oat_s3cret at polar_oat_s3cret and whsec_ab"
    assert redact(text, *secrets) == expected
