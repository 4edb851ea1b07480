"""RedisStore on a real Redis Cluster (three primaries on loopback ports): cluster URLs, tenants
of one batch on different nodes, a node that stops answering mid-batch, script cache loss on
every node, a slot that moves, a cluster that goes away, and the command line.

The conformance suite (tests/test_store_conformance.py, kind ``redis-cluster``) and the
differential tests of tests/test_redis_store.py run on the same cluster too."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from domainpolicy import (
    BlockMachine,
    InvalidConfiguration,
    MemoryStore,
    StoreUnavailable,
    open_store,
)
from domainpolicy._blockstate import Effects
from domainpolicy._cli import main
from domainpolicy._stores.redis import RedisStore
from redis_support import RedisCluster, redis_cluster_url, session_cluster, session_server
from store_support import BATCH_POLICY, effects_summary, every_call

pytestmark = pytest.mark.redis

NOW = 1_800_000_000.0
MACHINE = BlockMachine(BATCH_POLICY)


@pytest.fixture
def url(tmp_path: Path) -> str:
    return redis_cluster_url(tmp_path)


@pytest.fixture
def store(url: str) -> Iterator[RedisStore]:
    with RedisStore.from_url(url, server_time=False) as opened:
        yield opened


def _cluster_client(store: RedisStore) -> redis.RedisCluster:
    client = store._client
    assert isinstance(client, redis.RedisCluster)
    return client


def _node_of(store: RedisStore, tenant: str) -> str:
    """The name (host:port) of the primary holding *tenant*'s slot."""
    client = _cluster_client(store)
    keyslot: Any = client.keyslot  # untyped
    node = client.nodes_manager.get_node_from_slot(keyslot(store._tenant_keys(tenant).state))
    name: str = node.name
    return name


def _one_tenant_per_node(store: RedisStore) -> list[str]:
    """Tenant ids whose slots are on different primaries, one per primary."""
    found: dict[str, str] = {}
    number = 0
    while len(found) < len(session_cluster().nodes):
        tenant = f"n{number}"
        found.setdefault(_node_of(store, tenant), tenant)
        number += 1
    return sorted(found.values())


def _node_client(name: str) -> redis.Redis:
    host, port = name.rsplit(":", 1)
    return redis.Redis(host=host, port=int(port), socket_timeout=5)


def _cluster_command(name: str, *args: object) -> Any:
    """``CLUSTER <args>`` on the node *name* (host:port)."""
    with _node_client(name) as node:
        run: Any = node.execute_command  # untyped
        return run("CLUSTER", *args)


def _serves(name: str, key: str, owner: str) -> bool:
    """Whether node *name* agrees that *owner* serves *key*: it answers for the key itself when
    it is the owner, else redirects to the owner."""
    with _node_client(name) as node:
        try:
            node.exists(key)
        except redis.exceptions.ResponseError as exc:
            return name != owner and str(exc).split()[-1] == owner
        return name == owner


# --------------------------------------------------------------------------- URLs


def _nodes(count: int) -> str:
    return ",".join(f"127.0.0.1:{node.port}" for node in session_cluster().nodes[:count])


@pytest.mark.parametrize(
    "form",
    [
        "redis+cluster://{one}",
        "redis+cluster://{one}/",
        "redis+cluster://{one}/0",
        "redis+cluster://{all}/0",
        "redis+cluster://{all}?db=0&socket_keepalive=true",
        "redis+cluster://:@{one}/0",
    ],
)
def test_cluster_url_forms_open_a_cluster_store(url: str, form: str) -> None:
    """One or several startup nodes, with or without /0 and query options: a RedisStore on a
    redis.RedisCluster client that counts, from open_store as from RedisStore.from_url."""
    text = form.format(one=_nodes(1), all=_nodes(3))
    with open_store(text, server_time=False) as opened:
        assert isinstance(opened, RedisStore)
        assert isinstance(opened._client, redis.RedisCluster)
        opened.observe(MACHINE, "t", NOW, registered=True, registrable=None)
        assert opened.tenants() == ["t"]
        assert opened.load("t").window.total == 1


@pytest.mark.parametrize(
    ("form", "named"),
    [
        ("redis+cluster://127.0.0.1:7000/1", "database '1'"),
        ("redis+cluster://127.0.0.1:7000/0?db=3", "database '3'"),
        ("rediss+cluster://127.0.0.1:7000,127.0.0.1:7001/x", "database 'x'"),
        ("redis+cluster://127.0.0.1:notaport/0", "127.0.0.1:notaport"),
        ("redis+cluster://127.0.0.1:7000,/0", "node ''"),
    ],
)
def test_bad_cluster_url_is_a_configuration_error(form: str, named: str) -> None:
    """A database other than 0 (Redis Cluster has only db 0) or a bad node is refused before
    connecting, naming the value and the rule."""
    with pytest.raises(InvalidConfiguration) as info:
        open_store(form)
    assert named in str(info.value)
    assert form in str(info.value)
    if "database" in named:
        assert "only database 0" in str(info.value)


def test_cluster_url_on_a_plain_server_is_a_configuration_error() -> None:
    """A cluster URL pointing at a server not in cluster mode says so."""
    plain = session_server()
    with pytest.raises(InvalidConfiguration, match="not in cluster mode"):
        open_store(f"redis+cluster://127.0.0.1:{plain.port}/0")


def test_unreachable_cluster_is_store_unavailable() -> None:
    """No startup node answers: open_store raises StoreUnavailable (the cluster client needs
    the slot table at once)."""
    with pytest.raises(StoreUnavailable, match="unreachable"):
        open_store("redis+cluster://127.0.0.1:1,127.0.0.1:2/0", connect_timeout=0.2)


def test_cli_reads_a_cluster_store(url: str) -> None:
    """The command line takes a redis+cluster:// store URL (--store) like any other."""
    with open_store(url) as opened:
        opened.apply(
            "t1",
            lambda s, now: MACHINE.operator_block(s, now, by="ops", reason="abuse"),
            NOW,
            action="operator_block",
            actor="ops",
        )
    out = io.StringIO()
    assert main(["tenant", "history", "t1", "--store", url, "--json"], out=out) == 0
    (record,) = [json.loads(line) for line in out.getvalue().splitlines()]
    assert (record["action"], record["after"]) == ("operator_block", "blocked")


# --------------------------------------------------------------------------- batches


def _summaries(results: list[object]) -> list[object]:
    return [effects_summary(r[1]) if isinstance(r, tuple) else type(r) for r in results]


def _expected(items: list[tuple[str, bool, str | None, int]], reference: MemoryStore) -> list[Any]:
    return [
        effects_summary(
            reference.observe(MACHINE, t, NOW, registered=r, registrable=d, weight=w)[1]
        )
        for t, r, d, w in items
    ]


def test_batch_spanning_every_node_matches_observe_one_by_one(store: RedisStore) -> None:
    """A batch whose tenants live on three different primaries, one of them blocked mid-batch:
    the same effects, states and audit trails as observe one by one; each tenant's keys are all
    on its own node, the tenant index on one."""
    tenants = _one_tenant_per_node(store)
    assert len({_node_of(store, t) for t in tenants}) == 3
    items: list[tuple[str, bool, str | None, int]] = []
    for i in range(12):
        for tenant in tenants:
            if tenant == tenants[0]:
                items.append((tenant, False, f"d{i % 4}.example", 1))
            else:
                items.append((tenant, i % 3 == 0, None if i % 3 == 0 else "fwd.example", 1))
    reference = MemoryStore()
    expected = _expected(items, reference)
    assert _summaries(list(store.observe_many(MACHINE, items, NOW))) == expected
    assert store.tenants() == tenants
    for tenant in tenants:
        assert store.load(tenant).to_dict() == reference.load(tenant).to_dict()
        assert [r.to_dict() for r in store.history(tenant)] == [
            r.to_dict() for r in reference.history(tenant)
        ]
        with _node_client(_node_of(store, tenant)) as node:
            assert node.exists(f"dp:{{{tenant}}}:state", f"dp:{{{tenant}}}:bt") == 2
    assert store.load(tenants[0]).state.value == "blocked"


def test_node_that_stops_answering_fails_only_its_items_never_twice(url: str) -> None:
    """One primary pauses writes past the socket timeout mid-batch: its tenant's items are
    StoreUnavailable ("timed out"), the other nodes' items are answered, and the timed-out
    scripts are never sent again (they run once, when the pause ends, or not at all)."""
    with RedisStore.from_url(url, server_time=False, socket_timeout=0.3) as store:
        slow, *others = _one_tenant_per_node(store)
        store.observe_many(MACHINE, [(t, True, None, 1) for t in (slow, *others)], NOW)
        items = [(t, True, None, 1) for t in (slow, *others)] * 3
        with _node_client(_node_of(store, slow)) as node:
            node.client_pause(1200, all=False)  # write commands (EVALSHA) wait
            try:
                results = store.observe_many(MACHINE, items, NOW)
            finally:
                node.client_unpause()
        assert [type(r) for r in results] == [StoreUnavailable, tuple, tuple] * 3
        assert "timed out" in str(results[0])
        time.sleep(0.1)
        assert store.load(slow).window.total in (1, 4)  # ran once after the pause, or not
        for tenant in others:
            assert store.load(tenant).window.total == 4
        results = store.observe_many(MACHINE, [(slow, True, None, 1)] * 2, NOW)
        assert all(isinstance(r, tuple) for r in results)


def test_script_cache_flush_on_every_node_is_survived(store: RedisStore, url: str) -> None:
    """SCRIPT FLUSH on every primary: single observations, batches over all nodes and admin
    events reload the scripts and count every item once."""
    tenants = _one_tenant_per_node(store)
    items = [(t, True, None, 1) for t in tenants] * 2
    store.observe_many(MACHINE, items, NOW)
    client = _cluster_client(store)
    client.script_flush()
    results = store.observe_many(MACHINE, items, NOW)
    assert all(isinstance(r, tuple) for r in results)
    client.script_flush()
    store.observe(MACHINE, tenants[0], NOW, registered=True, registrable=None)
    client.script_flush()
    store.apply(tenants[1], lambda s, now: MACHINE.create_connector(s, now, "c"), NOW, action="c")
    assert [store.load(t).window.total for t in tenants] == [5, 4, 4]


def test_batch_follows_a_slot_that_moved(store: RedisStore) -> None:
    """A tenant's slot moves to another primary after the client read the slot table: the
    batch's scripts get MOVED, not run, and are sent again to the new owner; every item counts
    once (and a single observe follows the move too)."""
    client = _cluster_client(store)
    tenant = "mover"
    keyslot: Any = client.keyslot  # untyped
    slot = keyslot(store._tenant_keys(tenant).state)
    owner = _node_of(store, tenant)
    store.observe_many(MACHINE, [("anchor", True, None, 1)], NOW)  # the slot table is read
    nodes = session_cluster().nodes
    names = [f"127.0.0.1:{node.port}" for node in nodes]
    target = next(name for name in names if name != owner)
    ids = {name: _cluster_command(name, "MYID").decode() for name in names}

    state_key = store._tenant_keys(tenant).state

    def move(source: str, to: str) -> None:
        """Reshard the (empty) slot from *source* to *to* as redis-cli does: IMPORTING and
        MIGRATING first, so that the new owner bumps its config epoch and gossip cannot give
        the slot back; then wait until every node redirects to the new owner."""
        _cluster_command(to, "SETSLOT", slot, "IMPORTING", ids[source])
        _cluster_command(source, "SETSLOT", slot, "MIGRATING", ids[to])
        for name in (to, source, *[n for n in names if n not in (to, source)]):
            _cluster_command(name, "SETSLOT", slot, "NODE", ids[to])
        deadline = time.monotonic() + 10
        while not all(_serves(name, state_key, to) for name in names):
            assert time.monotonic() < deadline, f"slot {slot} did not settle on {to}"
            time.sleep(0.02)  # waiting for the cluster, not measuring time

    move(owner, target)
    try:
        items = [(tenant, True, None, 1)] * 3 + [("anchor", True, None, 1)]
        results = store.observe_many(MACHINE, items, NOW)
        assert all(isinstance(r, tuple) for r in results), results
        assert _node_of(store, tenant) == target
        store.observe(MACHINE, tenant, NOW, registered=True, registrable=None)
        assert store.load(tenant).window.total == 4
    finally:
        session_cluster().flush()
        move(target, owner)


# --------------------------------------------------------------------------- time, failures


def test_server_time_comes_from_the_tenants_primary(url: str) -> None:
    """With server_time the window follows the TIME of the primary holding the tenant (not the
    caller's now), on every node."""
    with RedisStore.from_url(url) as store:
        for tenant in _one_tenant_per_node(store):
            before = store.now()
            state, effects = store.observe(MACHINE, tenant, 5.0, registered=True, registrable=None)
            after = store.now()
            assert int(before / 10) - 1 <= state.window.head <= int(after / 10) + 1
            assert isinstance(effects, Effects)


def test_stopped_cluster_raises_store_unavailable(tmp_path: Path) -> None:
    """A cluster that goes away mid-life: every call raises StoreUnavailable, and a batch gives
    every item StoreUnavailable -- never a driver error, never an accept."""
    cluster = RedisCluster(tmp_path)
    cluster.start()
    try:
        store = RedisStore.from_url(cluster.url, server_time=False, socket_timeout=0.3)
        store.observe(MACHINE, "t", NOW, registered=False, registrable="a.example")
        cluster.stop()
        for call in every_call(store, MACHINE, NOW):
            with pytest.raises(StoreUnavailable):
                call()
        results = store.observe_many(
            MACHINE, [("t", False, "a.example", 1), ("u", True, None, 1)], NOW
        )
        assert [type(r) for r in results] == [StoreUnavailable, StoreUnavailable]
        store.close()
    finally:
        cluster.stop()
