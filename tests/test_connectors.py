"""Tests for inbound connector attribution (issue 3)."""

from __future__ import annotations

import datetime
import itertools
from collections.abc import Iterator
from ipaddress import ip_network
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domainpolicy import (
    AcceptedDomain,
    ConnectorTable,
    DomainMatcher,
    InboundConnector,
    InvalidAddress,
    InvalidConfiguration,
)

A = AcceptedDomain
C = InboundConnector

MATCHER = DomainMatcher.compile(
    [
        A("contoso.com", "A", match_subdomains=True),
        A("sales.contoso.com", "B"),
        A("fabrikam.com", "F"),
        A("*.tailspin.org", "T"),
    ]
)

TABLE = ConnectorTable.compile(
    [
        C("a-wide", "A", [ip_network("192.0.2.0/24"), ip_network("2001:db8::/32")]),
        C("b-narrow", "B", [ip_network("192.0.2.128/25"), ip_network("2001:db8:1::/48")]),
        C("f-host", "F", [ip_network("192.0.2.200/32")], ["mx.fabrikam.com"]),
        C("a-cert", "A", [], ["*.contoso.com"]),
        C("b-cert", "B", [], ["relay.sales.contoso.com"]),
        C("t-cert", "T", [], ["*.tailspin.org"]),
        C("old", "F", [ip_network("198.51.100.0/24")], enabled=False),
    ],
    MATCHER,
)


@pytest.mark.parametrize(
    ("ip", "cert", "tenant"),
    [
        # longest prefix wins, IPv4
        ("192.0.2.1", None, "A"),
        ("192.0.2.129", None, "B"),
        ("192.0.2.200", None, "F"),
        ("192.0.3.1", None, None),
        # longest prefix wins, IPv6, and IPv4-mapped IPv6
        ("2001:db8::1", None, "A"),
        ("2001:db8:1::25", None, "B"),
        ("2001:db9::1", None, None),
        ("::ffff:192.0.2.129", None, "B"),
        # disabled connectors never attribute
        ("198.51.100.7", None, None),
        # certificate names win over the address
        ("203.0.113.9", "mx.fabrikam.com", "F"),
        ("192.0.2.1", "MX.Fabrikam.COM.", "F"),
        ("203.0.113.9", "mail.contoso.com", "A"),
        ("203.0.113.9", "a.b.contoso.com", "A"),
        ("203.0.113.9", "relay.sales.contoso.com", "B"),
        ("203.0.113.9", "*.contoso.com", "A"),
        ("203.0.113.9", "x.tailspin.org", "T"),
        # a wildcard certificate name does not cover the apex
        ("203.0.113.9", "contoso.com", None),
        # unknown or invalid certificate names fall back to the address
        ("192.0.2.129", "mx.evil.example", "B"),
        ("192.0.2.129", "not a name", "B"),
        ("203.0.113.9", "evilcontoso.com", None),
    ],
)
def test_attribution_table(ip: str, cert: str | None, tenant: str | None) -> None:
    """Attribution by certificate name first, then longest IP prefix."""
    assert TABLE.attribute(ip, cert) == tenant


def test_attribute_accepts_address_objects() -> None:
    """ipaddress objects work as the client address."""
    from ipaddress import ip_address

    assert TABLE.attribute(ip_address("192.0.2.130")) == "B"


@pytest.mark.parametrize("ip", ["", "999.1.1.1", "example.com", None, 5.5])
def test_bad_client_ip(ip: object) -> None:
    """A client address that is not an IP address raises InvalidAddress."""
    with pytest.raises(InvalidAddress, match="bad_client_ip"):
        TABLE.attribute(ip)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("connectors", "needle"),
    [
        (
            [C("x", "A", [ip_network("10.0.0.0/8")]), C("y", "B", [ip_network("10.0.0.0/8")])],
            "ambiguous attribution",
        ),
        (
            [
                C("x", "A", [ip_network("2001:db8::/32")]),
                C("y", "F", [ip_network("2001:db8::/32")]),
            ],
            "ambiguous attribution",
        ),
        ([C("x", "A", [], ["mail.fabrikam.com"])], "cannot be trusted"),
        ([C("x", "A", [], ["sales.contoso.com"])], "cannot be trusted"),
        ([C("x", "B", [], ["*.contoso.com"])], "cannot be trusted"),
        ([C("x", "A", [], ["mail.example.net"])], "cannot be trusted"),
        ([C("x", "A", [], ["bad..name"])], "is invalid"),
        ([C("x", "A", ["10.0.0.1/8"])], "is not an ipaddress network"),
        ([C("x", "A", ["not a network"])], "is not an ipaddress network"),
        ([C("x", "A"), C("x", "B")], "unique"),
        ([C("x", "")], "non-empty"),
        (["nope"], "is not an InboundConnector"),
    ],
)
def test_compile_refuses(connectors: list[InboundConnector], needle: str) -> None:
    """Ambiguous, untrusted or malformed connectors are refused at compile time."""
    with pytest.raises(InvalidConfiguration) as caught:
        ConnectorTable.compile(connectors, MATCHER)
    assert needle in str(caught.value)


@pytest.mark.parametrize(
    "connectors",
    [
        # overlapping prefixes of different lengths: the longest wins, not ambiguous
        [C("x", "A", [ip_network("10.0.0.0/8")]), C("y", "B", [ip_network("10.1.0.0/16")])],
        # the same prefix twice in one tenant
        [C("x", "A", [ip_network("10.0.0.0/8")]), C("y", "A", [ip_network("10.0.0.0/8")])],
        # a disabled connector does not conflict
        [
            C("x", "A", [ip_network("10.0.0.0/8")]),
            C("y", "B", [ip_network("10.0.0.0/8")], enabled=False),
        ],
    ],
)
def test_compile_accepts(connectors: list[InboundConnector]) -> None:
    """Overlaps the longest-prefix rule resolves compile."""
    table = ConnectorTable.compile(connectors, MATCHER)
    assert table.attribute("10.1.2.3") in {"A", "B"}
    assert table.attribute("10.200.0.1") == "A"


def test_connector_fields() -> None:
    """Sequences given for ranges and names are stored as tuples."""
    when = datetime.datetime(2024, 1, 2, tzinfo=datetime.UTC)
    connector = C("x", "A", [ip_network("10.0.0.0/8")], ["*.contoso.com"], created_at=when)
    assert connector.sender_ip_ranges == (ip_network("10.0.0.0/8"),)
    assert connector.tls_cert_names == ("*.contoso.com",)
    assert connector.created_at == when


def test_sender_ranges_may_be_given_as_text() -> None:
    """Ranges given as text become ipaddress networks, one or many."""
    connector = C("x", "A", ["192.0.2.0/24", "2001:db8::/32"])
    assert connector.sender_ip_ranges == (ip_network("192.0.2.0/24"), ip_network("2001:db8::/32"))
    assert C("y", "A", "198.51.100.0/24").sender_ip_ranges == (ip_network("198.51.100.0/24"),)


# --------------------------------------------------------------------------- several names

OUTSIDE = "203.0.113.9"  # no connector covers it: only the certificate can attribute


@pytest.mark.parametrize(
    ("ip", "names", "tenant"),
    [
        # a later name matches when the first does not (the first is not special)
        (OUTSIDE, ("mx1.unknown.example", "mx.fabrikam.com"), "F"),
        (OUTSIDE, ["mx1.fabrikam.net", "mail.contoso.com"], "A"),
        # several names of the same tenant agree, and still win over the address
        ("192.0.2.129", ("mail.contoso.com", "a.b.contoso.com", "*.contoso.com"), "A"),
        ("192.0.2.129", ("mx.fabrikam.com", "MX.Fabrikam.COM."), "F"),
        # names of different tenants are ambiguous: the client address decides
        ("192.0.2.129", ("mx.fabrikam.com", "mail.contoso.com"), "B"),
        ("192.0.2.200", ("relay.sales.contoso.com", "mail.contoso.com"), "F"),
        ("192.0.2.1", ("x.tailspin.org", "unknown.example", "mx.fabrikam.com"), "A"),
        (OUTSIDE, ("mx.fabrikam.com", "mail.contoso.com"), None),
        # invalid and unknown names among valid ones are ignored
        (OUTSIDE, ("not a name", "", "bad..name", "-x.example", "x.tailspin.org"), "T"),
        (OUTSIDE, ("contoso.com", "mail.contoso.com"), "A"),
        # nothing that matches: the address decides
        ("192.0.2.129", ("unknown.example", "evilcontoso.com"), "B"),
        ("192.0.2.129", (), "B"),
        ("192.0.2.129", [], "B"),
        # any iterable of names
        (OUTSIDE, iter(["nope.example", "mx.fabrikam.com"]), "F"),
        (OUTSIDE, (n for n in ["mail.contoso.com", "x.contoso.com"]), "A"),
        (OUTSIDE, frozenset({"mx.fabrikam.com"}), "F"),
        (OUTSIDE, {"mx.fabrikam.com": "the keys are the names"}, "F"),
    ],
)
def test_attribution_by_several_names(ip: str, names: Any, tenant: str | None) -> None:
    """Each name is tried; one tenant wins, different tenants fall back to the address."""
    assert TABLE.attribute(ip, names) == tenant


@pytest.mark.parametrize(
    ("names", "tenant"),
    [
        ((None, 5, b"mx.fabrikam.com", ["mail.contoso.com"], "mx.fabrikam.com"), "F"),
        ((None, 5.5, object()), "B"),
        (5, "B"),
        (b"mx.fabrikam.com", "B"),
        (bytearray(b"mail.contoso.com"), "B"),
        (object(), "B"),
    ],
)
def test_values_that_are_not_names_are_ignored(names: Any, tenant: str) -> None:
    """Items that are not text, and values that are neither a name nor names, are ignored."""
    assert TABLE.attribute("192.0.2.129", names) == tenant


def test_the_number_of_names_considered_is_capped() -> None:
    """Only the first MAX_CERT_NAMES names count: a match (or a conflict) after them is not read."""
    cap = ConnectorTable.MAX_CERT_NAMES
    assert cap == 100
    filler = [f"mx{i}.unknown.example" for i in range(cap - 1)]
    assert TABLE.attribute(OUTSIDE, [*filler, "mx.fabrikam.com"]) == "F"
    assert TABLE.attribute(OUTSIDE, [*filler, "other.example", "mx.fabrikam.com"]) is None
    assert TABLE.attribute("192.0.2.129", ["mx.fabrikam.com", *filler, "mail.contoso.com"]) == "F"


def test_an_endless_iterable_of_names_is_read_only_up_to_the_cap() -> None:
    """A generator is consumed for at most MAX_CERT_NAMES names, so the work stays bounded."""
    read = 0

    def names() -> Iterator[str]:
        nonlocal read
        for i in itertools.count():
            read += 1
            yield "mx.fabrikam.com" if i == 3 else f"mx{i}.unknown.example"

    assert TABLE.attribute(OUTSIDE, names()) == "F"
    assert read == ConnectorTable.MAX_CERT_NAMES


def test_bad_client_ip_with_names_that_do_not_attribute() -> None:
    """With ambiguous or unknown names the address decides, so a bad address still raises."""
    with pytest.raises(InvalidAddress, match="bad_client_ip"):
        TABLE.attribute("not-an-ip", ("mx.fabrikam.com", "mail.contoso.com"))
    assert TABLE.attribute("not-an-ip", ("nope.example", "mx.fabrikam.com")) == "F"


_NAME_POOL = [
    "mx.fabrikam.com",
    "MX.FABRIKAM.COM.",
    "mail.contoso.com",
    "deep.mail.contoso.com",
    "*.contoso.com",
    "contoso.com",
    "relay.sales.contoso.com",
    "x.tailspin.org",
    "unknown.example",
    "not a name",
    "",
]
_IPS = ["192.0.2.1", "192.0.2.129", "192.0.2.200", "2001:db8:1::1", OUTSIDE]


@given(
    ip=st.sampled_from(_IPS),
    names=st.lists(st.one_of(st.sampled_from(_NAME_POOL), st.text(max_size=30)), max_size=12),
    seed=st.randoms(use_true_random=False),
)
def test_several_names_agree_with_one_name_at_a_time(ip: str, names: list[str], seed: Any) -> None:
    """Attribution by several names is: the one tenant the names identify one at a time, else
    (none or several) the address; independent of the order and of repeated names."""
    tenants = {TABLE.attribute(OUTSIDE, name) for name in names} - {None}
    expected = tenants.pop() if len(tenants) == 1 else TABLE.attribute(ip)
    assert TABLE.attribute(ip, names) == expected
    shuffled = list(names)
    seed.shuffle(shuffled)
    assert TABLE.attribute(ip, tuple(shuffled + names)) == expected


@given(ip=st.sampled_from(_IPS), name=st.one_of(st.sampled_from(_NAME_POOL), st.text()))
def test_one_name_or_a_tuple_of_it_is_the_same(ip: str, name: str) -> None:
    """A single name and a one-name tuple attribute alike."""
    assert TABLE.attribute(ip, name) == TABLE.attribute(ip, (name,)) == TABLE.attribute(ip, [name])
