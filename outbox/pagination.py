"""Keyset pagination shared by the API and the CLI: opaque cursors (the last row's id) and page
limits."""

from __future__ import annotations

import base64
import binascii

from outbox.errors import InvalidRequest
from outbox.validation import MAX_ID

MAX_PAGE_SIZE = 200


def decimal_at_most_pattern(maximum: int) -> str:
    """A regex for the canonical decimals 1..maximum (no sign, no leading zero)."""
    digits = str(maximum)
    shorter = rf"[1-9][0-9]{{0,{len(digits) - 2}}}" if len(digits) > 1 else ""
    same_length = []
    for i, digit in enumerate(digits):
        low = "1" if i == 0 else "0"
        if int(digit) > int(low):
            rest = len(digits) - i - 1
            same_length.append(
                digits[:i] + f"[{low}-{int(digit) - 1}]" + (f"[0-9]{{{rest}}}" if rest else "")
            )
    same_length.append(digits)
    return "^(" + "|".join(filter(None, [shorter, *same_length])) + ")$"


# A cursor is the id of the last row of the page, in decimal: the schema states it exactly.
CURSOR_PATTERN = decimal_at_most_pattern(MAX_ID)
MAX_CURSOR_LENGTH = len(str(MAX_ID))


def encode_cursor(last_id: int) -> str:
    """The cursor of the page after the row `last_id` (its id, in decimal)."""
    return str(last_id)


def legacy_cursor(last_id: int) -> str:
    """The cursor of the release before: unpadded URL-safe base64 of `id:N` (`aWQ6...`)."""
    return base64.urlsafe_b64encode(f"id:{last_id}".encode()).decode().rstrip("=")


# Deprecated, still accepted: a client paginating across the deploy holds one of these.
LEGACY_CURSOR_PREFIX = "aWQ6"  # base64 of "id:"
MAX_LEGACY_CURSOR_LENGTH = len(legacy_cursor(MAX_ID))


def _legacy_id_text(cursor: str) -> str | None:
    """The `N` of a cursor exactly as the release before made it, or None."""
    if not (
        cursor.startswith(LEGACY_CURSOR_PREFIX)
        and len(cursor) <= MAX_LEGACY_CURSOR_LENGTH
        and cursor.isascii()
    ):
        return None
    standard = cursor.translate(str.maketrans("-_", "+/")) + "=" * (-len(cursor) % 4)
    try:
        text = base64.b64decode(standard, validate=True).decode("ascii")
    except (binascii.Error, ValueError):
        return None
    value = text.removeprefix("id:")
    # Re-encoding must give the cursor back: no other spelling of the same bytes.
    return value if value.isdigit() and legacy_cursor(int(value)) == cursor else None


def decode_cursor(cursor: str | None) -> int | None:
    """The id a cursor points after; `InvalidRequest` unless it is an id from 1 to 2^63-1, so a
    cursor past 64 bits never reaches SQL. A cursor of the release before (base64 of `id:N`)
    is decoded first and passes the same check."""
    if cursor is None:
        return None
    value = _legacy_id_text(cursor) or cursor
    canonical = value.isascii() and value.isdigit() and not value.startswith("0")
    if not (canonical and len(value) <= MAX_CURSOR_LENGTH and int(value) <= MAX_ID):
        raise InvalidRequest("cursor is not valid: pass next_cursor as returned", field="cursor")
    return int(value)


def check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise InvalidRequest(f"limit must be between 1 and {MAX_PAGE_SIZE}", field="limit")
    return limit
