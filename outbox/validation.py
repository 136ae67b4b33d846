"""Validation at the edge: what Polar would refuse never reaches the outbox
(docs/explanation/polar.md).

Shared by the HTTP API and the library calls, so both refuse the same inputs the same way.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from outbox.errors import InvalidRequest

MAX_CUSTOMER_ID_LENGTH = 128
MAX_CREDITS = 1_000_000
MAX_GRANT_CREDITS = 1_000_000_000
MAX_METADATA_KEYS = 50
MAX_METADATA_KEY_LENGTH = 40
MAX_METADATA_STRING_LENGTH = 500
MAX_REASON_LENGTH = 500
MAX_IDEMPOTENCY_KEY_LENGTH = 255
# Integers beyond 2**53 lose precision in JSON parsers (and in Polar's meter sums).
MAX_METADATA_INT = 2**53
RESERVED_METADATA_KEYS = frozenset({"usage_id", "usage_external_id"})
# Row ids are PostgreSQL bigints: an id (or a cursor) past this is refused, never sent to SQL.
MAX_ID = 2**63 - 1

# The same rules as JSON Schema patterns for the OpenAPI schema (ECMA-262, Python and Rust
# regex all read them alike; tests/outbox/test_validation.py proves they agree with the checks).
# Control characters are Unicode's Cc: U+0000-U+001F and U+007F-U+009F.
_CONTROL = r"\u0000-\u001f\u007f-\u009f"
# What str.strip() removes that is not a control character.
_SPACE = r" \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
CUSTOMER_ID_PATTERN = rf"^[^{_CONTROL}{_SPACE}]([^{_CONTROL}]*[^{_CONTROL}{_SPACE}])?$"
NO_CONTROL_PATTERN = rf"^[^{_CONTROL}]*$"
NO_NUL_PATTERN = r"^[^\u0000]*$"

MetadataValue = str | int | float | bool
Metadata = dict[str, MetadataValue]


def _has_control_chars(value: str) -> bool:
    return any(unicodedata.category(ch) in ("Cc", "Cs") for ch in value)


def _is_clean_text(value: str) -> bool:
    """No control characters, no lone surrogates (PostgreSQL cannot store either in JSONB)."""
    return not _has_control_chars(value)


def check_customer_id(customer_id: object, field: str = "customer_id") -> str:
    """A customer id: a non-empty string of at most 128 characters, no control characters."""
    if not isinstance(customer_id, str):
        raise InvalidRequest(f"{field} must be a string", field=field)
    if not customer_id or customer_id != customer_id.strip():
        raise InvalidRequest(f"{field} must be non-empty, without surrounding spaces", field=field)
    if len(customer_id) > MAX_CUSTOMER_ID_LENGTH:
        raise InvalidRequest(
            f"{field} must be at most {MAX_CUSTOMER_ID_LENGTH} characters", field=field
        )
    if not _is_clean_text(customer_id):
        raise InvalidRequest(f"{field} must not contain control characters", field=field)
    return customer_id


def check_credits(credits: object, *, maximum: int = MAX_CREDITS, field: str = "credits") -> int:
    """Credits: an integer (not a bool, not a float) between 1 and `maximum`."""
    if isinstance(credits, bool) or not isinstance(credits, int):
        raise InvalidRequest(f"{field} must be an integer", field=field)
    if not 1 <= credits <= maximum:
        raise InvalidRequest(f"{field} must be between 1 and {maximum}", field=field)
    return credits


def check_text(value: object, *, field: str, max_length: int, required: bool = False) -> str | None:
    """Free text (a reason, a name): bounded, no control characters."""
    if value is None:
        if required:
            raise InvalidRequest(f"{field} is required", field=field)
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"{field} must be a string", field=field)
    if required and not value.strip():
        raise InvalidRequest(f"{field} must not be empty", field=field)
    if len(value) > max_length:
        raise InvalidRequest(f"{field} must be at most {max_length} characters", field=field)
    if any(unicodedata.category(ch) == "Cs" for ch in value) or "\x00" in value:
        raise InvalidRequest(f"{field} contains characters that cannot be stored", field=field)
    return value


def check_idempotency_key(key: object, field: str = "Idempotency-Key") -> str | None:
    """An idempotency key: printable, 1 to 255 characters."""
    if key is None:
        return None
    if not isinstance(key, str) or not key or len(key) > MAX_IDEMPOTENCY_KEY_LENGTH:
        raise InvalidRequest(
            f"{field} must be 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} characters", field=field
        )
    if not _is_clean_text(key):
        raise InvalidRequest(f"{field} must not contain control characters", field=field)
    return key


def _check_metadata_value(key: str, value: object) -> MetadataValue:
    field = f"metadata.{key}"
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        if abs(value) > MAX_METADATA_INT:
            raise InvalidRequest(f"{field} must be within ±2^53", field=field)
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidRequest(f"{field} must be a finite number", field=field)
        if abs(value) > MAX_METADATA_INT:
            # As for integers: JSON Schema cannot tell 2^53+1 from 2^53+1.0, the bound is one.
            raise InvalidRequest(f"{field} must be within ±2^53", field=field)
        return value
    if isinstance(value, str):
        if not 1 <= len(value) <= MAX_METADATA_STRING_LENGTH:
            raise InvalidRequest(
                f"{field} must be 1 to {MAX_METADATA_STRING_LENGTH} characters", field=field
            )
        if any(unicodedata.category(ch) == "Cs" for ch in value) or "\x00" in value:
            raise InvalidRequest(f"{field} contains characters that cannot be stored", field=field)
        return value
    raise InvalidRequest(
        f"{field} must be a string, an integer, a number or a boolean (no nesting)", field=field
    )


def check_metadata(metadata: object, *, credits_field: str = "credits_used") -> Metadata:
    """Metadata as Polar accepts it, without our reserved keys (`credits_used`, `usage_id`,
    `usage_external_id`)."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise InvalidRequest("metadata must be an object", field="metadata")
    if len(metadata) > MAX_METADATA_KEYS:
        raise InvalidRequest(
            f"metadata must have at most {MAX_METADATA_KEYS} keys", field="metadata"
        )
    reserved = RESERVED_METADATA_KEYS | {credits_field}
    # Polar takes at most 50 keys and we add ours (credits_used, usage_id, usage_external_id).
    room = MAX_METADATA_KEYS - len(reserved)
    if len(metadata) > room:
        raise InvalidRequest(
            f"metadata must have at most {room} keys ({', '.join(sorted(reserved))} are added)",
            field="metadata",
        )
    checked: Metadata = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not 1 <= len(key) <= MAX_METADATA_KEY_LENGTH:
            raise InvalidRequest(
                f"metadata keys must be 1 to {MAX_METADATA_KEY_LENGTH} characters",
                field="metadata",
            )
        if not _is_clean_text(key):
            raise InvalidRequest(
                "metadata keys must not contain control characters", field="metadata"
            )
        if key in reserved:
            raise InvalidRequest(
                f"metadata.{key} is reserved: the service sets it", field=f"metadata.{key}"
            )
        checked[key] = _check_metadata_value(key, value)
    return checked


def as_metadata(value: Any) -> Metadata:
    """Metadata read back from the database (already validated when written)."""
    return dict(value or {})


_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration(text: str, field: str = "older_than") -> timedelta:
    """'30d', '12h', '90m', '45s', '2w' → timedelta; `InvalidRequest` otherwise."""
    match = _DURATION.match(text or "")
    if not match:
        raise InvalidRequest(
            f"{field} must be a number and a unit (s, m, h, d, w), e.g. 30d; got {text!r}",
            field=field,
        )
    value, unit = int(match.group(1)), match.group(2)
    if value <= 0:
        raise InvalidRequest(f"{field} must be positive", field=field)
    try:
        return timedelta(**{_UNITS[unit]: value})
    except OverflowError:
        raise InvalidRequest(f"{field} is too large", field=field) from None
