"""RedisStore's ``wait_replicas``: ``WAIT`` after a commit, against a real primary and replica
(a replica made with ``REPLICAOF`` on loopback), a primary with no replica, and the test Redis
Cluster (its replicas), with the options' validation and their URL query form."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from domainpolicy import (
    BlockMachine,
    InvalidConfiguration,
    State,
    StoreUnavailable,
    open_store,
)
from domainpolicy._stores.redis import RedisStore
from domainpolicy._stores.redis_schema import Keys
from redis_support import RedisCluster, RedisServer, redis_cluster_url, redis_url
from store_support import BATCH_POLICY

pytestmark = pytest.mark.redis

NOW = 1_800_000_000.0


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, RedisServer]]:
    """A primary and its replica (``REPLICAOF`` on loopback), the link up."""
    primary = RedisServer(tmp_path_factory.mktemp("primary"))
    replica = RedisServer(tmp_path_factory.mktemp("replica"))
    primary.start()
    try:
        replica.start()
        try:
            with replica.client() as client:
                client.replicaof("127.0.0.1", primary.port)
                deadline = time.monotonic() + 20
                while client.info("replication").get("master_link_status") != "up":
                    assert time.monotonic() < deadline, "the replica did not sync"
                    time.sleep(0.02)
            yield primary, replica
        finally:
            replica.stop()
    finally:
        primary.stop()


@pytest.fixture
def fresh(pair: tuple[RedisServer, RedisServer]) -> tuple[RedisServer, RedisServer]:
    with pair[0].client() as client:
        client.flushall()
    return pair


def _block(store: RedisStore, tenant: str) -> None:
    """Observe unregistered mail for *tenant* until it is blocked (transitions on the way)."""
    machine = BlockMachine(BATCH_POLICY)
    for index in range(40):
        state, _ = store.observe(
            machine, tenant, NOW + index * 0.01, registered=False, registrable=f"d{index}.example"
        )
        if state.state is State.BLOCKED:
            return
    raise AssertionError("never blocked")


def _connector(store: RedisStore, tenant: str) -> None:
    machine = BlockMachine(BATCH_POLICY)
    store.apply(
        tenant,
        lambda state, now: machine.create_connector(state, now, "conn-1"),
        NOW,
        action="create_connector",
        actor="ops",
    )


def test_writes_acknowledged_by_the_replica_are_on_it(
    fresh: tuple[RedisServer, RedisServer],
) -> None:
    """With a replica that keeps up, admin events and transitions pass, and are on the replica
    the moment the call returns."""
    primary, replica = fresh
    with open_store(f"{primary.url}?wait_replicas=1&wait_timeout_ms=400", server_time=False) as s:
        assert isinstance(s, RedisStore)
        assert (s.wait_replicas, s.wait_timeout_ms) == (1, 400)
        _connector(s, "admin")
        _block(s, "hot")
        assert s.replication_shortfalls == 0
        assert s.load("hot").state is State.BLOCKED
    with replica.client() as client:
        assert client.hget(Keys("dp:", "admin").state, "doc") is not None
        assert client.hget(Keys("dp:", "hot").state, "st") == b"blocked"


def test_a_replica_that_does_not_acknowledge(
    fresh: tuple[RedisServer, RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    """A stalled replica: an admin event raises StoreUnavailable (and is stored on the primary);
    a transition stands, logged and counted."""
    primary, replica = fresh
    assert replica._process is not None
    pid = replica._process.pid
    with RedisStore.from_url(
        primary.url, server_time=False, wait_replicas=1, wait_timeout_ms=50
    ) as store:
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(StoreUnavailable, match="0 of 1 replicas acknowledged"):
                _connector(store, "admin")
            assert store.load("admin").connectors == (("conn-1", NOW),)
            with caplog.at_level(logging.WARNING, logger="domainpolicy.store"):
                _block(store, "hot")
        finally:
            os.kill(pid, signal.SIGCONT)
        assert store.load("hot").state is State.BLOCKED
        assert store.replication_shortfalls >= 1  # the warning and the block
        assert "a fail-over may lose it" in caplog.text


def test_a_primary_without_replica_times_out(tmp_path: Path) -> None:
    """No replica at all: WAIT times out, the admin event is a StoreUnavailable; without the
    option nothing waits."""
    url = redis_url(tmp_path)
    with RedisStore.from_url(url, wait_replicas=1, wait_timeout_ms=20) as store:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="0 of 1 replicas"):
            _connector(store, "admin")
        assert time.monotonic() - started >= 0.02
    with RedisStore.from_url(url) as store:
        _connector(store, "other")
        assert store.replication_shortfalls == 0


def test_a_flushed_script_cache_is_survived(fresh: tuple[RedisServer, RedisServer]) -> None:
    """The commit after SCRIPT FLUSH is sent as EVAL, and still waited for."""
    primary, _ = fresh
    with RedisStore.from_url(primary.url, wait_replicas=1, wait_timeout_ms=400) as store:
        with primary.client() as client:
            client.script_flush()
        _connector(store, "admin")
        assert store.load("admin").connectors


def test_on_the_cluster_wait_goes_to_the_node_of_the_slot(tmp_path: Path) -> None:
    """Redis Cluster: the commit and its WAIT go to the primary of each tenant's slot (tenants
    spread over the three primaries; a wrong node would answer MOVED), whose replica
    acknowledges; on the test cluster without replicas every admin event is refused."""
    cluster = RedisCluster(tmp_path / "cluster", replicas=1)
    cluster.start()
    try:
        with RedisStore.from_url(
            f"{cluster.url}?wait_replicas=1&wait_timeout_ms=400", server_time=False
        ) as store:
            assert store.wait_replicas == 1
            for tenant in [f"t{index}" for index in range(6)]:
                _connector(store, tenant)
            _block(store, "hot")
            assert store.replication_shortfalls == 0
    finally:
        cluster.stop()
    url = redis_cluster_url(tmp_path)
    with RedisStore.from_url(url, wait_replicas=1, wait_timeout_ms=20) as store:
        for tenant in [f"t{index}" for index in range(6)]:
            with pytest.raises(StoreUnavailable, match="0 of 1 replicas"):
                _connector(store, tenant)
            assert store.load(tenant).connectors


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"wait_replicas": -1}, "wait_replicas=-1"),
        ({"wait_replicas": "1"}, "wait_replicas='1'"),
        ({"wait_replicas": True}, "wait_replicas=True"),
        ({"wait_replicas": 1, "wait_timeout_ms": 0}, "wait_timeout_ms=0"),
        ({"wait_replicas": 1, "wait_timeout_ms": 500}, "below socket_timeout"),
        ({"wait_replicas": 1, "wait_timeout_ms": 900, "socket_timeout": 0.8}, "below socket"),
    ],
)
def test_invalid_options_are_refused(options: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidConfiguration, match=message):
        RedisStore(**options)  # type: ignore[arg-type]


def test_invalid_url_options_are_refused(tmp_path: Path) -> None:
    url = redis_url(tmp_path)
    with pytest.raises(InvalidConfiguration, match="wait_replicas='many'"):
        open_store(f"{url}?wait_replicas=many")
    with pytest.raises(InvalidConfiguration, match="wait_timeout_ms=1000"):
        open_store(f"{url}?wait_replicas=1&wait_timeout_ms=1000")
    with open_store(f"{url}?socket_keepalive=true&wait_timeout_ms=300&wait_replicas=0") as store:
        assert isinstance(store, RedisStore)
        assert (store.wait_replicas, store.wait_timeout_ms) == (0, 300)
        _connector(store, "t")
