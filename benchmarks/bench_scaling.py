"""What one decision and one tenant cost in Redis and SQLite: the inputs of the capacity model
in ``docs/scaling.md``.

Starts its own ``redis-server`` (and, with ``--cluster``, a local three-primary Redis Cluster)
on loopback, generates ``--tenants`` tenants of ``--domains-per-tenant`` accepted domains, and
measures, through the real `RelayPolicy` and stores:

* per decision, for batches of 1, 16 and 256 decisions (`RelayPolicy.evaluate` for 1,
  `evaluate_many` otherwise): the Redis commands (``INFO commandstats``), the round trips (the
  client's ``send_packed_command`` calls), the bytes on the wire both ways (``INFO stats``
  ``total_net_input_bytes``/``total_net_output_bytes``) and the Redis CPU (``INFO cpu``
  ``used_cpu_user`` + ``used_cpu_sys``: scripts, commands and network); the client's CPU per
  decision as well;
* per tenant: Redis memory (``INFO memory`` ``used_memory`` before and after, and
  ``MEMORY USAGE`` of each key of one tenant) after one message and after twenty messages of
  which ten come from distinct unregistered domains; the SQLite file's bytes per tenant after
  the same traffic.

* with ``--matcher-sizes 1000000,5000000``: per MTA host, the matcher of N accepted domains
  (``bench_matcher``'s seeded generator): compile time, snapshot bytes, and, in a fresh
  process, the snapshot load time and the resident memory the loaded matcher adds.

Counts and bytes do not depend on the machine's load; the CPU figures do (compare them with
each other, not across machines).

    python benchmarks/bench_scaling.py                  # 10,000 tenants
    python benchmarks/bench_scaling.py --tenants 2000 --cluster
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
from redis.connection import Connection

import _support
from domainpolicy import RelayPolicy, RelayRequest
from domainpolicy._config import load_config
from domainpolicy._stores import StateStore, open_store

__all__ = ["main"]

CONNECTOR_NET = "198.51.100"


def write_config(directory: Path, tenants: int, per_tenant: int) -> Path:
    """A configuration of *tenants* tenants with *per_tenant* accepted domains each (in a
    domains file) and a connector per tenant (one /32 each), limits never reached."""
    table = directory / "domains.tsv"
    with open(table, "w") as out:
        for t in range(tenants):
            for d in range(per_tenant):
                out.write(f"d{d}.t{t}.example\tt{t}\n")
    lines = [
        'domains_file = "domains.tsv"',
        "",
        "[policy]",
        "message_limit = 1000000000",
        "domain_limit = 50",
        "",
    ]
    for t in range(tenants):
        lines += [f"[tenants.t{t}]", f'domains = ["t{t}.example"]', ""]
    path = directory / "tenants.toml"
    path.write_text("\n".join(lines))
    return path


class Meter:
    """Redis-side counters (commands, CPU, bytes) and client round trips over a block."""

    def __init__(self, clients: Sequence[redis.Redis]) -> None:
        """Read the counters of every node in *clients*."""
        self.clients = clients

    def read(self) -> dict[str, float]:
        """The sum over the nodes of the counters we diff."""
        total: dict[str, float] = {"commands": 0, "evalsha": 0, "usec": 0, "in": 0, "out": 0}
        for client in self.clients:
            stats = client.info("commandstats")
            for name, value in stats.items():
                if name in ("cmdstat_info", "cmdstat_config|resetstat", "cmdstat_cluster|slots"):
                    continue
                if name.startswith("cmdstat_") and not name.startswith("cmdstat_info"):
                    total["commands"] += value["calls"]
                if name == "cmdstat_evalsha":
                    total["evalsha"] += value["calls"]
            cpu = client.info("cpu")  # the server's whole CPU: scripts, commands, network
            total["usec"] += (cpu["used_cpu_user"] + cpu["used_cpu_sys"]) * 1e6
            net = client.info("stats")
            total["in"] += net["total_net_input_bytes"]
            total["out"] += net["total_net_output_bytes"]
        return total


_ROUND_TRIPS = [0]


@contextmanager
def counting_round_trips() -> Iterator[None]:
    """Count `Connection.send_packed_command` calls (one per round trip) in `_ROUND_TRIPS`."""
    original: Any = Connection.send_packed_command

    def counted(self: Connection, command: Any, check_health: bool = True) -> None:
        _ROUND_TRIPS[0] += 1
        original(self, command, check_health)

    Connection.send_packed_command = counted  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        Connection.send_packed_command = original  # type: ignore[method-assign]


def registered(tenants: int, per_tenant: int, serial: int) -> RelayRequest:
    """A message from one of a tenant's accepted domains (the common case)."""
    t = (serial * 7919) % tenants
    return RelayRequest(
        sender=f"u{serial}@d{serial % per_tenant}.t{t}.example",
        client_ip="192.0.2.1",
        recipients=("bob@dest.example",),
        message_id=f"m{serial}",
    )


def unregistered(tenant: int, serial: int) -> RelayRequest:
    """A message from an unregistered domain through the tenant's connector."""
    return RelayRequest(
        sender=f"u@forged{serial}.t{tenant}.example",
        client_ip=f"{CONNECTOR_NET}.{tenant % 250 + 1}",
        recipients=("bob@dest.example",),
        message_id=f"x{tenant}.{serial}",
    )


def per_decision(
    policy: RelayPolicy, meter: Meter, make: Callable[[int], RelayRequest], batch: int, total: int
) -> dict[str, float]:
    """Decide *total* requests in batches of *batch*; the cost per decision."""
    requests = [make(i) for i in range(total)]
    before = meter.read()
    trips = _ROUND_TRIPS[0]
    cpu = time.process_time()
    for start in range(0, total, batch):
        chunk = requests[start : start + batch]
        if batch == 1:
            decision = policy.evaluate(chunk[0])
            assert decision.reason != "store_unavailable", decision
        else:
            for decision in policy.evaluate_many(chunk):
                assert decision.reason != "store_unavailable", decision
    client_cpu = time.process_time() - cpu
    after = meter.read()
    return {
        "commands": (after["commands"] - before["commands"]) / total,
        "evalsha": (after["evalsha"] - before["evalsha"]) / total,
        "round_trips": (_ROUND_TRIPS[0] - trips) / total,
        "bytes_in": (after["in"] - before["in"]) / total,
        "bytes_out": (after["out"] - before["out"]) / total,
        "redis_usec": (after["usec"] - before["usec"]) / total,
        "client_usec": client_cpu / total * 1e6,
    }


def used_memory(clients: Sequence[redis.Redis]) -> int:
    """``used_memory`` summed over the nodes."""
    return sum(int(c.info("memory")["used_memory"]) for c in clients)


def tenant_traffic(policy: RelayPolicy, tenants: int, per_tenant: int, messages: int) -> None:
    """*messages* messages per tenant: half from its domains, half from distinct unregistered
    domains through its connector (one message: a registered one)."""
    batch: list[RelayRequest] = []
    for t in range(tenants):
        for m in range(messages):
            if m % 2 == 0:
                batch.append(
                    RelayRequest(
                        sender=f"u{m}@d{m % per_tenant}.t{t}.example",
                        client_ip="192.0.2.1",
                        recipients=("bob@dest.example",),
                        message_id=f"tt{t}.{m}",
                    )
                )
            else:
                batch.append(unregistered(t, m))
        if len(batch) >= 256:
            policy.evaluate_many(batch)
            batch = []
    if batch:
        policy.evaluate_many(batch)


def with_connectors(config: Path, tenants: int) -> None:
    """Give tenant t a connector for one address of the connector network (t < 250)."""
    extra = []
    for t in range(min(tenants, 250)):
        extra += [
            "[[connectors]]",
            f'name = "c{t}"',
            f'tenant = "t{t}"',
            f'sender_ip_ranges = ["{CONNECTOR_NET}.{t + 1}/32"]',
            "created_at = 2020-01-01T00:00:00Z",
            "",
        ]
    config.write_text(config.read_text() + "\n" + "\n".join(extra))


def measure_store(
    name: str,
    url: str,
    clients: Sequence[redis.Redis],
    config: Path,
    tenants: int,
    per_tenant: int,
) -> None:
    """Print the per-decision table and the per-tenant memory for one Redis deployment."""
    configuration = load_config(config)
    store: StateStore = open_store(url)
    policy = configuration.build_policy(store=store)
    meter = Meter(clients)
    serial = iter(range(10**9))
    with counting_round_trips():
        # Steady state: every tenant seen once (its state read and cached by this client).
        tenant_traffic(policy, tenants, per_tenant, 1)
        print(f"\n### {name}: per decision (registered sender, distinct messages)\n")
        print(
            "| batch | EVALSHA | commands run (with those in scripts) | round trips | bytes to Redis | bytes from Redis "
            "| Redis CPU us | client CPU us |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for batch in (1, 16, 256):
            total = 2048 if batch == 1 else 8192
            base = next(serial) * 100000

            def make(i: int, base: int = base) -> RelayRequest:
                return registered(tenants, per_tenant, base + i)

            row = per_decision(policy, meter, make, batch, total)
            print(
                f"| {batch} | {row['evalsha']:.3f} | {row['commands']:.3f} | {row['round_trips']:.4f} | "
                f"{row['bytes_in']:.0f} | {row['bytes_out']:.0f} | {row['redis_usec']:.1f} | "
                f"{row['client_usec']:.0f} |",
                flush=True,
            )

        def forged(i: int) -> RelayRequest:
            return unregistered(i % 250, 10**6 + i // 250)

        row = per_decision(policy, meter, forged, 256, 4096)
        print(
            f"| 256, unregistered via connector | {row['evalsha']:.3f} | {row['commands']:.3f} | "
            f"{row['round_trips']:.4f} | {row['bytes_in']:.0f} | {row['bytes_out']:.0f} | "
            f"{row['redis_usec']:.1f} | {row['client_usec']:.0f} |",
            flush=True,
        )
    store.close()
    for client in clients:
        client.flushall()
    # memory per tenant
    store = open_store(url)
    policy = configuration.build_policy(store=store)
    print(f"\n### {name}: memory per tenant ({tenants:,} tenants)\n")
    print("| traffic per tenant | used_memory bytes/tenant | MEMORY USAGE of one tenant's keys |")
    print("|---|---:|---|")
    base = used_memory(clients)
    tenant_traffic(policy, tenants, per_tenant, 1)
    one = (used_memory(clients) - base) / tenants
    keys = key_usage(clients, "t1")
    print(f"| 1 registered message | {one:.0f} | {keys} |", flush=True)
    for client in clients:
        client.flushall()
    base = used_memory(clients)
    connected = min(tenants, 250)
    tenant_traffic(policy, connected, per_tenant, 20)
    twenty = (used_memory(clients) - base) / connected
    keys = key_usage(clients, "t1")
    print(
        f"| 20 messages, 10 of them from distinct unregistered domains ({connected} tenants) "
        f"| {twenty:.0f} | {keys} |",
        flush=True,
    )
    store.close()


def key_usage(clients: Sequence[redis.Redis], tenant: str) -> str:
    """``MEMORY USAGE`` of each key of *tenant* (any node)."""
    parts = []
    for client in clients:
        for key in client.scan_iter(match=f"*{{{tenant}}}*", count=1000):
            usage = client.memory_usage(key)
            name = key.decode() if isinstance(key, bytes) else key
            parts.append(f"`{name}` {usage}")
    return ", ".join(sorted(parts)) or "-"


def sqlite_per_tenant(config: Path, directory: Path, tenants: int, per_tenant: int) -> None:
    """Bytes of the SQLite file per tenant after the same traffic."""
    print(f"\n### SQLite: file bytes per tenant ({tenants:,} tenants)\n")
    print("| traffic per tenant | bytes/tenant |")
    print("|---|---:|")
    configuration = load_config(config)
    for messages, label, count in (
        (1, "1 registered message", tenants),
        (20, "20 messages, 10 of them from distinct unregistered domains", min(tenants, 250)),
    ):
        path = directory / f"state-{messages}.sqlite3"
        store = open_store(f"sqlite:{path}")
        policy = configuration.build_policy(store=store)
        empty = _sqlite_bytes(path)
        tenant_traffic(policy, count, per_tenant, messages)
        store.close()
        print(
            f"| {label} ({count} tenants) | {(_sqlite_bytes(path) - empty) / count:.0f} |",
            flush=True,
        )


def _sqlite_bytes(path: Path) -> int:
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        size = db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    return int(pages) * int(size)


def _rss_kb() -> int:
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def matcher_child(mode: str, n: int, path: str) -> None:
    """In a fresh process: ``compile`` N generated entries and save the snapshot, or ``load``
    it; print one JSON line of figures."""
    import gc
    import json

    from domainpolicy import DomainMatcher

    if mode == "compile":
        import bench_matcher

        entries = bench_matcher.generate(n)
        started = time.perf_counter()
        matcher = DomainMatcher.compile(entries)
        took = time.perf_counter() - started
        matcher.save(path)
        print(json.dumps({"compile": took, "bytes": os.path.getsize(path)}))
        return
    gc.collect()
    before = _rss_kb()
    started = time.perf_counter()
    matcher = DomainMatcher.load(path)
    took = time.perf_counter() - started
    gc.collect()
    print(json.dumps({"load": took, "rss_mb": (_rss_kb() - before) / 1024}))
    del matcher


def measure_matchers(sizes: Sequence[int], directory: Path) -> None:
    """The matcher per MTA host at each size, each step in a fresh process."""
    import json
    import subprocess
    import sys

    print("\n### The matcher per MTA host\n")
    print("| accepted domains | compile s | snapshot MB | snapshot load s | RSS added MB |")
    print("|---:|---:|---:|---:|---:|")
    for n in sizes:
        path = str(directory / f"matcher-{n}.snapshot")
        script = str(Path(__file__).resolve())
        made = json.loads(
            subprocess.run(
                [sys.executable, script, "--matcher-child", "compile", str(n), path],
                check=True, capture_output=True, text=True,
            ).stdout.splitlines()[-1]
        )  # fmt: skip
        loaded = json.loads(
            subprocess.run(
                [sys.executable, script, "--matcher-child", "load", str(n), path],
                check=True, capture_output=True, text=True,
            ).stdout.splitlines()[-1]
        )  # fmt: skip
        os.unlink(path)
        print(
            f"| {n:,} | {made['compile']:.1f} | {made['bytes'] / 2**20:.0f} | "
            f"{loaded['load']:.2f} | {loaded['rss_mb']:.0f} |",
            flush=True,
        )


def main(argv: Sequence[str] | None = None) -> None:
    """Measure and print Markdown tables."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--matcher-sizes", default="", help="e.g. 1000000,5000000 (only these)")
    parser.add_argument("--matcher-child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--tenants", type=int, default=10000)
    parser.add_argument("--domains-per-tenant", type=int, default=5)
    parser.add_argument("--cluster", action="store_true", help="also a 3-primary Redis Cluster")
    args = parser.parse_args(argv)
    if args.matcher_child:
        mode, n, path = args.matcher_child
        matcher_child(mode, int(n), path)
        return
    if args.matcher_sizes:
        with tempfile.TemporaryDirectory(prefix="bench-scaling-") as scratch:
            measure_matchers([int(x) for x in args.matcher_sizes.split(",")], Path(scratch))
        return
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as scratch:
        directory = Path(scratch)
        config = write_config(directory, args.tenants, args.domains_per_tenant)
        with_connectors(config, args.tenants)
        print(
            f"{args.tenants:,} tenants, {args.tenants * (args.domains_per_tenant + 1):,} accepted "
            f"domains; redis-py {redis.__version__}; pid {os.getpid()}"
        )
        started = _support.start_redis(scratch)
        if started is None:
            raise SystemExit("redis-server is not installed")
        process, url = started
        try:
            client = redis.Redis.from_url(url)
            measure_store("Redis", url, [client], config, args.tenants, args.domains_per_tenant)
        finally:
            process.terminate()
            process.wait()
        sqlite_per_tenant(config, directory, args.tenants, args.domains_per_tenant)
        if args.cluster:
            processes, ports = _support.start_cluster(scratch)
            try:
                clients = [redis.Redis(port=p) for p in ports]
                cluster_url = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports)
                measure_store(
                    "Redis Cluster, 3 primaries",
                    cluster_url,
                    clients,
                    config,
                    args.tenants,
                    args.domains_per_tenant,
                )
            finally:
                for p in processes:
                    p.terminate()
                    p.wait()


if __name__ == "__main__":
    main()
