"""Request and response bodies. Strict types: `"3"`, `3.0` or `true` are not credits."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Path, Query
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    WithJsonSchema,
)

from outbox.ops.replay import MAX_REPLAY_IDS
from outbox.pagination import CURSOR_PATTERN, MAX_LEGACY_CURSOR_LENGTH, MAX_PAGE_SIZE
from outbox.validation import (
    CUSTOMER_ID_PATTERN,
    MAX_CREDITS,
    MAX_CUSTOMER_ID_LENGTH,
    MAX_GRANT_CREDITS,
    MAX_ID,
    MAX_METADATA_INT,
    MAX_METADATA_KEY_LENGTH,
    MAX_METADATA_KEYS,
    MAX_METADATA_STRING_LENGTH,
    MAX_REASON_LENGTH,
    NO_CONTROL_PATTERN,
    NO_NUL_PATTERN,
    RESERVED_METADATA_KEYS,
)

# The schema states the limits the API enforces. Most are checked by outbox/validation.py (the
# same checks the library calls run, with their own messages), so here they are documented with
# `json_schema_extra` rather than enforced twice by pydantic.
CUSTOMER_ID_RULE = (
    f"1 to {MAX_CUSTOMER_ID_LENGTH} characters, no control characters, no surrounding spaces. "
    "Any other character is allowed, `/` included: in a path, percent-encode what a URL needs "
    "(`/v1/customers/org%2Fuser/credits` or `/v1/customers/org/user/credits` both address "
    "`org/user`)."
)
CUSTOMER_ID_SCHEMA: dict[str, Any] = {
    "pattern": CUSTOMER_ID_PATTERN,
    "description": CUSTOMER_ID_RULE,
}
NO_NUL_SCHEMA: dict[str, Any] = {"pattern": NO_NUL_PATTERN}

MetadataValue = StrictStr | StrictInt | StrictFloat | StrictBool
RESERVED_KEYS = sorted(RESERVED_METADATA_KEYS | {"credits_used"})
# What check_metadata accepts (USAGE_CREDITS_FIELD renames `credits_used`: see api/openapi.py).
METADATA_SCHEMA: dict[str, Any] = {
    "type": "object",
    "maxProperties": MAX_METADATA_KEYS - len(RESERVED_KEYS),
    "propertyNames": {
        "minLength": 1,
        "maxLength": MAX_METADATA_KEY_LENGTH,
        "pattern": NO_CONTROL_PATTERN,
        "not": {"enum": RESERVED_KEYS},
    },
    "additionalProperties": {
        "anyOf": [
            {
                "type": "string",
                "minLength": 1,
                "maxLength": MAX_METADATA_STRING_LENGTH,
                "pattern": NO_NUL_PATTERN,
            },
            {"type": "number", "minimum": -MAX_METADATA_INT, "maximum": MAX_METADATA_INT},
            {"type": "boolean"},
        ]
    },
    "description": (
        f"Up to {MAX_METADATA_KEYS - len(RESERVED_KEYS)} keys of 1 to {MAX_METADATA_KEY_LENGTH} "
        f"characters without control characters; values: a string of 1 to "
        f"{MAX_METADATA_STRING_LENGTH} characters (no NUL), a number (integer or not) within "
        f"±2^53, or a boolean. {', '.join(f'`{k}`' for k in RESERVED_KEYS)} are reserved "
        "(the service sets them)."
    ),
}
Metadata = Annotated[dict[StrictStr, MetadataValue], WithJsonSchema(METADATA_SCHEMA)]

# Row ids in a path or a body: PostgreSQL bigints.
RowId = Annotated[StrictInt, Field(ge=1, le=MAX_ID)]

# An integer in a path or a query string is its canonical decimal digits, nothing else: pydantic
# alone reads `1_0`, `+10`, `10.0`, `010` and ` 10` as 10, so one hold had many addresses.
DIGITS_PATTERN = r"^[1-9][0-9]*$"
DIGITS_RULE = (
    "Decimal digits only, as the API writes them: no sign, leading zero, `_`, `.`, exponent or "
    "space (`10`, never `+10`, `010`, `1_0` or `10.0`)."
)
_DIGITS = re.compile(r"[1-9][0-9]{0,18}")


def _canonical_digits(value: object) -> object:
    if isinstance(value, str) and not _DIGITS.fullmatch(value):
        raise ValueError("must be decimal digits without a sign, leading zero or separator")
    return value


def _digits(description: str) -> dict[str, Any]:
    return {
        "description": f"{description} {DIGITS_RULE}",
        "json_schema_extra": {"pattern": DIGITS_PATTERN},
    }


PathId = Annotated[
    int, Path(ge=1, le=MAX_ID, **_digits("A row id.")), BeforeValidator(_canonical_digits)
]
Cursor = Annotated[
    str | None,
    Query(
        # The pattern is the current form; maxLength also lets the deprecated one through.
        max_length=MAX_LEGACY_CURSOR_LENGTH,
        description=(
            "`next_cursor` from the previous page (the id of its last row). Deprecated but "
            "still accepted: a cursor of the previous release (`aWQ6...`, base64 of `id:N`), "
            "for clients paginating across the upgrade."
        ),
        json_schema_extra={"pattern": CURSOR_PATTERN},
    ),
]
Limit = Annotated[
    int,
    Query(ge=1, le=MAX_PAGE_SIZE, **_digits("Rows per page.")),
    BeforeValidator(_canonical_digits),
]
CustomerIdPath = Annotated[
    str,
    Path(
        min_length=1,
        max_length=MAX_CUSTOMER_ID_LENGTH,
        json_schema_extra=CUSTOMER_ID_SCHEMA,
    ),
]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UsageIn(Strict):
    customer_id: StrictStr = Field(
        min_length=1,
        max_length=MAX_CUSTOMER_ID_LENGTH,
        examples=["user_123"],
        json_schema_extra=CUSTOMER_ID_SCHEMA,
    )
    credits: StrictInt = Field(1, ge=1, le=MAX_CREDITS)
    metadata: Metadata | None = Field(None, examples=[{"plan_id": "fp_42", "rooms": 3}])


class UsageOut(BaseModel):
    event_id: int
    external_id: str
    balance: int


class GrantIn(Strict):
    credits: StrictInt = Field(ge=1, le=MAX_GRANT_CREDITS)
    reason: StrictStr | None = Field(
        None, max_length=MAX_REASON_LENGTH, json_schema_extra=NO_NUL_SCHEMA
    )


class GrantOut(BaseModel):
    grant_id: int
    balance: int


# Corrections (api/routes/refunds.py, api/routes/customers.py; docs/explanation/corrections.md)


class RefundIn(Strict):
    credits: StrictInt | None = Field(
        None,
        ge=1,
        le=MAX_CREDITS,
        description="Credits to give back; default: everything not yet refunded.",
    )
    reason: StrictStr = Field(
        min_length=1,
        max_length=MAX_REASON_LENGTH,
        examples=["the generation failed"],
        json_schema_extra=NO_NUL_SCHEMA,
    )


class RefundOut(BaseModel):
    refund_id: int = Field(description="The refund's ledger entry.")
    event_id: int = Field(description="The usage refunded.")
    credits: int
    balance: int
    action: Literal["cancelled", "compensated"] = Field(
        description="`cancelled`: the usage was refunded whole before Polar could hold it, "
        "nothing reaches Polar; `compensated`: a compensating event (negative credits) is on "
        "its way to Polar."
    )
    compensation_event_id: int | None
    compensation_external_id: str | None


class DebitIn(Strict):
    credits: StrictInt = Field(ge=1, le=MAX_GRANT_CREDITS)
    reason: StrictStr = Field(
        min_length=1, max_length=MAX_REASON_LENGTH, json_schema_extra=NO_NUL_SCHEMA
    )


class DebitOut(BaseModel):
    debit_id: int
    balance: int


class CreditsOut(BaseModel):
    customer_id: str
    balance: int
    held: int
    granted: int
    used: int


class UsageEventOut(BaseModel):
    event_id: int
    external_id: str
    credits: int = Field(description="Negative for a compensating event (a refund).")
    metadata: dict[str, MetadataValue]
    status: str
    attempts: int
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None
    refund_of: int | None = Field(
        None, description="A compensating event (a refund): the usage it corrects."
    )


class UsagePage(BaseModel):
    items: list[UsageEventOut]
    next_cursor: str | None


def error_body(code: str, detail: str, **extra: Any) -> dict[str, Any]:
    """Every error's JSON body (`ErrorOut`): a machine-readable `code`, a sentence, and
    extras such as the `field` at fault."""
    return {"code": code, "detail": detail, **extra}


class ErrorOut(BaseModel):
    code: str
    detail: str
    field: str | None = None


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorOut, "description": description}
    for status, description in {
        401: "missing or invalid token",
        403: "the token lacks the needed scope",
        422: "invalid_request: a field is invalid (`field` names it)",
    }.items()
}


# Holds (api/routes/holds.py)


class HoldIn(Strict):
    customer_id: StrictStr = Field(
        min_length=1,
        max_length=MAX_CUSTOMER_ID_LENGTH,
        examples=["user_123"],
        json_schema_extra=CUSTOMER_ID_SCHEMA,
    )
    credits: StrictInt = Field(ge=1, le=MAX_CREDITS)


class HoldOut(BaseModel):
    hold_id: int
    balance: int
    expires_at: datetime


class CaptureIn(Strict):
    credits: StrictInt | None = Field(None, ge=1, le=MAX_CREDITS)
    metadata: Metadata | None = None


class ReleaseOut(BaseModel):
    hold_id: int
    balance: int
    status: str


# Admin (api/routes/admin.py)


class StatsOut(BaseModel):
    counts: dict[str, int]
    oldest_pending_seconds: float
    delivered_last_minute: int
    credits_undelivered: int = Field(
        description="Usage credits committed but not yet accepted by Polar (money at risk)."
    )
    compensations_undelivered: int = Field(
        description="Credits refunded whose compensating events Polar has not accepted yet "
        "(Polar still bills them)."
    )
    credits_refunded: int = Field(description="Every credit given back by a refund so far.")


class EventOut(BaseModel):
    event_id: int
    external_id: str
    customer_id: str
    credits: int
    metadata: dict[str, object]
    status: str
    attempts: int
    next_attempt_at: datetime
    lease_owner: str | None
    lease_expires_at: datetime | None
    last_error: str | None
    last_replay_id: int | None
    created_at: datetime
    delivered_at: datetime | None
    refund_of: int | None = Field(
        None, description="A compensating event (a refund): the usage it corrects."
    )


class HistoryStepOut(BaseModel):
    """One step of an outbox row's history: an attempt, a rescue, a replay or a re-queue."""

    at: datetime
    decision: str = Field(
        description="delivered, retry, failed, released, rescued, replayed or requeued"
    )
    attempt: int
    worker: str | None
    claim_token: str | None = Field(description="The claim (worker and batch) that sent it.")
    polar_status: int | None = Field(description="Polar's HTTP status (null: no answer).")
    message: str | None = Field(description="Polar's message, or why the row moved.")
    replay_id: int | None
    replay_actor: str | None
    replay_reason: str | None


class EventDetailOut(BaseModel):
    """An outbox row, what is sent to Polar for it, and its whole history (oldest first)."""

    event_id: int
    external_id: str
    customer_id: str
    credits: int
    status: str
    attempts: int
    next_attempt_at: datetime
    lease_owner: str | None
    last_error: str | None
    last_replay_id: int | None
    created_at: datetime
    delivered_at: datetime | None
    sent: dict[str, object] = Field(
        description="The Polar event: name, external_id, external_customer_id, timestamp, metadata."
    )
    history: list[HistoryStepOut]


class EventPage(BaseModel):
    items: list[EventOut]
    next_cursor: str | None


class ReplayIn(Strict):
    """Either `event_ids`, or `status: "failed"` (optionally with `customer_id`); not both."""

    # The schema states the choice the API makes: ids, or every failed event (of one customer).
    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [
                {
                    "required": ["event_ids"],
                    "properties": {
                        "event_ids": {"type": "array"},
                        "status": {"type": "null"},
                        "customer_id": {"type": "null"},
                    },
                },
                {
                    "required": ["status"],
                    "properties": {"status": {"const": "failed"}, "event_ids": {"type": "null"}},
                },
            ]
        }
    )

    event_ids: list[RowId] | None = Field(
        None, min_length=1, max_length=MAX_REPLAY_IDS, description="These failed events."
    )
    status: Literal["failed"] | None = Field(None, description="Every failed event.")
    customer_id: StrictStr | None = Field(
        None,
        min_length=1,
        max_length=MAX_CUSTOMER_ID_LENGTH,
        description='With `status: "failed"`: only this customer\'s.',
        json_schema_extra=CUSTOMER_ID_SCHEMA,
    )
    dry_run: StrictBool = Field(False, description="Move nothing; answer what would move.")
    reason: StrictStr | None = Field(
        None, max_length=500, description="Kept with the replay.", json_schema_extra=NO_NUL_SCHEMA
    )


class ReplayOut(BaseModel):
    """The same object as `outbox replay --json`."""

    replayed: int = Field(description="Events moved failed → pending (0 in a dry run).")
    would_replay: int | None = Field(description="In a dry run: events that would move.")
    event_ids: list[int] = Field(description="The events moved (or that would move).")
    credits: int = Field(description="Their credits.")
    dry_run: bool
    replay_id: int | None = Field(description="The recorded replay (null in a dry run).")
