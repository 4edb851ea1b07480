"""The compiled accepted-domain matcher: which tenant, if any, accepts mail for a domain.

Semantics
---------
An `AcceptedDomain` names a domain, the tenant that owns it, its `DomainType` and whether it
also covers subdomains (``match_subdomains``, Exchange's MatchSubDomains):

* ``contoso.com`` matches only ``contoso.com``;
* ``contoso.com`` with ``match_subdomains=True`` matches ``contoso.com`` and every name under it
  (``a.b.contoso.com``);
* ``*.contoso.com`` matches every name under ``contoso.com`` but **not** the apex
  ``contoso.com`` itself.  This is the DNS reading of a wildcard (RFC 4592: a wildcard never
  matches its own parent) and it lets the apex and the subdomains be configured separately; add
  ``contoso.com`` too (or use ``match_subdomains``) to cover both;
* matching is on label boundaries: ``evilcontoso.com`` never matches ``contoso.com``;
* the longest (most specific) *matching* entry wins: ``sales.contoso.com`` owned by tenant B
  beats ``contoso.com`` with subdomains owned by tenant A for ``sales.contoso.com`` (and for
  names under it only if B's entry also matches subdomains; otherwise those fall back to A);
* entries and queries are normalised with `normalize_domain` (case, one trailing dot, U-labels
  and A-labels are the same key).

Each configured base name ``B`` therefore has two *slots*: who answers for ``B`` itself (the
*apex* slot, filled by ``B``) and who answers for names strictly below ``B`` (the *below* slot,
filled by ``B`` with ``match_subdomains`` or by ``*.B``).  Compilation refuses a slot claimed by
two different entries: by two tenants (a domain is accepted in one tenant only, as in Exchange),
or by one tenant with conflicting flags.  Identical duplicates are merged.  ``contoso.com``
(exact) and ``*.contoso.com`` fill different slots, so they may coexist, even in different
tenants.

Representation, chosen by measurement
-------------------------------------
The compiled form is one flat ``dict`` keyed by the normalised base name (a "hash trie": one node
per configured suffix, no interior nodes).  A node is a shared tuple ``(apex, below)`` of shared
`Owner` values (tenant, type, how matched), interned at compile time so that thousands of domains
of one tenant point at the same few objects.  A lookup probes the query itself for the apex slot,
then strips the leftmost label (``str.partition``) and probes each parent for the below slot; the
first hit is the longest match, so hits usually cost a single dict probe and a miss costs one
probe per label (single-label suffixes are never probed: they cannot be accepted domains).  The
cost depends on the number of labels of the query, never on the number of entries.

We measured (``benchmarks/bench_matcher.py``, see ``docs/performance.md``) the alternatives on
the same entries and queries in one process:

* a *nested-dict trie* (one dict per label, walked from the right) needs one dict per node, a
  ~200-byte object even for one child, and must always walk the whole query to find the
  longest match: it is the slowest and by far the largest (about 3-4x our memory);
* a *flat dict with a label walk* (``split`` then ``".".join(labels[i:])`` per probe) has our
  memory footprint but pays a list and a join per probe;
* our suffix-stripping walk slices strings the C runtime has already scanned, and stops at the
  first (longest) hit.

Memory per domain is the key string plus one dict slot; nodes and owners are shared, and the
per-tenant index used by `DomainMatcher.domains_of` is built lazily on first use.

Snapshots
---------
`DomainMatcher.save` writes a versioned binary format that needs no code execution to read::

    line 1   b"domainpolicy-matcher/1\\n"           magic and format version
    line 2   JSON object + b"\\n"                     header: counts, byte lengths, tenants,
                                                      the interned node table, the tenant limit
    payload  keys: ASCII, joined by b"\\n"            the normalised base names, in table order
             index: little-endian uint32 per key      the node number of each key
    trailer  32 bytes                                 SHA-256 of line 2 and the payload

Loading checks the magic, the version, every length, the checksum and the node table before it
builds anything, and raises `InvalidSnapshot` otherwise.  The checksum detects corruption and
truncation, not tampering: protect snapshot files as you protect configuration.  Loading builds
the dict in C (``dict(zip(keys, map(...)))``) and is several times faster than compiling.

Thread safety: a `DomainMatcher` is immutable once built; `DomainMatcher.with_changes` returns a
new matcher (the table is copied, never mutated), so a server swaps one reference atomically.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import os
import sys
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Final, TypeAlias

import attrs

from ._errors import InvalidConfiguration, InvalidDomain, InvalidSnapshot, shown
from ._names import NormalizedDomain, normalize_domain, parse_address
from ._psl import PublicSuffixes, default_public_suffixes

__all__ = [
    "SNAPSHOT_VERSION",
    "AcceptedDomain",
    "DomainMatcher",
    "DomainType",
    "Match",
    "MatchKind",
    "Owner",
]


class DomainType(enum.StrEnum):
    """How a tenant handles mail for an accepted domain, as in Exchange."""

    AUTHORITATIVE = "authoritative"
    """All recipients are mailboxes of the tenant; unknown recipients are rejected."""
    INTERNAL_RELAY = "internal_relay"
    """Some recipients live elsewhere in the organisation; unknown ones are relayed on."""
    EXTERNAL_RELAY = "external_relay"
    """No recipients are hosted; all mail is relayed to an external server."""


class MatchKind(enum.StrEnum):
    """How a query matched its entry."""

    EXACT = "exact"
    """The query is the configured domain itself."""
    SUBDOMAIN = "subdomain"
    """The query is under a domain configured with ``match_subdomains=True``."""
    WILDCARD = "wildcard"
    """The query is under a ``*.domain`` entry."""


@attrs.frozen
class AcceptedDomain:
    """One accepted domain of one tenant, as configured.

    Attributes:
        domain: the domain in any spelling `normalize_domain` accepts, or the wildcard form
            ``*.contoso.com`` (every name under ``contoso.com``, not ``contoso.com`` itself).
        tenant: the opaque id of the owning tenant (non-empty).
        domain_type: how the tenant handles the domain.
        match_subdomains: also match every name under *domain* (Exchange's MatchSubDomains);
            must be False for a wildcard entry, which matches subdomains by definition.
    """

    domain: str
    tenant: str
    domain_type: DomainType = DomainType.AUTHORITATIVE
    match_subdomains: bool = False

    @property
    def is_wildcard(self) -> bool:
        """True for the ``*.base`` form."""
        return self.domain.startswith("*.")


@attrs.frozen(weakref_slot=False)
class Owner:
    """What a lookup needs for a relay decision: who owns the name, its type, and how it matched.

    Owners are shared between all domains of a tenant with the same type and kind, so the hot
    path (`DomainMatcher.lookup`) allocates nothing.
    """

    tenant: str
    domain_type: DomainType
    kind: MatchKind


@attrs.frozen
class Match:
    """The result of `DomainMatcher.match`: the query, the entry that matched it, and how.

    Attributes:
        domain: the normalised query.
        entry: the matching entry in canonical form (normalised domain, ``*.`` for wildcards).
        kind: exact, via ``match_subdomains``, or via a wildcard.
    """

    domain: NormalizedDomain
    entry: AcceptedDomain
    kind: MatchKind

    @property
    def tenant(self) -> str:
        """The tenant that accepts the domain."""
        return self.entry.tenant

    @property
    def domain_type(self) -> DomainType:
        """The type of the matching entry."""
        return self.entry.domain_type


_Node: TypeAlias = tuple[Owner | None, Owner | None]
_Table: TypeAlias = dict[str, _Node]

SNAPSHOT_VERSION: Final = 1
"""The snapshot format version `DomainMatcher.save` writes and `DomainMatcher.load` reads."""

_MAGIC: Final = b"domainpolicy-matcher/"
_DIGEST_BYTES: Final = 32
_LDH_DOT: Final = "abcdefghijklmnopqrstuvwxyz0123456789-."
_KEY_BYTES: Final = (_LDH_DOT + "\n").encode("ascii")
_EXACT = MatchKind.EXACT
_SUBDOMAIN = MatchKind.SUBDOMAIN
_WILDCARD = MatchKind.WILDCARD


def _quick_key(text: str) -> str | None:
    """The normalised form of pure-ASCII *text* when it is plainly a valid name, else None.

    Every condition implies `normalize_domain` returns exactly this string (the same shortcut
    ``_names._ascii_path`` takes, applied after removing one trailing dot); anything else
    (IDN, ``xn--``, long names, errors) goes to `normalize_domain`.  A test checks agreement.
    """
    key = text.lower()
    if key[-1:] == ".":
        key = key[:-1]
    if (
        len(key) <= 63
        and not key.strip(_LDH_DOT)
        and "." in key
        and key[0] not in ".-"
        and key[-1] > "9"
        and ".." not in key
        and "-." not in key
        and ".-" not in key
        and "--" not in key
    ):
        return key
    return None


def _public_check(suffixes: PublicSuffixes) -> Callable[[str], bool]:
    """Return a fast ``is_public(normalised_key)`` for *suffixes*.

    A name of two or more labels can only be public if it, ``*.`` + it or ``*.`` + its parent
    is a rule (see publicsuffixlist's ``_countpublic``); only then is the exact (slower) check
    asked.  Falls back to the exact check if the rule set is not where we expect it.
    """
    rules = getattr(getattr(suffixes, "_psl", None), "_publicsuffix", None)
    exact = suffixes.is_public
    if not isinstance(rules, frozenset):
        return exact

    def check(key: str) -> bool:
        parent = key.partition(".")[2]
        if not parent or key in rules or "*." + key in rules or "*." + parent in rules:
            return exact(key)
        return False

    return check


def _describe(position: int, entry: object) -> str:
    if isinstance(entry, AcceptedDomain):
        return f"entry #{position} ({shown(entry.domain)}, tenant {shown(entry.tenant)})"
    return f"entry #{position} ({shown(entry)})"


class _Builder:
    """Adds and removes entries on a table, collecting every problem instead of stopping."""

    __slots__ = ("counts", "is_public", "limit", "nodes", "owners", "problems", "table", "touched")

    def __init__(
        self,
        table: _Table,
        counts: dict[str, int],
        suffixes: PublicSuffixes,
        limit: int | None,
    ) -> None:
        self.table = table
        self.counts = counts
        self.is_public = _public_check(suffixes)
        self.limit = limit
        self.problems: list[str] = []
        self.owners: dict[tuple[str, str, str], Owner] = {}
        self.nodes: dict[tuple[int, int], _Node] = {}
        self.touched: set[str] = set()

    def owner(self, tenant: str, domain_type: DomainType, kind: MatchKind) -> Owner:
        key = (tenant, domain_type, kind)
        found = self.owners.get(key)
        if found is None:
            found = self.owners[key] = _new_owner(tenant, domain_type, kind)
        return found

    def node(self, apex: Owner | None, below: Owner | None) -> _Node:
        # Owners are interned (or already in the table), and each node keeps its owners alive,
        # so their ids are stable keys.
        key = (id(apex), id(below))
        found = self.nodes.get(key)
        if found is None:
            found = self.nodes[key] = (apex, below)
        return found

    def parse(self, position: int, entry: object) -> tuple[str, bool, AcceptedDomain] | None:
        """Check one entry; return (key, is_wildcard, entry) or record the problems."""
        if not isinstance(entry, AcceptedDomain):
            self.problems.append(
                f"{_describe(position, entry)}: expected an AcceptedDomain, "
                f"got {type(entry).__name__}"
            )
            return None
        domain: object = entry.domain
        tenant: object = entry.tenant
        ok = True
        if tenant.__class__ is not str or not tenant:
            self.problems.append(
                f"{_describe(position, entry)}: tenant {shown(tenant)} must be a non-empty str"
            )
            ok = False
        if entry.domain_type.__class__ is not DomainType:
            self.problems.append(
                f"{_describe(position, entry)}: domain_type {shown(entry.domain_type)} "
                "must be a DomainType"
            )
            ok = False
        subs: object = entry.match_subdomains
        if subs is not True and subs is not False:
            self.problems.append(
                f"{_describe(position, entry)}: match_subdomains {shown(subs)} must be a bool"
            )
            ok = False
        if domain.__class__ is not str:
            self.problems.append(
                f"{_describe(position, entry)}: domain {shown(domain)} must be a str"
            )
            return None
        wildcard = domain[:2] == "*."
        text = domain[2:] if wildcard else domain
        key = _quick_key(text) if text.isascii() else None
        if key is None:
            try:
                key = normalize_domain(text, allow_single_label=True)
            except InvalidDomain as exc:
                what = "wildcard base" if wildcard else "domain"
                self.problems.append(f"{_describe(position, entry)}: invalid {what}: {exc}")
                return None
        if self.is_public(key):
            what = "the base of a wildcard" if wildcard else "an accepted domain"
            self.problems.append(
                f"{_describe(position, entry)}: {key!r} is a public suffix and cannot be {what}"
            )
            return None
        if "." not in key:
            self.problems.append(
                f"{_describe(position, entry)}: {key!r} has a single label and cannot be accepted"
            )
            return None
        if wildcard and subs is True:
            self.problems.append(
                f"{_describe(position, entry)}: a wildcard entry already matches every "
                "subdomain; match_subdomains must be False"
            )
            return None
        return (key, wildcard, entry) if ok else None

    def add(self, position: int, key: str, wildcard: bool, entry: AcceptedDomain) -> None:
        tenant = entry.tenant
        dtype = entry.domain_type
        table = self.table
        node = table.get(key)
        if wildcard:
            apex = None
            below: Owner | None = self.owner(tenant, dtype, _WILDCARD)
        else:
            apex = self.owner(tenant, dtype, _EXACT)
            below = self.owner(tenant, dtype, _SUBDOMAIN) if entry.match_subdomains else None
        if node is None:
            table[key] = self.node(apex, below)
            self._count(tenant, 1)
            return
        old_apex, old_below = node
        if wildcard:
            if old_below is None:
                table[key] = self.node(old_apex, below)
                self._count(tenant, 1)
                return
            if old_below == below:
                return
            other: Owner | None = old_below
            name = f"*.{key}"
        else:
            old_exact_below = (
                old_below if old_below is not None and old_below.kind is _SUBDOMAIN else None
            )
            if old_apex is None:
                if below is None:
                    table[key] = self.node(apex, old_below)
                    self._count(tenant, 1)
                    return
                other = old_below  # the wildcard holds the below slot
                name = f"names under {key!r}"
            elif old_apex == apex and old_exact_below == below:
                return
            else:
                other = old_apex
                name = key
        assert other is not None
        if other.tenant != tenant:
            self.problems.append(
                f"{_describe(position, entry)}: {name!r} is already claimed by tenant "
                f"{other.tenant!r}; a domain can be accepted in one tenant only"
            )
        else:
            self.problems.append(
                f"{_describe(position, entry)}: {name!r} is already configured for tenant "
                f"{tenant!r} with different flags (conflicting duplicate entries)"
            )

    def _count(self, tenant: str, delta: int) -> None:
        self.counts[tenant] = self.counts.get(tenant, 0) + delta
        self.touched.add(tenant)

    def remove(self, position: int, item: object) -> None:
        """Remove an entry given as an `AcceptedDomain` or as its configured domain text."""
        if isinstance(item, AcceptedDomain):
            parsed = self.parse(position, item)
            if parsed is None:
                return
            key, wildcard, wanted = parsed
        elif isinstance(item, str):
            wildcard = item[:2] == "*."
            try:
                key = normalize_domain(item[2:] if wildcard else item)
            except InvalidDomain as exc:
                self.problems.append(f"removal #{position} ({shown(item)}): {exc}")
                return
            wanted = None
        else:
            self.problems.append(
                f"removal #{position} ({shown(item)}): expected an AcceptedDomain or a str, "
                f"got {type(item).__name__}"
            )
            return
        node = self.table.get(key)
        found: AcceptedDomain | None = None
        new_node: _Node = (None, None)
        if node is not None:
            apex, below = node
            if wildcard:
                if below is not None and below.kind is _WILDCARD:
                    found = _entry_for(key, True, node)
                new_node = (apex, None)
            else:
                if apex is not None:
                    found = _entry_for(key, False, node)
                new_node = (None, below if below is not None and below.kind is _WILDCARD else None)
        if found is None or (wanted is not None and found != _canonical(key, wanted)):
            self.problems.append(
                f"removal #{position} ({shown(item)}): no such entry is configured"
                + (f" (configured: {found!r})" if found is not None else "")
            )
            return
        if new_node == (None, None):
            del self.table[key]
        else:
            self.table[key] = self.node(*new_node)
        self._count(found.tenant, -1)

    def check_limits(self) -> None:
        limit = self.limit
        if limit is None:
            return
        for tenant in sorted(self.touched):
            count = self.counts.get(tenant, 0)
            if count > limit:
                self.problems.append(
                    f"tenant {tenant!r} has {count} accepted domains, more than the limit "
                    f"of {limit} per tenant"
                )


def _canonical(key: str, entry: AcceptedDomain) -> AcceptedDomain:
    wildcard = entry.is_wildcard
    return AcceptedDomain(
        f"*.{key}" if wildcard else key,
        entry.tenant,
        entry.domain_type,
        entry.match_subdomains and not wildcard,
    )


def _entry_for(key: str, wildcard: bool, node: _Node) -> AcceptedDomain:
    """The canonical entry that fills the apex (or, for *wildcard*, the below) slot of *node*."""
    apex, below = node
    if wildcard:
        assert below is not None
        return AcceptedDomain(f"*.{key}", below.tenant, below.domain_type, False)
    assert apex is not None
    subs = below is not None and below.kind is _SUBDOMAIN
    return AcceptedDomain(key, apex.tenant, apex.domain_type, subs)


def _node_entries(key: str, node: _Node) -> Iterator[AcceptedDomain]:
    apex, below = node
    if apex is not None:
        yield _entry_for(key, False, node)
    if below is not None and below.kind is _WILDCARD:
        yield _entry_for(key, True, node)


def _node_size(node: _Node) -> int:
    apex, below = node
    return (apex is not None) + (below is not None and below.kind is _WILDCARD)


class DomainMatcher:
    """An immutable, thread-safe, compiled set of accepted domains.

    Build one with `DomainMatcher.compile` (or `DomainMatcher.load` from a snapshot); derive a
    changed copy with `DomainMatcher.with_changes`.  Iteration yields the entries in canonical
    form, in the order they were first configured; ``len()`` counts entries.
    """

    __slots__ = ("_by_tenant", "_counts", "_limit", "_suffixes", "_table")

    def __init__(
        self,
        table: _Table,
        counts: dict[str, int] | None,
        *,
        limit: int | None,
        suffixes: PublicSuffixes | None,
    ) -> None:
        """Internal: use `DomainMatcher.compile` or `DomainMatcher.load`."""
        self._table: _Table = table
        self._counts = counts
        self._limit = limit
        self._suffixes = suffixes
        self._by_tenant: dict[str, tuple[str, ...]] | None = None

    # ------------------------------------------------------------------ building

    @classmethod
    def compile(
        cls,
        entries: Iterable[AcceptedDomain],
        *,
        public_suffixes: PublicSuffixes | None = None,
        max_domains_per_tenant: int | None = None,
    ) -> DomainMatcher:
        """Check and compile accepted-domain entries into a matcher.

        Args:
            entries: the accepted domains of every tenant, in any order.
            public_suffixes: the list used to refuse public suffixes (default: bundled).
            max_domains_per_tenant: refuse a tenant with more entries (Exchange allows 5000);
                None for no limit.

        Raises:
            InvalidConfiguration: one error listing every problem found: invalid domains or
                fields, public suffixes (``com``, ``co.uk``, ``github.io``) as a domain or a
                wildcard base, a name claimed by two tenants, conflicting duplicate entries,
                a tenant over the limit.
        """
        if max_domains_per_tenant is not None and (
            max_domains_per_tenant.__class__ is not int or max_domains_per_tenant < 1
        ):
            raise InvalidConfiguration(
                [
                    f"max_domains_per_tenant {shown(max_domains_per_tenant)} must be a "
                    "positive int or None"
                ]
            )
        suffixes = public_suffixes or default_public_suffixes()
        builder = _Builder({}, {}, suffixes, max_domains_per_tenant)
        try:
            iterator = iter(entries)
        except TypeError as exc:
            raise InvalidConfiguration([f"entries {shown(entries)} is not iterable"]) from exc
        parse = builder.parse
        add = builder.add
        for position, entry in enumerate(iterator):
            parsed = parse(position, entry)
            if parsed is not None:
                add(position, *parsed)
        builder.check_limits()
        if builder.problems:
            raise InvalidConfiguration(builder.problems)
        return cls(builder.table, builder.counts, limit=max_domains_per_tenant, suffixes=suffixes)

    def with_changes(
        self,
        *,
        add: Iterable[AcceptedDomain] = (),
        remove: Iterable[AcceptedDomain | str] = (),
    ) -> DomainMatcher:
        """Return a new matcher with *remove* taken out and then *add* put in (copy-on-write).

        This matcher is not changed, so a server can build the new one and swap its reference.
        The same rules as `compile` apply to the result, including the tenant limit.

        Args:
            add: entries to add; an entry identical to a configured one is a no-op.
            remove: entries to remove, as `AcceptedDomain` values (which must equal the
                configured entry) or as configured domain text (``contoso.com``,
                ``*.contoso.com``).

        Raises:
            InvalidConfiguration: one error listing every problem: removals of entries that are
                not configured, and everything `compile` refuses.
        """
        builder = _Builder(
            dict(self._table),
            dict(self._tenant_counts()),
            self._suffixes or default_public_suffixes(),
            self._limit,
        )
        for name, items in (("remove", remove), ("add", add)):
            if isinstance(items, str | AcceptedDomain):
                raise InvalidConfiguration(
                    [f"{name} {shown(items)} must be an iterable of entries, not a single one"]
                )
            try:
                listed = list(items)
            except TypeError as exc:
                raise InvalidConfiguration([f"{name} {shown(items)} is not iterable"]) from exc
            for position, item in enumerate(listed):
                if name == "remove":
                    builder.remove(position, item)
                else:
                    parsed = builder.parse(position, item)
                    if parsed is not None:
                        builder.add(position, *parsed)
        builder.check_limits()
        if builder.problems:
            raise InvalidConfiguration(builder.problems)
        counts = {tenant: count for tenant, count in builder.counts.items() if count > 0}
        return DomainMatcher(builder.table, counts, limit=self._limit, suffixes=self._suffixes)

    # ------------------------------------------------------------------ lookups

    def lookup(self, domain: object) -> tuple[Owner | None, str | None]:
        """The hot-path lookup: never raises, allocates nothing but the result tuple.

        Returns:
            ``(owner, None)`` for a valid domain, *owner* being None when no tenant accepts it;
            ``(None, reason)`` when *domain* is not a valid domain, *reason* being the
            `InvalidDomain` reason code (``empty_label``, ``not_text``...).

        Raises:
            Nothing: invalid input is reported in the result.
        """
        # normalize_domain's bounded LRU cache makes repeated names (the common case for an
        # MTA) one C-level cache hit; measured faster than an inline ASCII check.
        try:
            key = normalize_domain(domain)  # type: ignore[arg-type]
        except InvalidDomain as exc:
            return None, exc.reason
        get = self._table.get
        node = get(key)
        if node is not None and node[0] is not None:
            return node[0], None
        rest = key.partition(".")[2]
        while "." in rest:
            node = get(rest)
            if node is not None and node[1] is not None:
                return node[1], None
            rest = rest.partition(".")[2]
        return None, None

    def owner_of_normalized(self, domain: NormalizedDomain) -> Owner | None:
        """The `Owner` of a domain already in canonical form (from `normalize_domain` or
        `parse_address`), with no normalisation or validation: the fastest lookup.

        Passing text that is not canonical gives an unspecified (but not raising) answer.

        Raises:
            Nothing.
        """
        get = self._table.get
        node = get(domain)
        if node is not None and node[0] is not None:
            return node[0]
        rest = domain.partition(".")[2]
        while "." in rest:
            node = get(rest)
            if node is not None and node[1] is not None:
                return node[1]
            rest = rest.partition(".")[2]
        return None

    def _find(self, key: str) -> tuple[str, _Node, bool] | None:
        """(base, node, below?) of the longest entry matching the canonical *key*."""
        get = self._table.get
        node = get(key)
        if node is not None and node[0] is not None:
            return key, node, False
        rest = key.partition(".")[2]
        while "." in rest:
            node = get(rest)
            if node is not None and node[1] is not None:
                return rest, node, True
            rest = rest.partition(".")[2]
        return None

    def _match_key(self, key: NormalizedDomain) -> Match | None:
        found = self._find(key)
        if found is None:
            return None
        base, node, below = found
        owner = node[1] if below else node[0]
        assert owner is not None
        return Match(key, _entry_for(base, owner.kind is _WILDCARD, node), owner.kind)

    def match(self, domain: str) -> Match | None:
        """The entry that accepts *domain* (the longest match), or None.

        Raises:
            InvalidDomain: *domain* is not a valid domain (use `lookup` on hot paths).
        """
        return self._match_key(normalize_domain(domain))

    def match_address(self, address: str) -> Match | None:
        """The entry that accepts the domain of an SMTP address, or None.

        The null reverse-path and address literals (``user@[192.0.2.1]``) have no domain and
        give None.

        Raises:
            InvalidAddress: *address* is not a valid SMTP path or mailbox.
        """
        parsed = parse_address(address)
        if parsed.domain is None:
            return None
        return self._match_key(parsed.domain)

    def tenant_of(self, domain: str) -> str | None:
        """The tenant that accepts *domain*, or None.

        Raises:
            InvalidDomain: *domain* is not a valid domain.
        """
        owner, reason = self.lookup(domain)
        if reason is not None:
            normalize_domain(domain)  # raises the full InvalidDomain
        return None if owner is None else owner.tenant

    def accepts(self, tenant: str, domain: str) -> bool:
        """True if *tenant* is the tenant that accepts *domain*.

        Raises:
            InvalidDomain: *domain* is not a valid domain.
        """
        return self.tenant_of(domain) == tenant

    def _tenant_index(self) -> dict[str, tuple[str, ...]]:
        index = self._by_tenant
        if index is None:
            building: dict[str, list[str]] = {}
            for key, (apex, below) in self._table.items():
                if apex is not None:
                    building.setdefault(apex.tenant, []).append(key)
                if below is not None and below.kind is _WILDCARD and (
                    apex is None or below.tenant != apex.tenant
                ):
                    building.setdefault(below.tenant, []).append(key)
            # Benign race: two threads may build equal indexes; the assignment is atomic.
            index = self._by_tenant = {t: tuple(keys) for t, keys in building.items()}
        return index

    def domains_of(self, tenant: str) -> tuple[AcceptedDomain, ...]:
        """The entries of *tenant* in canonical form (empty for an unknown tenant).

        The per-tenant index is built on the first call (one pass over the table).

        Raises:
            Nothing.
        """
        keys = self._tenant_index().get(tenant, ()) if isinstance(tenant, str) else ()
        table = self._table
        return tuple(
            entry for key in keys for entry in _node_entries(key, table[key])
            if entry.tenant == tenant
        )

    def tenants(self) -> frozenset[str]:
        """Every tenant with at least one entry.

        Raises:
            Nothing.
        """
        return frozenset(self._tenant_counts())

    def covering_tenants(self, domain: NormalizedDomain) -> frozenset[str]:
        """Tenants of the entries at the nearest configured base name at or above *domain*,
        ignoring ``match_subdomains`` (used to decide whether a name is "under" a tenant's
        accepted domains, as for connector certificate names).

        Raises:
            Nothing.
        """
        get = self._table.get
        rest: str = domain
        while "." in rest:
            node = get(rest)
            if node is not None:
                return frozenset(o.tenant for o in node if o is not None)
            rest = rest.partition(".")[2]
        return frozenset()

    def _tenant_counts(self) -> dict[str, int]:
        counts = self._counts
        if counts is None:
            counts = {}
            values = self._table.values()
            by_id = dict(zip(map(id, values), values, strict=True))
            for ident, uses in Counter(map(id, values)).items():
                apex, below = by_id[ident]
                if apex is not None:
                    counts[apex.tenant] = counts.get(apex.tenant, 0) + uses
                if below is not None and below.kind is _WILDCARD:
                    counts[below.tenant] = counts.get(below.tenant, 0) + uses
            self._counts = counts  # benign race: equal results, atomic assignment
        return counts

    def __len__(self) -> int:
        return sum(self._tenant_counts().values())

    def __iter__(self) -> Iterator[AcceptedDomain]:
        for key, node in self._table.items():
            yield from _node_entries(key, node)

    def __contains__(self, entry: object) -> bool:
        if not isinstance(entry, AcceptedDomain) or entry.domain.__class__ is not str:
            return False
        wildcard = entry.is_wildcard
        try:
            key = normalize_domain(entry.domain[2:] if wildcard else entry.domain)
        except InvalidDomain:
            return False
        node = self._table.get(key)
        if node is None or node[1 if wildcard else 0] is None:
            return False
        if wildcard and node[1] is not None and node[1].kind is not _WILDCARD:
            return False
        return _entry_for(key, wildcard, node) == _canonical(key, entry)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DomainMatcher):
            return NotImplemented
        return self._limit == other._limit and self._table == other._table

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"<DomainMatcher {len(self)} entries, {len(self._tenant_counts())} tenants, "
            f"{len(self._table)} names>"
        )

    # ------------------------------------------------------------------ snapshots

    def to_bytes(self) -> bytes:
        """The snapshot `save` writes, as bytes (format in the module docs).

        Raises:
            Nothing.
        """
        return b"".join(self._snapshot_parts())

    def _snapshot_parts(self) -> list[bytes]:
        values = self._table.values()
        node_ids: dict[int, int] = {}
        nodes: list[_Node] = []
        for node in dict(zip(map(id, values), values, strict=True)).values():
            node_ids[id(node)] = len(nodes)
            nodes.append(node)
        index = array("I", map(node_ids.__getitem__, map(id, values)))
        tenant_ids: dict[str, int] = {}
        owner_ids: dict[int, int] = {}
        owner_rows = array("I")  # tenant number, type code, kind code per owner
        node_rows = array("I")  # apex owner + 1, below owner + 1 per node (0: none)

        def owner_number(owner: Owner | None) -> int:
            if owner is None:
                return 0
            number = owner_ids.get(id(owner))
            if number is None:
                number = owner_ids[id(owner)] = len(owner_ids) + 1
                owner_rows.extend(
                    (
                        tenant_ids.setdefault(owner.tenant, len(tenant_ids)),
                        _TYPE_CODES.index(owner.domain_type),
                        _KIND_CODES.index(owner.kind),
                    )
                )
            return number

        for apex, below in nodes:
            node_rows.extend((owner_number(apex), owner_number(below)))
        if sys.byteorder != "little":  # pragma: no cover - big-endian hosts
            for numbers in (index, owner_rows, node_rows):
                numbers.byteswap()
        blobs = [
            "\n".join(self._table).encode("ascii"),
            index.tobytes(),
            owner_rows.tobytes(),
            node_rows.tobytes(),
        ]
        header = {
            "format": "domainpolicy-matcher",
            "version": SNAPSHOT_VERSION,
            "names": len(self._table),
            "owners": len(owner_ids),
            "nodes": len(nodes),
            "blob_bytes": [len(blob) for blob in blobs],
            "max_domains_per_tenant": self._limit,
            "tenants": list(tenant_ids),
        }
        head = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"
        digest = hashlib.sha256(head)
        for blob in blobs:
            digest.update(blob)
        return [_MAGIC + b"%d\n" % SNAPSHOT_VERSION, head, *blobs, digest.digest()]

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a snapshot (format version `SNAPSHOT_VERSION`, see the module docs) to *path*.

        The file is written next to *path* and renamed over it, so readers never see half a
        snapshot.

        Raises:
            InvalidSnapshot: the file cannot be written (``__cause__`` is the ``OSError``).
        """
        parts = self._snapshot_parts()
        name = os.fspath(path)
        temporary = f"{name}.tmp-{os.getpid()}"
        try:
            with open(temporary, "wb") as handle:
                handle.writelines(parts)
            os.replace(temporary, name)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise InvalidSnapshot(f"cannot write snapshot {name!r}: {exc}") from exc

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], *, public_suffixes: PublicSuffixes | None = None
    ) -> DomainMatcher:
        """Read a snapshot written by `save`; no code in the file is ever executed.

        Args:
            path: the snapshot file.
            public_suffixes: the list later `with_changes` calls check against (default:
                bundled).

        Raises:
            InvalidSnapshot: the file cannot be read, is not a matcher snapshot, has an
                unsupported version, is truncated or corrupt (checksum, lengths, tables).
        """
        name = os.fspath(path)
        try:
            with open(name, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            raise InvalidSnapshot(f"cannot read snapshot {name!r}: {exc}") from exc
        return cls.from_bytes(data, public_suffixes=public_suffixes, source=name)

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        *,
        public_suffixes: PublicSuffixes | None = None,
        source: str = "<bytes>",
    ) -> DomainMatcher:
        """Read a snapshot from bytes (see `load`).

        Raises:
            InvalidSnapshot: *data* is not a valid snapshot; the message names the rule broken.
        """

        def bad(rule: str) -> InvalidSnapshot:
            return InvalidSnapshot(f"snapshot {source!r} is not usable: {rule}")

        if not isinstance(data, bytes):
            raise bad(f"expected bytes, got {type(data).__name__}")
        if not data.startswith(_MAGIC):
            raise bad(f"it does not start with {_MAGIC!r} (not a matcher snapshot)")
        first_end = data.find(b"\n", 0, 64)
        if first_end < 0:
            raise bad("the format line is truncated")
        version_text = data[len(_MAGIC) : first_end]
        if version_text != b"%d" % SNAPSHOT_VERSION:
            raise bad(
                f"format version {version_text.decode('ascii', 'replace')!r} is not supported "
                f"(this library reads version {SNAPSHOT_VERSION})"
            )
        end = len(data) - _DIGEST_BYTES
        if end < first_end + 1:
            raise bad("the file is truncated (no room for the checksum)")
        if hashlib.sha256(memoryview(data)[first_end + 1 : end]).digest() != data[end:]:
            raise bad("the SHA-256 checksum does not match (corrupt or truncated file)")
        head_end = data.find(b"\n", first_end + 1, end)
        if head_end < 0:
            raise bad("the header line is truncated")
        try:
            header = json.loads(data[first_end + 1 : head_end])
            return cls._build(data, head_end + 1, end, header, public_suffixes)
        except InvalidSnapshot as exc:
            raise bad(str(exc)) from exc
        except (KeyError, TypeError, ValueError, IndexError, RecursionError) as exc:
            raise bad(f"the header or a table is malformed: {exc!r}") from exc

    @classmethod
    def _build(
        cls,
        data: bytes,
        start: int,
        end: int,
        header: object,
        public_suffixes: PublicSuffixes | None,
    ) -> DomainMatcher:
        if not isinstance(header, dict) or header.get("format") != "domainpolicy-matcher":
            raise InvalidSnapshot("the header is not a matcher header")
        names = _nonneg(header, "names")
        owner_count = _nonneg(header, "owners")
        node_count = _nonneg(header, "nodes")
        sizes = header["blob_bytes"]
        if not (
            isinstance(sizes, list)
            and len(sizes) == 4
            and all(n.__class__ is int and n >= 0 for n in sizes)
        ):
            raise InvalidSnapshot(f"blob_bytes {shown(sizes)} is not four byte counts")
        if start + sum(sizes) != end:
            raise InvalidSnapshot("the payload length does not match the header")
        expected = [sizes[0], 4 * names, 12 * owner_count, 8 * node_count]
        if sizes != expected or (not names and sizes[0]):
            raise InvalidSnapshot(f"table sizes {sizes} do not match the counts in the header")
        limit = header["max_domains_per_tenant"]
        if limit is not None and (limit.__class__ is not int or limit < 1):
            raise InvalidSnapshot(f"max_domains_per_tenant {shown(limit)} is not a positive int")
        tenants = header["tenants"]
        if not isinstance(tenants, list) or not all(t.__class__ is str and t for t in tenants):
            raise InvalidSnapshot("tenants must be a list of non-empty strings")
        offsets = [start]
        for size in sizes:
            offsets.append(offsets[-1] + size)
        blob = data[offsets[0] : offsets[1]]
        if blob.translate(None, _KEY_BYTES):
            raise InvalidSnapshot("the names hold bytes other than letters, digits, '-', '.'")
        tables = []
        for number in (1, 2, 3):
            table_array = array("I")
            table_array.frombytes(data[offsets[number] : offsets[number + 1]])
            if sys.byteorder != "little":  # pragma: no cover - big-endian hosts
                table_array.byteswap()
            tables.append(table_array)
        index, owner_rows, node_rows = tables
        owners: list[Owner | None] = [None]
        for row in range(owner_count):
            tenant, type_code, kind_code = owner_rows[3 * row : 3 * row + 3]
            if tenant >= len(tenants) or type_code >= 3 or kind_code >= 3:
                raise InvalidSnapshot(f"owner #{row} has out-of-range numbers")
            owners.append(
                _new_owner(tenants[tenant], _TYPE_CODES[type_code], _KIND_CODES[kind_code])
            )
        nodes: list[_Node] = []
        for row in range(node_count):
            apex_number, below_number = node_rows[2 * row : 2 * row + 2]
            if apex_number > owner_count or below_number > owner_count:
                raise InvalidSnapshot(f"node #{row} refers to a missing owner")
            apex, below = owners[apex_number], owners[below_number]
            if (
                (apex is None and below is None)
                or (apex is not None and apex.kind is not _EXACT)
                or (below is not None and below.kind is _EXACT)
            ):
                raise InvalidSnapshot(f"node #{row} has an impossible shape")
            nodes.append((apex, below))
        keys = blob.decode("ascii").split("\n") if names else []
        if len(keys) != names:
            raise InvalidSnapshot(f"{len(keys)} names found where the header says {names}")
        if names and max(index) >= node_count:
            raise InvalidSnapshot(f"node number {max(index)} is out of range")
        table: _Table = dict(zip(keys, map(nodes.__getitem__, index), strict=True))
        if len(table) != names:
            raise InvalidSnapshot("a name appears twice")
        return cls(table, None, limit=limit, suffixes=public_suffixes)


_TYPE_CODES: Final = tuple(DomainType)
_KIND_CODES: Final = tuple(MatchKind)
_set_field = object.__setattr__


def _new_owner(tenant: str, domain_type: DomainType, kind: MatchKind) -> Owner:
    """Owner(...) without the attrs ``__init__`` overhead (values are trusted here)."""
    owner = object.__new__(Owner)
    _set_field(owner, "tenant", tenant)
    _set_field(owner, "domain_type", domain_type)
    _set_field(owner, "kind", kind)
    return owner


def _nonneg(header: dict[str, object], field: str) -> int:
    value = header[field]
    if not isinstance(value, int) or value.__class__ is not int or value < 0:
        raise InvalidSnapshot(f"{field} {shown(value)} is not a non-negative int")
    return value
