"""Store factories shared by the conformance suite: each kind of store opened the same way.

A factory is ``(tmp_path) -> url``; ``open_store(url)`` then opens it, in this process or in a
worker process (the concurrency tests open the same store from several processes).
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from pathlib import Path

from domainpolicy import BlockMachine, BlockPolicy, StateStore, open_store
from redis_support import redis_url

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

    pool = [threading.Thread(target=run) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    store.close()
    results.put((accepted, refused))


def open_for(url: str) -> StateStore:
    return open_store(url)
