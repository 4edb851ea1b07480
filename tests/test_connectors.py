"""Tests for inbound connector attribution (issue 3)."""

from __future__ import annotations

import datetime
from ipaddress import ip_network

import pytest

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
