"""outbox/webhooks.py: the signature (a pure function of bytes, secret and now), defensive
parsing, and the per-grant state machine on PostgreSQL and SQLite, in every order."""

from __future__ import annotations

import base64
import itertools
from typing import Any

import pytest
from sqlalchemy import Engine, select

from outbox.db import session_scope
from outbox.errors import InvalidSignature
from outbox.ledger import get_credits, ledger_balance
from outbox.models import Customer, PolarGrantCycle
from outbox.settings import load_settings
from outbox.webhooks import (
    grant_credit,
    parse_payload,
    receive_webhook,
    signing_keys,
    verify_signature,
)
from tests.polar_webhooks import (
    CYCLE_1,
    CYCLE_2,
    SECRET,
    credited,
    decoded_key,
    encode,
    revoked,
    signature,
    whole_secret_key,
)

NOW = 1_800_000_000
BODY = b'{"type": "order.paid"}'


def headers(key: bytes, *, webhook_id: bytes = b"wh_1", ts: int = NOW) -> dict[str, Any]:
    timestamp = str(ts).encode()
    return {
        "webhook_id": webhook_id,
        "timestamp": timestamp,
        "signature": signature(key, webhook_id, timestamp, BODY),
    }


@pytest.mark.parametrize(
    "secret, key",
    [
        (SECRET, decoded_key()),  # Standard Webhooks: base64 after whsec_
        (SECRET, whole_secret_key()),  # what Polar's server signs with today
        ("polar-legacy-secret", b"polar-legacy-secret"),  # an older secret, no prefix
    ],
)
def test_both_key_forms_verify(secret: str, key: bytes) -> None:
    assert key in signing_keys(secret)
    verify_signature(BODY, **headers(key), secret=secret, now=NOW)


@pytest.mark.parametrize("skew", [-300, 0, 300])
def test_five_minutes_either_way_are_tolerated(skew: int) -> None:
    verify_signature(BODY, **headers(decoded_key(), ts=NOW + skew), secret=SECRET, now=NOW)


REFUSED: dict[str, tuple[bytes, dict[str, Any]]] = {
    "301 s old": (BODY, headers(decoded_key(), ts=NOW - 301)),
    "301 s ahead": (BODY, headers(decoded_key(), ts=NOW + 301)),
    "another body": (BODY + b" ", headers(decoded_key())),
    "non-UTF-8 body": (b"\xff" + BODY, headers(decoded_key())),
    "another key": (BODY, headers(b"not-the-key")),
    "the base64 text as key": (BODY, headers(SECRET.removeprefix("whsec_").encode())),
    "no id": (BODY, headers(decoded_key()) | {"webhook_id": None}),
    "no timestamp": (BODY, headers(decoded_key()) | {"timestamp": None}),
    "no signature": (BODY, headers(decoded_key()) | {"signature": None}),
    "empty signature": (BODY, headers(decoded_key()) | {"signature": b""}),
    "timestamp with sign": (BODY, headers(decoded_key()) | {"timestamp": b"+1800000000"}),
    "timestamp in ms": (BODY, headers(decoded_key()) | {"timestamp": b"1800000000000"}),
    "huge timestamp": (BODY, headers(decoded_key()) | {"timestamp": b"9" * 400}),
}


@pytest.mark.parametrize("body, parts", REFUSED.values(), ids=REFUSED.keys())
def test_what_is_not_signed_is_refused(body: bytes, parts: dict[str, Any]) -> None:
    with pytest.raises(InvalidSignature):
        verify_signature(body, **parts, secret=SECRET, now=NOW)


def test_the_signature_covers_a_non_utf8_body() -> None:
    """Verified over bytes: a signed non-UTF-8 body passes (and is then stored, unparsed)."""
    body = b"\xff\xfe"
    ts = str(NOW).encode()
    sig = signature(decoded_key(), b"wh_1", ts, body)
    verify_signature(body, webhook_id=b"wh_1", timestamp=ts, signature=sig, secret=SECRET, now=NOW)


def test_an_undecodable_whsec_secret_uses_its_whole_bytes_only() -> None:
    assert signing_keys("whsec_not*base64") == (b"whsec_not*base64",)
    assert base64.b64decode(SECRET[6:]) in signing_keys(SECRET)


@pytest.mark.parametrize(
    "body, reason",
    [
        (b"\xff", "not UTF-8"),
        (b"[" * 100_000, "nested too deeply"),
        (b"{", "not JSON"),
        (b"1" * 5000, "not JSON"),  # past Python's int digits limit: ValueError
        (b"[]", "not a JSON object"),
    ],
)
def test_parse_payload_says_why_a_body_is_unusable(body: bytes, reason: str) -> None:
    result = parse_payload(body)
    assert isinstance(result, str) and reason in result


def test_grant_credit_reads_cycle_identity_from_polar_properties() -> None:
    settings = load_settings(polar_meter_id="meter_1")
    credit = grant_credit(credited(cycle=CYCLE_2, units=7), settings)
    assert not isinstance(credit, str)
    assert (credit.revoke, credit.grant_id, credit.cycle, credit.units) == (
        False,
        "grant_1",
        CYCLE_2,
        7,
    )
    revoke = grant_credit(revoked(of_cycle=CYCLE_2, units=7), settings)
    assert not isinstance(revoke, str)
    assert (revoke.revoke, revoke.cycle, revoke.units) == (True, CYCLE_2, 7)


# --- the state machine in every order, on both databases ----------------------------------------

# One grant's life: created, cycled, the last cycle revoked; plus a redelivery of each.
LIFE = [
    credited("benefit_grant.created", cycle=CYCLE_1, units=20),
    credited("benefit_grant.cycled", cycle=CYCLE_2, units=20),
    revoked(of_cycle=CYCLE_2, units=20),
]


def deliver(engine: Engine, payload: dict[str, Any], webhook_id: str) -> str:
    settings = load_settings(polar_meter_id="meter_1")
    with session_scope(engine) as session:
        outcome = receive_webhook(
            session, webhook_id=webhook_id.encode(), body=encode(payload), settings=settings
        )
    return outcome.outcome


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))), ids=str)
def test_any_order_and_any_redelivery_ends_at_the_same_balance(
    any_engine: Engine, order: tuple[int, ...]
) -> None:
    for round_ in ("first", "again"):  # "again": Polar redelivers under new webhook ids
        for index in order:
            deliver(any_engine, LIFE[index], f"wh_{round_}_{index}")
    with session_scope(any_engine) as session:
        assert get_credits(session, "user_1").balance == 20
        assert ledger_balance(session, "user_1") == 20
        states = dict(session.execute(select(PolarGrantCycle.cycle, PolarGrantCycle.state)).all())
    # The revoked cycle: taken back if it came after its credit, never credited if before.
    assert states[CYCLE_1] == "credited"
    assert states[CYCLE_2] == ("cancelled" if order.index(2) < order.index(1) else "revoked")


def test_a_revoke_alone_leaves_no_customer_and_no_credits(any_engine: Engine) -> None:
    assert "remembered" in deliver(any_engine, revoked(), "wh_1")
    with session_scope(any_engine) as session:
        assert session.get(Customer, "user_1") is None
