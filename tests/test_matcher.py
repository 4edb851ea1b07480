"""Tests for the compiled accepted-domain matcher (issue 3)."""

from __future__ import annotations

import pathlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domainpolicy import (
    AcceptedDomain,
    DomainMatcher,
    DomainType,
    InvalidAddress,
    InvalidConfiguration,
    InvalidDomain,
    Match,
    MatchKind,
    normalize_domain,
)
from domainpolicy._matcher import _quick_key
from domainpolicy.testing import accepted_domain_sets, domains, hostile_text, matcher_queries

A = AcceptedDomain
AUTH = DomainType.AUTHORITATIVE
RELAY = DomainType.INTERNAL_RELAY

CONFIG = [
    A("contoso.com", "A", match_subdomains=True),
    A("sales.contoso.com", "B", match_subdomains=True),
    A("exact.org", "C"),
    A("*.fabrikam.com", "D", RELAY),
    A("fabrikam.com", "E"),
    A("Bücher.DE.", "F"),
    A("eu.shop.example.co.uk", "G", match_subdomains=True),
]


@pytest.fixture(scope="module")
def matcher() -> DomainMatcher:
    return DomainMatcher.compile(CONFIG)


@pytest.mark.parametrize(
    ("query", "tenant", "kind"),
    [
        # exact entry matches only itself
        ("exact.org", "C", MatchKind.EXACT),
        ("www.exact.org", None, None),
        # match_subdomains covers apex and every depth below
        ("contoso.com", "A", MatchKind.EXACT),
        ("a.contoso.com", "A", MatchKind.SUBDOMAIN),
        ("a.b.c.contoso.com", "A", MatchKind.SUBDOMAIN),
        # wildcard: every subdomain, never the apex (the apex here is another tenant's entry)
        ("x.fabrikam.com", "D", MatchKind.WILDCARD),
        ("y.x.fabrikam.com", "D", MatchKind.WILDCARD),
        ("fabrikam.com", "E", MatchKind.EXACT),
        # label boundaries
        ("evilcontoso.com", None, None),
        ("contoso.com.evil.net", None, None),
        ("notfabrikam.com", None, None),
        ("xexact.org", None, None),
        # longest entry wins
        ("sales.contoso.com", "B", MatchKind.EXACT),
        ("eu.sales.contoso.com", "B", MatchKind.SUBDOMAIN),
        ("salescontoso.com", None, None),
        # parents of an entry are not matched
        ("shop.example.co.uk", None, None),
        ("example.co.uk", None, None),
        ("a.eu.shop.example.co.uk", "G", MatchKind.SUBDOMAIN),
        # other TLD
        ("contoso.net", None, None),
        # normalisation: case, trailing dot, U-label == A-label
        ("CONTOSO.COM.", "A", MatchKind.EXACT),
        ("Mail.Sales.Contoso.Com", "B", MatchKind.SUBDOMAIN),
        ("xn--bcher-kva.de", "F", MatchKind.EXACT),
        ("BÜCHER.de", "F", MatchKind.EXACT),
        ("bücher\u3002de", "F", MatchKind.EXACT),
        ("XN--BCHER-KVA.DE.", "F", MatchKind.EXACT),
    ],
)
def test_semantics_table(
    matcher: DomainMatcher, query: str, tenant: str | None, kind: MatchKind | None
) -> None:
    """Each semantic rule gives the expected tenant and match kind, in every lookup API."""
    found = matcher.match(query)
    assert (found.tenant if found else None) == tenant
    assert (found.kind if found else None) == kind
    owner, reason = matcher.lookup(query)
    assert reason is None
    assert (owner.tenant if owner else None) == tenant
    assert (owner.kind if owner else None) == kind
    assert matcher.tenant_of(query) == tenant
    assert matcher.owner_of_normalized(normalize_domain(query)) == owner
    if tenant is not None:
        assert matcher.accepts(tenant, query)
        assert not matcher.accepts("somebody-else", query)


def test_match_reports_the_canonical_entry(matcher: DomainMatcher) -> None:
    """match() returns the normalised query and the matching entry in canonical form."""
    assert matcher.match("a.b.Sales.contoso.com") == Match(
        domain=normalize_domain("a.b.sales.contoso.com"),
        entry=A("sales.contoso.com", "B", AUTH, True),
        kind=MatchKind.SUBDOMAIN,
    )
    found = matcher.match("q.fabrikam.com")
    assert found is not None
    assert found.entry == A("*.fabrikam.com", "D", RELAY, False)
    assert found.domain_type is RELAY
    assert matcher.match("bücher.de") == Match(
        normalize_domain("xn--bcher-kva.de"), A("xn--bcher-kva.de", "F"), MatchKind.EXACT
    )


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("", "empty"),
        ("a..contoso.com", "empty_label"),
        ("-a.contoso.com", "bad_hyphen"),
        ("contoso", "single_label"),
        ("a_b.contoso.com", "disallowed_codepoint"),
        ("contoso.com..", "empty_label"),
        ("1.2.3.4", "numeric_tld"),
        ("x" * 2000, "input_too_long"),
        ("ab--c.contoso.com", "reserved_hyphens"),
        ("xn--zz.contoso.com", "bad_alabel"),
        (5, "not_text"),
        (None, "not_text"),
        (b"contoso.com", "not_text"),
    ],
)
def test_invalid_queries(matcher: DomainMatcher, query: object, reason: str) -> None:
    """An invalid query raises InvalidDomain from match/tenant_of and is a reason in lookup."""
    with pytest.raises(InvalidDomain) as caught:
        matcher.match(query)  # type: ignore[arg-type]
    assert caught.value.reason == reason
    with pytest.raises(InvalidDomain):
        matcher.tenant_of(query)  # type: ignore[arg-type]
    with pytest.raises(InvalidDomain):
        matcher.accepts("A", query)  # type: ignore[arg-type]
    assert matcher.lookup(query) == (None, reason)


@given(hostile_text())
def test_lookup_never_raises_and_agrees_with_match(text: str) -> None:
    """lookup() never raises; it reports exactly the InvalidDomain match() would raise."""
    matcher = DomainMatcher.compile(CONFIG)
    owner, reason = matcher.lookup(text)
    if reason is not None:
        with pytest.raises(InvalidDomain) as caught:
            matcher.match(text)
        assert (owner, reason) == (None, caught.value.reason)
    else:
        found = matcher.match(text)
        assert reason is None
        assert (owner.tenant if owner else None) == (found.tenant if found else None)


@given(st.one_of(hostile_text(max_size=100), domains(spellings=True), st.text(max_size=70)))
def test_quick_key_agrees_with_normalize_domain(text: str) -> None:
    """The ASCII shortcut returns exactly normalize_domain's answer whenever it answers."""
    if not text.isascii():
        return
    quick = _quick_key(text)
    if quick is not None:
        assert normalize_domain(text) == quick


@pytest.mark.parametrize(
    ("address", "tenant"),
    [
        ("user@contoso.com", "A"),
        ("<User@Mail.Sales.Contoso.COM>", "B"),
        ("<@relay.example:user@x.fabrikam.com>", "D"),
        ('"odd local"@exact.org', "C"),
        ("user@evilcontoso.com", None),
        ("user@[192.0.2.1]", None),
        ("<>", None),
        ("用户@bücher.de", "F"),
    ],
)
def test_match_address(matcher: DomainMatcher, address: str, tenant: str | None) -> None:
    """match_address() matches the address's domain; null path and literals match nothing."""
    found = matcher.match_address(address)
    assert (found.tenant if found else None) == tenant


@pytest.mark.parametrize("address", ["no-at-sign", "a@b@c", "user@a..b", "<user@x.com"])
def test_match_address_invalid(matcher: DomainMatcher, address: str) -> None:
    """An invalid address raises InvalidAddress."""
    with pytest.raises(InvalidAddress):
        matcher.match_address(address)


# --------------------------------------------------------------------------- compile errors


@pytest.mark.parametrize(
    ("entries", "needle"),
    [
        ([A("x.com", "A"), A("X.COM.", "B")], "already claimed by tenant 'A'"),
        (
            [A("x.com", "A", match_subdomains=True), A("*.x.com", "B")],
            "already claimed by tenant 'A'",
        ),
        ([A("*.x.com", "A"), A("x.com", "B", match_subdomains=True)], "claimed by tenant 'A'"),
        ([A("x.com", "A"), A("x.com", "A", RELAY)], "different flags"),
        ([A("x.com", "A"), A("x.com", "A", match_subdomains=True)], "different flags"),
        ([A("*.x.com", "A"), A("*.x.com", "A", RELAY)], "different flags"),
        ([A("com", "A")], "'com' is a public suffix"),
        ([A("co.uk", "A")], "'co.uk' is a public suffix"),
        ([A("github.io", "A")], "'github.io' is a public suffix"),
        ([A("*.com", "A")], "public suffix and cannot be the base of a wildcard"),
        ([A("*.co.uk", "A")], "public suffix and cannot be the base of a wildcard"),
        ([A("*.github.io", "A")], "public suffix"),
        ([A("a..b.com", "A")], "empty_label"),
        ([A("*", "A")], "invalid domain"),
        ([A("*.", "A")], "invalid wildcard base"),
        ([A("a.*.com", "A")], "disallowed_codepoint"),
        ([A("*.*.x.com", "A")], "invalid wildcard base"),
        ([A("x.com", "")], "tenant '' must be a non-empty str"),
        ([A("x.com", 5)], "tenant 5 must be a non-empty str"),  # type: ignore[arg-type]
        ([A("x.com", "A", "authoritative")], "must be a DomainType"),  # type: ignore[arg-type]
        ([A("x.com", "A", match_subdomains=1)], "must be a bool"),  # type: ignore[arg-type]
        ([A(5, "A")], "domain 5 must be a str"),  # type: ignore[arg-type]
        ([A("*.x.com", "A", match_subdomains=True)], "match_subdomains must be False"),
        (["x.com"], "expected an AcceptedDomain, got str"),
    ],
)
def test_compile_refuses(entries: list[AcceptedDomain], needle: str) -> None:
    """Each configuration rule is enforced with a message naming the value and the rule."""
    with pytest.raises(InvalidConfiguration) as caught:
        DomainMatcher.compile(entries)
    assert any(needle in problem for problem in caught.value.problems), caught.value.problems


def test_compile_lists_every_problem() -> None:
    """One InvalidConfiguration lists every problem, not just the first."""
    entries = [
        A("com", "A"),
        A("ok.com", "A"),
        A("ok.com", "B"),
        A("a..b", "C"),
        A("*.co.uk", "D"),
        A("fine.org", "E"),
    ]
    with pytest.raises(InvalidConfiguration) as caught:
        DomainMatcher.compile(entries)
    problems = caught.value.problems
    assert len(problems) == 4
    assert [p.split(" ")[1] for p in problems] == ["#0", "#2", "#3", "#4"]


@pytest.mark.parametrize(
    "entries",
    [
        [A("x.com", "A"), A("*.x.com", "B")],  # apex and wildcard are different slots
        [A("x.com", "A"), A("X.com.", "A")],  # identical duplicates merge
        [A("x.com", "A", match_subdomains=True), A("a.x.com", "B", match_subdomains=True)],
        [A("*.x.com", "A"), A("*.a.x.com", "B"), A("a.x.com", "C")],
        [A("bücher.de", "A"), A("xn--bcher-kva.de", "A")],
    ],
)
def test_compile_accepts(entries: list[AcceptedDomain]) -> None:
    """Nested claims, separate slots and identical duplicates compile."""
    matcher = DomainMatcher.compile(entries)
    assert len(matcher) == len({(e.tenant, e.domain.lower()) for e in entries}) or len(
        matcher
    ) < len(entries)


@pytest.mark.parametrize(("limit", "ok"), [(None, True), (3, True), (2, False)])
def test_domains_per_tenant_limit(limit: int | None, ok: bool) -> None:
    """max_domains_per_tenant refuses a tenant with more entries than the limit."""
    entries = [A("a.com", "T"), A("b.com", "T"), A("*.c.com", "T"), A("d.com", "U")]
    if ok:
        assert len(DomainMatcher.compile(entries, max_domains_per_tenant=limit)) == 4
    else:
        with pytest.raises(InvalidConfiguration, match="'T' has 3 accepted domains"):
            DomainMatcher.compile(entries, max_domains_per_tenant=limit)


@pytest.mark.parametrize("limit", [0, -1, "5", 2.5, True])
def test_bad_limit(limit: object) -> None:
    """A limit that is not a positive int is refused."""
    with pytest.raises(InvalidConfiguration, match="max_domains_per_tenant"):
        DomainMatcher.compile([], max_domains_per_tenant=limit)  # type: ignore[arg-type]


def test_entries_not_iterable() -> None:
    """Non-iterable entries are a configuration error, not a TypeError."""
    with pytest.raises(InvalidConfiguration, match="not iterable"):
        DomainMatcher.compile(5)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- collection API


def test_len_iter_contains_domains_of(matcher: DomainMatcher) -> None:
    """len counts entries, iteration yields canonical entries, domains_of filters by tenant."""
    assert len(matcher) == len(CONFIG)
    entries = list(matcher)
    assert A("xn--bcher-kva.de", "F") in entries
    assert A("*.fabrikam.com", "D", RELAY) in entries
    assert A("Bücher.de", "F") in matcher
    assert A("bücher.de", "Z") not in matcher
    assert A("*.contoso.com", "A") not in matcher
    assert "contoso.com" not in matcher
    assert matcher.domains_of("A") == (A("contoso.com", "A", AUTH, True),)
    assert matcher.domains_of("D") == (A("*.fabrikam.com", "D", RELAY),)
    assert matcher.domains_of("nobody") == ()
    assert matcher.tenants() == frozenset("ABCDEFG")
    assert DomainMatcher.compile(list(matcher)) == matcher
    assert "7 entries" in repr(matcher)


def test_domains_of_same_key_two_tenants() -> None:
    """An apex and a wildcard at one name in two tenants each show up for their own tenant."""
    matcher = DomainMatcher.compile([A("x.com", "A"), A("*.x.com", "B"), A("*.y.com", "A")])
    assert matcher.domains_of("A") == (A("x.com", "A"), A("*.y.com", "A"))
    assert matcher.domains_of("B") == (A("*.x.com", "B"),)


# --------------------------------------------------------------------------- differential


def reference_tenant(entries: list[AcceptedDomain], query: str) -> str | None:
    """Obviously correct: scan every entry, keep the matching one with the longest name."""
    best: tuple[int, str] | None = None
    for entry in entries:
        wildcard = entry.domain.startswith("*.")
        key = normalize_domain(entry.domain[2:] if wildcard else entry.domain)
        below = query.endswith("." + key)
        if (
            (query == key and not wildcard) or (below and (wildcard or entry.match_subdomains))
        ) and (best is None or len(key) > best[0]):
            best = (len(key), entry.tenant)
    return None if best is None else best[1]


@given(accepted_domain_sets(), st.lists(matcher_queries(), max_size=10))
def test_differential_against_linear_scan(
    entries: list[AcceptedDomain], queries: list[str]
) -> None:
    """The compiled matcher answers exactly like a linear scan over the entries."""
    matcher = DomainMatcher.compile(entries)
    for query in queries:
        _owner, reason = matcher.lookup(query)
        if reason is not None:
            with pytest.raises(InvalidDomain, match=reason):
                normalize_domain(query)
            continue
        key = normalize_domain(query)
        expected = reference_tenant(entries, key)
        assert matcher.tenant_of(query) == expected
        found = matcher.match(query)
        assert (found.tenant if found else None) == expected
        if found is not None:
            assert found.entry in list(matcher)


# --------------------------------------------------------------------------- with_changes


def test_with_changes_is_copy_on_write(matcher: DomainMatcher) -> None:
    """with_changes returns a new matcher and leaves the original untouched."""
    before = list(matcher)
    changed = matcher.with_changes(
        add=[A("new.org", "Z"), A("*.contoso.org", "Z")],
        remove=["*.fabrikam.com", A("exact.org", "C")],
    )
    assert list(matcher) == before
    assert changed.tenant_of("new.org") == "Z"
    assert changed.tenant_of("a.contoso.org") == "Z"
    assert changed.tenant_of("x.fabrikam.com") is None
    assert changed.tenant_of("fabrikam.com") == "E"
    assert changed.tenant_of("exact.org") is None
    assert len(changed) == len(matcher)
    assert "C" not in changed.tenants()
    assert changed == DomainMatcher.compile(
        [e for e in CONFIG if e.tenant not in "CD"] + [A("new.org", "Z"), A("*.contoso.org", "Z")]
    )


@pytest.mark.parametrize(
    ("add", "remove", "needle"),
    [
        ([A("contoso.com", "Z")], [], "already claimed by tenant 'A'"),
        ([], ["nothere.com"], "no such entry"),
        ([], ["*.contoso.com"], "no such entry"),
        ([], [A("contoso.com", "A")], "is configured (configured: "),
        ([], ["a..b"], "empty_label"),
        ([], [5], "expected an AcceptedDomain or a str"),
        ([A("com", "Z")], [], "public suffix"),
        (A("x.com", "Z"), [], "not a single one"),
        ([], "contoso.com", "not a single one"),
        (5, [], "not iterable"),
    ],
)
def test_with_changes_refuses(
    matcher: DomainMatcher, add: object, remove: object, needle: str
) -> None:
    """with_changes refuses bad additions and removals with every problem listed."""
    with pytest.raises(InvalidConfiguration) as caught:
        matcher.with_changes(add=add, remove=remove)  # type: ignore[arg-type]
    assert needle in str(caught.value)


def test_with_changes_remove_then_add_moves_a_domain(matcher: DomainMatcher) -> None:
    """Removing and adding in one call moves a domain between tenants."""
    moved = matcher.with_changes(add=[A("exact.org", "Q")], remove=["exact.org"])
    assert moved.tenant_of("exact.org") == "Q"


def test_with_changes_enforces_limit() -> None:
    """The tenant limit chosen at compile time also applies to with_changes."""
    base = DomainMatcher.compile([A("a.com", "T")], max_domains_per_tenant=1)
    with pytest.raises(InvalidConfiguration, match="more than the limit of 1"):
        base.with_changes(add=[A("b.com", "T")])
    assert base.with_changes(add=[A("b.com", "U")]).tenant_of("b.com") == "U"


@given(accepted_domain_sets(), accepted_domain_sets())
def test_with_changes_equals_recompiling(
    first: list[AcceptedDomain], second: list[AcceptedDomain]
) -> None:
    """Removing all of one set and adding another equals compiling the other from scratch."""
    matcher = DomainMatcher.compile(first)
    swapped = matcher.with_changes(remove=list(matcher), add=second)
    assert swapped == DomainMatcher.compile(second)
    assert sorted(map(repr, swapped)) == sorted(map(repr, DomainMatcher.compile(second)))


# --------------------------------------------------------------------------- snapshots


@given(accepted_domain_sets(), st.sampled_from([None, 5, 100]))
def test_snapshot_round_trip(entries: list[AcceptedDomain], limit: int | None) -> None:
    """from_bytes(to_bytes()) gives an equal matcher with the same entries, order and counts."""
    try:
        matcher = DomainMatcher.compile(entries, max_domains_per_tenant=limit)
    except InvalidConfiguration:
        return
    loaded = DomainMatcher.from_bytes(matcher.to_bytes())
    assert loaded == matcher
    assert list(loaded) == list(matcher)
    assert len(loaded) == len(matcher)
    assert loaded.tenants() == matcher.tenants()
    for entry in entries:
        assert loaded.domains_of(entry.tenant) == matcher.domains_of(entry.tenant)


def test_save_and_load(matcher: DomainMatcher, tmp_path: pathlib.Path) -> None:
    """save() writes a file load() reads back into an equal matcher."""
    path = tmp_path / "accepted.snapshot"
    matcher.save(path)
    loaded = DomainMatcher.load(str(path))
    assert loaded == matcher
    assert loaded.tenant_of("a.b.contoso.com") == "A"
    assert loaded.with_changes(add=[A("z.org", "Z")]).tenant_of("z.org") == "Z"
    assert not list(tmp_path.glob("*.tmp-*"))


def test_save_to_missing_directory(matcher: DomainMatcher, tmp_path: pathlib.Path) -> None:
    """A snapshot that cannot be written raises InvalidSnapshot."""
    from domainpolicy import InvalidSnapshot

    with pytest.raises(InvalidSnapshot, match="cannot write"):
        matcher.save(tmp_path / "missing" / "x")


def test_load_missing_file(tmp_path: pathlib.Path) -> None:
    """A snapshot that cannot be read raises InvalidSnapshot."""
    from domainpolicy import InvalidSnapshot

    with pytest.raises(InvalidSnapshot, match="cannot read"):
        DomainMatcher.load(tmp_path / "nope")


def test_empty_matcher_round_trip() -> None:
    """An empty matcher snapshots and loads."""
    empty = DomainMatcher.compile([])
    assert DomainMatcher.from_bytes(empty.to_bytes()) == empty
    assert len(empty) == 0
    assert empty.tenant_of("a.com") is None


def _corrupt_cases() -> list[tuple[str, bytes, str]]:
    import hashlib
    import json

    good = DomainMatcher.compile(CONFIG).to_bytes()
    first, rest = good.split(b"\n", 1)
    head, payload = rest.split(b"\n", 1)
    payload = payload[:-32]

    def sealed(header_bytes: bytes, body: bytes) -> bytes:
        digest = hashlib.sha256(header_bytes + b"\n" + body).digest()
        return first + b"\n" + header_bytes + b"\n" + body + digest

    header = json.loads(head)
    cases = [
        ("empty file", b"", "does not start with"),
        ("other magic", b"PK\x03\x04" + good[4:], "does not start with"),
        ("pickle", b"\x80\x04\x95" + good, "does not start with"),
        ("future version", good.replace(b"/1\n", b"/2\n", 1), "version '2' is not supported"),
        ("magic only", first, "format line is truncated"),
        ("no checksum room", first + b"\n" + b"x" * 5, "truncated"),
        ("flipped byte", good[:-40] + bytes([good[-40] ^ 1]) + good[-39:], "checksum"),
        ("bad json", sealed(b"{nope", payload), "malformed"),
        ("not an object", sealed(b"[1]", payload), "not a matcher header"),
        ("no header end", sealed(b"", b"")[:-33] + b"x" + b"\0" * 32, "checksum"),
        ("extra payload", sealed(head, payload + b"zz"), "payload length"),
    ]
    for cut in (1, 10, len(good) // 2, len(good) - 1):
        cases.append((f"truncated at {cut}", good[:cut], ""))
    for field, value, needle in [
        ("names", -1, "not a non-negative int"),
        ("names", True, "not a non-negative int"),
        ("owners", 999, "table sizes"),
        ("blob_bytes", [1, 2], "four byte counts"),
        ("tenants", ["", "x"], "non-empty strings"),
        ("tenants", ["x", 5], "non-empty strings"),
        ("tenants", "x", "non-empty strings"),
        ("max_domains_per_tenant", 0, "positive int"),
        ("format", "other", "not a matcher header"),
    ]:
        changed = dict(header, **{field: value})
        cases.append((f"{field}={value!r}", sealed(json.dumps(changed).encode(), payload), needle))
    del header["tenants"]
    cases.append(("missing field", sealed(json.dumps(header).encode(), payload), "malformed"))
    keys_end = json.loads(head)["blob_bytes"][0]
    bad_keys = b"A" + payload[1:keys_end] + payload[keys_end:]
    cases.append(("upper-case name", sealed(head, bad_keys), "bytes other than"))
    return cases


@pytest.mark.parametrize(("what", "data", "needle"), _corrupt_cases())
def test_corrupt_snapshots_raise_invalid_snapshot(what: str, data: bytes, needle: str) -> None:
    """Corrupt, truncated, foreign or future snapshots raise InvalidSnapshot naming the rule."""
    from domainpolicy import InvalidSnapshot

    with pytest.raises(InvalidSnapshot) as caught:
        DomainMatcher.from_bytes(data)
    assert needle in str(caught.value), (what, str(caught.value))


@given(st.binary(max_size=300), st.integers(min_value=0, max_value=2000))
def test_any_bytes_load_or_raise_invalid_snapshot(noise: bytes, cut: int) -> None:
    """Arbitrary bytes and truncations (plus noise) raise InvalidSnapshot and nothing else."""
    from domainpolicy import InvalidSnapshot

    good = DomainMatcher.compile(CONFIG).to_bytes()
    truncated = good[: cut % len(good)]
    for data in (noise, truncated + noise, b"domainpolicy-matcher/1\n" + noise):
        with pytest.raises(InvalidSnapshot):
            DomainMatcher.from_bytes(data)


def _forged(change: str) -> bytes:
    """A sealed snapshot of CONFIG with one table changed (owner or node rows)."""
    import hashlib
    import json
    from array import array

    good = DomainMatcher.compile(CONFIG).to_bytes()
    first, rest = good.split(b"\n", 1)
    head, payload = rest.split(b"\n", 1)
    payload = payload[:-32]
    header = json.loads(head)
    sizes = header["blob_bytes"]
    starts = [sum(sizes[:i]) for i in range(5)]
    index = array("I", payload[starts[1] : starts[2]])
    owners = array("I", payload[starts[2] : starts[3]])
    nodes = array("I", payload[starts[3] : starts[4]])
    if change == "node index":
        index[-1] = header["nodes"]
    elif change == "owner type":
        owners[1] = 7
    elif change == "node owner":
        nodes[0] = header["owners"] + 1
    elif change == "empty node":
        nodes[0] = nodes[1] = 0
    elif change == "apex not exact":
        below = next(n for n in nodes[1::2] if n)
        nodes[0] = below
    body = payload[: starts[1]] + index.tobytes() + owners.tobytes() + nodes.tobytes()
    return first + b"\n" + head + b"\n" + body + hashlib.sha256(head + b"\n" + body).digest()


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ("node index", "out of range"),
        ("owner type", "out-of-range"),
        ("node owner", "missing owner"),
        ("empty node", "impossible shape"),
        ("apex not exact", "impossible shape"),
    ],
)
def test_forged_tables_raise_invalid_snapshot(change: str, needle: str) -> None:
    """A well-sealed snapshot whose owner or node table is inconsistent is refused."""
    from domainpolicy import InvalidSnapshot

    with pytest.raises(InvalidSnapshot, match=needle):
        DomainMatcher.from_bytes(_forged(change))


# --------------------------------------------------------------------------- batch compile

_ODD_ENTRIES = [
    A("a..b.com", "t1"),
    A("-a.com", "t1"),
    A("com", "t1"),
    A("co.uk", "t2"),
    A("*.github.io", "t2"),
    A("x.ck", "t1"),
    A("localhost", "t1"),
    A("a.b1", "t1"),
    A("xn--bcher-kva.de", "t3"),
    A("Bücher.de.", "t3"),
    A("A.Example.COM.", "t1"),
    A("*.example.com", "t2"),
    A("*.example.com", "t2", match_subdomains=True),
    A("example.com", "t3", match_subdomains=True),
    A("example.com", "t3"),
    A("x" * 60 + ".example.org", "t1"),
    A("ab--c.example.org", "t1"),
    A("a.example.org\nb.example.org", "t1"),
    A("a.example.org", ""),
    A("exämple.org", "t1"),
    A("K.example.org", "t2"),
    A("\u212a.example.org", "t2"),
    A("*.", "t1"),
    A(".", "t1"),
    A("a.com-", "t1"),
    A("a-.example.net", "t1"),
    A("a.-b.example.net", "t1"),
    A("a.b9", "t1"),
    A("a.example.net..", "t1"),
    A("9.example.net", "t1"),
    A("one.example.net", "t1", match_subdomains=1),  # type: ignore[arg-type]
    A("two.example.net", "t1", "authoritative"),  # type: ignore[arg-type]
]


@given(
    accepted_domain_sets(),
    st.lists(st.sampled_from(_ODD_ENTRIES), max_size=4),
    st.randoms(use_true_random=False),
)
def test_batch_compile_agrees_with_the_builder(
    entries: list[AcceptedDomain], odd: list[AcceptedDomain], rnd: object
) -> None:
    """The batch path accepts only what the entry-by-entry builder accepts, and then builds
    the same table (keys, order, nodes) with the same interning of owners."""
    import random

    from domainpolicy._matcher import _Builder, _compile_batch
    from domainpolicy._psl import default_public_suffixes

    assert isinstance(rnd, random.Random)
    mixed = [*entries, *odd]
    rnd.shuffle(mixed)
    suffixes = default_public_suffixes()
    builder = _Builder({}, {}, suffixes, None)
    for position, entry in enumerate(mixed):
        parsed = builder.parse(position, entry)
        if parsed is not None:
            builder.add(position, *parsed)
    batch = _compile_batch(mixed, suffixes, None)
    if builder.problems:
        assert batch is None
        return
    assert batch is not None
    table = batch[0]
    assert list(table.items()) == list(builder.table.items())
    assert len({id(node) for node in table.values()}) == len(set(table.values()))


def test_compile_keeps_one_tenant_string_per_tenant() -> None:
    """Entries carrying equal but distinct tenant strings share one string in the matcher."""
    names = [f"d{number}.example.com" for number in range(50)]
    entries = [
        A(name, "".join(["tenant-", "a"]), match_subdomains=number % 2 == 0)
        for number, name in enumerate(names)
    ]
    entries.append(A("*.w.example.org", "".join(["tenant-", "a"]), DomainType.INTERNAL_RELAY))
    assert len({id(entry.tenant) for entry in entries}) > 1
    matcher = DomainMatcher.compile(entries)
    owners = {id(owner): owner for node in matcher._table.values() for owner in node if owner}
    assert len(owners) == 3
    assert len({id(owner.tenant) for owner in owners.values()}) == 1


def test_batch_compile_falls_back_for_problems_and_restores_gc() -> None:
    """Problems found by the batch path are reported by the builder, and compile leaves the
    garbage collector as it found it."""
    import gc

    assert gc.isenabled()
    with pytest.raises(InvalidConfiguration) as caught:
        DomainMatcher.compile([*CONFIG, A("co.uk", "X"), A("exact.org", "Y")])
    assert len(caught.value.problems) == 2
    assert gc.isenabled()
    gc.disable()
    try:
        DomainMatcher.compile(CONFIG)
        DomainMatcher.from_bytes(DomainMatcher.compile(CONFIG).to_bytes())
        assert not gc.isenabled()
    finally:
        gc.enable()


_KEY_TEXT = st.one_of(
    hostile_text(max_size=100),
    domains(spellings=True),
    st.text(max_size=70),
    st.text(alphabet="abcxyz019-.*\n", max_size=20),
)


@given(st.lists(_KEY_TEXT, min_size=1, max_size=6))
def test_batch_keys_agree_with_normalize_domain(texts: list[str]) -> None:
    """The blob-level key checks give normalize_domain's answer for every name, or None when
    some name is invalid or has a single label (those entries go to the builder)."""
    from domainpolicy._matcher import _batch_keys

    wild = [text.startswith("*.") for text in texts]
    keys: list[str] = []
    expected: list[str] | None = keys
    for text, is_wild in zip(texts, wild, strict=True):
        try:
            key = normalize_domain(text[2:] if is_wild else text, allow_single_label=True)
        except InvalidDomain:
            expected = None
            break
        if "." not in key:
            expected = None
            break
        keys.append(key)
    if "\n" in "".join(texts):
        assert _batch_keys(texts, wild) is None
    else:
        assert _batch_keys(texts, wild) == expected
