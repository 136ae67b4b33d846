"""Request and response bodies. Strict types: `"3"`, `3.0` or `true` are not credits."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from outbox.validation import (
    MAX_CREDITS,
    MAX_CUSTOMER_ID_LENGTH,
    MAX_GRANT_CREDITS,
    MAX_REASON_LENGTH,
)

MetadataValue = StrictStr | StrictInt | StrictFloat | StrictBool


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UsageIn(Strict):
    customer_id: StrictStr = Field(
        min_length=1, max_length=MAX_CUSTOMER_ID_LENGTH, examples=["user_123"]
    )
    credits: StrictInt = Field(1, ge=1, le=MAX_CREDITS)
    metadata: dict[StrictStr, MetadataValue] | None = Field(
        None,
        description="Up to 47 keys (≤ 40 chars); values: string (1-500 chars), int, float, bool. "
        "`credits_used`, `usage_id` and `usage_external_id` are reserved.",
        examples=[{"plan_id": "fp_42", "rooms": 3}],
    )


class UsageOut(BaseModel):
    event_id: int
    external_id: str
    balance: int


class GrantIn(Strict):
    credits: StrictInt = Field(ge=1, le=MAX_GRANT_CREDITS)
    reason: StrictStr | None = Field(None, max_length=MAX_REASON_LENGTH)


class GrantOut(BaseModel):
    grant_id: int
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
    credits: int
    metadata: dict[str, MetadataValue]
    status: str
    attempts: int
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None


class UsagePage(BaseModel):
    items: list[UsageEventOut]
    next_cursor: str | None


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
