"""Raw `StateStore.observe` calls per second: memory, SQLite and Redis (loopback), side by side.

Accept path: an active tenant far below its limits.  Refuse path: a blocked tenant (5.7.750).
Single process, then 2 processes on the same store (memory cannot be shared: skipped).  Starts
its own ``redis-server`` on a free loopback port (the binary must be installed).

Then the same through `StateStore.observe_many` in batches (``--batch``, 64 by default; 0 skips
it): in one process, and in 2 processes that are two MTAs of a fleet, each serving its own
tenants (process ``p`` observes the tenants ``bench-<path>-p<p>-<j>``, 64 of them on the accept
path, one blocked tenant on the refuse path), so no tenant is shared between the processes.

    python benchmarks/bench_stores.py [--quick] [--batch N]
    python benchmarks/bench_stores.py --floors [--before REV] [--quick]

``--floors`` measures a single `observe` against the floor of its store, in rounds alternating
the rows in one process: SQLite against ``BEGIN IMMEDIATE`` + one UPSERT + ``COMMIT`` on a file
with the same settings (WAL, ``synchronous=NORMAL``), Redis against a trivial ``EVALSHA`` round
trip on the store's own client.  ``--before REV`` adds the stores as they were at git revision
*REV* (their modules copied out of git into ``domainpolicy._stores.*_before``) as "before" rows.

The per-decision facade benchmark (``RelayPolicy.evaluate``) is a separate script.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from domainpolicy import BlockMachine, BlockPolicy, SQLiteStore, StateStore, open_store
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


def _module_before(rev: str, name: str, renames: dict[str, str]) -> object:
    """``domainpolicy/_stores/<name>.py`` at *rev*, imported as ``..._stores.<name>_before``
    (its imports of the modules in *renames* pointed at their own "before" copies)."""
    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(
        ["git", "show", f"{rev}:src/domainpolicy/_stores/{name}.py"],
        cwd=root,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    for old, new in renames.items():
        source = source.replace(
            f"domainpolicy._stores.{old} import", f"domainpolicy._stores.{new} import"
        )
    path = Path(tempfile.mkdtemp()) / f"{name}_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"domainpolicy._stores.{name}_before", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _sqlite_floor(path: str) -> object:
    """One durable write: BEGIN IMMEDIATE + one UPSERT + COMMIT (WAL, synchronous=NORMAL)."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE IF NOT EXISTS c (k TEXT PRIMARY KEY, n INTEGER NOT NULL)")

    def write() -> None:
        db.execute("BEGIN IMMEDIATE")
        db.execute(
            "INSERT INTO c (k, n) VALUES ('bench', 1) ON CONFLICT (k) DO UPDATE SET n = n + 1"
        )
        db.execute("COMMIT")

    return write


def _observer(store: StateStore, path: str) -> object:
    tenant = _prepare(store, path)
    now = time.time()

    def call() -> None:
        store.observe(MACHINE, tenant, now, registered=False, registrable="spam.example")

    return call


def floors(count: int, rounds: int, before: str | None) -> None:
    """Single `observe` against the floor of its store, rows alternating in rounds."""
    old: dict[str, object] = {}
    if before:
        old["sqlite"] = _module_before(before, "sqlite", {})
        schema = _module_before(before, "redis_schema", {})
        del schema
        resp = _module_before(before, "_resp", {"redis_schema": "redis_schema_before"})
        del resp
        old["redis"] = _module_before(
            before, "redis", {"redis_schema": "redis_schema_before", "_resp": "_resp_before"}
        )
    with tempfile.TemporaryDirectory() as directory:
        server = RedisServer(Path(directory))
        server.start()
        try:
            for path in ("accept", "refuse"):
                rows: dict[str, object] = {}
                rows["sqlite floor"] = _sqlite_floor(f"{directory}/floor-{path}.db")
                if before:
                    store = old["sqlite"].SQLiteStore(f"{directory}/before-{path}.db")  # type: ignore[attr-defined]
                    rows["sqlite before"] = _observer(store, path)
                rows["sqlite"] = _observer(SQLiteStore(f"{directory}/after-{path}.db"), path)
                after = open_store(server.url)
                client = after._client  # type: ignore[attr-defined]
                trivial = client.register_script("return 1")
                rows["redis floor"] = lambda trivial=trivial: trivial(keys=[], args=[])
                if before:
                    store = old["redis"].RedisStore.from_url(server.url)  # type: ignore[attr-defined]
                    rows["redis before"] = _observer(store, f"{path}")
                rows["redis"] = _observer(after, path)
                times: dict[str, list[float]] = {name: [] for name in rows}
                for _ in range(rounds):
                    for name, call in rows.items():
                        for _ in range(count // 10):
                            call()  # type: ignore[operator]
                        started = time.perf_counter()
                        for _ in range(count):
                            call()  # type: ignore[operator]
                        times[name].append(time.perf_counter() - started)
                print(f"\nsingle observe, {path} path ({rounds} rounds of {count}, median)")
                print(f"{'row':<16} {'calls/s':>10} {'x floor':>8}")
                for name, seconds in times.items():
                    rate = count / statistics.median(seconds)
                    floor = count / statistics.median(times[name.split()[0] + " floor"])
                    print(f"{name:<16} {rate:>8,.0f}/s {rate / floor:>7.2f}x")
        finally:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls")
    parser.add_argument(
        "--batch", type=int, default=64, help="observe_many batch size (0: observe only)"
    )
    parser.add_argument("--floors", action="store_true", help="single observe against floors")
    parser.add_argument("--before", metavar="REV", help="with --floors: the stores at REV too")
    parser.add_argument("--rounds", type=int, default=5, help="with --floors: rounds")
    options = parser.parse_args()
    count = 2_000 if options.quick else 20_000
    if options.floors:
        floors(count // 4, options.rounds, options.before)
        return
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
