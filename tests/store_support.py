"""Store factories shared by the conformance suite: each kind of store opened the same way.

A factory is ``(tmp_path) -> url``; ``open_store(url)`` then opens it, in this process or in a
worker process (the concurrency tests open the same store from several processes).
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from pathlib import Path

from domainpolicy import (
    BlockMachine,
    BlockPolicy,
    Effects,
    InvalidEvent,
    StateStore,
    StoreUnavailable,
    open_store,
)
from domainpolicy._stores import ObserveItem
from redis_support import redis_cluster_url, redis_url
from threads import run_in_threads

StoreUrl = Callable[[Path], str]


def memory_url(tmp_path: Path) -> str:
    return "memory:"


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:{tmp_path / 'state.db'}"


# name -> (factory, shared between processes?)
STORE_KINDS: dict[str, tuple[StoreUrl, bool]] = {
    "memory": (memory_url, False),
    "sqlite": (sqlite_url, True),
    "redis": (redis_url, True),
    "redis-cluster": (redis_cluster_url, True),
}

SMALL_POLICY = BlockPolicy(
    message_limit=40, domain_limit=40, max_tracked_domains=100, suspend_factor=100.0
)


def worker(
    url: str, tenant: str, count: int, threads: int, results: multiprocessing.Queue[object]
) -> None:
    """Observe *count* unregistered messages from *threads* threads; report accepted/refused."""
    import threading

    store = open_store(url)
    machine = BlockMachine(SMALL_POLICY)
    accepted = refused = 0
    lock = threading.Lock()

    def run() -> None:
        nonlocal accepted, refused
        for _ in range(count):
            _, effects = store.observe(
                machine, tenant, store.now(), registered=False, registrable="spam.example"
            )
            assert effects.decision is not None
            with lock:
                if effects.decision.accepted:
                    accepted += 1
                else:
                    refused += 1

    run_in_threads(*[run] * threads)
    store.close()
    results.put((accepted, refused))


def open_deterministic(url: str) -> StateStore:
    """Open *url* with observations on the caller's clock (Redis: ``server_time=False``), so that
    two stores given the same times agree exactly."""
    if url.startswith("redis"):
        return open_store(url, server_time=False)
    return open_store(url)


# Small limits with warnings, probation and a reachable suspension: every slow path of a store
# (block, approaching-limit alert, suspension) happens within a few dozen observations.
BATCH_POLICY = BlockPolicy(
    window_seconds=40,
    bucket_seconds=10,
    message_limit=8,
    domain_limit=3,
    max_tracked_domains=5,
    warn_fraction=0.5,
    suspend_factor=2.0,
    probation_seconds=100,
    sample_size=3,
)


def every_call(store: StateStore, machine: BlockMachine, now: float) -> list[Callable[[], object]]:
    """One call of each kind a store serves (observe, apply, load, history, tenants, now), for
    tests that check how every one of them fails."""
    return [
        lambda: store.observe(machine, "t", now, registered=False, registrable="a.example"),
        lambda: store.apply(
            "t", lambda s, at: machine.create_connector(s, at, "c"), now, action="c"
        ),
        lambda: store.load("t"),
        lambda: store.history("t"),
        store.tenants,
        store.now,
    ]


def effects_summary(effects: Effects) -> tuple[object, ...]:
    """Everything observable in *effects*: decision, transitions and alerts with their times and
    evidence (comparable across stores)."""
    return (
        effects.decision,
        [(t.source, t.target, t.event, t.reason, t.at, t.evidence) for t in effects.transitions],
        [(a.kind, a.message, a.at, a.evidence) for a in effects.alerts],
    )


def result_summary(result: object) -> object:
    """One `observe_many` result (or `observe` outcome) made comparable: the effects summary, or
    the type of the error."""
    if isinstance(result, tuple):
        return effects_summary(result[1])
    return type(result)


def observe_sequentially(
    store: StateStore,
    machine: BlockMachine,
    items: Sequence[ObserveItem],
    times: Sequence[float],
) -> list[object]:
    """Call `observe` for each item in turn; the summaries (errors included) in order."""
    outcomes: list[object] = []
    for (tenant, registered, registrable, weight), at in zip(items, times, strict=True):
        try:
            outcome: object = store.observe(
                machine, tenant, at, registered=registered, registrable=registrable, weight=weight
            )
        except (StoreUnavailable, InvalidEvent) as exc:
            outcome = exc
        outcomes.append(result_summary(outcome))
    return outcomes
