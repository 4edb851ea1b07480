"""Raw `StateStore.observe` calls per second: memory, SQLite and Redis (loopback), side by side.

Accept path: an active tenant far below its limits.  Refuse path: a blocked tenant (5.7.750).
Single process, then 2 processes on the same store (memory cannot be shared: skipped).  Starts
its own ``redis-server`` on a free loopback port (the binary must be installed).

Then the same through `StateStore.observe_many` in batches (``--batch``, 64 by default; 0 skips
it): in one process, and in 2 processes that are two MTAs of a fleet, each serving its own
tenants (process ``p`` observes the tenants ``bench-<path>-p<p>-<j>``, 64 of them on the accept
path, one blocked tenant on the refuse path), so no tenant is shared between the processes.

    python benchmarks/bench_stores.py [--quick] [--batch N]

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
from domainpolicy._stores import ObserveItem
from redis_support import RedisServer  # type: ignore[import-not-found,unused-ignore]

POLICY = BlockPolicy(message_limit=10**8, domain_limit=100, max_tracked_domains=200)
MACHINE = BlockMachine(POLICY)
FLEET_TENANTS = 64  # accept-path tenants of each process in batch mode


def _block(store: StateStore, tenant: str) -> None:
    if store.load(tenant).state.value == "active":
        store.apply(
            tenant,
            lambda s, now: MACHINE.operator_block(s, now, by="bench", reason="bench"),
            store.now(),
            action="operator_block",
        )


def _prepare(store: StateStore, path: str) -> str:
    tenant = f"bench-{path}"
    if path == "refuse":
        _block(store, tenant)
    return tenant


def _items(path: str, process: int, count: int) -> list[ObserveItem]:
    """Batch mode: *count* observations of process *process*'s own tenants."""
    if path == "refuse":
        return [(f"bench-{path}-p{process}-0", False, "spam.example", 1)] * count
    return [
        (f"bench-{path}-p{process}-{i % FLEET_TENANTS}", False, "spam.example", 1)
        for i in range(count)
    ]


def _run(store: StateStore, tenant: str, count: int) -> float:
    now = time.time()
    started = time.perf_counter()
    for _ in range(count):
        store.observe(MACHINE, tenant, now, registered=False, registrable="spam.example")
    return time.perf_counter() - started


def _run_batches(store: StateStore, items: list[ObserveItem], batch: int) -> float:
    chunks = [items[i : i + batch] for i in range(0, len(items), batch)]
    now = time.time()
    observe_many = store.observe_many
    started = time.perf_counter()
    for chunk in chunks:
        results = observe_many(MACHINE, chunk, now)
    elapsed = time.perf_counter() - started
    assert all(isinstance(r, tuple) for r in results), results
    return elapsed


def _measure(store: StateStore, path: str, count: int, batch: int, process: int) -> float:
    """Seconds for *count* observations (a warm-up first): one by one, or in batches."""
    if batch:
        items = _items(path, process, count)
        if path == "refuse":
            _block(store, items[0][0])
        _run_batches(store, items[: count // 10], batch)  # warm up
        return _run_batches(store, items, batch)
    tenant = _prepare(store, path)
    _run(store, tenant, count // 10)  # warm up
    return _run(store, tenant, count)


def _worker(
    url: str, path: str, count: int, batch: int, process: int, barrier: object, out: object
) -> None:
    store = open_store(url)
    if batch:
        items = _items(path, process, count)
        if path == "refuse":
            _block(store, items[0][0])
        _run_batches(store, items[: count // 10], batch)  # warm up
        barrier.wait()  # type: ignore[attr-defined]
        elapsed = _run_batches(store, items, batch)
    else:
        tenant = f"bench-{path}"
        barrier.wait()  # type: ignore[attr-defined]
        elapsed = _run(store, tenant, count)
    store.close()
    out.put(elapsed)  # type: ignore[attr-defined]


def bench(url: str, path: str, count: int, processes: int, batch: int = 0) -> float:
    """Calls per second over all processes: `observe` one by one (*batch* 0, every process on
    the same tenant), or `observe_many` in batches of *batch* (each process its own tenants)."""
    if processes == 1:
        with open_store(url) as store:
            return count / _measure(store, path, count, batch, 0)
    if not batch:
        with open_store(url) as store:
            _prepare(store, path)
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(processes)
    out = context.Queue()
    workers = [
        context.Process(target=_worker, args=(url, path, count, batch, i, barrier, out))
        for i in range(processes)
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
    parser.add_argument(
        "--batch", type=int, default=64, help="observe_many batch size (0: observe only)"
    )
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
            modes = [0, options.batch] if options.batch else [0]
            for batch in modes:
                call = f"observe_many({batch})" if batch else "observe"
                print(f"\n{call}")
                print(f"{'store':<18} {'path':<7} {'1 process':>12} {'2 processes':>12}")
                for name, base in urls.items():
                    for path in ("accept", "refuse"):
                        url = f"{base[:-3]}-{path}.db" if name == "sqlite" else base
                        single = bench(url, path, count, 1, batch)
                        double = (
                            bench(url, path, count, 2, batch) if name != "memory" else float("nan")
                        )
                        print(f"{name:<18} {path:<7} {single:>10,.0f}/s {double:>10,.0f}/s")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
