"""Redis Cluster for `RedisStore`: cluster URLs, the error replies that mean a script did not
run, and one round of a batch split by node.

Imports redis-py, `_resp` and the pure core; only `domainpolicy._stores.redis` uses it.

Redis Cluster
-------------
Open it with ``redis+cluster://host:port[,host:port...]/0`` (``rediss+cluster://`` for TLS;
`RedisStore.from_cluster_url`, `open_store`), or pass a ``redis.RedisCluster`` client.  Every
script touches the keys of one tenant only, all in one slot (hash tag), so the scripts run
unchanged; ``SCRIPT LOAD`` after a ``NOSCRIPT`` goes to every primary.  The ``tenants`` set is
the one key outside the tenant's slot: it is written with a separate command (before the first
write for a tenant in each process, and again when a script reports that it created the
tenant), and `RedisStore.tenants` (an admin operation: ``SMEMBERS`` plus an ``EXISTS`` per
member) lists the members that have a stored state.

`RedisStore.observe_many` does not use redis-py's cluster pipeline: redis-py refuses ``EVALSHA``
in it ("Calling pipelined function evalsha is blocked when running redis in cluster mode", so
every batched item would be a temporary failure), and it sends again, one by one, every command
of a node whose connection failed or timed out -- a script that may have run would be counted
twice.  The store
splits a round by the primary that serves each tenant's slot (from the client's slot table),
writes each node's share on a connection of that node's pool, all nodes before reading any
reply, and never sends a command again: a node that fails or times out gives its items
`StoreUnavailable`, the other nodes' items are answered.  A ``MOVED``, ``ASK``, ``TRYAGAIN`` or
``CLUSTERDOWN`` reply means the script did not run: the store refreshes the slot table and sends
the tenant's items again in the next round (three times at most, then `StoreUnavailable`).  The
order of a tenant's items is kept: they all go to the one node of its slot.

With ``server_time=True`` a tenant's window follows the ``TIME`` of the primary holding its slot;
`RedisStore.now` reads the client's default node.  Keep the nodes' clocks in sync (NTP), as
for the MTAs themselves.  The cluster client connects when the store is opened (it needs the
slot table): an unreachable cluster is a `StoreUnavailable` from `open_store`.  Redis Cluster has
one database: a cluster URL naming another one is an `InvalidConfiguration`.  A
``redis.RedisCluster`` client given to the store should have retries off
(``retry=Retry(NoBackoff(), 0)``, as the store's own clients), or a timed-out single ``observe``
may be sent twice.

Fail-over and what it can lose
------------------------------
Redis replicates asynchronously.  A master that dies before its replica received the latest
writes takes them with it: the counts of the last moments (typically milliseconds, up to the
replication lag) and, in the worst case, a block, a suspension or an admin event that had just
been acknowledged.  Counts that are lost only make the window more lenient by that amount; a
lost block is made again by the next message over the limit, because the counts that caused it
are still being sent.  A lost administrative event (an approval) must be repeated; its audit
record is lost with it.  The store's ``wait_replicas`` option (``WAIT`` after every state
change, to the node of the tenant's slot; see `domainpolicy._stores.redis`) and
``min-replicas-to-write`` on the server narrow the gap; persistence (AOF with
``appendfsync always``/``everysec``) covers restarts of a single server, not fail-over.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

import redis
from redis.cluster import ClusterNode
from redis.exceptions import AskError, ClusterDownError, MovedError, TryAgainError

from domainpolicy._errors import InvalidConfiguration, StoreUnavailable
from domainpolicy._stores._resp import ERRORS, Prepared, Wire

__all__ = ["CLUSTER_SCHEMES", "NOT_RUN", "cluster_round", "cluster_url"]

CLUSTER_SCHEMES: Final = ("redis+cluster://", "rediss+cluster://")


NOT_RUN: Final = (MovedError, AskError, TryAgainError, ClusterDownError)
"""Cluster error replies to a script that did not run: its slot moved, is migrating, or the
cluster is down.  A batch sends the script again (bounded) after refreshing the slot table."""


def cluster_url(url: str) -> tuple[str, list[ClusterNode]]:
    """Split ``redis+cluster://[userinfo@]host:port[,host:port...][/0][?query]`` into a
    ``redis://`` URL of the first node (with the userinfo, path and query, for
    ``redis.RedisCluster(url=...)``) and the other startup nodes.

    Raises:
        InvalidConfiguration: no scheme of a cluster, a bad host or port, a database other
            than 0.
    """
    if not url.startswith(CLUSTER_SCHEMES):
        raise InvalidConfiguration(
            [f"store url {url!r}: a Redis Cluster URL starts with redis+cluster:// or "
             "rediss+cluster://"],
            source="RedisStore",
        )  # fmt: skip
    scheme = url[: url.index("+cluster://")]
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    problems: list[str] = []
    nodes: list[ClusterNode] = []
    for host_port in hosts.split(","):
        try:
            split = urlsplit(f"//{host_port}")
            host, port = split.hostname, split.port
        except ValueError as exc:
            problems.append(f"node {host_port!r}: {exc}")
            continue
        if not host or split.username is not None or split.path:
            problems.append(f"node {host_port!r}: expected host:port")
            continue
        node: Any = ClusterNode  # untyped
        nodes.append(node(host, port or 6379))
    databases = parse_qs(parts.query).get("db", [])
    if parts.path not in ("", "/"):
        databases.insert(0, parts.path[1:])
    for database in databases:
        if database != "0":
            problems.append(
                f"database {database!r}: Redis Cluster has only database 0 "
                "(end the URL with /0 or no path)"
            )
    if problems:
        raise InvalidConfiguration(
            [f"store url {url!r}: {problem}" for problem in problems], source="RedisStore"
        )
    query = f"?{parts.query}" if parts.query else ""
    first = f"{scheme}://{userinfo}{at}{hosts.split(',')[0]}{parts.path}{query}"
    return first, nodes[1:]


def cluster_round(
    client: redis.RedisCluster,
    wire: Wire,
    prepared: Mapping[int, Prepared],
    pending: Sequence[int],
    commands: Sequence[bytes],
    fail: Callable[[str, Exception], StoreUnavailable],
) -> list[object]:
    """`RedisStore._round` on Redis Cluster: each node's commands (the items whose tenant's slot it
    serves, in batch order) are written on a connection of that node's pool, to every node
    before any reply is read; then the replies are read node by node.

    Nothing is ever sent twice (redis-py's cluster pipeline sends every command of a node
    whose connection failed or timed out again, one by one: a script that may have run would
    be counted twice).  The items of a node that cannot be reached, or whose replies do not
    come in time, get the `StoreUnavailable` in place of their reply; the other nodes' items
    are answered.  *fail* makes the `StoreUnavailable` of a failed node from what failed and
    the driver's exception."""
    replies: list[object] = [None] * len(pending)
    groups: dict[str, tuple[redis.ConnectionPool, list[int]]] = {}
    for position, index in enumerate(pending):
        keys = prepared[index][0]
        try:
            if keys.slot < 0:
                keyslot: Any = client.keyslot  # untyped
                keys.slot = keyslot(keys.state)
            node = client.nodes_manager.get_node_from_slot(keys.slot)
            pool = client.get_redis_connection(node).connection_pool
        except ERRORS as exc:
            replies[position] = fail("observe batch: no node for the slot", exc)
            continue
        groups.setdefault(node.name, (pool, []))[1].append(position)
    sent: list[tuple[str, redis.ConnectionPool, Any, list[int]]] = []
    try:
        for name, (pool, positions) in groups.items():
            try:
                connection = wire.send(pool, b"".join(commands[p] for p in positions))
            except ERRORS as exc:
                failed = fail(f"observe batch of {len(positions)} on {name}", exc)
                for position in positions:
                    replies[position] = failed
                continue
            sent.append((name, pool, connection, positions))
        while sent:
            name, pool, connection, positions = sent.pop(0)
            try:
                got = wire.receive(pool, connection, len(positions))
            except ERRORS as exc:
                failed = fail(f"observe batch of {len(positions)} on {name}", exc)
                for position in positions:
                    replies[position] = failed
                continue
            for position, reply in zip(positions, got, strict=True):
                replies[position] = reply
    finally:
        for _, pool, connection, _ in sent:  # interrupted: replies left unread
            connection.disconnect()
            pool.release(connection)
    return replies
