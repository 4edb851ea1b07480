"""The long form of the fault suite: every scenario of ``tests/faults`` with longer runs,
repeated, printing the checker's figures as JSON lines (one per run) and a summary.

    PYTHONPATH=src python benchmarks/faults.py                 # every scenario, 3 runs each
    PYTHONPATH=src python benchmarks/faults.py --runs 10 --seconds 20 --only cluster
    PYTHONPATH=src python benchmarks/faults.py --only cluster --only cluster_wait  # WAIT off/on
    PYTHONPATH=src python benchmarks/faults.py --only replica --only replica_wait
    PYTHONPATH=src python benchmarks/faults.py --only reshard --only mixed

Needs root (the SQLite disk-full scenario mounts a tmpfs) and ``redis-server``; everything
listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

_TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path[:0] = [str(_TESTS), str(_TESTS / "faults")]

from fault_history import Report  # type: ignore[import-not-found,unused-ignore]  # noqa: E402
from fault_scenarios import (  # type: ignore[import-not-found,unused-ignore]  # noqa: E402
    AdminFigures,
    redis_cluster_failover,
    redis_cluster_reshard,
    redis_proxy,
    redis_replica_failover,
    sqlite_clock_skew,
    sqlite_disk_full,
)
from fault_workload import Workload  # type: ignore[import-not-found,unused-ignore]  # noqa: E402


def scenarios(seconds: float) -> dict[str, Callable[[Path], Report | tuple[Report, AdminFigures]]]:
    """Every scenario, for runs of about *seconds* each (the replica scenarios also count the
    administrative events acknowledged, refused and lost)."""
    base = Workload(hot=3, cool=3, processes=4, seconds=seconds)
    waiting = dataclasses.replace(
        base, store_options=(("wait_replicas", 1), ("wait_timeout_ms", 100))
    )
    step = seconds / 8
    proxy_schedule = [
        (step * 1, "cut", 0.0),
        (step * 2, "drop", step),
        (step * 4, "delay", step),
        (step * 6, "cut", step / 2),
    ]
    return {
        "proxy": lambda d: redis_proxy(d, base, proxy_schedule),
        "disk_full": lambda d: sqlite_disk_full(d, base, full_at=-1.0, seconds=seconds / 3),
        "skew_30s": lambda d: sqlite_clock_skew(
            d, Workload(hot=3, cool=3, processes=2, seconds=seconds, skews=(0.0, 30.0))
        ),
        "skew_2h": lambda d: sqlite_clock_skew(
            d, Workload(hot=3, cool=3, processes=2, seconds=seconds, skews=(0.0, 7200.0))
        ),
        "cluster": lambda d: redis_cluster_failover(
            d, base, kill_at=seconds / 6, failover_at=seconds * 2 / 3
        ),
        # the same with the store's wait_replicas=1, wait_timeout_ms=100 (WAIT after each
        # state change)
        "cluster_wait": lambda d: redis_cluster_failover(
            d, waiting, kill_at=seconds / 6, failover_at=seconds * 2 / 3
        ),
        # a primary and its replica promoted by hand; the replication link lags for 1 s before
        # the kill
        "replica": lambda d: redis_replica_failover(d, base, kill_at=seconds / 2, lag=1.0),
        "replica_wait": lambda d: redis_replica_failover(d, waiting, kill_at=seconds / 2, lag=1.0),
        # mixed: the proxy's cut, blackhole and delay, then the lagging link and the kill
        "mixed": lambda d: redis_replica_failover(
            d, waiting, kill_at=seconds * 7 / 8, lag=1.0, schedule=proxy_schedule[:3]
        ),
        # the busy tenant's slot migrated key by key to another primary and back, under load
        "reshard": lambda d: redis_cluster_reshard(d, base, migrate_at=step, pause=step / 8),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--only", action="append", help="scenario name (repeatable)")
    args = parser.parse_args()
    chosen = scenarios(args.seconds)
    names = args.only or list(chosen)
    summary: dict[str, dict[str, float]] = {}
    for name in names:
        for run in range(args.runs):
            directory = Path(tempfile.mkdtemp(prefix=f"domainpolicy-faults-{name}-"))
            began = time.monotonic()
            try:
                got = chosen[name](directory)
            finally:
                shutil.rmtree(directory, ignore_errors=True)
            report, admin = got if isinstance(got, tuple) else (got, None)
            figures = report.to_dict()
            if admin is not None:
                figures["admin"] = dataclasses.asdict(admin)
            figures["violations"] = report.violations()
            figures["wall_seconds"] = round(time.monotonic() - began, 1)
            figures["decisions_per_second"] = round(figures["decisions"] / args.seconds)
            print(json.dumps({"scenario": name, "run": run, **figures}), flush=True)
            total = summary.setdefault(name, {})
            for key in (
                "decisions",
                "tempfails_4xx",
                "failure_accepts",
                "lost",
                "doubled",
                "indeterminate_counted",
                "accepts_over_limit",
            ):
                total[key] = total.get(key, 0) + figures[key]
            total["block_mismatch"] = total.get("block_mismatch", 0) + abs(
                figures["blocks"] - figures["expected_blocks"]
            )
            recovery = max((f["recovery_seconds"] for f in figures["faults"]), default=0.0)
            total["max_recovery_seconds"] = max(total.get("max_recovery_seconds", 0.0), recovery)
    print(json.dumps({"summary": summary, "runs": args.runs, "seconds": args.seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
