"""Benchmark: decisions per second through `RelayPolicy.evaluate` and `evaluate_many`, per store.

Run: ``python benchmarks/bench_policy.py`` (``--quick`` for a short run, ``--stores memory,sqlite``
and ``--batches 1,16,64`` to choose).  For each store it measures the accept path (a tenant's
accepted domain, and tolerated unregistered relay) and the refuse path (a blocked tenant's
unregistered mail), in one process and in two processes sharing the store (memory: one process
only), one message at a time (``evaluate``) and in batches of each size (``evaluate_many``).
A Redis store is measured against a ``redis-server`` this script starts on a free loopback port.

Two processes are two MTAs of a fleet, each serving its own tenants: process ``p`` of ``P``
sends the registered mail of the tenants ``t<j>`` with ``j % P == p`` only, the tolerated
unregistered relay of tenant ``t<P + p>`` and the refused mail of the blocked tenant ``t<p>``
(each tenant's on-premises servers connect from ``10.<j>.0.0/16``).  One process is ``p = 0``
of ``P = 1``: the tenants ``t0`` (blocked) and ``t1`` (tolerated), registered mail of every
tenant.  The processes start together (a barrier) and the rate is every process's decisions
over the longest run.
"""

from __future__ import annotations

import argparse
import ipaddress
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import _support
from domainpolicy import (
    AcceptedDomain,
    BlockPolicy,
    ConnectorTable,
    DomainMatcher,
    InboundConnector,
    StateStore,
    open_store,
)
from domainpolicy._policy import RelayPolicy, RelayRequest

TENANTS = 1000
MATCHER = DomainMatcher.compile(
    [AcceptedDomain(f"tenant{i}.example", f"t{i}") for i in range(TENANTS)]
)
MAX_PROCESSES = 8
# t<j>'s on-premises servers connect from 10.<j>.0.0/16 (the refused and tolerated relay).
CONNECTORS = ConnectorTable.compile(
    [
        InboundConnector(
            f"t{j}-onprem", f"t{j}", sender_ip_ranges=(ipaddress.ip_network(f"10.{j}.0.0/16"),)
        )
        for j in range(2 * MAX_PROCESSES)
    ],
    MATCHER,
)
# High limits so the accept path never blocks during the run; the refuse tenant is blocked first.
POLICY = BlockPolicy(message_limit=10**9, domain_limit=10**6, max_tracked_domains=10**6 + 1)
KINDS = (
    ("accept_registered", True),
    ("accept_unregistered", True),
    ("refuse", False),
)


def requests(kind: str, count: int, process: int = 0, processes: int = 1) -> list[RelayRequest]:
    """A batch of requests for process *process* of *processes*, on its own tenants: their
    own domains, tolerated unregistered relay (tenant ``t<processes + process>``), or refused
    (the blocked tenant ``t<process>``)."""
    if kind == "accept_registered":
        share = TENANTS // processes
        return [
            RelayRequest(f"user@tenant{process + processes * (i % share)}.example")
            for i in range(count)
        ]
    if kind == "accept_unregistered":
        return [
            RelayRequest(f"user@forward{i % 50}.example", client_ip=f"10.{processes + process}.0.7")
            for i in range(count)
        ]
    return [
        RelayRequest(f"spam@forged{i % 50}.example", client_ip=f"10.{process}.0.7")
        for i in range(count)
    ]


def make_policy(store: StateStore) -> RelayPolicy:
    return RelayPolicy(MATCHER, CONNECTORS, POLICY, store)


def timed(
    policy: RelayPolicy, batch: Sequence[RelayRequest], expect_accept: bool, size: int
) -> float:
    """Decisions per second: *batch* through ``evaluate`` one by one (*size* 0) or through
    ``evaluate_many`` in chunks of *size*."""
    if size == 0:
        evaluate = policy.evaluate
        started = time.perf_counter()
        for request in batch:
            decision = evaluate(request)
        elapsed = time.perf_counter() - started
    else:
        chunks = [batch[i : i + size] for i in range(0, len(batch), size)]
        evaluate_many = policy.evaluate_many
        started = time.perf_counter()
        for chunk in chunks:
            decisions = evaluate_many(chunk)
        elapsed = time.perf_counter() - started
        decision = decisions[-1]
    assert decision.accepted is expect_accept, decision
    return len(batch) / elapsed


def worker(
    url: str,
    kind: str,
    count: int,
    process: int,
    processes: int,
    size: int,
    barrier: Any,
    queue: multiprocessing.Queue[float],
) -> None:
    store = open_store(url)
    policy = make_policy(store)
    batch = requests(kind, count, process, processes)
    barrier.wait()
    queue.put(count / timed(policy, batch, kind != "refuse", size))
    store.close()


def block_refused(policy: RelayPolicy, processes: int) -> None:
    """Block the tenants of the refuse path (``t0`` .. ``t<processes - 1>``) in *policy*'s store."""
    for process in range(processes):
        if policy.status(f"t{process}").state.value == "active":
            policy.block(f"t{process}", by="bench", reason="refuse path")


def start_redis(directory: str) -> tuple[subprocess.Popen[bytes], str]:
    started = _support.start_redis(directory)
    if started is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    return started


def mode_name(size: int) -> str:
    return "evaluate" if size == 0 else f"evaluate_many({size})"


def measure(
    name: str, url: str, count: int, repeats: int, processes: int, size: int
) -> dict[str, float]:
    results: dict[str, float] = {}
    for kind, expect in KINDS:
        samples: list[float] = []
        for _ in range(repeats):
            if processes == 1:
                store = open_store(url)
                policy = make_policy(store)
                if kind == "refuse":
                    block_refused(policy, 1)  # in this store: memory: opens a new one each time
                samples.append(timed(policy, requests(kind, count), expect, size))
                store.close()
            else:
                if kind == "refuse":
                    with open_store(url) as shared:
                        block_refused(make_policy(shared), processes)
                context = multiprocessing.get_context("spawn")
                queue: multiprocessing.Queue[float] = context.Queue()
                barrier = context.Barrier(processes)
                pool = [
                    context.Process(
                        target=worker,
                        args=(url, kind, count, i, processes, size, barrier, queue),
                    )
                    for i in range(processes)
                ]
                for process in pool:
                    process.start()
                elapsed = [queue.get(timeout=600) for _ in pool]
                for process in pool:
                    process.join()
                samples.append(processes * count / max(elapsed))
        results[kind] = statistics.median(samples)
        print(
            f"  {name:8s} {processes}p {mode_name(size):18s} {kind:20s} "
            f"{results[kind]:>12,.0f} decisions/s",
            flush=True,
        )
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--stores", default="memory,sqlite,redis")
    parser.add_argument(
        "--batches", default="1,16,64", help="evaluate_many batch sizes ('' for evaluate only)"
    )
    parser.add_argument("--json", metavar="FILE", help="also write every measurement here")
    args = parser.parse_args(argv)
    count, repeats = (2000, 3) if args.quick else (20000, 3)
    stores = args.stores.split(",")
    sizes = [0] + [int(b) for b in args.batches.split(",") if b]
    print(f"Python {sys.version.split()[0]}; {count} decisions per sample, median of {repeats}")
    table: list[tuple[str, int, int, dict[str, float]]] = []
    with tempfile.TemporaryDirectory() as scratch:
        redis_process: subprocess.Popen[bytes] | None = None
        try:
            for name in stores:
                cleanup: Callable[[], None] = lambda: None  # noqa: E731
                if name == "memory":
                    url = "memory:"
                elif name == "sqlite":
                    path = os.path.join(scratch, "bench.sqlite3")
                    url = f"sqlite:{path}"

                    def cleanup(path: str = path) -> None:
                        for suffix in ("", "-wal", "-shm"):
                            if os.path.exists(path + suffix):
                                os.remove(path + suffix)

                elif name == "redis":
                    if redis_process is None:
                        redis_process, redis_url = start_redis(scratch)
                    url = redis_url

                    def cleanup(url: str = url) -> None:
                        import redis

                        client = redis.Redis.from_url(url)
                        client.flushall()
                        client.close()

                else:
                    raise SystemExit(f"unknown store {name!r}")
                for processes in (1,) if name == "memory" else (1, 2):
                    for size in sizes:
                        cleanup()
                        table.append(
                            (
                                name,
                                processes,
                                size,
                                measure(name, url, count, repeats, processes, size),
                            )
                        )
        finally:
            if redis_process is not None:
                redis_process.terminate()
                redis_process.wait()
    print()
    print("| store | processes | call | accept (registered) | accept (unregistered) | refuse |")
    print("|---|---:|---|---:|---:|---:|")
    for name, processes, size, results in table:
        print(
            f"| {name} | {processes} | `{mode_name(size)}` | {results['accept_registered']:,.0f}/s "
            f"| {results['accept_unregistered']:,.0f}/s | {results['refuse']:,.0f}/s |"
        )
    print(
        "\ntargets (issue 6, accept path): memory >= 200k/s, SQLite >= 10k/s, Redis >= 20k/s with batching"
    )
    if args.json:
        _support.write_json(args.json, "bench_policy", [row_record(*row) for row in table])
    return 0


def row_record(store: str, processes: int, size: int, results: dict[str, float]) -> dict[str, Any]:
    """One table row as ``--json`` writes it (``batch`` None: one message per `evaluate` call)."""
    return {
        "store": store,
        "processes": processes,
        "batch": size or None,
        "decisions_per_s": {kind: round(rate) for kind, rate in results.items()},
    }


if __name__ == "__main__":
    raise SystemExit(main())
