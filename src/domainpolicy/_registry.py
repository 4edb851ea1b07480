"""The tenant registry's values: changes, the versioned change log and the view rebuilt from it.

The registry is the live, shared tenant configuration a store holds: every tenant's accepted
domains and inbound connectors.  It is kept as an append-only log of `RegistryRecord` values,
one per mutation, numbered 1, 2, 3...; the registry's *version* is the number of the last
record.  A record is the unit of atomicity (a whole import is one record) and of audit: who, when,
why, and exactly what changed.

A `RegistryView` is the registry at one version, compiled: a `DomainMatcher` and the connectors.
It moves forward by applying records with `DomainMatcher.with_changes` (copy-on-write, no full
recompile), and it validates a proposed mutation with **the same code** that compiles a
configuration: `DomainMatcher.with_changes` (valid names, public suffixes refused, a slot claimed
by another tenant refused, conflicting duplicates, the tenant limit) and `ConnectorTable.compile`
(unique connector names, valid networks, certificate names under the tenant's own accepted
domains, the same prefix or certificate name on two tenants).  No rule is written twice.

This module is pure: no I/O and no clock.  The stores (`domainpolicy._stores.registry_base`)
append records with a compare-and-set on the version, so that two writers racing from the same
version cannot both win.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, Literal

import attrs

from ._connectors import ConnectorTable, InboundConnector
from ._errors import DomainPolicyError, InvalidConfiguration, shown
from ._matcher import AcceptedDomain, DomainMatcher, DomainType
from ._names import _plain_key, normalize_domain
from ._psl import PublicSuffixes

__all__ = [
    "REGISTRY_ACTIONS",
    "EntryInfo",
    "RegistryChange",
    "RegistryRecord",
    "RegistryView",
    "canonical_entry_name",
    "connector_from_dict",
    "connector_to_dict",
    "domain_from_dict",
    "domain_to_dict",
]

Action = Literal["add_domain", "remove_domain", "add_connector", "remove_connector"]

REGISTRY_ACTIONS: Final = ("add_domain", "remove_domain", "add_connector", "remove_connector")
"""The kinds of `RegistryChange`."""


def canonical_entry_name(domain: object) -> str:
    """The canonical spelling of an accepted-domain entry's name, as `DomainMatcher.domains_of`
    spells it: the normalised domain, or ``*.`` and the normalised base for a wildcard.

    Raises:
        InvalidConfiguration: *domain* is not a str or not a valid domain (or wildcard) name.
    """
    if not isinstance(domain, str):
        raise InvalidConfiguration([f"domain {shown(domain)} must be a str"])
    wildcard = domain.startswith("*.")
    text = domain[2:] if wildcard else domain
    # normalize_domain's own ASCII shortcut first (the same answer, without the call).
    key = _plain_key(text.lower()) if text.isascii() else None
    if key is not None:
        return f"*.{key}" if wildcard else key
    try:
        key = normalize_domain(text)
    except DomainPolicyError as exc:
        raise InvalidConfiguration(
            [f"domain {shown(domain)} is not a valid domain: {exc}"]
        ) from exc
    return f"*.{key}" if wildcard else key


def domain_to_dict(entry: AcceptedDomain) -> dict[str, Any]:
    """A JSON-safe dict of an accepted domain (see `domain_from_dict`)."""
    return {
        "domain": entry.domain,
        "tenant": entry.tenant,
        "type": str(entry.domain_type),
        "subdomains": entry.match_subdomains,
    }


def domain_from_dict(data: Mapping[str, Any]) -> AcceptedDomain:
    """Rebuild an accepted domain from `domain_to_dict` output.

    Raises:
        InvalidConfiguration: *data* is malformed (the message shows it).
    """
    try:
        return AcceptedDomain(
            str(data["domain"]),
            str(data["tenant"]),
            DomainType(data.get("type", "authoritative")),
            bool(data.get("subdomains", False)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidConfiguration([f"malformed domain record {shown(data)}: {exc!r}"]) from exc


def connector_to_dict(connector: InboundConnector) -> dict[str, Any]:
    """A JSON-safe dict of an inbound connector (see `connector_from_dict`)."""
    created = connector.created_at
    return {
        "name": connector.name,
        "tenant": connector.tenant,
        "sender_ip_ranges": [str(n) for n in connector.sender_ip_ranges],
        "tls_cert_names": list(connector.tls_cert_names),
        "created_at": None if created is None else created.isoformat(),
        "enabled": connector.enabled,
    }


def connector_from_dict(data: Mapping[str, Any]) -> InboundConnector:
    """Rebuild an inbound connector from `connector_to_dict` output.

    Raises:
        InvalidConfiguration: *data* is malformed (the message shows it).
    """
    try:
        created = data.get("created_at")
        return InboundConnector(
            str(data["name"]),
            str(data["tenant"]),
            sender_ip_ranges=tuple(ipaddress.ip_network(str(n)) for n in data["sender_ip_ranges"]),
            tls_cert_names=tuple(str(n) for n in data["tls_cert_names"]),
            created_at=None if created is None else datetime.datetime.fromisoformat(created),
            enabled=bool(data.get("enabled", True)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidConfiguration([f"malformed connector record {shown(data)}: {exc!r}"]) from exc


@attrs.frozen
class RegistryChange:
    """One change of a registry mutation.

    Attributes:
        action: ``add_domain``, ``remove_domain``, ``add_connector`` (adds, or replaces the
            connector of that name) or ``remove_connector``.
        domain: the accepted domain added or removed (``*_domain``).
        connector: the connector added (``add_connector``).
        name: the connector removed (``remove_connector``).
    """

    action: Action
    domain: AcceptedDomain | None = None
    connector: InboundConnector | None = None
    name: str | None = None

    @classmethod
    def add_domain(cls, entry: AcceptedDomain) -> RegistryChange:
        """Add *entry* (an identical entry already there is a no-op)."""
        return cls("add_domain", domain=entry)

    @classmethod
    def remove_domain(cls, entry: AcceptedDomain) -> RegistryChange:
        """Remove *entry* (its tenant and flags must match the registered one)."""
        return cls("remove_domain", domain=entry)

    @classmethod
    def add_connector(cls, connector: InboundConnector) -> RegistryChange:
        """Add *connector*, or replace the connector of the same name."""
        return cls("add_connector", connector=connector)

    @classmethod
    def remove_connector(cls, name: str) -> RegistryChange:
        """Remove the connector called *name*."""
        return cls("remove_connector", name=name)

    @property
    def tenant(self) -> str | None:
        """The tenant the change is about (None for a connector removal)."""
        if self.domain is not None:
            return self.domain.tenant
        if self.connector is not None:
            return self.connector.tenant
        return None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (see `from_dict`)."""
        data: dict[str, Any] = {"action": self.action}
        if self.domain is not None:
            data["domain"] = domain_to_dict(self.domain)
        if self.connector is not None:
            data["connector"] = connector_to_dict(self.connector)
        if self.name is not None:
            data["name"] = self.name
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RegistryChange:
        """Rebuild a change from `to_dict` output.

        Raises:
            InvalidConfiguration: *data* is malformed.
        """
        action = data.get("action") if isinstance(data, Mapping) else None
        if action not in REGISTRY_ACTIONS:
            raise InvalidConfiguration(
                [f"registry change {shown(data)}: action must be one of {REGISTRY_ACTIONS}"]
            )
        domain = data.get("domain")
        connector = data.get("connector")
        name = data.get("name")
        return cls(
            action,
            domain=None if domain is None else domain_from_dict(domain),
            connector=None if connector is None else connector_from_dict(connector),
            name=None if name is None else str(name),
        )

    def describe(self) -> str:
        """One line for diffs and logs: ``+ domain contoso.com (contoso)``."""
        if self.domain is not None:
            sign = "+" if self.action == "add_domain" else "-"
            flags = ", subdomains" if self.domain.match_subdomains else ""
            return (
                f"{sign} domain {self.domain.domain} (tenant {self.domain.tenant}, "
                f"{self.domain.domain_type}{flags})"
            )
        if self.connector is not None:
            c = self.connector
            parts = [str(n) for n in c.sender_ip_ranges] + list(c.tls_cert_names)
            return f"+ connector {c.name} (tenant {c.tenant}: {', '.join(parts) or 'no match'})"
        return f"- connector {self.name}"


@attrs.frozen
class RegistryRecord:
    """One committed registry mutation: the change log's entry and its audit record.

    Attributes:
        version: the registry's version after this mutation (1 for the first).
        at: when (UTC epoch seconds).
        actor: who.
        reason: why (free text, may be empty).
        changes: what, in order.
    """

    version: int
    at: float
    actor: str
    reason: str
    changes: tuple[RegistryChange, ...]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (see `from_dict`)."""
        return {
            "version": self.version,
            "at": self.at,
            "actor": self.actor,
            "reason": self.reason,
            "changes": [c.to_dict() for c in self.changes],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RegistryRecord:
        """Rebuild a record from `to_dict` output.

        Raises:
            InvalidConfiguration: *data* is malformed.
        """
        try:
            return cls(
                int(data["version"]),
                float(data["at"]),
                str(data["actor"]),
                str(data.get("reason", "")),
                tuple(RegistryChange.from_dict(c) for c in data["changes"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidConfiguration(
                [f"malformed registry record {shown(data)}: {exc!r}"]
            ) from exc


@attrs.frozen
class EntryInfo:
    """When and by whom a registry entry (domain or connector) was last added.

    Attributes:
        version: the registry version that added it.
        at: when (UTC epoch seconds).
        actor: who.
    """

    version: int
    at: float
    actor: str


class RegistryView:
    """The registry at one version, compiled (not thread-safe: copy it with `copy` to share).

    Args:
        public_suffixes: the list the matcher checks (default: bundled).
        max_domains_per_tenant: the matcher's tenant limit (None: no limit).
        matcher: start from this matcher (a snapshot) at *version* instead of empty at 0.
        version: the registry version *matcher* reflects.
    """

    def __init__(
        self,
        *,
        public_suffixes: PublicSuffixes | None = None,
        max_domains_per_tenant: int | None = None,
        matcher: DomainMatcher | None = None,
        connectors: Iterable[InboundConnector] = (),
        version: int = 0,
    ) -> None:
        self.version = version
        self.matcher = (
            matcher
            if matcher is not None
            else DomainMatcher.compile(
                [], public_suffixes=public_suffixes, max_domains_per_tenant=max_domains_per_tenant
            )
        )
        self.connectors: dict[str, InboundConnector] = {c.name: c for c in connectors}
        self.info: dict[tuple[str, str], EntryInfo] = {}
        self._table: ConnectorTable | None = None
        self._suffixes = public_suffixes
        self._limit = max_domains_per_tenant

    def copy(self) -> RegistryView:
        """An independent copy (the matcher is immutable and shared)."""
        other = RegistryView.__new__(RegistryView)
        other.version = self.version
        other.matcher = self.matcher
        other.connectors = dict(self.connectors)
        other.info = dict(self.info)
        other._table = self._table
        other._suffixes = self._suffixes
        other._limit = self._limit
        return other

    @property
    def connector_table(self) -> ConnectorTable:
        """The compiled connector table (cached per version).

        Raises:
            InvalidConfiguration: never for a view built by `apply` (validated on the way in).
        """
        if self._table is None:
            self._table = ConnectorTable.compile(self.connectors.values(), self.matcher)
        return self._table

    def domains(self) -> list[AcceptedDomain]:
        """Every accepted domain, in canonical form."""
        return list(self.matcher)

    def check(
        self, changes: Sequence[RegistryChange]
    ) -> tuple[DomainMatcher, dict[str, InboundConnector], ConnectorTable | None]:
        """Validate *changes* against this version; return the matcher, the connectors and the
        connector table they would give (nothing here changes).

        The rules are `DomainMatcher.with_changes` and `ConnectorTable.compile`'s (see the
        module docs).  Domain removals name the registered entry by its domain text (any
        spelling); the tenant must be the owner.

        Raises:
            InvalidConfiguration: every problem found, each naming the offending value and the
                rule it breaks (a domain claimed by another tenant names that tenant).
        """
        problems: list[str] = []
        add: list[AcceptedDomain] = []
        remove: list[AcceptedDomain] = []
        connectors = dict(self.connectors)
        connectors_changed = False
        listed: list[object] = list(changes)
        for position, item in enumerate(listed):
            if not isinstance(item, RegistryChange):
                problems.append(f"change #{position} {shown(item)} is not a RegistryChange")
                continue
            change = item
            if change.action in ("add_domain", "remove_domain"):
                entry = change.domain
                if not isinstance(entry, AcceptedDomain):
                    problems.append(f"change #{position}: {change.action} needs an AcceptedDomain")
                    continue
                if change.action == "add_domain":
                    add.append(entry)
                    continue
                try:
                    found = self._registered(entry)
                except InvalidConfiguration as exc:
                    problems.extend(exc.problems)
                    continue
                if found is None:
                    problems.append(
                        f"domain {shown(entry.domain)} is not an accepted domain of tenant "
                        f"{shown(entry.tenant)}"
                    )
                else:
                    remove.append(found)
            elif change.action == "add_connector":
                connector = change.connector
                if not isinstance(connector, InboundConnector):
                    problems.append(f"change #{position}: add_connector needs an InboundConnector")
                    continue
                connectors[connector.name] = connector
                connectors_changed = True
            else:
                name = change.name
                if name is None or name not in connectors:
                    problems.append(f"connector {shown(name)} is not registered")
                    continue
                del connectors[name]
                connectors_changed = True
        if problems:
            raise InvalidConfiguration(problems, source="registry change")
        matcher = self.matcher
        if add and not remove and len(matcher) == 0:
            # Into an empty registry (an import, a seed): the batch compile, same rules.
            matcher = DomainMatcher.compile(
                add, public_suffixes=self._suffixes, max_domains_per_tenant=self._limit
            )
        elif add or remove:
            matcher = matcher.with_changes(add=add, remove=remove)
        table: ConnectorTable | None = None
        if connectors_changed or (remove and connectors):
            table = ConnectorTable.compile(connectors.values(), matcher)
        return matcher, connectors, table

    def _registered(self, entry: AcceptedDomain) -> AcceptedDomain | None:
        """The registered entry *entry* names (canonical), or None when its tenant has none."""
        name = canonical_entry_name(entry.domain)
        for found in self.matcher.domains_of(entry.tenant):
            if found.domain == name:
                return found
        return None

    def apply(
        self,
        record: RegistryRecord,
        checked: tuple[DomainMatcher, dict[str, InboundConnector], ConnectorTable | None]
        | None = None,
    ) -> None:
        """Move to *record*'s version by applying its changes incrementally (*checked*: what
        `check` returned for them at this version, to save validating twice).

        Raises:
            InvalidConfiguration: *record* does not follow this version, or its changes break
                the rules (a corrupt log); the view is unchanged.
        """
        if record.version != self.version + 1:
            raise InvalidConfiguration(
                [f"registry record version {record.version} does not follow version {self.version}"]
            )
        matcher, connectors, table = checked if checked is not None else self.check(record.changes)
        info = EntryInfo(record.version, record.at, record.actor)
        for change in record.changes:
            if change.action == "add_domain" and change.domain is not None:
                self.info[("domain", canonical_entry_name(change.domain.domain))] = info
            elif change.action == "remove_domain" and change.domain is not None:
                self.info.pop(("domain", canonical_entry_name(change.domain.domain)), None)
            elif change.action == "add_connector" and change.connector is not None:
                self.info[("connector", change.connector.name)] = info
            elif change.name is not None:
                self.info.pop(("connector", change.name), None)
        self.matcher = matcher
        if connectors != self.connectors or table is not None:
            self.connectors = connectors
            self._table = table
        self.version = record.version

    def diff(
        self,
        domains: Iterable[AcceptedDomain],
        connectors: Iterable[InboundConnector],
        *,
        replace: bool,
    ) -> list[RegistryChange]:
        """The changes that make this registry hold *domains* and *connectors*: additions of
        what is missing or different, and with *replace* removals of what is not listed (of
        every tenant), removals first.  Without *replace* a domain listed for another tenant
        than its current one is only added (which the rules refuse: it is claimed); with
        *replace* it moves.

        Raises:
            InvalidConfiguration: a domain is not a valid name.
        """
        wanted: dict[str, AcceptedDomain] = {}
        for entry in domains:
            wanted[canonical_entry_name(entry.domain)] = entry
        current = {e.domain: e for e in self.matcher}
        removals: list[RegistryChange] = []
        additions: list[RegistryChange] = []
        for name, entry in current.items():
            target = wanted.get(name)
            if target is None:
                if replace:
                    removals.append(RegistryChange.remove_domain(entry))
            elif attrs.evolve(target, domain=name) != entry and (
                replace or target.tenant == entry.tenant
            ):
                # Changed flags; or, only with replace, another tenant (without replace, the
                # addition alone is refused: the domain is claimed by its current tenant).
                removals.append(RegistryChange.remove_domain(entry))
        for name, entry in wanted.items():
            if current.get(name) != attrs.evolve(entry, domain=name):
                additions.append(RegistryChange.add_domain(entry))
        listed = {c.name: c for c in connectors}
        for name in self.connectors:
            if name not in listed and replace:
                removals.append(RegistryChange.remove_connector(name))
        for name, connector in listed.items():
            if self.connectors.get(name) != connector:
                additions.append(RegistryChange.add_connector(connector))
        return removals + additions
