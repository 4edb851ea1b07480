"""The registry contract, run against every store: versioned, validated, atomic, shared."""

from __future__ import annotations

import datetime
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from domainpolicy import (
    AcceptedDomain,
    DomainType,
    Effects,
    InboundConnector,
    InvalidConfiguration,
    StateStore,
    open_store,
)
from domainpolicy._registry import RegistryChange, RegistryRecord
from domainpolicy._stores.registry_base import RegistryStore
from store_support import STORE_KINDS

REGISTRY_KINDS = ["memory", "sqlite", "redis", "redis-cluster"]
SHARED_KINDS = [k for k in REGISTRY_KINDS if STORE_KINDS[k][1]]
NOW = 1_800_000_000.0

add = RegistryChange.add_domain
remove = RegistryChange.remove_domain


@pytest.fixture(params=REGISTRY_KINDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    factory, _ = STORE_KINDS[request.param]
    return factory(tmp_path)


@pytest.fixture(params=SHARED_KINDS)
def shared_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    factory, _ = STORE_KINDS[request.param]
    return factory(tmp_path)


@pytest.fixture
def store(store_url: str) -> Iterator[RegistryStore]:
    opened = open_store(store_url)
    assert isinstance(opened, RegistryStore)
    yield opened
    opened.close()


def commit(store: RegistryStore, *changes: RegistryChange, actor: str = "admin") -> RegistryRecord:
    record = store.registry_commit(list(changes), actor=actor, reason="test", now=NOW)
    assert record is not None
    return record


def onprem(tenant: str = "contoso", name: str = "contoso-onprem") -> InboundConnector:
    return InboundConnector(
        name,
        tenant,
        sender_ip_ranges=("198.51.100.0/24",),
        tls_cert_names=("mail.contoso.com",),
        created_at=datetime.datetime(2027, 1, 2, tzinfo=datetime.UTC),
    )


def test_an_empty_registry_is_version_zero(store: RegistryStore) -> None:
    """A new store's registry is empty at version 0, with no records."""
    assert store.registry_version() == 0
    assert store.registry_records() == []
    assert len(store.registry_view().matcher) == 0


def test_a_commit_is_one_versioned_audited_record(store: RegistryStore) -> None:
    """Each commit is one record: the next version, who, when, why and what."""
    first = commit(store, add(AcceptedDomain("contoso.com", "contoso")))
    second = commit(
        store,
        add(AcceptedDomain("*.contoso.net", "contoso", DomainType.INTERNAL_RELAY)),
        add(AcceptedDomain("fabrikam.com", "fabrikam", match_subdomains=True)),
        actor="ops",
    )
    assert (first.version, second.version) == (1, 2)
    assert store.registry_version() == 2
    assert store.registry_records() == [first, second]
    assert store.registry_records(1) == [second]
    assert (second.actor, second.reason, second.at) == ("ops", "test", NOW)
    view = store.registry_view()
    assert view.matcher.tenant_of("a.contoso.net") == "contoso"
    assert view.matcher.tenant_of("x.fabrikam.com") == "fabrikam"
    assert view.info[("domain", "*.contoso.net")].actor == "ops"


def test_an_empty_commit_writes_nothing(store: RegistryStore) -> None:
    """No changes: no record, the version stays."""
    assert store.registry_commit([], actor="admin", now=NOW) is None
    assert store.registry_version() == 0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ([add(AcceptedDomain("co.uk", "contoso"))], "public suffix"),
        ([add(AcceptedDomain("*.github.io", "contoso"))], "public suffix"),
        ([add(AcceptedDomain("fabrikam.com", "contoso"))], "already claimed by tenant 'fabrikam'"),
        ([add(AcceptedDomain("bad..name", "contoso"))], "invalid domain"),
        ([remove(AcceptedDomain("contoso.com", "fabrikam"))], "not an accepted domain"),
        ([RegistryChange.remove_connector("nope")], "'nope' is not registered"),
        (
            [RegistryChange.add_connector(onprem(tenant="fabrikam", name="x"))],
            "cannot be trusted",
        ),
        (
            [remove(AcceptedDomain("contoso.com", "contoso"))],
            "not (under) one of the tenant's accepted domains",
        ),
    ],
)
def test_a_change_breaking_a_compile_rule_is_refused_whole(
    store: RegistryStore, changes: list[RegistryChange], message: str
) -> None:
    """compile's rules apply; a refused mutation writes nothing, even its valid changes."""
    commit(
        store,
        add(AcceptedDomain("contoso.com", "contoso")),
        add(AcceptedDomain("fabrikam.com", "fabrikam")),
        RegistryChange.add_connector(onprem()),
    )
    valid = add(AcceptedDomain("valid.example", "contoso"))
    with pytest.raises(InvalidConfiguration) as caught:
        store.registry_commit([valid, *changes], actor="admin", now=NOW)
    assert message in str(caught.value)
    assert store.registry_version() == 1
    assert store.registry_view().matcher.tenant_of("valid.example") is None


@pytest.mark.parametrize("spelling", ["Bücher.Example.", "xn--bcher-kva.example", "BÜCHER.EXAMPLE"])
def test_a_domain_is_removed_by_any_spelling(store: RegistryStore, spelling: str) -> None:
    """Removal normalises the name, as compile does."""
    commit(store, add(AcceptedDomain("bücher.example", "contoso")))
    commit(store, remove(AcceptedDomain(spelling, "contoso")))
    assert len(store.registry_view().matcher) == 0


def test_connectors_are_added_replaced_and_removed(store: RegistryStore) -> None:
    """A connector is added, replaced by name and removed, with when and who."""
    commit(store, add(AcceptedDomain("contoso.com", "contoso")))
    commit(store, RegistryChange.add_connector(onprem()), actor="alice")
    view = store.registry_view()
    assert view.connector_table.attribute("198.51.100.9") == "contoso"
    assert view.connectors["contoso-onprem"].created_at == onprem().created_at
    assert view.info[("connector", "contoso-onprem")].actor == "alice"
    replaced = InboundConnector("contoso-onprem", "contoso", sender_ip_ranges=("203.0.113.0/24",))
    commit(store, RegistryChange.add_connector(replaced))
    view = store.registry_view()
    assert view.connector_table.attribute("198.51.100.9") is None
    assert view.connector_table.attribute("203.0.113.9") == "contoso"
    commit(store, RegistryChange.remove_connector("contoso-onprem"))
    assert store.registry_view().connectors == {}


def test_two_handles_on_one_store_see_each_others_commits(shared_url: str) -> None:
    """A commit through one store object is seen, and validated against, by another."""
    one, two = open_store(shared_url), open_store(shared_url)
    assert isinstance(one, RegistryStore)
    assert isinstance(two, RegistryStore)
    try:
        commit(one, add(AcceptedDomain("contoso.com", "contoso")))
        assert two.registry_version() == 1
        assert two.registry_view().matcher.tenant_of("contoso.com") == "contoso"
        with pytest.raises(InvalidConfiguration, match="already claimed by tenant 'contoso'"):
            commit(two, add(AcceptedDomain("contoso.com", "fabrikam")))
        commit(two, add(AcceptedDomain("fabrikam.com", "fabrikam")))
        assert one.registry_view().matcher.tenant_of("fabrikam.com") == "fabrikam"
    finally:
        one.close()
        two.close()


def test_racing_claims_in_threads_have_exactly_one_winner(store: RegistryStore) -> None:
    """Eight threads claim one domain for eight tenants: one wins, the others name it."""
    outcomes: list[object] = []
    lock = threading.Lock()

    def claim(tenant: str) -> None:
        try:
            result: object = commit(store, add(AcceptedDomain("contested.example", tenant)))
        except InvalidConfiguration as exc:
            result = exc
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=claim, args=(f"t{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wins = [o for o in outcomes if isinstance(o, RegistryRecord)]
    assert len(wins) == 1
    owner = store.registry_view().matcher.tenant_of("contested.example")
    assert owner is not None
    for lost in outcomes:
        if isinstance(lost, InvalidConfiguration):
            assert f"already claimed by tenant {owner!r}" in str(lost)
    assert store.registry_version() == 1


def _claim_in_process(url: str, tenant: str, queue: multiprocessing.Queue[object]) -> None:
    store = open_store(url)
    assert isinstance(store, RegistryStore)
    try:
        commit(store, add(AcceptedDomain("contested.example", tenant)))
        queue.put(("won", tenant))
    except InvalidConfiguration as exc:
        queue.put(("lost", str(exc)))
    finally:
        store.close()


def test_racing_claims_in_processes_have_exactly_one_winner(shared_url: str) -> None:
    """Four processes claim one domain for four tenants: one wins, the others name the owner."""
    context = multiprocessing.get_context("spawn")
    queue: multiprocessing.Queue[object] = context.Queue()
    workers = [
        context.Process(target=_claim_in_process, args=(shared_url, f"t{i}", queue))
        for i in range(4)
    ]
    for worker in workers:
        worker.start()
    results = [queue.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    winners = [r[1] for r in results if isinstance(r, tuple) and r[0] == "won"]
    assert len(winners) == 1
    for result in results:
        assert isinstance(result, tuple)
        if result[0] == "lost":
            assert f"already claimed by tenant {winners[0]!r}" in str(result[1])


_IMPORTER = """
import os, sys
from domainpolicy import AcceptedDomain, open_store
from domainpolicy._registry import RegistryChange
store = open_store(sys.argv[1])
changes = [RegistryChange.add_domain(AcceptedDomain(f"d{i}.example", "big")) for i in range(50000)]
print("ready", flush=True)
store.registry_commit(changes, actor="importer", now=1.0)
print("done", flush=True)
"""


def test_a_crash_mid_import_leaves_the_previous_registry(shared_url: str, tmp_path: Path) -> None:
    """SIGKILL during a large import: the registry is the previous version, nothing of it."""
    store = open_store(shared_url)
    assert isinstance(store, RegistryStore)
    commit(store, add(AcceptedDomain("contoso.com", "contoso")))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen(
        [sys.executable, "-c", _IMPORTER, shared_url], stdout=subprocess.PIPE, text=True, env=env
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "ready"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    process.stdout.close()
    version = store.registry_version()
    view = store.registry_view()
    assert version in (1, 2)  # killed before or after the one append, never in between
    assert len(view.matcher) in (1, 50001)
    store.close()


def test_state_and_registry_live_side_by_side(store: RegistryStore) -> None:
    """Registry commits do not touch tenant state, and tenant state does not bump the version."""
    assert isinstance(store, StateStore)
    commit(store, add(AcceptedDomain("contoso.com", "contoso")))
    store.apply("contoso", lambda s, now: (s, Effects()), NOW, action="x")
    assert store.registry_version() == 1
    assert store.tenants() == ["contoso"]
