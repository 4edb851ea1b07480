"""Raw `StateStore.observe` calls per second: memory, SQLite and Redis (loopback), side by side.

Accept path: an active tenant far below its limits.  Refuse path: a blocked tenant (5.7.750).
Single process, then 2 processes on the same store (memory cannot be shared: skipped).  Starts
its own ``redis-server`` on a free loopback port (the binary must be installed).

    python benchmarks/bench_stores.py [--quick]

The per-decision facade benchmark (``RelayPolicy.evaluate``) is a separate script.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from domainpolicy import BlockMachine, BlockPolicy, StateStore, open_store
from redis_support import RedisServer  # type: ignore[import-not-found,unused-ignore]

POLICY = BlockPolicy(message_limit=10**8, domain_limit=100, max_tracked_domains=200)
MACHINE = BlockMachine(POLICY)


def _prepare(store: StateStore, path: str) -> str:
    tenant = f"bench-{path}"
    if path == "refuse" and store.load(tenant).state.value == "active":
        store.apply(
            tenant,
            lambda s, now: MACHINE.operator_block(s, now, by="bench", reason="bench"),
            store.now(),
            action="operator_block",
        )
    return tenant


def _run(store: StateStore, tenant: str, count: int) -> float:
    now = time.time()
    started = time.perf_counter()
    for _ in range(count):
        store.observe(MACHINE, tenant, now, registered=False, registrable="spam.example")
    return time.perf_counter() - started


def _worker(url: str, tenant: str, count: int, barrier: object, out: object) -> None:
    store = open_store(url)
    barrier.wait()  # type: ignore[attr-defined]
    elapsed = _run(store, tenant, count)
    store.close()
    out.put(elapsed)  # type: ignore[attr-defined]


def bench(url: str, path: str, count: int, processes: int) -> float:
    """Calls per second over all processes."""
    with open_store(url) as store:
        tenant = _prepare(store, path)
        if processes == 1:
            _run(store, tenant, count // 10)  # warm up
            return count / _run(store, tenant, count)
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(processes)
    out = context.Queue()
    workers = [
        context.Process(target=_worker, args=(url, tenant, count, barrier, out))
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    elapsed: float = max(out.get(timeout=600) for _ in workers)
    for worker in workers:
        worker.join()
    return processes * count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls")
    options = parser.parse_args()
    count = 2_000 if options.quick else 20_000
    with tempfile.TemporaryDirectory() as directory:
        server = RedisServer(Path(directory))
        server.start()
        try:
            urls = {
                "memory": "memory:",
                "sqlite": f"sqlite:{directory}/state.db",
                "redis (loopback)": server.url,
            }
            print(f"{'store':<18} {'path':<7} {'1 process':>12} {'2 processes':>12}")
            for name, base in urls.items():
                for path in ("accept", "refuse"):
                    url = f"{base[:-3]}-{path}.db" if name == "sqlite" else base
                    single = bench(url, path, count, 1)
                    double = bench(url, path, count, 2) if name != "memory" else float("nan")
                    print(f"{name:<18} {path:<7} {single:>10,.0f}/s {double:>10,.0f}/s")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
