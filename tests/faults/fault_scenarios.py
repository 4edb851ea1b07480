"""The fault scenarios: each starts what it needs on loopback (or in a tmpfs), runs the workload
of `fault_workload`, injects its faults on a schedule and returns the checker's `Report`.

The quick tests (``tests/faults``) call them with short runs; ``benchmarks/faults.py`` calls
them with long ones and prints the figures.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import itertools
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fault_history import Fault, Report, check, read_final
from fault_proxy import FaultProxy
from fault_workload import LIMIT, POLICY, Workload, join_processes, run_processes
from redis.crc import key_slot

from domainpolicy import BlockMachine, StoreUnavailable, TenantState, open_store
from domainpolicy._blockstate import Effects
from redis_support import RedisCluster, RedisServer, _cluster

__all__ = [
    "AdminFigures",
    "redis_cluster_failover",
    "redis_cluster_reshard",
    "redis_proxy",
    "redis_replica_failover",
    "sqlite_clock_skew",
    "sqlite_disk_full",
    "tmpfs",
]

Schedule = Sequence[tuple[float, str, float]]
"""Faults: ``(seconds after the workload starts, proxy mode, seconds in force)``."""


def _sleep_until(at: float) -> None:
    time.sleep(max(0.0, at - time.time()))


def redis_proxy(directory: Path, workload: Workload, schedule: Schedule) -> Report:
    """The workload against one real redis-server through a `FaultProxy` that delays, drops or
    cuts on *schedule*; the final state is read from the server directly."""
    server = RedisServer(directory)
    server.start()
    try:
        with FaultProxy(server.port) as proxy:
            start = run_processes(proxy.url, workload, directory)
            faults = []
            try:
                for offset, mode, seconds in schedule:
                    _sleep_until(start + offset)
                    began = time.time()
                    proxy.set_mode(mode)
                    if mode == "cut" and seconds == 0:
                        proxy.set_mode("pass")
                    else:
                        time.sleep(seconds)
                        proxy.set_mode("pass")
                    faults.append(Fault(mode, began, time.time()))
            finally:
                proxy.set_mode("pass")
                ops = join_processes(workload, directory)
        with open_store(server.url) as store:
            final = read_final(store, workload.tenants)
    finally:
        server.stop()
    return check(ops, final, limit=LIMIT, faults=faults)


@contextlib.contextmanager
def tmpfs(mount_point: Path, size: str) -> Iterator[Path]:
    """A tmpfs of *size* mounted at *mount_point* (needs root), unmounted at exit."""
    mount_point.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mount_point)],
        check=True,
        capture_output=True,
    )
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False, capture_output=True)


def _fill(path: Path) -> None:
    """Write zeros to *path* until the filesystem is full, to the last byte."""
    with path.open("wb", buffering=0) as filler:
        for size in (65536, 4096, 512, 1):
            chunk = b"\0" * size
            try:
                while True:
                    filler.write(chunk)
            except OSError:
                continue


def sqlite_disk_full(directory: Path, workload: Workload, full_at: float, seconds: float) -> Report:
    """The workload against SQLite in a small tmpfs that is filled at *full_at* (seconds from
    the workload's start; negative: once every process has opened the store, before the first
    decision) until *seconds* after the start (or after *full_at*), then freed.  A write that
    needs the files to grow then fails with ``database or disk is full``; one that reuses pages
    (a WAL past its first checkpoint) does not need space and succeeds."""
    with tmpfs(directory / "mnt", "8m") as mount:
        url = f"sqlite:{mount / 'state.db'}"
        with open_store(url):
            pass  # create the schema before the workload starts
        faults = []
        began = 0.0

        def fill() -> None:
            nonlocal began
            began = time.time()
            _fill(mount / "filler")

        if full_at < 0:
            start = run_processes(url, workload, directory, before=fill)
        else:
            start = run_processes(url, workload, directory)
        try:
            if full_at >= 0:
                _sleep_until(start + full_at)
                fill()
            _sleep_until(start + max(full_at, 0) + seconds)
            (mount / "filler").unlink()
            faults.append(Fault("disk_full", began, time.time()))
        finally:
            with contextlib.suppress(FileNotFoundError):
                (mount / "filler").unlink()
            ops = join_processes(workload, directory)
        with open_store(url) as store:
            final = read_final(store, workload.tenants)
    return check(ops, final, limit=LIMIT, faults=faults)


def sqlite_clock_skew(directory: Path, workload: Workload) -> Report:
    """The workload against one SQLite file from processes whose policy clocks differ by
    ``workload.skews``."""
    url = f"sqlite:{directory / 'state.db'}"
    run_processes(url, workload, directory)
    ops = join_processes(workload, directory)
    with open_store(url) as store:
        final = read_final(store, workload.tenants)
    return check(ops, final, limit=LIMIT)


def _slot_owner(cluster: RedisCluster, tenant: str) -> int:
    """The index in ``cluster.nodes`` of the original primary of *tenant*'s slot."""
    slot = key_slot(f"{{{tenant}}}:state".encode())
    return slot * cluster.size // 16384


def _wait_cluster_ok(cluster: RedisCluster, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = []
        for node in cluster.nodes:
            if node._process is None:
                continue
            with node.client() as client:
                info: Any = client.execute_command("CLUSTER", "INFO")  # untyped
            states.append(b"cluster_state:ok" in info)
        if all(states):
            return
        time.sleep(0.1)
    raise RuntimeError("Redis Cluster did not come back to cluster_state:ok")


def redis_cluster_failover(
    directory: Path, workload: Workload, *, kill_at: float, failover_at: float | None
) -> Report:
    """The workload against a Redis Cluster of 3 primaries + 3 replicas (cluster-node-timeout
    1 s): at *kill_at* the primary holding ``hot0`` is killed (SIGKILL) and its replica is
    promoted by the cluster; at *failover_at* a manual ``CLUSTER FAILOVER`` (safe: the replica
    catches up first) promotes the replica of another primary.  The final state is read through
    the cluster once it is ``ok`` again."""
    cluster = RedisCluster(directory / "cluster", size=3, replicas=1, node_timeout=1000)
    cluster.start()
    try:
        start = run_processes(cluster.url, workload, directory)
        faults = []
        try:
            victim = _slot_owner(cluster, "hot0")
            _sleep_until(start + kill_at)
            began = time.time()
            cluster.nodes[victim].kill()
            deadline = time.monotonic() + 30
            while cluster.nodes[cluster.size + victim] not in cluster.primaries():
                if time.monotonic() > deadline:
                    raise RuntimeError("the killed primary's replica was not promoted")
                time.sleep(0.02)
            _wait_cluster_ok(cluster)
            faults.append(Fault("primary_killed", began, time.time()))
            if failover_at is not None:
                other = (victim + 1) % cluster.size
                _sleep_until(start + failover_at)
                began = time.time()
                with cluster.nodes[cluster.size + other].client() as replica:
                    replica.execute_command("CLUSTER", "FAILOVER")
                deadline = time.monotonic() + 30
                while cluster.nodes[cluster.size + other] not in cluster.primaries():
                    if time.monotonic() > deadline:
                        raise RuntimeError("manual CLUSTER FAILOVER did not complete")
                    time.sleep(0.02)
                _wait_cluster_ok(cluster)
                faults.append(Fault("manual_failover", began, time.time()))
        finally:
            ops = join_processes(workload, directory)
        live = ",".join(f"127.0.0.1:{n.port}" for n in cluster.nodes if n._process is not None)
        with open_store(f"redis+cluster://{live}/0") as store:
            final = read_final(store, workload.tenants)
    finally:
        cluster.stop()
        _collect_sockets()
    return check(ops, final, limit=LIMIT, faults=faults)


def _collect_sockets() -> None:
    """Known issue: after a fail-over or a slot migration a socket to a cluster node is
    sometimes left for the garbage collector (not found in the suite's own code; suspected in
    redis-py's cluster client).  Collect it here, quietly, rather than at the end of the
    session."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


@dataclass
class AdminFigures:
    """Administrative events of `redis_replica_failover`: acknowledged (`apply` returned),
    refused (`StoreUnavailable`: too few replicas, or the store failed) and acknowledged but
    missing from the final state (**lost**)."""

    acknowledged: int = 0
    refused: int = 0
    lost: int = 0


def _admin_writer(
    url: str, options: dict[str, Any], stop: threading.Event
) -> tuple[list[str], list[str]]:
    """Create connectors ``c0``, ``c1``... for tenant ``admin`` until *stop*; return the
    acknowledged and the refused names."""
    machine = BlockMachine(POLICY)
    acknowledged: list[str] = []
    refused: list[str] = []
    store = open_store(url, **options)
    try:
        for index in itertools.count():
            if stop.is_set():
                break
            name = f"c{index}"

            def create(
                state: TenantState, now: float, name: str = name
            ) -> tuple[TenantState, Effects]:
                return machine.create_connector(state, now, name)

            try:
                store.apply(
                    "admin",
                    create,
                    time.time(),
                    action="create_connector",
                    actor="ops",
                )
            except StoreUnavailable:
                refused.append(name)
            else:
                acknowledged.append(name)
            time.sleep(0.005)
    finally:
        store.close()
    return acknowledged, refused


def redis_replica_failover(
    directory: Path, workload: Workload, *, kill_at: float, lag: float, schedule: Schedule = ()
) -> tuple[Report, AdminFigures]:
    """The workload (and a writer of administrative events, with the same store options) against
    a primary and its replica, promoted by hand as Sentinel would.  The replica follows the
    primary through a `FaultProxy`; the clients reach the primary through another.  *lag*
    seconds before *kill_at* the replication link starts to lag (0.2 s per chunk); at *kill_at*
    the primary is killed (SIGKILL) and the link cut (what was in flight is lost), the replica
    is promoted (``REPLICAOF NO ONE``) and the clients' proxy is pointed at it (their
    connections cut).  *schedule* (a mixed run) are faults of the clients' proxy before that,
    as in `redis_proxy`.  The final state is read from the promoted replica."""
    primary = RedisServer(directory / "primary")
    replica = RedisServer(directory / "replica")
    for server in (primary, replica):
        server.directory.mkdir()
        server.start()
    try:
        with FaultProxy(primary.port) as link, FaultProxy(primary.port) as front:
            with replica.client() as client:
                client.replicaof("127.0.0.1", link.port)
                deadline = time.monotonic() + 30
                while client.info("replication").get("master_link_status") != "up":
                    if time.monotonic() > deadline:
                        raise RuntimeError("the replica did not sync")
                    time.sleep(0.02)
            options = dict(workload.store_options)
            stop = threading.Event()
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                start = run_processes(front.url, workload, directory)
                admin = pool.submit(_admin_writer, front.url, options, stop)
                faults = []
                try:
                    for offset, mode, seconds in schedule:
                        _sleep_until(start + offset)
                        began = time.time()
                        front.set_mode(mode)
                        time.sleep(seconds)
                        front.set_mode("pass")
                        faults.append(Fault(mode, began, time.time()))
                    _sleep_until(start + kill_at - lag)
                    link.set_mode("delay")
                    _sleep_until(start + kill_at)
                    began = time.time()
                    primary.kill()
                    link.set_mode("cut")
                    with replica.client() as client:
                        client.replicaof("NO", "ONE")
                    front.upstream_port = replica.port
                    front.cut_once()
                    faults.append(Fault("primary_killed", began, time.time()))
                finally:
                    ops = join_processes(workload, directory)
                    stop.set()
                    acknowledged, refused = admin.result()
        with open_store(replica.url) as store:
            final = read_final(store, workload.tenants)
            kept = {name for name, _ in store.load("admin").connectors}
    finally:
        replica.stop()
        primary.stop()
    figures = AdminFigures(len(acknowledged), len(refused), len(set(acknowledged) - kept))
    return check(ops, final, limit=LIMIT, faults=faults), figures


def _migrate_slot(cluster: RedisCluster, slot: int, source: int, target: int, pause: float) -> int:
    """Move *slot* with its keys from node *source* to node *target* as ``redis-cli --cluster
    reshard`` does: ``IMPORTING`` / ``MIGRATING``, then ``MIGRATE`` one key at a time (*pause*
    seconds apart, so the slot stays half-moved under load: ``ASK``, ``TRYAGAIN``), then
    ``SETSLOT NODE`` on every node; return how many keys moved."""
    nodes = cluster.nodes
    clients = [node.client() for node in nodes]
    try:
        ids = [_cluster(client, "MYID").decode() for client in clients]
        _cluster(clients[target], "SETSLOT", slot, "IMPORTING", ids[source])
        _cluster(clients[source], "SETSLOT", slot, "MIGRATING", ids[target])
        moved = 0
        while True:
            keys = _cluster(clients[source], "GETKEYSINSLOT", slot, 1)
            if not keys:
                break
            run: Any = clients[source].execute_command  # untyped
            run("MIGRATE", "127.0.0.1", nodes[target].port, "", 0, 5000, "KEYS", *keys)
            moved += len(keys)
            time.sleep(pause)
        for index in (target, source, *[i for i in range(len(nodes)) if i not in (source, target)]):
            _cluster(clients[index], "SETSLOT", slot, "NODE", ids[target])
        return moved
    finally:
        for client in clients:
            client.close()


def redis_cluster_reshard(
    directory: Path, workload: Workload, *, migrate_at: float, pause: float
) -> Report:
    """The workload against a Redis Cluster of 3 primaries: at *migrate_at* the slot of the
    busy tenant ``hot0`` (blocked or about to be, its keys written by every process) is
    migrated to another primary key by key, *pause* seconds between keys, and back again
    once the first move is done.  The final state is read through the cluster."""
    cluster = RedisCluster(directory / "cluster", size=3)
    cluster.start()
    try:
        start = run_processes(cluster.url, workload, directory)
        faults = []
        try:
            slot = key_slot(b"{hot0}:state")
            owner = _slot_owner(cluster, "hot0")
            other = (owner + 1) % cluster.size
            _sleep_until(start + migrate_at)
            for source, target in ((owner, other), (other, owner)):
                began = time.time()
                if not _migrate_slot(cluster, slot, source, target, pause):
                    raise RuntimeError("the busy tenant's slot had no keys to migrate")
                faults.append(Fault(f"slot_migrated_{source}_to_{target}", began, time.time()))
                time.sleep(pause)
        finally:
            ops = join_processes(workload, directory)
        with open_store(cluster.url) as store:
            final = read_final(store, workload.tenants)
    finally:
        cluster.stop()
        _collect_sockets()
    return check(ops, final, limit=LIMIT, faults=faults)
