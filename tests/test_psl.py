"""Registrable domains and public suffixes."""

from __future__ import annotations

from pathlib import Path

import pytest

from domainpolicy import (
    InvalidConfiguration,
    InvalidDomain,
    PublicSuffixes,
    default_public_suffixes,
    is_public_suffix,
    registrable_domain,
)
from threads import run_in_threads


@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        ("rit.edu", "rit.edu"),
        ("www.rit.edu", "rit.edu"),
        ("a.b.example.co.uk", "example.co.uk"),
        ("Mail.Example.COM.", "example.com"),
        ("test.пример.рф", "xn--e1afmkfd.xn--p1ai"),
        ("user.github.io", "user.github.io"),
        ("deep.user.github.io", "user.github.io"),
        ("x.unknown-tld-zz", "x.unknown-tld-zz"),
        ("com", None),
        ("co.uk", None),
        ("github.io", None),
    ],
)
def test_registrable_domain(domain: str, expected: str | None) -> None:
    """The registrable domain is the public suffix plus one label (None for a suffix)."""
    assert registrable_domain(domain) == expected


@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        ("com", True),
        ("co.uk", True),
        ("github.io", True),
        ("рф", True),
        ("example.com", False),
        ("rit.edu", False),
        ("jp", True),
        ("co.jp", True),
    ],
)
def test_is_public_suffix(domain: str, expected: bool) -> None:
    """Public suffixes from both the ICANN and the private sections are recognised."""
    assert is_public_suffix(domain) is expected


def test_invalid_domain_raises() -> None:
    """A query that is not a domain raises InvalidDomain."""
    with pytest.raises(InvalidDomain):
        registrable_domain("a_b.example")


def test_custom_list_file(tmp_path: Path) -> None:
    """A custom Public Suffix List file replaces the bundled one for the calls that pass it."""
    path = tmp_path / "psl.dat"
    path.write_text("// test list\ncom\nexample.com\n*.wild.test\n", encoding="utf-8")
    custom = PublicSuffixes.from_file(path)
    assert custom.is_public("example.com")
    assert registrable_domain("a.b.example.com", suffixes=custom) == "b.example.com"
    assert registrable_domain("x.y.wild.test", suffixes=custom) == "x.y.wild.test"
    assert not is_public_suffix("example.com")


@pytest.mark.parametrize("content", [None, "", "// only comments\n", b"\xff\xfe"])
def test_unreadable_or_empty_list_is_a_configuration_error(
    tmp_path: Path, content: str | bytes | None
) -> None:
    """A missing, empty or undecodable list file raises InvalidConfiguration naming the file."""
    path = tmp_path / "psl.dat"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(InvalidConfiguration) as info:
        PublicSuffixes.from_file(path)
    assert str(path) in str(info.value)


def test_default_list_is_built_once_across_threads() -> None:
    """Concurrent first use builds the shared list exactly once."""
    results: list[PublicSuffixes] = []
    run_in_threads(*[lambda: results.append(default_public_suffixes())] * 8)
    assert len({id(r) for r in results}) == 1
    assert default_public_suffixes().public_suffix("a.example.co.uk") == "co.uk"
