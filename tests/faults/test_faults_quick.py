"""The quick form of the fault suite: each fault once, a few seconds each, checked by the
history checker (``benchmarks/faults.py`` runs the long form)."""

from __future__ import annotations

import time
from pathlib import Path

import redis
from fault_history import Fault, Final, Op, check
from fault_proxy import FaultProxy
from fault_scenarios import (
    redis_cluster_failover,
    redis_cluster_reshard,
    redis_proxy,
    redis_replica_failover,
    sqlite_clock_skew,
    sqlite_disk_full,
)
from fault_workload import LIMIT, Workload
from redis.backoff import NoBackoff
from redis.retry import Retry

from redis_support import RedisServer

QUICK = Workload(hot=2, cool=2, processes=3, seconds=3.0)


def _op(tenant: str, outcome: str, *, counted: bool = True, at: float = 0.0) -> Op:
    reason = {"accept": "unregistered_allowed", "refuse": "blocked"}.get(
        outcome, "store_unavailable"
    )
    return Op(0, tenant, False, outcome, reason, counted, at, at + 0.001)


def test_checker_finds_lost_doubled_and_failure_accepts() -> None:
    """The checker reports lost and doubled counts, a missing block and an uncounted accept."""
    ops = [_op("t", "accept", at=i) for i in range(LIMIT)] + [_op("t", "refuse", at=100)]
    ops.append(_op("t", "accept", counted=False, at=101))
    report = check(ops, {"t": Final(LIMIT - 2, LIMIT - 2, "active", 0)}, limit=LIMIT)
    found = report.violations()
    assert "t: lost=3" in found
    assert "1 accepts the store did not count" in found
    assert "t: 0 block transitions, 1 expected" in found
    assert any("accepts_after_block" in line for line in found)
    doubled = check(ops[:5], {"t": Final(9, 9, "active", 0)}, limit=LIMIT)
    assert doubled.violations() == ["t: doubled=4"]


def test_checker_bounds_indeterminate_tempfails() -> None:
    """A tempfail the store counted anyway is allowed (Redis) unless told otherwise (SQLite)."""
    ops = [_op("t", "accept"), _op("t", "tempfail", counted=False)]
    report = check(ops, {"t": Final(2, 2, "active", 0)}, limit=LIMIT, faults=[Fault("cut", 0, 0)])
    assert report.violations() == []
    assert report.violations(indeterminate_allowed=False) == ["t: 1 tempfails were counted"]
    assert report.faults[0].tempfails == 1


def test_proxy_forwards_and_cuts_connections(tmp_path: Path) -> None:
    """The fault proxy forwards to redis-server; a cut closes the open connection (a new one
    is then made)."""
    server = RedisServer(tmp_path)
    server.start()
    try:
        with FaultProxy(server.port) as proxy:
            client = redis.Redis(
                host="127.0.0.1", port=proxy.port, socket_timeout=1, retry=Retry(NoBackoff(), 0)
            )
            try:
                assert client.ping()
                proxy.cut_once()
                time.sleep(0.1)  # the connection's thread sees the cut within 20 ms
                assert client.ping()  # redis-py finds the socket closed and reconnects
                assert (proxy.cuts, proxy.connections) == (1, 2)
            finally:
                client.close()
    finally:
        server.stop()


def test_redis_through_cutting_dropping_delaying_proxy(tmp_path: Path) -> None:
    """Cuts, a blackhole and delays between the workload and Redis: no lost or doubled count,
    no accept on failure (tempfail instead), one block per crossing tenant."""
    schedule = [(0.5, "cut", 0.0), (0.9, "drop", 0.6), (1.8, "delay", 0.4), (2.4, "cut", 0.3)]
    report = redis_proxy(tmp_path, QUICK, schedule)
    assert report.violations() == [], report.to_dict()
    assert report.tempfails > 0, report.to_dict()
    assert report.total("expected_blocks") == QUICK.hot


def test_sqlite_disk_full_then_space_back(tmp_path: Path) -> None:
    """SQLite on a full tmpfs: writes fail as tempfails, nothing is counted twice or lost, and
    counting resumes when space comes back."""
    report = sqlite_disk_full(tmp_path, QUICK, full_at=-1.0, seconds=1.5)
    assert report.violations(indeterminate_allowed=False) == [], report.to_dict()
    assert report.tempfails > 0, report.to_dict()
    assert report.faults[0].recovery_seconds < 1.0, report.to_dict()


def test_sqlite_clock_skew_within_the_window(tmp_path: Path) -> None:
    """Two processes whose clocks differ by 30 s share one SQLite store: no count lost or
    doubled, one block per crossing tenant, no accept over the limit."""
    workload = Workload(hot=2, cool=2, processes=2, seconds=2.0, skews=(0.0, 30.0))
    report = sqlite_clock_skew(tmp_path, workload)
    assert report.violations(indeterminate_allowed=False) == [], report.to_dict()


def test_sqlite_clock_skew_beyond_the_window_is_bounded(tmp_path: Path) -> None:
    """Clocks two hours apart (beyond the one-hour window): the process ahead expires what the
    other counted before its first observation -- at most one window's worth per tenant, never
    a lost block transition, a doubled count or an uncounted accept."""
    workload = Workload(hot=2, cool=2, processes=2, seconds=2.0, skews=(0.0, 7200.0))
    report = sqlite_clock_skew(tmp_path, workload)
    for line in report.violations(indeterminate_allowed=False):
        assert line.split(": ")[1].split("=")[0] in ("lost", "accepts_over_limit"), line
    for tenant in report.tenants.values():
        assert tenant.lost <= LIMIT
        assert tenant.accepts_over_limit <= LIMIT
        assert tenant.doubled == 0
        assert tenant.blocks <= 1


def test_redis_cluster_primary_killed_then_manual_failover(tmp_path: Path) -> None:
    """3 primaries + 3 replicas: the primary of a blocked tenant is killed and its replica
    promoted, then a manual CLUSTER FAILOVER: no count doubled, no accept on failure, one block
    per crossing tenant; counts lost to asynchronous replication are measured, not assumed."""
    workload = Workload(hot=2, cool=2, processes=3, seconds=6.0)
    report = redis_cluster_failover(tmp_path, workload, kill_at=1.0, failover_at=4.0)
    found = report.violations()
    # Asynchronous replication may lose the last acknowledged writes of the killed primary
    # (docs/reliability.md): bounded here, reported by the runner.
    assert [line for line in found if "lost=" not in line] == [], report.to_dict()
    assert report.total("lost") <= 10, report.to_dict()
    assert report.failure_accepts == 0
    assert [f.name for f in report.faults] == ["primary_killed", "manual_failover"]


def test_replica_promoted_after_a_lagging_link_with_wait_replicas(tmp_path: Path) -> None:
    """A primary whose replication link lags is killed and its replica promoted (by hand, as
    Sentinel would), the store with wait_replicas=1: no administrative event that `apply`
    acknowledged is lost (those the replica had not acknowledged were refused), no accept on
    failure, no count doubled; counts may be lost (they are not waited for)."""
    workload = Workload(
        hot=2,
        cool=2,
        processes=2,
        seconds=3.0,
        store_options=(("wait_replicas", 1), ("wait_timeout_ms", 100)),
    )
    report, admin = redis_replica_failover(tmp_path, workload, kill_at=2.0, lag=0.5)
    assert admin.acknowledged > 0
    assert admin.refused > 0  # during the lag
    assert admin.lost == 0, admin
    # what the killed primary had not replicated (counts, a block) may be lost, and so accepts
    # over the limit follow: measured by the runner, not assumed here
    assert report.failure_accepts == 0, report.to_dict()
    assert report.total("doubled") == 0, report.to_dict()


def test_redis_cluster_busy_slot_resharded_under_load(tmp_path: Path) -> None:
    """The slot of a busy tenant is migrated key by key to another primary and back while the
    workload runs (ASK, TRYAGAIN, MOVED): every promise holds, nothing lost or doubled."""
    workload = Workload(hot=2, cool=2, processes=3, seconds=4.0)
    report = redis_cluster_reshard(tmp_path, workload, migrate_at=1.0, pause=0.1)
    assert report.violations() == [], report.to_dict()
    assert [f.name.startswith("slot_migrated") for f in report.faults] == [True, True]
