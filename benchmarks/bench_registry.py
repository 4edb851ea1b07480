"""The tenant registry: change-to-enforced latency, incremental changes against a full compile,
start from a snapshot against from the registry, and the version poll's cost on decisions.

    python benchmarks/bench_registry.py [--quick] [--domains 1000000] [--changes 50]

Everything is measured in one run, side by side (the machines are shared: compare ratios).

* **latency**: a second process decides with `RelayPolicy.from_registry` (poll every 50 ms);
  this process registers a new domain N times; the time from the commit to the first decision
  in the other process that accepts the domain: median and p99, SQLite and Redis (a private
  ``redis-server`` on loopback);
* **with_changes vs compile**: one domain added to a registry of ``--domains`` domains, applied
  with `RegistryView.apply` (`DomainMatcher.with_changes`), against `DomainMatcher.compile` of
  the same final registry;
* **start**: a process's registry at ``--domains`` domains on SQLite, from a registry snapshot
  (`view_from_snapshot`: load, then the changes since) against from the registry's log;
* **poll cost**: decisions/s of an accepted domain through `RelayPolicy.evaluate` (MemoryStore:
  the check alone; SQLite: with a real store), with the registry poll (every 250 ms, the
  default) against the same policy with a static matcher, in alternated rounds.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from _support import start_redis
from domainpolicy import AcceptedDomain, DomainMatcher, MemoryStore, SQLiteStore, open_store
from domainpolicy._policy import RelayPolicy, RelayRequest
from domainpolicy._registry import RegistryChange, RegistryRecord, RegistryView
from domainpolicy._registry_snapshot import snapshot_registry, view_from_snapshot


def entries(count: int) -> list[AcceptedDomain]:
    """*count* domains over count/100 tenants, deterministic."""
    return [AcceptedDomain(f"d{i}.example{i % 97}.com", f"t{i // 100}") for i in range(count)]


def _enforcer(
    url: str, names: multiprocessing.Queue[object], seen: multiprocessing.Queue[object]
) -> None:
    store = open_store(url)
    policy = RelayPolicy.from_registry(store, poll_interval=0.05)
    seen.put("ready")
    while True:
        name = names.get()
        if name is None:
            break
        request = RelayRequest(f"x@{name}")
        while policy.evaluate(request).reason != "accepted_domain":
            time.sleep(0.0005)
        seen.put(time.time())
    store.close()


def latency(url: str, changes: int) -> list[float]:
    """Seconds from commit to enforcement in another process, for *changes* changes."""
    store = open_store(url)
    store.registry_commit(  # type: ignore[attr-defined]
        [RegistryChange.add_domain(AcceptedDomain("seed.example", "t"))], actor="b", now=1.0
    )
    context = multiprocessing.get_context("spawn")
    names: multiprocessing.Queue[object] = context.Queue()
    seen: multiprocessing.Queue[object] = context.Queue()
    child = context.Process(target=_enforcer, args=(url, names, seen))
    child.start()
    assert seen.get(timeout=60) == "ready"
    delays = []
    for i in range(changes):
        name = f"n{i}.latency.example"
        names.put(name)
        time.sleep(0.07)  # the child is polling for it, as an MTA would be deciding
        committed = time.time()
        store.registry_commit(  # type: ignore[attr-defined]
            [RegistryChange.add_domain(AcceptedDomain(name, "t"))], actor="b", now=committed
        )
        enforced = seen.get(timeout=60)
        assert isinstance(enforced, float)
        delays.append(enforced - committed)
    names.put(None)
    child.join(60)
    store.close()
    return delays


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def bench_latency(changes: int) -> None:
    print(f"\n== change-to-enforced latency across processes ({changes} changes, poll 50 ms) ==")
    with tempfile.TemporaryDirectory() as scratch:
        targets = [("sqlite", f"sqlite:{scratch}/latency.db")]
        redis = start_redis(scratch)
        if redis is not None:
            targets.append(("redis", redis[1]))
        try:
            for name, url in targets:
                delays = latency(url, changes)
                print(
                    f"{name:8} median {statistics.median(delays) * 1000:7.1f} ms   "
                    f"p99 {percentile(delays, 0.99) * 1000:7.1f} ms   "
                    f"max {max(delays) * 1000:7.1f} ms"
                )
        finally:
            if redis is not None:
                redis[0].kill()
                redis[0].wait()


def bench_changes(count: int) -> None:
    print(f"\n== one change at {count:,} domains: with_changes against a full compile ==")
    base = entries(count)
    view = RegistryView()
    started = time.perf_counter()
    view.apply(RegistryRecord(1, 0.0, "b", "", tuple(RegistryChange.add_domain(e) for e in base)))
    print(f"initial import (batch compile through the view): {time.perf_counter() - started:.2f} s")
    incremental = []
    for i in range(5):
        added = AcceptedDomain(f"new{i}.example", "t0")
        record = RegistryRecord(view.version + 1, 0.0, "b", "", (RegistryChange.add_domain(added),))
        started = time.perf_counter()
        view.apply(record)
        incremental.append(time.perf_counter() - started)
    final = list(view.matcher)
    full = []
    for _ in range(2):
        started = time.perf_counter()
        compiled = DomainMatcher.compile(final)
        full.append(time.perf_counter() - started)
    assert compiled == view.matcher
    inc, comp = statistics.median(incremental), statistics.median(full)
    print(f"with_changes (RegistryView.apply), median of 5: {inc * 1000:9.1f} ms")
    print(f"DomainMatcher.compile of the same registry:     {comp * 1000:9.1f} ms")
    print(f"ratio: {comp / inc:.0f}x faster")


def bench_start(count: int) -> None:
    print(f"\n== start at {count:,} domains (SQLite): from a snapshot against from the log ==")
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "start.db"
        store = SQLiteStore(path)
        store.registry_commit(
            [RegistryChange.add_domain(e) for e in entries(count)], actor="b", now=1.0
        )
        snapshot = str(Path(scratch) / "registry.snap")
        snapshot_registry(store, snapshot)
        for i in range(10):  # changes after the snapshot, to catch up with
            store.registry_commit(
                [RegistryChange.add_domain(AcceptedDomain(f"after{i}.example", "t1"))],
                actor="b",
                now=2.0,
            )
        store.close()
        started = time.perf_counter()
        fresh = SQLiteStore(path)
        from_log = fresh.registry_view()
        log_seconds = time.perf_counter() - started
        fresh.close()
        started = time.perf_counter()
        fresh = SQLiteStore(path)
        from_snapshot = view_from_snapshot(snapshot, fresh)
        snap_seconds = time.perf_counter() - started
        fresh.close()
        assert from_snapshot.matcher == from_log.matcher
        print(f"from the registry's log:          {log_seconds:7.2f} s")
        print(f"from the snapshot (+10 changes):  {snap_seconds:7.2f} s")
        print(f"ratio: {log_seconds / snap_seconds:.1f}x faster")


def bench_poll(rounds: int, calls: int) -> None:
    print("\n== the version poll on the decision path (accepted domain, poll every 250 ms) ==")
    with tempfile.TemporaryDirectory() as scratch:
        for kind in ("memory", "sqlite"):
            store = MemoryStore() if kind == "memory" else SQLiteStore(Path(scratch) / "poll.db")
            store.registry_commit(
                [RegistryChange.add_domain(AcceptedDomain("contoso.com", "contoso"))],
                actor="b",
                now=1.0,
            )
            following = RelayPolicy.from_registry(store)
            static = RelayPolicy(following.matcher, following.connectors, None, store)
            request = RelayRequest("alice@contoso.com")
            rates: dict[str, list[float]] = {"on": [], "off": []}
            for index in range(rounds):  # alternated, each first in turn
                pair = [("on", following), ("off", static)]
                for name, policy in pair if index % 2 else pair[::-1]:
                    started = time.perf_counter()
                    for _ in range(calls):
                        policy.evaluate(request)
                    rates[name].append(calls / (time.perf_counter() - started))
            on, off = statistics.median(rates["on"]), statistics.median(rates["off"])
            print(
                f"{kind:7} polling on {on:9,.0f} /s   off {off:9,.0f} /s   on/off {on / off:.3f}"
                f"   (median of {rounds} rounds of {calls:,} decisions)"
            )
            store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100k domains, 20 changes")
    parser.add_argument("--domains", type=int, default=1_000_000)
    parser.add_argument("--changes", type=int, default=50)
    args = parser.parse_args()
    domains = 100_000 if args.quick else args.domains
    changes = 20 if args.quick else args.changes
    bench_latency(changes)
    bench_changes(domains)
    bench_start(domains)
    bench_poll(7 if args.quick else 15, 20_000)


if __name__ == "__main__":
    main()
