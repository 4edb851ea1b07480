"""RelayPolicy following a store's registry: admin changes write it, every policy enforces them."""

from __future__ import annotations

import datetime
import logging
from pathlib import Path
from typing import Any

import pytest

from domainpolicy import (
    AcceptedDomain,
    BlockPolicy,
    InboundConnector,
    InvalidConfiguration,
    MemoryStore,
    SQLiteStore,
    StoreUnavailable,
)
from domainpolicy._policy import RelayPolicy, RelayRequest
from domainpolicy._registry import RegistryChange

NOW = 1_800_000_000.0
POLICY = BlockPolicy(message_limit=5, domain_limit=4, max_tracked_domains=20)


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def seeded(store: MemoryStore | SQLiteStore) -> MemoryStore | SQLiteStore:
    store.registry_commit(
        [
            RegistryChange.add_domain(AcceptedDomain("contoso.com", "contoso")),
            RegistryChange.add_domain(AcceptedDomain("fabrikam.com", "fabrikam")),
            RegistryChange.add_connector(
                InboundConnector(
                    "contoso-onprem",
                    "contoso",
                    sender_ip_ranges=("198.51.100.0/24",),
                    tls_cert_names=("mail.contoso.com",),
                )
            ),
        ],
        actor="seed",
        now=NOW,
    )
    return store


def follow(store: MemoryStore | SQLiteStore, **options: Any) -> RelayPolicy:
    return RelayPolicy.from_registry(
        store, poll_interval=0.01, block_policy=POLICY, clock=Clock(), **options
    )


def test_a_policy_decides_with_the_registry() -> None:
    """from_registry decides with the registry's domains and connectors."""
    policy = follow(seeded(MemoryStore()))
    assert policy.registry_version == 1
    assert policy.evaluate(RelayRequest("a@contoso.com")).reason == "accepted_domain"
    decision = policy.evaluate(RelayRequest("a@elsewhere.example", "198.51.100.7"))
    assert (decision.tenant, decision.reason) == ("contoso", "unregistered_allowed")


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_a_domain_registered_by_one_policy_is_enforced_by_another(
    kind: str, tmp_path: Path
) -> None:
    """register_domain writes the registry; a second policy on the store accepts it at once
    after its next poll, with no reload."""
    store = seeded(MemoryStore() if kind == "memory" else SQLiteStore(tmp_path / "s.db"))
    other_store = store if kind == "memory" else SQLiteStore(tmp_path / "s.db")
    admin, mta = follow(store), follow(other_store)
    assert mta.evaluate(RelayRequest("a@contoso-news.com")).reason == "no_tenant"
    admin.register_domain("contoso", "Contoso-News.COM.", by="alice", reason="new brand")
    mta.sync_registry()
    decision = mta.evaluate(RelayRequest("a@contoso-news.com"))
    assert (decision.tenant, decision.reason) == ("contoso", "accepted_domain")
    record = store.registry_records(1)[0]
    assert (record.actor, record.reason) == ("alice", "new brand")
    admin.remove_domain("contoso", "contoso-news.com", by="alice")
    mta.sync_registry()
    assert mta.evaluate(RelayRequest("a@contoso-news.com")).reason == "no_tenant"
    assert "contoso-news.com" not in [d.domain for d in mta.status("contoso").accepted_domains]


def test_polling_happens_on_the_decision_path_without_a_reload() -> None:
    """A policy polls by itself at its interval: no sync call, no SIGHUP."""
    store = seeded(MemoryStore())
    mta = RelayPolicy.from_registry(store, poll_interval=0.01, block_policy=POLICY)
    store.registry_commit(
        [RegistryChange.add_domain(AcceptedDomain("late.example", "fabrikam"))], actor="a", now=NOW
    )
    import time

    deadline = time.monotonic() + 2
    while mta.evaluate(RelayRequest("a@late.example")).reason != "accepted_domain":
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_a_claim_of_another_tenants_domain_names_the_owner() -> None:
    """register_domain of a domain of another tenant fails naming it; nothing changes."""
    policy = follow(seeded(MemoryStore()))
    with pytest.raises(InvalidConfiguration, match="already claimed by tenant 'contoso'"):
        policy.register_domain("fabrikam", "contoso.com", by="eve")
    assert policy.registry_version == 1


@pytest.mark.parametrize("spelling", ["bücher.example", "BÜCHER.Example.", "xn--bcher-kva.example"])
def test_remove_domain_through_the_registry_normalises(spelling: str) -> None:
    """remove_domain accepts any spelling of a registered domain (issue 14.7)."""
    policy = follow(seeded(MemoryStore()))
    policy.register_domain("contoso", "bücher.example", by="a")
    policy.remove_domain("contoso", spelling, by="a")
    assert policy.evaluate(RelayRequest("a@bücher.example")).reason == "no_tenant"


def block(policy: RelayPolicy) -> None:
    for i in range(POLICY.message_limit + 1):
        policy.evaluate(RelayRequest(f"x@spam{i % 2}.example", "198.51.100.7"))
    assert policy.status("contoso").raw.block is not None


def test_a_connector_added_before_the_block_is_on_its_checklist() -> None:
    """add_connector puts the connector on the checklist of the next block (issue 14.6)."""
    policy = follow(seeded(MemoryStore()))
    policy.add_connector(
        InboundConnector("sneaky", "contoso", sender_ip_ranges=("203.0.113.0/24",)), by="mallory"
    )
    block(policy)
    checklist = policy.status("contoso").checklist
    assert checklist is not None
    assert "sneaky" in checklist.unreviewed_connectors


def test_a_connector_added_after_the_block_joins_the_open_checklist() -> None:
    """A connector created while blocked is added to the open checklist."""
    policy = follow(seeded(MemoryStore()))
    block(policy)
    policy.add_connector(
        InboundConnector("late", "contoso", sender_ip_ranges=("203.0.113.0/24",)), by="mallory"
    )
    checklist = policy.status("contoso").checklist
    assert checklist is not None
    assert "late" in checklist.unreviewed_connectors


def test_connector_rules_apply_and_removal_stops_attribution() -> None:
    """A certificate name outside the tenant's domains is refused; a removed connector no
    longer attributes."""
    policy = follow(seeded(MemoryStore()))
    with pytest.raises(InvalidConfiguration, match="cannot be trusted"):
        policy.add_connector(
            InboundConnector("bad", "contoso", tls_cert_names=("mail.fabrikam.com",)), by="a"
        )
    policy.remove_connector("contoso-onprem", by="a")
    decision = policy.evaluate(RelayRequest("x@elsewhere.example", "198.51.100.7"))
    assert decision.reason == "no_tenant"


def test_connector_changes_need_a_registry() -> None:
    """A policy with a static matcher refuses connector changes, saying why."""
    static = RelayPolicy(follow(seeded(MemoryStore())).matcher)
    with pytest.raises(InvalidConfiguration, match="does not follow a registry"):
        static.remove_connector("x", by="a")


class FlakyStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.down = False

    def _registry_version(self) -> int:
        if self.down:
            raise StoreUnavailable("registry down")
        return super()._registry_version()


def test_a_failing_store_keeps_the_last_registry_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Polls that fail keep the last registry, log it and report the staleness."""
    store = FlakyStore()
    seeded(store)
    policy = follow(store)
    store.down = True
    with caplog.at_level(logging.WARNING, logger="domainpolicy.registry"):
        assert not policy.sync_registry()
    assert "registry stale" in caplog.text
    assert policy.registry_stale_seconds >= 0
    assert policy.evaluate(RelayRequest("a@contoso.com")).reason == "accepted_domain"
    store.down = False
    policy.sync_registry()
    assert policy.registry_stale_seconds == 0


def test_status_ages_the_window_and_says_who_added_what() -> None:
    """status counts only what is still in the window at as_of, and shows who added entries."""
    policy = follow(seeded(MemoryStore()))
    policy.evaluate(RelayRequest("a@elsewhere.example", "198.51.100.7"))
    fresh = policy.status("contoso")
    assert fresh.unregistered == 1
    later = policy.status("contoso", now=NOW + POLICY.window_seconds + 3600)
    assert (later.unregistered, later.total, later.as_of) == (
        0,
        0,
        NOW + POLICY.window_seconds + 3600,
    )
    assert fresh.added["contoso.com"].actor == "seed"
    assert fresh.added["connector:contoso-onprem"].actor == "seed"
    assert [c.name for c in fresh.connectors] == ["contoso-onprem"]
    data = fresh.to_dict()
    assert data["registry_version"] == 1
    assert data["added"]["contoso.com"]["by"] == "seed"


def test_connector_created_at_is_its_creation_time() -> None:
    """A connector's created_at, not the time it was imported, decides the look-back."""
    policy = follow(seeded(MemoryStore()))
    old = datetime.datetime.fromtimestamp(
        NOW - 10 * POLICY.connector_lookback_seconds, datetime.UTC
    )
    policy.add_connector(
        InboundConnector(
            "ancient", "contoso", sender_ip_ranges=("203.0.113.0/24",), created_at=old
        ),
        by="a",
    )
    block(policy)
    checklist = policy.status("contoso").checklist
    assert checklist is not None
    assert "ancient" not in checklist.unreviewed_connectors
