"""SMTP address parsing: the forms MTAs pass, RFC 5321 limits, round trips and hostile input."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domainpolicy import (
    Address,
    DomainPolicyError,
    InvalidAddress,
    InvalidDomain,
    parse_address,
)
from domainpolicy._names import _parse_address, _parse_plain
from domainpolicy.testing import addresses, hostile_text

PARSED = [
    ("user@example.com", "user", "example.com", None),
    ("<user@example.com>", "user", "example.com", None),
    ("  <User@Example.COM.>\r\n", "User", "example.com", None),
    ("<@a.example,@b.example:user@example.com>", "user", "example.com", None),
    ("<@a.example:user@example.com>", "user", "example.com", None),
    ('"a@b"@example.com', '"a@b"', "example.com", None),
    ('"a\\"b c"@example.com', '"a\\"b c"', "example.com", None),
    ('""@example.com', '""', "example.com", None),
    ("ü@bücher.example", "ü", "xn--bcher-kva.example", None),
    ("用户@例子.广告", "用户", "xn--fsqu00a.xn--4rr70v", None),
    ("first.last+tag@example.com", "first.last+tag", "example.com", None),
    ("!#$%&'*+-/=?^_`{|}~@example.com", "!#$%&'*+-/=?^_`{|}~", "example.com", None),
    ("user@[192.0.2.1]", "user", None, "[192.0.2.1]"),
    ("<user@[IPv6:2001:DB8:0::1]>", "user", None, "[IPv6:2001:db8::1]"),
    ("user@[x-tag:opaque]", "user", None, "[x-tag:opaque]"),
    ("a" * 64 + "@example.com", "a" * 64, "example.com", None),
]


@pytest.mark.parametrize(("text", "local", "domain", "literal"), PARSED)
def test_accepted_forms(text: str, local: str, domain: str | None, literal: str | None) -> None:
    """Each form MTAs pass parses to the local part as given and the normalised domain."""
    address = parse_address(text)
    assert (address.local_part, address.domain, address.literal) == (local, domain, literal)
    assert address.original == text
    assert not address.is_null


@pytest.mark.parametrize("text", ["<>", "", "  <>  ", "\t"])
def test_null_path(text: str) -> None:
    """<> and the empty string (Postfix's sender=) are the null reverse-path."""
    address = parse_address(text)
    assert address.is_null
    assert address.path == "<>"
    assert str(address) == ""


def test_null_path_refused_when_not_allowed() -> None:
    """Recipients may not be the null path."""
    with pytest.raises(InvalidAddress) as info:
        parse_address("<>", allow_null=False)
    assert info.value.reason == "null_path"


INVALID = [
    ("user", "missing_at"),
    ("<user>", "missing_at"),
    ("user@", "bad_domain"),
    ("@example.com", "bad_source_route"),
    ("a..b@example.com", "bad_local_part"),
    (".a@example.com", "bad_local_part"),
    ("a.@example.com", "bad_local_part"),
    ("a b@example.com", "bad_local_part"),
    ("a\r\nb@example.com", "bad_local_part"),
    ("a\ufffdb@example.com", "bad_local_part"),  # octets that were not UTF-8
    ('"a\ufffd"@example.com', "bad_quoted_string"),
    ('"abc@example.com', "bad_quoted_string"),
    ('"a\x00"@example.com', "bad_quoted_string"),
    ('"a\\\x00"@example.com', "bad_quoted_string"),
    ('"a"b@example.com', "missing_at"),
    ("<user@example.com", "unbalanced_brackets"),
    ("user@example.com>", "unbalanced_brackets"),
    ("<@a.example:>", "missing_at"),
    ("<@a_b.example:user@example.com>", "bad_source_route"),
    ("<@a.example,b.example:user@example.com>", "bad_source_route"),
    ("@a.example:user@example.com", "bad_source_route"),
    ("user@exa_mple.com", "bad_domain"),
    ("user@1.2.3.4", "bad_domain"),
    ("user@localhost", "bad_domain"),
    ("user@[192.0.2.256]", "bad_literal"),
    ("user@[IPv6:zz::1]", "bad_literal"),
    ("user@[192.0.2.1", "bad_literal"),
    ("user@[]", "bad_literal"),
    ("a" * 65 + "@example.com", "local_part_too_long"),
    ("é" * 33 + "@example.com", "local_part_too_long"),
    ("a@" + ".".join(["b" * 63] * 4), "path_too_long"),
    ("x" * 100_000, "input_too_long"),
    ("\ud800@example.com", "bad_local_part"),
]


@pytest.mark.parametrize(("text", "reason"), INVALID)
def test_invalid_addresses(text: str, reason: str) -> None:
    """Each broken rule raises InvalidAddress with its reason code."""
    with pytest.raises(InvalidAddress) as info:
        parse_address(text)
    assert info.value.reason == reason
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, DomainPolicyError)


def test_bad_domain_chains_the_domain_error() -> None:
    """A bad domain is reported as bad_domain with the InvalidDomain as its cause and position."""
    with pytest.raises(InvalidAddress) as info:
        parse_address("<user@exa_mple.com>")
    assert isinstance(info.value.__cause__, InvalidDomain)
    assert info.value.position == 9


def test_path_limit_counts_octets() -> None:
    """The 256-octet path limit counts UTF-8 octets, brackets included."""
    domain = ".".join(["b" * 60] * 3) + ".example"  # 191 octets
    local = "a" * 62
    assert parse_address(f"{local}@{domain}").domain == domain
    with pytest.raises(InvalidAddress) as info:
        parse_address(f"{'é' * 31}{local[:1]}@{domain}x")
    assert info.value.reason in {"path_too_long", "bad_domain"}


def test_equality_ignores_original_text() -> None:
    """Two spellings of the same mailbox are equal values; the original text is kept."""
    a = parse_address("<user@Example.com.>")
    b = parse_address("user@example.com")
    assert a == b
    assert hash(a) == hash(b)
    assert a.original != b.original


def test_smtputf8_flag() -> None:
    """needs_smtputf8 is true exactly for non-ASCII local parts (domains become A-labels)."""
    assert parse_address("ü@example.com").needs_smtputf8
    assert not parse_address("u@bücher.example").needs_smtputf8


def test_address_is_frozen() -> None:
    """Address values are immutable."""
    address = parse_address("user@example.com")
    with pytest.raises(AttributeError):
        address.local_part = "other"  # type: ignore[misc]


@given(addresses())
def test_generated_addresses_round_trip(text: str) -> None:
    """Parsing, rendering the path and parsing again gives the same value."""
    address = parse_address(text)
    again = parse_address(address.path)
    assert again == address
    assert parse_address(str(address)) == address


@given(addresses(forms=False))
def test_rendered_mailbox_is_local_at_domain(text: str) -> None:
    """The mailbox form is the local part as given, '@', and the normalised domain."""
    address = parse_address(text)
    local, _, _ = text.rpartition("@")
    assert address.local_part == local
    assert address.mailbox == f"{local}@{address.domain}"


@given(st.one_of(hostile_text(), addresses().map(lambda a: a + "\x00"), st.text()))
def test_arbitrary_text_raises_only_domainpolicy_errors(text: str) -> None:
    """No text makes parse_address raise anything but InvalidAddress."""
    try:
        result = parse_address(text)
    except InvalidAddress:
        return
    assert isinstance(result, Address)


def test_non_text_is_refused() -> None:
    """A non-str value raises InvalidAddress(reason='not_text')."""
    with pytest.raises(InvalidAddress) as info:
        parse_address(b"user@example.com")  # type: ignore[arg-type]
    assert info.value.reason == "not_text"


_ADDRESS_PIECES = st.sampled_from(
    [
        "a",
        "B",
        "0",
        ".",
        "..",
        "@",
        "<",
        ">",
        '"',
        "-",
        "_",
        "+",
        "x.example",
        "com",
        "[",
        "]",
        "1.2.3.4",
        ":",
        ",",
        " ",
        "\t",
        "a" * 64,
        "b" * 63 + ".",
        "xn--",
        "EXAMPLE",
        "!",
        "~",
    ]
)


@given(st.one_of(addresses(utf8=False), st.lists(_ADDRESS_PIECES, max_size=12).map("".join)))
def test_fast_path_agrees_with_full_parser(text: str) -> None:
    """Whatever the plain-address fast path accepts, the full parser accepts identically."""
    fast = _parse_plain(text)
    if fast is None:
        return
    slow = _parse_address(text)
    assert (fast, fast.original) == (slow, slow.original)


def test_cached_null_path_still_refused_for_recipients() -> None:
    """A cached null path does not slip past allow_null=False."""
    assert parse_address("<>").is_null
    with pytest.raises(InvalidAddress):
        parse_address("<>", allow_null=False)
