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
  first (longest) hit.  ``str.find`` index walking (one slice per probe, no tuple) and two
  separate apex/below dicts were measured too and were not reliably faster on this machine,
  while two dicts cost memory for every key with subdomains; the table's bound ``get`` is
  kept on the matcher, and `DomainMatcher.lookup` probes `normalize_domain`'s cache inline;
* a *compact* layout with no object per name (the names in one ``bytes`` blob, a CRC-32
  open-addressing table in ``array`` columns; ``benchmarks/compact_table.py``) loads a
  snapshot ten times faster than any dict of the names can be built and takes about 60 bytes
  per domain, but a pure-Python probe (encode, CRC, array reads, an in-place compare) costs
  several C-level dict probes: it answered at 0.34-0.59x the flat label walk.

Memory per domain is the key string plus one dict slot; nodes and owners are shared, and the
per-tenant index used by `DomainMatcher.domains_of` is built lazily on first use.  What is left
is per tenant: its id string, one `Owner` per (type, kind) it uses and one node tuple per
distinct (apex, below) pair, so the figure per domain depends on the domains per tenant.

Building, chosen by profiling
-----------------------------
Profiling `DomainMatcher.compile` on 1M entries showed the time spread over per-entry Python
work: parsing (`_quick_key`, and `normalize_domain` for IDN names, which also filled its bounded
cache with configuration names), the public-suffix check, the owner and node interning
(hashing ``DomainType``/``MatchKind`` keys calls ``Enum.__hash__``, Python code), the tenant
counts, and the cyclic garbage collector, started every 700 new owners or nodes and walking
every live object of the process each time it reached the oldest generation.  `compile`
therefore first tries a batch path (`_compile_batch`) made of C-level loops over the whole
configuration:

* the four fields of every entry are read with ``map(attrgetter(...))`` and type-checked as
  sets of types;
* all names are joined into one blob, lower-cased, stripped of ``*.`` and of one trailing dot,
  and split again; `_quick_key`'s conditions are checked on the blob (``bytes.translate`` for
  the alphabet, one search for ``..``/``-.``/``.-``/``--``/leading ``.``/``-`` after reading
  ``-`` as ``.``) and per line with C-level ``map`` (a dot, the length, a final letter); only
  the names failing them (IDN, ``xn--``, long or invalid ones) go through the uncached
  normaliser, which gives `normalize_domain`'s answer without churning its cache;
* each entry gets a small *shape code* (its type, and exact, exact with subdomains or
  wildcard) from one dict probe; per shape code in use (a handful, however many tenants), the
  tenants using it get their owners and nodes in C-level loops, every tenant keeping one
  tenant string (the first configured: a large configuration often repeats equal strings),
  and the table is ``dict(zip(keys, map(...)))``;
* the public-suffix pre-filter of `_public_check` runs once for all keys (set intersections
  with the rules, plus the set of distinct parents against the ``*.`` rules);
* keys configured more than once (``contoso.com`` next to ``*.contoso.com``) are replayed
  through `_Builder`'s slot rules, so merging and conflicts behave exactly as before;
* the garbage collector is paused while the matcher's objects are built (`_gc_paused`).

Anything unusual (a problem to report, a custom suffix list) makes the batch path give up and
the entry-by-entry `_Builder` run instead; it produces the same table and the full list of
problems.  A property test checks that both paths agree.  Internationalised names are kept
out of the blob (a placeholder stands in, so it stays one byte per character) and go through
the normaliser one by one, a few microseconds each through its IDN shortcuts.  What remains of
a large compile is C-level loops over the entries, each linear: reading their fields, the
string checks, the dict.

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
everything with C-level loops: the owners from the owner rows (``object.__new__`` and the slot
descriptors mapped over columns), the node shapes checked as byte strings, the nodes with
``zip``, the names with one ``decode().split("\n")`` and the table with
``dict(zip(keys, map(nodes.__getitem__, index)))``, with the garbage collector paused.  It is
many times faster than compiling.

Thread safety: a `DomainMatcher` is immutable once built; `DomainMatcher.with_changes` returns a
new matcher (the table is copied, never mutated), so a server swaps one reference atomically.

Why one file
------------
The matcher is one data layout (the owner and node tuples, the folded key blob of a batch) read
by three paths: the lookups, the compiler and the snapshot reader.  Each path is tuned against
the exact shape of that layout (C-level ``map``/``compress`` pipelines over it, positions in the
owner tuples), so a change of the layout is one change in one file, reviewed and measured as a
whole; split by path, every layout change would touch three modules that must agree
byte-for-byte.
"""

from __future__ import annotations

import contextlib
import enum
import gc
import hashlib
import json
import os
import sys
from array import array
from bisect import bisect_right
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from itertools import accumulate, compress, filterfalse, repeat
from operator import add, attrgetter, contains, eq, getitem, itemgetter, not_
from typing import Final, TypeAlias

import attrs

from ._errors import InvalidConfiguration, InvalidDomain, InvalidSnapshot, shown
from ._names import (
    _LDH_DOT,
    NormalizedDomain,
    _check_input,
    _normalize_miss,
    _normalize_uncached,
    _plain_key,
    _results_get,
    normalize_domain,
    parse_address,
)
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
_KEY_BYTES: Final = (_LDH_DOT + "\n").encode("ascii")
_EXACT = MatchKind.EXACT
_SUBDOMAIN = MatchKind.SUBDOMAIN
_WILDCARD = MatchKind.WILDCARD


def _quick_key(text: str) -> str | None:
    """The normalised form of pure-ASCII *text* when it is plainly a valid name, else None.

    The test is ``_names._plain_key``, the shortcut ``normalize_domain``'s ASCII path takes, so
    the answer is exactly `normalize_domain`'s; anything else (IDN, ``xn--``, long names,
    errors) goes to `normalize_domain`.
    """
    return _plain_key(text.lower())


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
        self.owners: dict[tuple[str, int, int], Owner] = {}
        self.nodes: dict[tuple[int, int], _Node] = {}
        self.touched: set[str] = set()

    def owner(self, tenant: str, domain_type: DomainType, kind: MatchKind) -> Owner:
        # Enum members are singletons; their ids hash in C (Enum.__hash__ is Python code).
        key = (tenant, id(domain_type), id(kind))
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


_cached_domain: Final = _results_get
"""``normalize_domain``'s result cache, probed directly by `DomainMatcher.lookup`."""
_GET_DOMAIN: Final = attrgetter("domain")
_GET_TENANT: Final = attrgetter("tenant")
_GET_TYPE: Final = attrgetter("domain_type")
_GET_SUBS: Final = attrgetter("match_subdomains")
_LAST_CHAR: Final = slice(-1, None)
_LETTERS: Final = frozenset("abcdefghijklmnopqrstuvwxyz")
_FOLD: Final = bytes.maketrans(b"-0123456789", b".0000000000")


_SHAPE_OF: Final = {
    (id(domain_type), wildcard, id(subs)): (number * 3 + (2 if wildcard else subs))
    for number, domain_type in enumerate(DomainType)
    for wildcard, subs in ((False, False), (False, True), (True, False))
}
"""(id(domain type), wildcard, id(match_subdomains)) -> shape code: 3 * type number + 0 (exact
only), 1 (exact and subdomains) or 2 (wildcard).  Keyed by ids, so a value that is not a
`DomainType` or not a bool (``1`` equals ``True``) is missing, as is a wildcard with
match_subdomains."""


def _shape_nodes(
    codes: list[int], tenants: list[str]
) -> tuple[list[dict[str, _Node]], dict[tuple[DomainType, MatchKind], dict[str, Owner]]]:
    """For each shape code, the node of every tenant using it; and the owners by (type, kind).

    Owners and nodes are shared exactly as `_Builder.add` shares them: one owner per (tenant,
    type, kind), one node per (apex owner, below owner), and one tenant string per tenant
    (the first one configured).  Every loop is C-level, once per shape code in use (a
    large configuration has hundreds of thousands of tenants but only a few shape codes).
    """
    first = dict.fromkeys(tenants)
    canonical: dict[str, str] = dict(zip(first, first, strict=True))
    del first
    owners: dict[tuple[DomainType, MatchKind], dict[str, Owner]] = {}

    def owners_for(
        domain_type: DomainType, kind: MatchKind, wanted: dict[str, None]
    ) -> dict[str, Owner]:
        known = owners.setdefault((domain_type, kind), {})
        new = list(map(canonical.__getitem__, filterfalse(known.__contains__, wanted)))
        known.update(
            zip(new, _new_owners(new, [domain_type] * len(new), [kind] * len(new)), strict=True)
        )
        return known

    nodes: list[dict[str, _Node]] = [{} for _ in range(3 * len(_TYPE_CODES))]
    for code in sorted(set(codes)):
        domain_type = _TYPE_CODES[code // 3]
        shape = code % 3
        wanted = dict.fromkeys(compress(tenants, map(eq, codes, repeat(code))))
        made: Iterable[_Node]
        if shape == 2:
            below = owners_for(domain_type, _WILDCARD, wanted)
            made = zip(repeat(None), map(below.__getitem__, wanted), strict=False)
        else:
            apex = owners_for(domain_type, _EXACT, wanted)
            if shape == 1:
                below = owners_for(domain_type, _SUBDOMAIN, wanted)
                made = zip(
                    map(apex.__getitem__, wanted), map(below.__getitem__, wanted), strict=True
                )
            else:
                made = zip(map(apex.__getitem__, wanted), repeat(None), strict=False)
        nodes[code] = dict(zip(wanted, made, strict=False))
    return nodes, owners


def _lines_with(blob: str, needle: str, starts: list[int]) -> Iterator[int]:
    """Numbers of the lines of *blob* (line i starts at ``starts[i]``) holding *needle*."""
    found = blob.find(needle)
    while found >= 0:
        yield bisect_right(starts, found + 1) - 1
        found = blob.find(needle, found + 1)


def _batch_keys(domains: list[str], wild: list[bool]) -> list[str] | None:
    """The normalised key of every domain (``*.`` removed), or None if one is invalid.

    The common case is checked for all names at once with C-level string operations on one
    joined blob (exactly `_quick_key`'s conditions); the few other names (IDN, ``xn--``, long
    or suspicious ones) go through the uncached normalisation, which gives the result
    `normalize_domain` would without filling its bounded cache with configuration names.
    """
    count = len(domains)
    joined = "\n".join(domains)
    if joined.count("\n") != count - 1:
        return None  # a name holds a line feed: invalid, the builder reports it
    numbers = range(count)
    bad: set[int] = set()
    if not joined.isascii():
        # Non-ASCII names go to the normaliser below.  A placeholder stands in for them in the
        # blob, which stays one byte per character: a single CJK name would make the blob two
        # bytes per character, and every operation on it slower.
        bad.update(compress(numbers, map(not_, map(str.isascii, domains))))
        plain = domains.copy()
        for number in bad:
            plain[number] = "x.x"
        joined = "\n".join(plain)
        del plain
    blob = ("\n" + joined + "\n").lower().replace("\n*.", "\n").replace(".\n", "\n")
    del joined
    lines = blob[1:-1].split("\n")
    if len(lines) != count:  # pragma: no cover - cannot happen (lower() adds no line feed)
        return None
    # Bytes other than letters, digits, '-', '.', '\n': some name needs a closer look.
    encoded = blob.encode("ascii")
    if encoded.translate(None, _KEY_BYTES):
        bad.update(compress(numbers, map(str.strip, lines, repeat(_LDH_DOT))))
    dotted = list(map(contains, lines, repeat(".")))
    if not all(dotted):
        bad.update(compress(numbers, map(not_, dotted)))
    del dotted
    if max(map(len, lines)) > 63:
        bad.update(number for number, line in enumerate(lines) if len(line) > 63)
    # One translation serves the remaining checks: letters stay, digits become '0', '-' becomes
    # '.', so a name ending in a digit or '-' shows as '0\n' or '.\n' ('-' at the end of a
    # label, '..', '-.', '.-', '--' and a name starting with '.' or '-' all show as '..' or
    # '\n.').
    folded = encoded.translate(_FOLD)
    del encoded
    if b"0\n" in folded or b".\n" in folded:
        lasts = list(map(getitem, lines, repeat(_LAST_CHAR)))
        bad.update(compress(numbers, map(not_, map(_LETTERS.__contains__, lasts))))
        del lasts
    if b".." in folded or b"\n." in folded:
        needles = [n for n in ("..", "-.", ".-", "--", "\n.", "\n-") if n in blob]
        starts = list(accumulate(map(add, map(len, lines), repeat(1)), initial=1))
        for needle in needles:
            bad.update(_lines_with(blob, needle, starts))
    for number in bad:
        text = domains[number][2:] if wild[number] else domains[number]
        try:
            key = _normalize_uncached(_check_input(text, InvalidDomain))
        except InvalidDomain:
            return None
        if "." not in key:
            return None  # a single label: refused, the builder says why
        lines[number] = key
    return lines


def _maybe_public(table: _Table, suffixes: PublicSuffixes) -> bool | None:
    """True if a key of *table* is a public suffix, None if that cannot be told quickly.

    The same pre-filter as `_public_check`, for all keys at once: only a key that is a rule,
    the base of a ``*.`` rule, or directly under the base of a ``*.`` rule is asked.
    """
    rules = getattr(getattr(suffixes, "_psl", None), "_publicsuffix", None)
    if not isinstance(rules, frozenset):
        return None
    known = _WILD_BASES.get(id(rules))
    if known is None or known[0] is not rules:
        known = _WILD_BASES[id(rules)] = (rules, {r[2:] for r in rules if r[:2] == "*."})
    wild_bases = known[1]
    if len(table) < len(rules):
        suspects = [key for key in table if key in rules or key in wild_bases]
    else:
        suspects = [rule for rule in rules if rule in table]
        suspects.extend(base for base in wild_bases if base in table)
    parents = set(map(itemgetter(2), map(str.partition, table, repeat("."))))
    if not parents.isdisjoint(wild_bases):
        suspects.extend(key for key in table if key.partition(".")[2] in wild_bases)
    return any(map(suffixes.is_public, suspects))


_WILD_BASES: dict[int, tuple[frozenset[str], set[str]]] = {}
"""id(rules) -> (rules, the bases of its ``*.`` rules); few lists exist per process."""


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a matcher builds its many small objects.

    Building a large matcher allocates hundreds of thousands of owners and nodes; each 700
    allocations start a collection that walks the young objects, and the oldest generation,
    which holds every live object of the process (the configuration entries included), is
    walked again and again: at 1M entries this more than doubled the build time.  The
    objects built here hold no reference cycles, so nothing is left for the collector; the
    previous state is restored on exit (another thread that enables the collector meanwhile
    merely shortens the pause).
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _count_tenants(table: _Table) -> dict[str, int]:
    """Entries per tenant in *table* (one pass over the distinct nodes)."""
    counts: dict[str, int] = {}
    values = table.values()
    by_id = dict(zip(map(id, values), values, strict=True))
    for ident, uses in Counter(map(id, values)).items():
        apex, below = by_id[ident]
        if apex is not None:
            counts[apex.tenant] = counts.get(apex.tenant, 0) + uses
        if below is not None and below.kind is _WILDCARD:
            counts[below.tenant] = counts.get(below.tenant, 0) + uses
    return counts


def _compile_batch(
    items: list[AcceptedDomain], suffixes: PublicSuffixes, limit: int | None
) -> tuple[_Table, dict[str, int] | None] | None:
    """Compile valid *items* with C-level batch operations; None if anything is unusual.

    Gives the table `_Builder` would (same keys in the same order, equal interned nodes) when
    the configuration has no problem; on any doubt it returns None and the caller runs the
    entry-by-entry builder, which reports the problems.
    """
    count = len(items)
    if not count:
        return {}, {}
    if set(map(type, items)) != {AcceptedDomain}:
        return None
    entries = items
    domains: list[str] = list(map(_GET_DOMAIN, entries))
    tenants: list[str] = list(map(_GET_TENANT, entries))
    if set(map(type, domains)) != {str} or set(map(type, tenants)) != {str} or "" in tenants:
        return None
    wild = list(map(str.startswith, domains, repeat("*.")))
    type_ids = map(id, map(_GET_TYPE, entries))
    subs_ids = map(id, map(_GET_SUBS, entries))
    try:
        codes = list(map(_SHAPE_OF.__getitem__, zip(type_ids, wild, subs_ids, strict=True)))
    except KeyError:
        return None  # not a DomainType, not a bool, or a wildcard with subdomains
    keys = _batch_keys(domains, wild)
    if keys is None:
        return None
    del domains
    nodes, owners = _shape_nodes(codes, tenants)
    table = dict(zip(keys, map(getitem, map(nodes.__getitem__, codes), tenants), strict=True))
    if len(table) != count:
        # Some keys are configured more than once (``contoso.com`` and ``*.contoso.com``,
        # duplicates): replay their entries, in order, through the builder's slot rules, with
        # the owners and nodes made above so that sharing is the same.
        builder = _Builder({}, {}, suffixes, limit)
        for (domain_type, kind), by_tenant in owners.items():
            ids = zip(by_tenant, repeat(id(domain_type)), repeat(id(kind)), strict=False)
            builder.owners.update(zip(ids, by_tenant.values(), strict=True))
        for by_tenant_nodes in nodes:
            made = list(by_tenant_nodes.values())
            apex_ids = map(id, map(itemgetter(0), made))
            below_ids = map(id, map(itemgetter(1), made))
            builder.nodes.update(zip(zip(apex_ids, below_ids, strict=True), made, strict=True))
        repeated = {key for key, uses in Counter(keys).items() if uses > 1}
        scratch: _Table = {}
        builder.table = scratch
        for number in compress(range(count), map(repeated.__contains__, keys)):
            builder.add(number, keys[number], wild[number], entries[number])
        if builder.problems:
            return None
        table.update(scratch)  # existing keys: values replaced, order kept
    if _maybe_public(table, suffixes) is not False:
        return None
    counts = None
    if limit is not None:
        counts = _count_tenants(table)
        if max(counts.values(), default=0) > limit:
            return None
    return table, counts


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

    __slots__ = ("_by_tenant", "_counts", "_get", "_limit", "_suffixes", "_table")

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
        self._get = table.get  # bound once: one attribute load per lookup instead of two
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
        try:
            iterator = iter(entries)
        except TypeError as exc:
            raise InvalidConfiguration([f"entries {shown(entries)} is not iterable"]) from exc
        items: list[AcceptedDomain] = list(iterator)
        with _gc_paused():
            fast = _compile_batch(items, suffixes, max_domains_per_tenant)
        if fast is not None:
            return cls(fast[0], fast[1], limit=max_domains_per_tenant, suffixes=suffixes)
        # Something is unusual (a problem to report, most likely): the entry-by-entry builder
        # gives the same table and collects every problem with its position.
        iterator = iter(items)
        builder = _Builder({}, {}, suffixes, max_domains_per_tenant)
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

        Never raises: invalid input is reported in the result.
        """
        # normalize_domain's bounded cache makes repeated names (the common case for an MTA)
        # one C-level dict hit; probing that cache here saves the call.  A miss (or an
        # unhashable value) goes straight to normalize_domain's miss path, which validates,
        # normalises and remembers; a single-label name is refused as normalize_domain does.
        try:
            key = _cached_domain(domain)  # type: ignore[call-overload]
        except TypeError:
            key = None
        if key is None:
            try:
                key = _normalize_miss(domain)
            except InvalidDomain as exc:
                return None, exc.reason
        if "." not in key:
            return None, "single_label"
        get = self._get
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

        Never raises.
        """
        get = self._get
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
                if (
                    below is not None
                    and below.kind is _WILDCARD
                    and (apex is None or below.tenant != apex.tenant)
                ):
                    building.setdefault(below.tenant, []).append(key)
            # Benign race: two threads may build equal indexes; the assignment is atomic.
            index = self._by_tenant = {t: tuple(keys) for t, keys in building.items()}
        return index

    def domains_of(self, tenant: str) -> tuple[AcceptedDomain, ...]:
        """The entries of *tenant* in canonical form (empty for an unknown tenant).

        The per-tenant index is built on the first call (one pass over the table).

        Never raises.
        """
        keys = self._tenant_index().get(tenant, ()) if isinstance(tenant, str) else ()
        table = self._table
        return tuple(
            entry
            for key in keys
            for entry in _node_entries(key, table[key])
            if entry.tenant == tenant
        )

    def tenants(self) -> frozenset[str]:
        """Every tenant with at least one entry.

        Never raises.
        """
        return frozenset(self._tenant_counts())

    def covering_tenants(self, domain: NormalizedDomain) -> frozenset[str]:
        """Tenants of the entries at the nearest configured base name at or above *domain*,
        ignoring ``match_subdomains`` (used to decide whether a name is "under" a tenant's
        accepted domains, as for connector certificate names).

        Never raises.
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
            counts = _count_tenants(self._table)
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

        Never raises.
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
            with _gc_paused():
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
        if not isinstance(tenants, list) or (
            tenants and (set(map(type, tenants)) != {str} or "" in tenants)
        ):
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
        if owner_count:
            tenant_numbers = owner_rows[0::3]
            type_codes = owner_rows[1::3]
            kind_codes = owner_rows[2::3]
            if max(tenant_numbers) >= len(tenants) or max(type_codes) >= 3 or max(kind_codes) >= 3:
                raise InvalidSnapshot("an owner has out-of-range numbers")
        else:
            tenant_numbers = type_codes = kind_codes = array("I")
        owners: list[Owner | None] = [None]
        owners.extend(
            _new_owners(
                list(map(tenants.__getitem__, tenant_numbers)),
                list(map(_TYPE_CODES.__getitem__, type_codes)),
                list(map(_KIND_CODES.__getitem__, kind_codes)),
            )
        )
        apex_numbers = node_rows[0::2]
        below_numbers = node_rows[1::2]
        if node_count and max(node_rows) > owner_count:
            raise InvalidSnapshot("a node refers to a missing owner")
        # Shapes: the apex is none or EXACT, the below slot none or not EXACT, not both none.
        # kind_of[number] is the kind code of owner *number* (3 for "none").
        kind_of = bytes([3, *kind_codes])
        apex_kinds = bytes(map(kind_of.__getitem__, apex_numbers))
        below_kinds = bytes(map(kind_of.__getitem__, below_numbers))
        exact = _KIND_CODES.index(_EXACT)
        if (
            apex_kinds.translate(None, bytes([exact, 3]))
            or exact in below_kinds
            or any(map(_BOTH_NONE.__eq__, zip(apex_kinds, below_kinds, strict=True)))
        ):
            raise InvalidSnapshot("a node has an impossible shape")
        nodes: list[_Node] = list(
            zip(
                map(owners.__getitem__, apex_numbers),
                map(owners.__getitem__, below_numbers),
                strict=True,
            )
        )
        keys = blob.decode("ascii").split("\n") if names else []
        if len(keys) != names:
            raise InvalidSnapshot(f"{len(keys)} names found where the header says {names}")
        try:  # cheaper than max(index) first: a bad number stops the C loop with IndexError
            table: _Table = dict(zip(keys, map(nodes.__getitem__, index), strict=True))
        except IndexError:
            raise InvalidSnapshot(f"node number {max(index)} is out of range") from None
        if len(table) != names:
            raise InvalidSnapshot("a name appears twice")
        return cls(table, None, limit=limit, suffixes=public_suffixes)


_TYPE_CODES: Final = tuple(DomainType)
_KIND_CODES: Final = tuple(MatchKind)
_set_field = object.__setattr__


_BOTH_NONE: Final = (3, 3)
_SET_TENANT: Final = Owner.__dict__["tenant"].__set__
_SET_TYPE: Final = Owner.__dict__["domain_type"].__set__
_SET_KIND: Final = Owner.__dict__["kind"].__set__


def _new_owners(tenants: list[str], types: list[DomainType], kinds: list[MatchKind]) -> list[Owner]:
    """Owners for parallel lists of fields, built with C-level loops (the slot descriptors of
    the frozen class, as `_new_owner`; values are trusted here)."""
    owners = list(map(object.__new__, repeat(Owner, len(tenants))))
    for setter, values in ((_SET_TENANT, tenants), (_SET_TYPE, types), (_SET_KIND, kinds)):
        deque(map(setter, owners, values), maxlen=0)
    return owners


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
