"""Polar webhooks: verify the signature over the raw bytes, store the bytes, then apply the
Meter Credits benefit as a per-grant state machine (docs/explanation/webhooks.md).

1. `SignatureCheck` checks the Standard Webhooks headers and timestamp before the body is read,
   then the signature over the body's bytes as they arrive, before anything decodes them:
   nothing unsigned is ever stored.
2. `receive_webhook` stores every verified body once per `webhook-id` (its SHA-256, so ids of
   any length), whatever it contains, and only then parses it, defensively.
3. `benefit_grant.created` / `cycled` of a `meter_credit` benefit credit
   `data.properties.last_credited_units`; `benefit_grant.revoked` takes them back from the
   balance, then from open holds (they shrink), never below zero (the shortfall is
   recorded). With POLAR_METER_ID set, only that meter's grants count.
   Each credit is identified by Polar's grant id (`data.id`) and its cycle: the
   `last_credited_at` Polar writes each time it credits the meter (a revoke names the credit it
   takes back in `data.previous_properties.last_credited_at`). So redeliveries under new
   webhook ids credit once, each cycle credits once, and a revoke that arrives before its
   credit is remembered and cancels it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from outbox.errors import InvalidRequest, InvalidSignature, OutboxError
from outbox.ledger import RevokeResult, grant_credits, revoke_credits
from outbox.models import PolarGrantCycle, WebhookEvent, utcnow
from outbox.settings import Settings
from outbox.states import GrantCycleState
from outbox.validation import MAX_GRANT_CREDITS, check_credits, check_customer_id

log = logging.getLogger("outbox.webhooks")

TOLERANCE_SECONDS = 5 * 60
CREDIT_TYPES = frozenset({"benefit_grant.created", "benefit_grant.cycled"})
REVOKE_TYPES = frozenset({"benefit_grant.revoked"})
MAX_GRANT_ID_LENGTH = 128
MAX_CYCLE_LENGTH = 64
MAX_OUTCOME_LENGTH = 1000

_TIMESTAMP = re.compile(rb"[0-9]{1,15}")
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
_EVENT_TYPE = re.compile(r"[A-Za-z0-9_.\-]{1,100}")
# Polar's grant ids are UUIDs and its cycles ISO 8601 timestamps: anything printable and short
# is accepted, so a future format still works; nothing else reaches a text column.
_PRINTABLE = re.compile(r"[\x21-\x7e]+")


# --- 1. the signature -------------------------------------------------------------------------


def signing_keys(secret: str) -> tuple[bytes, ...]:
    """The HMAC keys a secret may sign with: older Polar secrets sign with the UTF-8 bytes of
    the whole secret; Standard Webhooks `whsec_<base64>` secrets with the decoded part (as the
    SDK's `validate_event` does, both are tried)."""
    keys = [secret.encode()]
    encoded = secret.removeprefix("whsec_")
    try:
        decoded = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        return tuple(keys)
    if decoded and decoded not in keys:
        keys.append(decoded)
    return tuple(keys)


class SignatureCheck:
    """One delivery's Standard Webhooks signature, checked as the body arrives: the headers
    and the timestamp window when it is made (before any of the body is read), then `update`
    with each piece of the body, then `verify`. Works on the raw header and body bytes:
    nothing is decoded before it. (The SDK's `validate_event` decodes the body first and so
    cannot tell a non-UTF-8 body from a signed one; the `standardwebhooks` package does the
    same and knows one key form only.)"""

    def __init__(
        self,
        *,
        webhook_id: bytes | None,
        timestamp: bytes | None,
        signature: bytes | None,
        secret: str,
        now: float,
    ) -> None:
        """Raise `InvalidSignature` unless the three headers are there once each, the id is
        sane (no control characters) and `timestamp` is within five minutes of `now`."""
        if not webhook_id or not timestamp or not signature:
            raise InvalidSignature(
                "missing (or repeated) webhook-id, webhook-timestamp or webhook-signature header"
            )
        if _CONTROL.search(webhook_id):
            raise InvalidSignature("webhook-id has a control character")
        if not _TIMESTAMP.fullmatch(timestamp):
            raise InvalidSignature("webhook-timestamp is not a Unix time in seconds")
        if abs(now - int(timestamp)) > TOLERANCE_SECONDS:
            raise InvalidSignature("webhook-timestamp is more than 5 minutes from now")
        self.webhook_id = webhook_id
        self._signature = signature
        prefix = webhook_id + b"." + timestamp + b"."
        self._macs = [hmac.new(key, prefix, hashlib.sha256) for key in signing_keys(secret)]

    def update(self, chunk: bytes) -> None:
        """Feed the next bytes of the body."""
        for mac in self._macs:
            mac.update(chunk)

    def verify(self) -> None:
        """Raise `InvalidSignature` unless one `v1,<base64>` of the signature header is the
        HMAC-SHA256 of `{id}.{timestamp}.{body}` under one of the secret's keys."""
        expected = [mac.digest() for mac in self._macs]
        for candidate in self._signature.split():
            version, comma, encoded = candidate.partition(b",")
            if version != b"v1" or not comma:
                continue
            try:
                given = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                continue
            if any(hmac.compare_digest(given, digest) for digest in expected):
                return
        raise InvalidSignature("no webhook-signature matches POLAR_WEBHOOK_SECRET")


def verify_signature(
    body: bytes,
    *,
    webhook_id: bytes | None,
    timestamp: bytes | None,
    signature: bytes | None,
    secret: str,
    now: float,
) -> None:
    """`SignatureCheck` over a whole body at once: raise `InvalidSignature` unless it is
    signed with `secret` and its timestamp is within five minutes of `now`."""
    check = SignatureCheck(
        webhook_id=webhook_id, timestamp=timestamp, signature=signature, secret=secret, now=now
    )
    check.update(body)
    check.verify()


# --- 2. storing and parsing ---------------------------------------------------------------------


@dataclass(frozen=True)
class WebhookOutcome:
    """What became of a verified webhook. `stored` is False for a redelivery of a stored one."""

    stored: bool
    outcome: str


def storable(text: str, limit: int = MAX_OUTCOME_LENGTH) -> str:
    """`text` as PostgreSQL can store it and JSON can encode it: lone surrogates and NUL
    escaped (both come from signed payloads; either would make the insert fail)."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")
    return text[:limit]


def parse_payload(body: bytes) -> dict[str, Any] | str:
    """The JSON object in a verified body, or why there is none (it is stored anyway)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return "unparseable: the body is not UTF-8"
    try:
        payload = json.loads(text)
    except RecursionError:
        return "unparseable: the JSON is nested too deeply"
    except ValueError:
        return "unparseable: not JSON"
    if not isinstance(payload, dict):
        return "unparseable: not a JSON object"
    return payload


def _event_type(payload: dict[str, Any] | str) -> str:
    kind = payload.get("type") if isinstance(payload, dict) else None
    if isinstance(kind, str) and _EVENT_TYPE.fullmatch(kind):
        return kind
    return "unparseable" if isinstance(payload, str) else "unknown"


def _insert(session: Session, entity: type[Any]) -> Any:
    """INSERT for the session's dialect (both have ON CONFLICT DO NOTHING ... RETURNING)."""
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    return dialect.insert(entity)


def receive_webhook(
    session: Session, *, webhook_id: bytes, body: bytes, settings: Settings
) -> WebhookOutcome:
    """Store a VERIFIED webhook's body once per `webhook-id` and apply it, in the caller's
    transaction. Whatever the body holds, this stores it and returns an outcome; only a fault
    of our own (the database) raises, so Polar retries it."""
    payload = parse_payload(body)
    kind = _event_type(payload)
    row_id = session.execute(
        _insert(session, WebhookEvent)
        .values(
            webhook_id_sha256=hashlib.sha256(webhook_id).hexdigest(),
            webhook_id=storable(webhook_id.decode("utf-8", "backslashreplace"), limit=10_000),
            type=kind,
            body=body,
            received_at=utcnow(),
        )
        .on_conflict_do_nothing(index_elements=[WebhookEvent.webhook_id_sha256])
        .returning(WebhookEvent.id)
    ).scalar_one_or_none()
    if row_id is None:
        return WebhookOutcome(stored=False, outcome="duplicate: this webhook-id was received")
    outcome = storable(
        payload if isinstance(payload, str) else apply_payload(session, payload, settings)
    )
    event = session.get(WebhookEvent, row_id)
    assert event is not None
    event.processed_at = utcnow()
    event.outcome = outcome
    log.info("webhook stored", extra={"webhook_event_id": row_id, "type": kind, "outcome": outcome})
    return WebhookOutcome(stored=True, outcome=outcome)


# --- 3. the per-grant state machine -------------------------------------------------------------


@dataclass(frozen=True)
class GrantCredit:
    """A Meter Credits webhook reduced to what moves credits: credit or revoke `units` of one
    grant's cycle, for our customer."""

    revoke: bool
    grant_id: str
    cycle: str
    customer_id: str
    units: int
    event_type: str


def _get(data: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _describe(value: Any) -> str:
    """A short, safe description of a payload value for an outcome message."""
    if value is None or isinstance(value, bool | int | float | str):
        return repr(value)[:100]
    return f"a JSON {'array' if isinstance(value, list) else 'object'}"


def _identifier(value: Any, limit: int) -> str | None:
    if isinstance(value, str) and len(value) <= limit and _PRINTABLE.fullmatch(value):
        return value
    return None


def grant_credit(payload: dict[str, Any], settings: Settings) -> GrantCredit | str:
    """The credit move a webhook asks for, or why it asks for none (pure: no I/O)."""
    kind = _event_type(payload)
    if kind not in CREDIT_TYPES | REVOKE_TYPES:
        return f"ignored: {kind} does not move credits"
    data = payload.get("data")
    if _get(data, "benefit", "type") != "meter_credit":
        return "ignored: not a meter_credit benefit"
    meter_id = _get(data, "benefit", "properties", "meter_id")
    if settings.polar_meter_id and meter_id != settings.polar_meter_id:
        return f"ignored: meter {_describe(meter_id)} is not POLAR_METER_ID"
    grant_id = _identifier(_get(data, "id"), MAX_GRANT_ID_LENGTH)
    if grant_id is None:
        return f"not applied: data.id (the grant id) is {_describe(_get(data, 'id'))}"
    try:
        customer_id = check_customer_id(_get(data, "customer", "external_id"))
    except InvalidRequest:
        return "ignored: the Polar customer has no usable external_id (cannot map it to ours)"
    units = _get(data, "properties", "last_credited_units")
    if isinstance(units, bool) or not isinstance(units, int):
        return f"ignored: last_credited_units is {_describe(units)}"
    revoke = kind in REVOKE_TYPES
    if revoke:
        # Polar takes credits back by crediting the meter minus the last credit (negative
        # units). When other grants of the benefit remain it revokes nothing and leaves the
        # properties as they were (positive units): so do we.
        if units >= 0:
            return "ignored: Polar took no credits back (last_credited_units is not negative)"
        units, cycle_path = -units, ("previous_properties", "last_credited_at")
    else:
        if units <= 0:
            return f"ignored: last_credited_units is {units}"
        cycle_path = ("properties", "last_credited_at")
    cycle = _identifier(_get(data, *cycle_path), MAX_CYCLE_LENGTH)
    if cycle is None:
        where = "data." + ".".join(cycle_path)
        return f"not applied: {where} (the credit's cycle) is {_describe(_get(data, *cycle_path))}"
    try:
        units = check_credits(units, maximum=MAX_GRANT_CREDITS, field="last_credited_units")
    except InvalidRequest as exc:
        return f"not applied: {exc.detail}"
    return GrantCredit(revoke, grant_id, cycle, customer_id, units, kind)


def apply_payload(session: Session, payload: dict[str, Any], settings: Settings) -> str:
    """Apply a parsed webhook's credit move (if any); return the outcome to store."""
    move = grant_credit(payload, settings)
    if isinstance(move, str):
        return move
    try:
        with session.begin_nested():
            return revoke_cycle(session, move) if move.revoke else credit_cycle(session, move)
    except OutboxError as exc:
        return f"not applied: {exc.detail}"


def _cycle_for_update(session: Session, move: GrantCredit) -> PolarGrantCycle | None:
    return session.scalars(
        select(PolarGrantCycle)
        .where(PolarGrantCycle.grant_id == move.grant_id, PolarGrantCycle.cycle == move.cycle)
        .with_for_update()
    ).one_or_none()


def _get_or_create_cycle_for_update(
    session: Session, move: GrantCredit, state: GrantCycleState
) -> tuple[PolarGrantCycle, bool]:
    """The grant cycle's row, locked; created in `state` if new (True: created now). Two
    deliveries of one cycle serialize here, whatever their webhook ids."""
    row = _cycle_for_update(session, move)
    if row is not None:
        return row, False
    now = utcnow()
    created = session.execute(
        _insert(session, PolarGrantCycle)
        .values(
            grant_id=move.grant_id,
            cycle=move.cycle,
            customer_id=move.customer_id,
            state=state,
            units=move.units,
            created_at=now,
            updated_at=now,
        )
        .on_conflict_do_nothing(index_elements=[PolarGrantCycle.grant_id, PolarGrantCycle.cycle])
        .returning(PolarGrantCycle.id)
    ).scalar_one_or_none()
    # None: a concurrent delivery created it first; this waits for its commit.
    row = _cycle_for_update(session, move)
    assert row is not None
    return row, created is not None


def _key(move: GrantCredit, action: str) -> str:
    return f"polar-{action}:{move.grant_id}:{move.cycle}"


def _reason(move: GrantCredit) -> str:
    return f"Polar {move.event_type}: grant {move.grant_id}, cycle {move.cycle}"


def credit_cycle(session: Session, move: GrantCredit) -> str:
    """created/cycled: credit the cycle once; a revoke seen first cancels it instead.

    A cycle row is committed with its credit (one savepoint), so a `credited` row found here
    was credited: by this code (ledger key `polar-grant:{grant}:{cycle}`) or, for rows the
    migration 5d0e7c1f9a42 filled in, by the code before it (key `polar-webhook:{id}`), which
    is why the row decides and not the ledger key. The ledger's unique (customer, kind,
    idempotency key) is the database's second guard: a new row for a credited cycle (its row
    deleted by hand) adds nothing either."""
    row, created = _get_or_create_cycle_for_update(session, move, GrantCycleState.CREDITED)
    if row.state == GrantCycleState.REVOKED_EARLY:
        row.state, row.updated_at = GrantCycleState.CANCELLED, utcnow()
        return f"cancelled: grant {move.grant_id} cycle {move.cycle} was revoked before it came"
    if row.state != GrantCycleState.CREDITED:
        return f"duplicate: grant {move.grant_id} cycle {move.cycle} is already {row.state}"
    if not created:
        return f"duplicate: grant {move.grant_id} cycle {move.cycle} was already credited"
    result = grant_credits(
        session, row.customer_id, row.units, _reason(move), idempotency_key=_key(move, "grant")
    )
    if result.replayed:
        return f"duplicate: grant {move.grant_id} cycle {move.cycle} was already credited"
    return f"granted {row.units} credits to {row.customer_id}: balance {result.balance}"


def revoke_cycle(session: Session, move: GrantCredit) -> str:
    """revoked: take the cycle's credits back once; before its credit came, remember it."""
    row, created = _get_or_create_cycle_for_update(session, move, GrantCycleState.REVOKED_EARLY)
    if created:
        return (
            f"remembered: grant {move.grant_id} cycle {move.cycle} revoked before its credit "
            "came; that credit will be cancelled"
        )
    if row.state != GrantCycleState.CREDITED:
        return f"duplicate: grant {move.grant_id} cycle {move.cycle} is already {row.state}"
    row.state, row.updated_at = GrantCycleState.REVOKED, utcnow()
    result = revoke_credits(
        session, row.customer_id, row.units, _reason(move), idempotency_key=_key(move, "revoke")
    )
    return revoke_outcome(result, row.units, row.customer_id)


def revoke_outcome(result: RevokeResult, units: int, customer_id: str) -> str:
    """What a revoke took, exactly: from the balance, from which holds, and what it could not."""
    parts = [f"{result.from_balance} from the balance"]
    if result.from_holds:
        taken = result.from_holds.items()
        parts.append(", ".join(f"{credits} from hold {hold}" for hold, credits in taken))
    outcome = (
        f"revoked {result.taken} of {units} credits of {customer_id} "
        f"({'; '.join(parts)}): balance {result.balance}"
    )
    if result.shortfall:
        outcome += f"; {result.shortfall} were already spent and could not be taken back"
    return outcome


def list_received(
    session: Session, *, before: int | None = None, limit: int = 50
) -> list[WebhookEvent]:
    """Received webhooks, newest first (older ones: `before` an id); bodies are not loaded."""
    from sqlalchemy.orm import defer

    query = select(WebhookEvent).options(defer(WebhookEvent.body)).order_by(WebhookEvent.id.desc())
    if before is not None:
        query = query.where(WebhookEvent.id < before)
    return list(session.scalars(query.limit(limit)))
