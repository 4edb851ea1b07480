"""Inbound connector attribution: which tenant does a connecting partner server belong to?

A `ConnectorTable` is compiled from `InboundConnector` values and a `DomainMatcher`:

* **certificate first**: a TLS certificate name presented by the client identifies a connector
  whose configured names match it (``mail.contoso.com`` exactly, or ``*.contoso.com`` for any
  name under ``contoso.com``, not the apex; a presented wildcard name matches only the same
  wildcard).  As Exchange Online Protection requires, a configured certificate name is only
  trusted if it is (under) one of the connector tenant's accepted domains: the nearest
  accepted domain at or above it must belong to that tenant.  Compilation refuses others;
* **every name of the certificate**: a client certificate often carries several names
  (``subjectAltName`` DNS names), and, as in Exchange Online, a connector matches when any of
  them matches.  Each name is tried with the rules above (invalid or unknown names are
  ignored).  When names of one certificate match connectors of **different** tenants the
  certificate is ambiguous: it attributes nothing (no guessing) and attribution falls back to
  the client address.  Only the first `ConnectorTable.MAX_CERT_NAMES` (100) names are
  considered: RFC 5280 sets no limit and a hostile certificate may carry thousands, so the cost
  stays linear in the size of the input;
* **then the IP address**: the longest sender IP prefix (IPv4 or IPv6; IPv4-mapped IPv6
  clients are treated as IPv4) among enabled connectors that contains the client address;
* **ambiguity is refused at compile time**: the same prefix or the same certificate name on
  enabled connectors of two different tenants.  Overlapping prefixes of different lengths are
  not ambiguous: the longest wins.

Lookup cost: one dict probe per distinct prefix length in use (at most 33 for IPv4, 129 for IPv6).
"""

from __future__ import annotations

import datetime
import ipaddress
import itertools
from collections.abc import Iterable
from typing import ClassVar

import attrs

from ._errors import InvalidAddress, InvalidConfiguration, InvalidDomain, shown
from ._matcher import DomainMatcher
from ._names import NormalizedDomain, normalize_domain

__all__ = ["ConnectorTable", "InboundConnector"]

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _network(value: object) -> object:
    """Text such as ``"198.51.100.0/24"`` becomes a network; anything else is kept as given so
    that `ConnectorTable.compile` reports it with every other problem."""
    if isinstance(value, str):
        try:
            return ipaddress.ip_network(value, strict=True)
        except ValueError:
            return value
    return value


def _networks(value: Iterable[_Network | str]) -> tuple[_Network, ...]:
    if isinstance(value, str | ipaddress.IPv4Network | ipaddress.IPv6Network):
        value = [value]
    return tuple(_network(v) for v in value)  # type: ignore[misc]


def _names(value: Iterable[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


@attrs.frozen
class InboundConnector:
    """An inbound connector of a tenant (a partner organisation's servers).

    Attributes:
        name: unique name of the connector.
        tenant: the tenant mail through this connector is attributed to.
        sender_ip_ranges: the partner's networks (`ipaddress` networks, or text such as
            ``"198.51.100.0/24"``).
        tls_cert_names: certificate names (``mail.contoso.com`` or ``*.contoso.com``).
        created_at: when the connector was created (informational).
        enabled: disabled connectors are checked but never attribute mail.
    """

    name: str
    tenant: str
    sender_ip_ranges: tuple[_Network, ...] = attrs.field(default=(), converter=_networks)
    tls_cert_names: tuple[str, ...] = attrs.field(default=(), converter=_names)
    created_at: datetime.datetime | None = None
    enabled: bool = True


def _cert_key(name: object) -> tuple[str, bool] | None:
    """(normalised base, is_wildcard) of a certificate name, or None if it is not valid."""
    if not isinstance(name, str):
        return None
    wildcard = name.startswith("*.")
    try:
        return normalize_domain(name[2:] if wildcard else name), wildcard
    except InvalidDomain:
        return None


class ConnectorTable:
    """Compiled, immutable connector attribution (see the module documentation)."""

    __slots__ = ("_certs", "_v4", "_v6")

    MAX_CERT_NAMES: ClassVar[int] = 100
    """How many names of one certificate `attribute` considers at most (the first ones, in the
    order given); further names are ignored, unread."""

    def __init__(
        self,
        certs: dict[tuple[str, bool], str],
        v4: dict[int, dict[int, str]],
        v6: dict[int, dict[int, str]],
    ) -> None:
        """Internal: use `ConnectorTable.compile`."""
        self._certs = certs
        # Longest prefix first.
        self._v4 = [(32 - plen, v4[plen]) for plen in sorted(v4, reverse=True)]
        self._v6 = [(128 - plen, v6[plen]) for plen in sorted(v6, reverse=True)]

    @classmethod
    def compile(
        cls, connectors: Iterable[InboundConnector], matcher: DomainMatcher
    ) -> ConnectorTable:
        """Check and compile connectors against the tenants' accepted domains.

        Raises:
            InvalidConfiguration: one error listing every problem: duplicate connector names,
                bad networks or certificate names, certificate names outside the tenant's
                accepted domains, the same prefix or certificate name in two tenants.
        """
        problems: list[str] = []
        certs: dict[tuple[str, bool], str] = {}
        nets: dict[int, dict[int, dict[int, str]]] = {4: {}, 6: {}}
        owners: dict[object, str] = {}
        names: set[str] = set()
        try:
            listed: list[object] = list(connectors)
        except TypeError as exc:
            raise InvalidConfiguration([f"connectors {shown(connectors)} is not iterable"]) from exc
        item: object
        for item in listed:
            if not isinstance(item, InboundConnector):
                problems.append(f"{shown(item)} is not an InboundConnector")
                continue
            connector = item
            label = f"connector {connector.name!r} (tenant {connector.tenant!r})"
            name: object = connector.name
            tenant: object = connector.tenant
            if not isinstance(name, str) or name in names:
                problems.append(f"{label}: the name must be a unique str")
            names.add(str(name))
            if not isinstance(tenant, str) or not tenant:
                problems.append(f"{label}: the tenant must be a non-empty str")
                continue
            ranges: tuple[object, ...] = connector.sender_ip_ranges
            for network in ranges:
                if not isinstance(network, ipaddress.IPv4Network | ipaddress.IPv6Network):
                    problems.append(
                        f"{label}: sender range {shown(network)} is not an ipaddress network"
                    )
                    continue
                if not connector.enabled:
                    continue
                by_length = nets[network.version].setdefault(network.prefixlen, {})
                start = int(network.network_address) >> (network.max_prefixlen - network.prefixlen)
                other = by_length.get(start)
                if other is not None and other != connector.tenant:
                    problems.append(
                        f"{label}: sender range {str(network)!r} is also a range of tenant "
                        f"{other!r} (ambiguous attribution)"
                    )
                by_length[start] = connector.tenant
            for cert_name in connector.tls_cert_names:
                key = _cert_key(cert_name)
                if key is None:
                    problems.append(f"{label}: certificate name {shown(cert_name)} is invalid")
                    continue
                tenants = matcher.covering_tenants(NormalizedDomain(key[0]))
                if connector.tenant not in tenants:
                    problems.append(
                        f"{label}: certificate name {cert_name!r} is not (under) one of the "
                        "tenant's accepted domains, so it cannot be trusted"
                    )
                    continue
                if not connector.enabled:
                    continue
                owner = owners.get(key)
                if owner is not None and owner != connector.tenant:
                    problems.append(
                        f"{label}: certificate name {cert_name!r} also identifies tenant "
                        f"{owner!r} (ambiguous attribution)"
                    )
                owners[key] = certs[key] = connector.tenant
        if problems:
            raise InvalidConfiguration(problems)
        return cls(certs, nets[4], nets[6])

    def attribute(
        self,
        client_ip: str | ipaddress.IPv4Address | ipaddress.IPv6Address,
        tls_cert_name: str | Iterable[str] | None = None,
    ) -> str | None:
        """The tenant a connection is attributed to, or None.

        Args:
            client_ip: the client's address (text or an `ipaddress` value).
            tls_cert_name: the verified TLS client certificate's name, or all its names (any
                iterable of names, such as every ``subjectAltName`` DNS name), or None.

        A certificate name that is not a valid name, or that matches no connector, is ignored.
        The tenant of the connectors the certificate's names match wins over the client
        address.  If they match connectors of different tenants the certificate is ambiguous
        and attributes nothing.  Only the first `MAX_CERT_NAMES` names are considered.  Without
        a certificate attribution, the longest sender IP prefix containing *client_ip* decides.
        An exception raised by a *tls_cert_name* iterable itself propagates.

        Raises:
            InvalidAddress: *client_ip* is not an IP address (reason ``bad_client_ip``) and
                no certificate name attributed the connection.
        """
        if tls_cert_name is not None and self._certs:
            found = self._certificate_tenant(tls_cert_name)
            if found is not None:
                return found
        try:
            address = (
                client_ip
                if isinstance(client_ip, ipaddress.IPv4Address | ipaddress.IPv6Address)
                else ipaddress.ip_address(client_ip)
            )
        except (ValueError, TypeError) as exc:
            raise InvalidAddress(
                client_ip, "bad_client_ip", "expected an IPv4 or IPv6 address"
            ) from exc
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        number = int(address)
        for shift, starts in self._v4 if address.version == 4 else self._v6:
            found = starts.get(number >> shift)
            if found is not None:
                return found
        return None

    def _certificate_tenant(self, names: object) -> str | None:
        """The one tenant the certificate names identify; None when none match or when they
        match different tenants (ambiguous)."""
        if isinstance(names, str | bytes | bytearray):
            return self._certificate_name_tenant(names)
        try:
            iterator = iter(names)  # type: ignore[call-overload]
        except TypeError:  # not a name, not names: an invalid name, ignored
            return None
        tenant: str | None = None
        for name in itertools.islice(iterator, self.MAX_CERT_NAMES):
            found = self._certificate_name_tenant(name)
            if found is None or found == tenant:
                continue
            if tenant is not None:
                return None  # names of two tenants: do not guess
            tenant = found
        return tenant

    def _certificate_name_tenant(self, name: object) -> str | None:
        """The tenant of the connector one certificate name matches, or None."""
        key = _cert_key(name)
        if key is None:
            return None
        found = self._certs.get(key)
        if found is None and not key[1]:
            rest = key[0].partition(".")[2]
            while found is None and "." in rest:
                found = self._certs.get((rest, True))
                rest = rest.partition(".")[2]
        return found
