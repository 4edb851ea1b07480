"""The concurrent relay workload of the fault suite, and the processes that run it.

Each process opens the store from its URL, builds a `RelayPolicy` over the same tenants and
decides messages until its deadline, recording every decision as a `fault_history.Op`.  Tenants
``hot*`` relay unregistered mail without end (they cross the limit and get blocked); tenants
``cool*`` relay at most `COOL_UNREGISTERED` unregistered messages per process (they stay under
the limit); every third message of every tenant is from a registered domain.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fault_history import Op, read_ops, write_ops

from domainpolicy import (
    AcceptedDomain,
    BlockPolicy,
    ConnectorTable,
    DomainMatcher,
    InboundConnector,
    Outcome,
    RelayPolicy,
    RelayRequest,
    open_store,
)

__all__ = ["COOL_UNREGISTERED", "LIMIT", "POLICY", "Workload", "run_processes", "run_worker"]

LIMIT = 30
POLICY = BlockPolicy(
    window_seconds=3600,
    bucket_seconds=60,
    message_limit=LIMIT,
    domain_limit=40,
    max_tracked_domains=50,
    suspend_factor=1000.0,
)
COOL_UNREGISTERED = 8

_OUTCOME = {Outcome.ACCEPT: "accept", Outcome.REFUSE: "refuse", Outcome.TEMPFAIL: "tempfail"}


@dataclass(frozen=True)
class Workload:
    """The shape of one run: tenants, processes, how long, how fast, clocks."""

    hot: int = 2
    cool: int = 2
    processes: int = 3
    seconds: float = 4.0
    interval: float = 0.002
    skews: Sequence[float] = ()  # seconds added to each process's policy clock (default none)
    store_options: Sequence[tuple[str, float]] = ()

    @property
    def tenants(self) -> list[str]:
        """Every tenant of the run."""
        return [f"hot{i}" for i in range(self.hot)] + [f"cool{i}" for i in range(self.cool)]


def run_worker(url: str, workload: Workload, process: int, directory: Path, skew: float) -> None:
    """Open the store, say so (``ready-N``), wait for the ``go`` file, then decide messages for
    ``workload.seconds``; write the ops to ``ops-N.jsonl``."""
    logging.getLogger("domainpolicy").setLevel(logging.CRITICAL)  # tempfails are recorded
    tenants = workload.tenants
    matcher = DomainMatcher.compile([AcceptedDomain(f"{t}.example", t) for t in tenants])
    connectors = ConnectorTable.compile(
        [
            InboundConnector(f"{t}-onprem", t, sender_ip_ranges=(f"10.0.{i}.0/24",))
            for i, t in enumerate(tenants)
        ],
        matcher,
    )
    store = open_store(url, **dict(workload.store_options))
    clock = (lambda: time.time() + skew) if skew else None
    policy = RelayPolicy(matcher, connectors, POLICY, store, clock=clock)
    ops: list[Op] = []
    sent_unregistered = dict.fromkeys(tenants, 0)
    (directory / f"ready-{process}").touch()
    while not (directory / "go").exists():
        time.sleep(0.001)
    deadline = time.time() + workload.seconds
    index = 0
    try:
        while time.time() < deadline:
            slot = index % len(tenants)
            tenant = tenants[slot]
            registered = (index // len(tenants)) % 3 == 2
            index += 1
            cool = tenant.startswith("cool")
            if not registered and cool and sent_unregistered[tenant] >= COOL_UNREGISTERED:
                registered = True
            if not registered:
                sent_unregistered[tenant] += 1
            sender = f"u@{tenant}.example" if registered else "u@spam.example"
            start = time.time()
            decision = policy.evaluate(RelayRequest(sender, client_ip=f"10.0.{slot}.1"))
            end = time.time()
            ops.append(
                Op(
                    process,
                    tenant,
                    registered,
                    _OUTCOME[decision.outcome],
                    decision.reason,
                    decision.counted,
                    start,
                    end,
                )
            )
            if workload.interval:
                time.sleep(workload.interval)
    finally:
        store.close()
        write_ops(directory / f"ops-{process}.jsonl", ops)


def run_processes(
    url: str, workload: Workload, directory: Path, *, before: Callable[[], None] | None = None
) -> float:
    """Start the workload's processes (spawned), wait until each has opened the store, call
    *before* (a fault to inject before the first decision), let them go and return the time
    they were let go.  Join them with `join_processes`.

    Raises:
        RuntimeError: a process did not open the store within a minute.
    """
    context = multiprocessing.get_context("spawn")
    skews = list(workload.skews) or [0.0] * workload.processes
    processes = [
        context.Process(target=run_worker, args=(url, workload, index, directory, skews[index]))
        for index in range(workload.processes)
    ]
    for process in processes:
        process.start()
    _running.extend(processes)
    deadline = time.monotonic() + 60
    ready = [directory / f"ready-{index}" for index in range(workload.processes)]
    while not all(path.exists() for path in ready):
        if time.monotonic() > deadline or any(p.exitcode is not None for p in processes):
            (directory / "go").touch()
            raise RuntimeError("a workload process did not open the store")
        time.sleep(0.01)
    if before is not None:
        before()
    start = time.time()
    (directory / "go").touch()
    return start


_running: list[multiprocessing.process.BaseProcess] = []


def join_processes(workload: Workload, directory: Path) -> list[Op]:
    """Wait for the processes `run_processes` started; every op they recorded.

    Raises:
        AssertionError: a process failed.
    """
    processes, _running[:] = list(_running), []
    for process in processes:
        process.join(timeout=workload.seconds + 60)
        if process.is_alive():
            process.kill()
            process.join()
    codes = [process.exitcode for process in processes]
    for process in processes:
        process.close()
    assert codes == [0] * len(codes), f"workload processes failed: {codes}"
    return read_ops(directory / f"ops-{index}.jsonl" for index in range(workload.processes))
