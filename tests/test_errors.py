"""The error helpers: values in messages are shown truncated, and showing never fails."""

from __future__ import annotations

import pytest

from domainpolicy._errors import shown, shown_key


def nested(depth: int) -> list[object]:
    """A list nested *depth* levels deep."""
    value: list[object] = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("short", "'short'"),
        ("x" * 100, "'" + "x" * 80 + "'... (100 characters)"),
        (b"y" * 100, "b'" + "y" * 80 + "'... (100 bytes)"),
        (2**63, str(2**63)),
        (10**5000, "<integer of 16610 bits>"),
        (-(10**5000), "<negative integer of 16610 bits>"),
        ([10**5000], "<list that cannot be shown>"),
        (nested(100_000), "<list that cannot be shown>"),
        (list(range(100)), repr(list(range(100)))[:80] + "... (390 characters of repr)"),
    ],
    ids=[
        "short",
        "long-str",
        "long-bytes",
        "int64",
        "huge-int",
        "huge-negative",
        "in-list",
        "deep",
        "list",
    ],
)
def test_shown_is_short_and_never_raises(value: object, expected: str) -> None:
    """shown() truncates long text, describes huge integers by size and unprintable values by
    type, instead of raising or taking quadratic time."""
    assert shown(value) == expected


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("contoso", "contoso"),
        ("tenant-42_b", "tenant-42_b"),
        ("5.7.750", "'5.7.750'"),
        ("a\nb", "'a\\nb'"),
        ("", "''"),
        ("k" * 100, "'" + "k" * 40 + "'... (100 characters)"),
    ],
)
def test_shown_key_is_bare_only_for_short_bare_keys(key: str, expected: str) -> None:
    """A configuration key is shown bare when TOML would write it bare, else as a short repr."""
    assert shown_key(key) == expected
