"""A real ``redis-server`` for the tests, started on a free loopback port.

The session server is started lazily on first use (`redis_url`) and stopped at exit; tests that
need their own server (persistence, a server that goes away) use `RedisServer` directly.  The
session cluster (`redis_cluster_url`: three primaries in cluster mode, no replicas) is started
the same way, on first use, and stopped at exit.  The
binary comes from the Debian package ``redis-server`` (the README's test command installs it);
when it is missing the tests fail with a message saying so -- they are never skipped.
"""

from __future__ import annotations

import atexit
import os
import random
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import redis

__all__ = [
    "RedisCluster",
    "RedisServer",
    "redis_binary",
    "redis_cluster_url",
    "redis_url",
    "session_cluster",
    "session_server",
]

_START_TIMEOUT = 20.0


def redis_binary() -> str:
    """The path of ``redis-server``.

    Raises:
        RuntimeError: the binary is not installed.
    """
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
    )
    if found is None:
        raise RuntimeError(
            "redis-server is not installed: the Redis store tests need a real server. "
            "Install the Debian package: sudo apt-get install -y redis-server"
        )
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _free_cluster_port() -> int:
    """A free loopback port whose cluster bus port (port + 10000) is free too (so at most
    55535: redis-server refuses a higher port in cluster mode)."""
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(20000, 55536)
        if _bindable(port) and _bindable(port + 10000):
            return port
    raise RuntimeError("no free loopback port pair (port, port + 10000) for a cluster node")


class RedisServer:
    """One ``redis-server`` process bound to 127.0.0.1, optionally persistent (AOF in *directory*).

    Args:
        directory: the working directory (logs, and the AOF when *persistent*).
        persistent: append-only file with ``appendfsync always``; otherwise no persistence.
        cluster: cluster mode (``nodes-PORT.conf`` in *directory*); `RedisCluster` assigns the
            slots and joins the nodes.
        node_timeout: ``cluster-node-timeout`` in milliseconds (cluster mode): how long a
            primary may be unreachable before its replica is promoted.
    """

    def __init__(
        self,
        directory: Path,
        *,
        persistent: bool = False,
        cluster: bool = False,
        node_timeout: int = 5000,
    ) -> None:
        self.directory = directory
        self.persistent = persistent
        self.cluster = cluster
        self.node_timeout = node_timeout
        self.port = _free_cluster_port() if cluster else _free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        """A new client (close it)."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def start(self) -> None:
        """Start the server and wait until it answers PING.

        Raises:
            RuntimeError: the binary is missing, or the server did not come up.
        """
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
            if self.persistent
            else ["--appendonly", "no", "--save", ""]
        )
        log = self.directory / f"redis-{self.port}.log"
        if self.cluster:
            persistence += [
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(self.directory / f"nodes-{self.port}.conf"),
                "--cluster-node-timeout", str(self.node_timeout),
            ]  # fmt: skip
        command = [
            redis_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--logfile", str(log),
            "--daemonize", "no",
            *persistence,
        ]  # fmt: skip
        self._process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            if self._process.poll() is not None:
                self._process = None
                text = log.read_text(errors="replace") if log.exists() else "(no log)"
                raise RuntimeError(f"redis-server exited at start: {command}\n{text[-2000:]}")
            try:
                with self.client() as probe:
                    probe.ping()
                    if self.persistent:
                        while probe.info("persistence").get("loading"):
                            time.sleep(0.01)
                return
            except redis.ConnectionError as exc:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not answer on {self.url}") from exc
                time.sleep(0.02)

    def stop(self) -> None:
        """Stop the server (SIGTERM: it writes its AOF and exits) and reap it."""
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        self._reap(process)

    def kill(self) -> None:
        """Kill the server at once (SIGKILL: no AOF rewrite, no goodbye to its cluster)."""
        process, self._process = self._process, None
        if process is None:
            return
        process.kill()
        self._reap(process)

    @staticmethod
    def _reap(process: subprocess.Popen[bytes]) -> None:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def restart(self) -> None:
        """Stop and start again on the same port and directory."""
        self.stop()
        self.start()


_session: list[RedisServer] = []
_session_lock = threading.Lock()


_Started = TypeVar("_Started", "RedisServer", "RedisCluster")


def _shared(started: list[_Started], make: Callable[[Path], _Started], prefix: str) -> _Started:
    """The one *make(directory)* of the test session in *started*: started (in a new temporary
    directory) on first use, stopped and its directory removed at exit."""
    with _session_lock:
        if not started:
            directory = Path(tempfile.mkdtemp(prefix=prefix))
            made = make(directory)
            try:
                made.start()
            except BaseException:
                shutil.rmtree(directory, ignore_errors=True)
                raise
            atexit.register(_stop_shared, made, directory)
            started.append(made)
        return started[0]


def _stop_shared(made: RedisServer | RedisCluster, directory: Path) -> None:
    made.stop()
    shutil.rmtree(directory, ignore_errors=True)


def session_server() -> RedisServer:
    """The server shared by the whole test session, started on first use, stopped at exit."""
    return _shared(_session, RedisServer, "domainpolicy-redis-")


def redis_url(tmp_path: Path) -> str:
    """Flush the session server and return its URL (a store factory for the conformance suite)."""
    server = session_server()
    with server.client() as client:
        client.flushall()
    return server.url


_SLOTS = 16384


def _cluster(client: redis.Redis, *args: object) -> Any:
    """``CLUSTER <args>`` on one node."""
    run: Any = client.execute_command  # untyped
    return run("CLUSTER", *args)


class RedisCluster:
    """A Redis Cluster of *size* ``redis-server`` primaries on free loopback ports, each in its
    own directory under *directory*; the slots are split evenly between them.  With
    *replicas*, each primary gets that many replicas (``CLUSTER REPLICATE``), and `start`
    returns once every replica's link to its primary is up; *node_timeout* is every node's
    ``cluster-node-timeout`` (milliseconds).

    The cluster is made with redis-py (``CLUSTER ADDSLOTS``, ``CLUSTER SET-CONFIG-EPOCH``,
    ``CLUSTER MEET``) rather than ``redis-cli --cluster create``, which sleeps a second per
    check; `start` returns once every node says ``cluster_state:ok``.
    """

    def __init__(
        self, directory: Path, *, size: int = 3, replicas: int = 0, node_timeout: int = 5000
    ) -> None:
        self.directory = directory
        self.size = size
        self.nodes: list[RedisServer] = []
        for index in range(size * (1 + replicas)):
            node_directory = directory / f"node{index}"
            node_directory.mkdir(parents=True, exist_ok=True)
            self.nodes.append(RedisServer(node_directory, cluster=True, node_timeout=node_timeout))

    @property
    def url(self) -> str:
        """``redis+cluster://127.0.0.1:P1,127.0.0.1:P2,.../0``: every node a startup node."""
        hosts = ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)
        return f"redis+cluster://{hosts}/0"

    def start(self) -> None:
        """Start the nodes, assign the slots, join them and wait for ``cluster_state:ok``.

        Raises:
            RuntimeError: a binary is missing, or the cluster did not come up.
        """
        try:
            for node in self.nodes:
                node.start()
            size = self.size
            clients = [node.client() for node in self.nodes]
            try:
                for index, client in enumerate(clients[:size]):
                    first, last = index * _SLOTS // size, (index + 1) * _SLOTS // size
                    _cluster(client, "ADDSLOTS", *range(first, last))
                for index, client in enumerate(clients):
                    _cluster(client, "SET-CONFIG-EPOCH", index + 1)
                for node in self.nodes[1:]:
                    _cluster(clients[0], "MEET", "127.0.0.1", node.port)
                self._wait_until_ok(clients)
                if len(clients) > size:
                    self._replicate(clients)
            finally:
                for client in clients:
                    client.close()
        except BaseException:
            self.stop()
            raise

    def _wait_until_ok(self, clients: list[redis.Redis]) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        size = str(len(clients))
        while True:
            infos = [
                dict(
                    line.split(":", 1)
                    for line in _cluster(client, "INFO").decode().split()
                    if ":" in line
                )
                for client in clients
            ]
            if all(
                info.get("cluster_state") == "ok" and info.get("cluster_known_nodes") == size
                for info in infos
            ):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"Redis Cluster did not come up: {infos}")
            time.sleep(0.02)

    def _replicate(self, clients: list[redis.Redis]) -> None:
        """Make node ``size + k`` a replica of primary ``k % size``; wait until every link is up."""
        ids = [_cluster(client, "MYID").decode() for client in clients[: self.size]]
        for index, client in enumerate(clients[self.size :]):
            deadline = time.monotonic() + _START_TIMEOUT
            while True:  # the replica must have learnt the primary's id from the gossip first
                try:
                    _cluster(client, "REPLICATE", ids[index % self.size])
                    break
                except redis.ResponseError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        deadline = time.monotonic() + _START_TIMEOUT
        while not all(
            client.info("replication").get("master_link_status") == "up"
            for client in clients[self.size :]
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("Redis Cluster replicas did not sync")
            time.sleep(0.05)
        self._wait_until_ok(clients)

    def primaries(self) -> list[RedisServer]:
        """The nodes that are primaries now (after fail-overs), by ``ROLE``; unreachable nodes
        are left out."""
        found = []
        for node in self.nodes:
            if node._process is None:
                continue
            with node.client() as client:
                try:
                    role: Any = client.execute_command("ROLE")  # untyped
                except redis.ConnectionError:
                    continue
            if role[0] in (b"master", "master"):
                found.append(node)
        return found

    def flush(self) -> None:
        """``FLUSHALL`` on every primary."""
        for node in self.nodes[: self.size]:
            with node.client() as client:
                client.flushall()

    def stop(self) -> None:
        """Stop every node."""
        for node in self.nodes:
            node.stop()


_clusters: list[RedisCluster] = []


def session_cluster() -> RedisCluster:
    """The cluster shared by the whole test session, started on first use, stopped at exit."""
    return _shared(_clusters, RedisCluster, "domainpolicy-redis-cluster-")


def redis_cluster_url(tmp_path: Path) -> str:
    """Flush every node of the session cluster and return its ``redis+cluster://`` URL (a store
    factory for the conformance suite)."""
    cluster = session_cluster()
    cluster.flush()
    return cluster.url
