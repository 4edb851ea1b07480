"""Decisions per second with the alert outbox on (sinks configured) against off, side by side.

Run: ``python benchmarks/bench_alerts.py``.  The accept path writes no outbox row (the route is
only consulted when the machine raises an alert); the block path writes one row per sink in the
same transaction.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from domainpolicy import BlockMachine, BlockPolicy, open_store
from domainpolicy._alerts import AlertsConfig, LogSink


def accept_rate(url: str, routed: bool, count: int = 20_000) -> float:
    store = open_store(url)
    if routed:
        cfg = AlertsConfig(sinks={"a": LogSink(name="a"), "b": LogSink(name="b")})
        store.route_alerts(cfg.route)
    machine = BlockMachine(BlockPolicy())
    now = time.time()
    started = time.perf_counter()
    for i in range(count):
        store.observe(machine, f"t{i % 100}", now, registered=True, registrable=None)
    elapsed = time.perf_counter() - started
    store.close()
    return count / elapsed


def block_rate(url: str, routed: bool, tenants: int = 300) -> float:
    store = open_store(url)
    if routed:
        cfg = AlertsConfig(sinks={"a": LogSink(name="a"), "b": LogSink(name="b")})
        store.route_alerts(cfg.route)
    policy = BlockPolicy(message_limit=1, domain_limit=1, warn_fraction=1.0)
    machine = BlockMachine(policy)
    now = time.time()
    started = time.perf_counter()
    for i in range(tenants):
        for j in range(2):
            store.observe(machine, f"b{i}", now, registered=False, registrable=f"d{j}.example")
    elapsed = time.perf_counter() - started
    store.close()
    return tenants / elapsed


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for name, url in (("memory", "memory:"), ("sqlite", None)):
            rows = []
            for routed in (False, True, False, True):
                u = url or f"sqlite:{Path(tmp) / f'{routed}{time.monotonic_ns()}.db'}"
                rows.append((routed, accept_rate(u, routed), block_rate(u, routed)))
            for routed in (False, True):
                acc = max(r[1] for r in rows if r[0] is routed)
                blk = max(r[2] for r in rows if r[0] is routed)
                label = "outbox on " if routed else "outbox off"
                print(f"{name:7} {label}: accept {acc:10.0f}/s   blocks {blk:8.0f}/s")


if __name__ == "__main__":
    main()
