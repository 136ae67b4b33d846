"""outbox/pagination.py: a cursor given out comes back as the same id (the current decimal
form and the previous release's base64 form); anything else is `InvalidRequest` naming
`cursor`; a page size outside 1..200 is `InvalidRequest` naming `limit`; the schema's cursor
pattern accepts exactly the decimals from 1 to its maximum.

That the served schema's pattern and `decode_cursor` agree on arbitrary text is checked in
tests/api/test_openapi.py, and what a client sees over HTTP in tests/api/test_bounds.py and
tests/api/test_customers.py.
"""

from __future__ import annotations

import re

import pytest

from outbox.errors import InvalidRequest
from outbox.pagination import (
    MAX_PAGE_SIZE,
    check_limit,
    decimal_at_most_pattern,
    decode_cursor,
    encode_cursor,
    legacy_cursor,
)
from outbox.validation import MAX_ID

IDS = [1, 2, 9, 10, 42, 999, 1000, 2**31, 10**18, MAX_ID - 1, MAX_ID]


@pytest.mark.parametrize("last_id", IDS)
def test_a_cursor_comes_back_as_the_id_it_was_made_from(last_id: int) -> None:
    assert decode_cursor(encode_cursor(last_id)) == last_id


@pytest.mark.parametrize("last_id", IDS)
def test_a_cursor_of_the_previous_release_comes_back_as_its_id(last_id: int) -> None:
    cursor = legacy_cursor(last_id)
    assert cursor.startswith("aWQ6") and "=" not in cursor
    assert decode_cursor(cursor) == last_id


def test_no_cursor_is_the_first_page() -> None:
    assert decode_cursor(None) is None


@pytest.mark.parametrize(
    "cursor",
    [
        "",
        "0",
        "-1",
        "+1",
        "01",
        "1.0",
        " 1",
        "1 ",
        "abc",
        "\uff11",  # a full-width digit: isdigit() says yes
        "\u0661",  # an Arabic-Indic digit
        str(MAX_ID + 1),
        "9" * 40,
        legacy_cursor(0),
        legacy_cursor(MAX_ID + 1),
        legacy_cursor(7) + "==",  # the same bytes, padded
        legacy_cursor(7) + "A",
        "aWQ6",  # "id:" and no number
        "aWQ6!!!!",
    ],
)
def test_anything_else_is_refused_naming_the_cursor(cursor: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        decode_cursor(cursor)
    assert refused.value.context == {"field": "cursor"}
    assert refused.value.detail == "cursor is not valid: pass next_cursor as returned"


@pytest.mark.parametrize("limit", [1, 50, MAX_PAGE_SIZE])
def test_a_page_size_from_1_to_200_is_taken(limit: int) -> None:
    assert check_limit(limit) == limit


@pytest.mark.parametrize("limit", [0, -1, MAX_PAGE_SIZE + 1, 10**6])
def test_a_page_size_outside_1_to_200_is_refused_naming_the_limit(limit: int) -> None:
    with pytest.raises(InvalidRequest) as refused:
        check_limit(limit)
    assert refused.value.context == {"field": "limit"}
    assert refused.value.detail == "limit must be between 1 and 200"


@pytest.mark.parametrize("maximum", [1, 7, 9, 10, 11, 19, 20, 99, 100, 101, 205, 999, 1000, 3050])
def test_the_decimal_pattern_accepts_exactly_1_to_its_maximum(maximum: int) -> None:
    pattern = re.compile(decimal_at_most_pattern(maximum))
    for n in range(0, 2 * maximum + 20):
        assert (pattern.fullmatch(str(n)) is not None) == (1 <= n <= maximum), n
        assert pattern.fullmatch(f"0{n}") is None, n  # one spelling per number
    assert pattern.fullmatch("") is None
