"""Decisions per second with the alert outbox on (sinks configured) against off, side by side.

Run: ``python benchmarks/bench_alerts.py``.  The accept path writes no outbox row (the route is
only consulted when the machine raises an alert); the block path writes one row per sink in the
same transaction.

``--instructions`` measures the accept path's work instead of its time, which a shared machine
cannot resolve to a few per cent: each store's accept loop runs under ``valgrind
--tool=callgrind`` with the outbox on and off, and with 0 and *N* decisions, and the machine
instructions per decision, ``(I(N) - I(0)) / N``, are compared.  Instruction counts do not
depend on what else the machine is doing.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
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
    return count / max(elapsed, 1e-9)


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


def _instructions(url: str, routed: bool, count: int, scratch: str) -> int:
    """Machine instructions (callgrind's ``Ir``) of a process running the accept loop."""
    out = os.path.join(scratch, f"cg-{time.monotonic_ns()}.out")
    argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable]
    argv += [__file__, "--accept-loop", url, str(int(routed)), str(count)]
    subprocess.run(argv, check=True, capture_output=True)
    text = Path(out).read_text()
    found = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
    if found is None:
        raise SystemExit(f"no instruction total in {out}")
    return int(found.group(1))


def instructions(count: int) -> None:
    """Instructions per accept decision, outbox off and on, per store (see the docstring)."""
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("memory", "sqlite"):
            per: dict[bool, float] = {}
            for routed in (False, True):
                totals = []
                for n in (0, count):
                    url = "memory:" if name == "memory" else f"sqlite:{tmp}/{routed}-{n}.db"
                    totals.append(_instructions(url, routed, n, tmp))
                per[routed] = (totals[1] - totals[0]) / count
            ratio = per[True] / per[False]
            print(
                f"{name:7} accept path: outbox off {per[False]:10,.0f} instructions/decision, "
                f"on {per[True]:10,.0f} ({ratio:.4f}x)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--instructions", action="store_true")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--accept-loop", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.accept_loop:
        url, routed, count = args.accept_loop
        accept_rate(url, routed == "1", int(count))
        return
    if args.instructions:
        instructions(args.count)
        return
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
