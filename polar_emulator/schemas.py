"""Polar's ingestion schema, rebuilt with the same pydantic types, so the emulator refuses what
Polar refuses and says it the way Polar says it.

Taken from Polar's server (polarsource/polar `server/polar/event/schemas.py`,
`server/polar/kit/metadata.py`, `server/polar/kit/schemas.py`, snapshot of 2026-08-22) and pinned
against its live answers by tests/contract/ (fixtures recorded from that server). What follows
from building it the same way, and what the project depends on (docs/explanation/polar.md):

- `EventCreate` is a union of two models without a discriminator: every schema error of an
  event is listed once per variant (`["body", "events", i, "EventCreateCustomer", ...]` and
  `[..., "EventCreateExternalCustomer", ...]`), and an event of one variant gets a spurious
  "Field required" for the other's customer field.
- A future timestamp is a schema error (an after-validator), not a service one.
- A metadata value is `str (1-500) | int | float | bool`: a bad one gives four errors per
  variant, their `loc` ending in the member's tag (`constrained-str`, `int`, `float`, `bool`).

The one change: the timestamp is checked against the emulator's clock (`clock_offset_seconds`),
passed in the validation context, where Polar uses its machine's.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, NotRequired

from pydantic import (
    UUID4,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from typing_extensions import TypedDict

_MetadataValueString = Annotated[str, StringConstraints(min_length=1, max_length=500)]
MetadataValue = _MetadataValueString | int | float | bool


class CostMetadata(TypedDict):
    amount: Annotated[Decimal, Field(max_digits=17, decimal_places=12)]
    currency: Annotated[str, Field(pattern="usd")]


class LLMMetadata(TypedDict):
    vendor: str
    model: str
    prompt: Annotated[str | None, Field(default=None)]
    response: Annotated[str | None, Field(default=None)]
    input_tokens: int
    cached_input_tokens: NotRequired[int]
    output_tokens: int
    total_tokens: int


class EventMetadataInput(TypedDict, total=False, extra_items=MetadataValue):  # type: ignore[call-arg]
    _cost: CostMetadata
    _llm: LLMMetadata


class _Schema(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    @field_validator("*", mode="after")
    @classmethod
    def _reject_nul_characters(cls, value: Any, info: ValidationInfo) -> Any:
        if not (info.context or {}).get("check_nul", True):
            return value  # the body has no NUL at all (see `validate_ingest`): skip the walk
        pending = [value]
        visited: set[int] = set()
        while pending:
            current = pending.pop()
            if isinstance(current, str):
                if "\x00" in current:
                    raise ValueError("This value contains invalid characters")
            elif isinstance(current, BaseModel):
                continue
            elif isinstance(current, Mapping):
                if id(current) in visited:
                    continue
                visited.add(id(current))
                pending.extend(current.keys())
                pending.extend(current.values())
            elif isinstance(current, Collection) and not isinstance(current, bytes | bytearray):
                if id(current) in visited:
                    continue
                visited.add(id(current))
                pending.extend(current)
        return value


def _now(info: ValidationInfo) -> datetime:
    context = info.context or {}
    now = context.get("now")
    return now if isinstance(now, datetime) else datetime.now(UTC)


class EventCreateBase(_Schema):
    timestamp: AwareDatetime = Field(default_factory=lambda: datetime.now(UTC))
    name: str = Field(..., max_length=128)
    organization_id: UUID4 | None = None
    external_id: str | None = None
    parent_id: str | None = None
    metadata: EventMetadataInput = Field(default_factory=lambda: EventMetadataInput())

    @field_validator("timestamp", mode="after")
    @classmethod
    def _is_past_timestamp(cls, timestamp: datetime, info: ValidationInfo) -> datetime:
        timestamp = timestamp.astimezone(UTC)
        if timestamp > _now(info):
            raise ValueError("Timestamp must be in the past.")
        return timestamp


class EventCreateCustomer(EventCreateBase):
    customer_id: UUID4
    member_id: UUID4 | None = None


class EventCreateExternalCustomer(EventCreateBase):
    external_customer_id: str
    external_member_id: str | None = None


EventCreate = EventCreateCustomer | EventCreateExternalCustomer


class EventsIngest(_Schema):
    events: list[EventCreate]


_INGEST = TypeAdapter(EventsIngest)


def _jsonable(value: Any) -> Any:
    """What FastAPI's `jsonable_encoder` makes of an error's `input`/`ctx` (an exception in
    `ctx` becomes `{}`, as Polar answers)."""
    if isinstance(value, BaseException):
        return {}
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def request_errors(exc: ValidationError) -> list[dict[str, Any]]:
    """A pydantic error of the body, as FastAPI lists it in a 422 (`loc` under "body")."""
    out = []
    for error in exc.errors(include_url=False):
        item: dict[str, Any] = {
            "type": error["type"],
            "loc": ["body", *error["loc"]],
            "msg": error["msg"],
            "input": _jsonable(error.get("input")),
        }
        if "ctx" in error:
            item["ctx"] = _jsonable(error["ctx"])
        out.append(item)
    return out


def json_error(exc: json.JSONDecodeError) -> list[dict[str, Any]]:
    """FastAPI's answer to a body that is not JSON."""
    return [
        {
            "type": "json_invalid",
            "loc": ["body", exc.pos],
            "msg": "JSON decode error",
            "input": {},
            "ctx": {"error": exc.msg},
        }
    ]


def validate_ingest(payload: Any, now: datetime, body: bytes | None = None) -> EventsIngest:
    """The schema stage: the parsed body, or `ValidationError` (see `request_errors`).

    Given the raw JSON `body`, Polar's walk for NUL characters (three quarters of the time
    spent here) runs only if the body can contain one: JSON can only carry it as `\u0000`."""
    check_nul = body is None or b"\\u0000" in body
    ingest = _INGEST.validate_python(payload, context={"now": now, "check_nul": check_nul})
    for event in ingest.events:
        if "timestamp" not in event.model_fields_set:
            event.timestamp = now  # Polar fills in its own now
    return ingest
