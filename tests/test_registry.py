"""The registry's values: codecs, diffs, and incremental views equal to a compile from scratch."""

from __future__ import annotations

import datetime

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from domainpolicy import (
    AcceptedDomain,
    ConnectorTable,
    DomainMatcher,
    DomainType,
    InboundConnector,
    InvalidConfiguration,
)
from domainpolicy._registry import (
    RegistryChange,
    RegistryRecord,
    RegistryView,
    canonical_entry_name,
)

CONNECTOR = InboundConnector(
    "c1",
    "contoso",
    sender_ip_ranges=("198.51.100.0/24", "2001:db8::/32"),
    tls_cert_names=("*.contoso.com",),
    created_at=datetime.datetime(2027, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
    enabled=False,
)


@pytest.mark.parametrize(
    ("spelling", "canonical"),
    [
        ("Contoso.COM.", "contoso.com"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("*.Bücher.Example", "*.xn--bcher-kva.example"),
    ],
)
def test_canonical_entry_names(spelling: str, canonical: str) -> None:
    """Entry names are normalised as the matcher spells them."""
    assert canonical_entry_name(spelling) == canonical


def test_an_invalid_entry_name_is_named() -> None:
    """An invalid name raises InvalidConfiguration showing it."""
    with pytest.raises(InvalidConfiguration, match=r"'a\.\.b'"):
        canonical_entry_name("a..b")


@pytest.mark.parametrize(
    "change",
    [
        RegistryChange.add_domain(AcceptedDomain("a.example", "t", DomainType.EXTERNAL_RELAY)),
        RegistryChange.remove_domain(AcceptedDomain("*.a.example", "t")),
        RegistryChange.add_connector(CONNECTOR),
        RegistryChange.remove_connector("c1"),
    ],
)
def test_changes_round_trip_through_dicts(change: RegistryChange) -> None:
    """to_dict / from_dict give back the same change, inside a record too."""
    assert RegistryChange.from_dict(change.to_dict()) == change
    record = RegistryRecord(3, 1.5, "who", "why", (change,))
    assert RegistryRecord.from_dict(record.to_dict()) == record


def test_a_malformed_record_is_refused() -> None:
    """A record with an unknown action is InvalidConfiguration naming it."""
    with pytest.raises(InvalidConfiguration, match="explode"):
        RegistryChange.from_dict({"action": "explode"})


def test_diff_adds_changes_and_with_replace_removes() -> None:
    """diff lists additions of what differs, and removals only with replace."""
    view = RegistryView()
    first = RegistryRecord(
        1,
        0.0,
        "a",
        "",
        (
            RegistryChange.add_domain(AcceptedDomain("keep.example", "t")),
            RegistryChange.add_domain(AcceptedDomain("flip.example", "t")),
            RegistryChange.add_domain(AcceptedDomain("gone.example", "t")),
        ),
    )
    view.apply(first)
    wanted = [
        AcceptedDomain("Keep.Example", "t"),
        AcceptedDomain("flip.example", "t", match_subdomains=True),
        AcceptedDomain("new.example", "u"),
    ]
    lines = [c.describe() for c in view.diff(wanted, [], replace=False)]
    assert lines == [
        "- domain flip.example (tenant t, authoritative)",
        "+ domain flip.example (tenant t, authoritative, subdomains)",
        "+ domain new.example (tenant u, authoritative)",
    ]
    replaced = view.diff(wanted, [], replace=True)
    assert "- domain gone.example (tenant t, authoritative)" in [c.describe() for c in replaced]
    view.apply(RegistryRecord(2, 0.0, "a", "", tuple(replaced)))
    assert sorted(e.domain for e in view.matcher) == [
        "flip.example",
        "keep.example",
        "new.example",
    ]
    assert view.diff(wanted, [], replace=True) == []


def test_a_record_out_of_order_is_refused() -> None:
    """A record must follow the view's version."""
    with pytest.raises(InvalidConfiguration, match="does not follow version 0"):
        RegistryView().apply(RegistryRecord(2, 0.0, "a", "", ()))


NAMES = st.sampled_from(["a.example", "b.example", "x.a.example", "c.example", "d.test"])
TENANTS = st.sampled_from(["t1", "t2"])


class IncrementalEqualsScratch(RuleBasedStateMachine):
    """Any sequence of registry mutations applied incrementally answers like the final
    registry compiled from scratch."""

    def __init__(self) -> None:
        super().__init__()
        self.view = RegistryView()
        self.entries: list[AcceptedDomain] = []
        self.connectors: dict[str, InboundConnector] = {}

    def _commit(self, *changes: RegistryChange) -> bool:
        record = RegistryRecord(self.view.version + 1, 0.0, "p", "", changes)
        try:
            self.view.apply(record)
        except InvalidConfiguration:
            return False
        return True

    @rule(
        name=NAMES,
        tenant=TENANTS,
        wildcard=st.booleans(),
        subs=st.booleans(),
        kind=st.sampled_from(DomainType),
    )
    def add_domain(
        self, name: str, tenant: str, wildcard: bool, subs: bool, kind: DomainType
    ) -> None:
        entry = AcceptedDomain(f"*.{name}" if wildcard else name, tenant, kind, subs)
        candidate = [*self.entries, entry]
        try:
            DomainMatcher.compile(candidate)
            ConnectorTable.compile(self.connectors.values(), DomainMatcher.compile(candidate))
            expected = True
        except InvalidConfiguration:
            expected = False
        assert self._commit(RegistryChange.add_domain(entry)) is expected
        if expected and entry not in self.entries:  # an identical duplicate is a no-op
            self.entries.append(entry)

    @rule(data=st.data())
    def remove_domain(self, data: st.DataObject) -> None:
        if not self.entries:
            return
        entry = data.draw(st.sampled_from(self.entries))
        rest = [e for e in self.entries if e is not entry]
        try:
            ConnectorTable.compile(self.connectors.values(), DomainMatcher.compile(rest))
            expected = True
        except InvalidConfiguration:
            expected = False
        spelled = AcceptedDomain(entry.domain.upper() + ".", entry.tenant)
        assert self._commit(RegistryChange.remove_domain(spelled)) is expected
        if expected:
            self.entries = rest

    @rule(tenant=TENANTS, name=NAMES, slot=st.integers(0, 3))
    def add_connector(self, tenant: str, name: str, slot: int) -> None:
        connector = InboundConnector(
            f"c{slot}", tenant, sender_ip_ranges=(f"192.0.2.{slot * 4}/30",), tls_cert_names=(name,)
        )
        candidate = {**self.connectors, connector.name: connector}
        try:
            ConnectorTable.compile(candidate.values(), DomainMatcher.compile(self.entries))
            expected = True
        except InvalidConfiguration:
            expected = False
        assert self._commit(RegistryChange.add_connector(connector)) is expected
        if expected:
            self.connectors = candidate

    @rule(slot=st.integers(0, 3))
    def remove_connector(self, slot: int) -> None:
        name = f"c{slot}"
        assert self._commit(RegistryChange.remove_connector(name)) is (name in self.connectors)
        self.connectors.pop(name, None)

    @invariant()
    def answers_like_a_fresh_compile(self) -> None:
        scratch = DomainMatcher.compile(self.entries)
        assert self.view.matcher == scratch
        for name in ["a.example", "b.example", "x.a.example", "y.x.a.example", "d.test"]:
            assert self.view.matcher.match(name) == scratch.match(name)
        table = ConnectorTable.compile(self.connectors.values(), scratch)
        for slot in range(4):
            ip = f"192.0.2.{slot * 4 + 1}"
            assert self.view.connector_table.attribute(ip) == table.attribute(ip)


TestIncrementalEqualsScratch = IncrementalEqualsScratch.TestCase
TestIncrementalEqualsScratch.settings = settings(max_examples=60, stateful_step_count=25)
