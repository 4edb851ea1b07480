"""The store contract, run against every store: exact counts, one block, durability, failures."""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

from domainpolicy import (
    BlockMachine,
    InvalidConfiguration,
    InvalidTransition,
    SQLiteStore,
    State,
    StateStore,
    StoreUnavailable,
    TenantState,
    open_store,
)
from store_support import SMALL_POLICY, STORE_KINDS, worker

KINDS = sorted(STORE_KINDS)
NOW = 1_800_000_000.0


@pytest.fixture(params=KINDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    factory, _ = STORE_KINDS[request.param]
    return factory(tmp_path)


@pytest.fixture
def store(store_url: str) -> Iterator[StateStore]:
    opened = open_store(store_url)
    yield opened
    opened.close()


MACHINE = BlockMachine(SMALL_POLICY)


def observe(store: StateStore, tenant: str, at: float, *, registered: bool = False) -> bool:
    _, effects = store.observe(
        MACHINE,
        tenant,
        at,
        registered=registered,
        registrable=None if registered else "spam.example",
    )
    assert effects.decision is not None
    return effects.decision.accepted


def test_unknown_tenant_loads_fresh_active_state(store: StateStore) -> None:
    """A tenant never seen is ACTIVE with empty counters, and is not listed."""
    state = store.load("nobody")
    assert state == TenantState.new("nobody")
    assert store.tenants() == []
    assert store.history("nobody") == []


def test_counts_accumulate_and_persist(store: StateStore) -> None:
    """Observations accumulate in the stored window; registered mail counts in the total only."""
    for i in range(10):
        assert observe(store, "t1", NOW + i)
    for i in range(5):
        assert observe(store, "t1", NOW + 10 + i, registered=True)
    state = store.load("t1")
    assert (state.window.total, state.window.unregistered) == (15, 10)
    assert store.tenants() == ["t1"]


def test_block_happens_once_at_the_crossing_message(store: StateStore) -> None:
    """The message that crosses the limit is refused and blocks; one audit record says so."""
    results = [observe(store, "t1", NOW + i) for i in range(SMALL_POLICY.message_limit + 5)]
    assert results[: SMALL_POLICY.message_limit] == [True] * SMALL_POLICY.message_limit
    assert results[SMALL_POLICY.message_limit :] == [False] * 5
    assert store.load("t1").state is State.BLOCKED
    history = store.history("t1")
    assert [(r.action, r.before, r.after) for r in history] == [("observe", "active", "blocked")]
    assert history[0].detail["transitions"][0]["evidence"]["unregistered"] == 41


def test_registered_mail_flows_while_blocked(store: StateStore) -> None:
    """A blocked tenant still gets its accepted-domain mail through."""
    for i in range(SMALL_POLICY.message_limit + 1):
        observe(store, "t1", NOW + i)
    assert observe(store, "t1", NOW + 100, registered=True)
    assert not observe(store, "t1", NOW + 101)


def test_tenants_are_independent(store: StateStore) -> None:
    """Blocking one tenant leaves another untouched."""
    for i in range(SMALL_POLICY.message_limit + 1):
        observe(store, "bad", NOW + i)
    assert observe(store, "good", NOW)
    assert store.load("good").state is State.ACTIVE


def test_admin_events_are_audited_with_actor_and_states(store: StateStore) -> None:
    """apply() runs an admin event atomically and records who, what, before and after."""
    store.apply(
        "t1",
        lambda s, now: MACHINE.operator_block(s, now, by="ops@example.net", reason="abuse report"),
        NOW,
        action="operator_block",
        actor="ops@example.net",
        detail={"reason": "abuse report"},
    )
    assert store.load("t1").state is State.BLOCKED
    (record,) = store.history("t1")
    assert (record.action, record.actor, record.before, record.after) == (
        "operator_block",
        "ops@example.net",
        "active",
        "blocked",
    )
    assert record.detail["reason"] == "abuse report"


def test_refused_admin_event_changes_nothing(store: StateStore) -> None:
    """An event the machine refuses raises InvalidTransition and writes no state or audit."""
    with pytest.raises(InvalidTransition):
        store.apply(
            "t1",
            lambda s, now: MACHINE.approve(s, now, by="support", reason="ok"),
            NOW,
            action="approve",
        )
    assert store.history("t1") == []
    assert store.load("t1").state is State.ACTIVE


def test_history_limit_returns_newest(store: StateStore) -> None:
    """history(limit=n) gives the newest n records, oldest first."""
    for i in range(4):
        store.apply(
            "t1",
            lambda s, now: MACHINE.register_domain(s, now, f"d{int(now) % 10}.example"),
            NOW + i,
            action="register_domain",
            detail={"i": i},
        )
    assert [r.detail["i"] for r in store.history("t1", limit=2)] == [2, 3]
    assert len(store.history("t1")) == 4


def test_loaded_state_is_a_copy(store: StateStore) -> None:
    """Mutating a loaded state does not change the stored one."""
    observe(store, "t1", NOW)
    state = store.load("t1")
    state.window.head_total += 1000
    assert store.load("t1").window.total == 1


def test_concurrent_threads_count_exactly(store: StateStore) -> None:
    """8 threads x 25 observations: every one counted, the block exactly once."""
    accepted: list[bool] = []
    lock = threading.Lock()

    def run() -> None:
        for _ in range(25):
            ok = observe(store, "t1", NOW)
            with lock:
                accepted.append(ok)

    threads = [threading.Thread(target=run) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    state = store.load("t1")
    assert state.window.unregistered == 200
    assert accepted.count(True) == SMALL_POLICY.message_limit
    assert [r.after for r in store.history("t1")] == ["blocked"]


@pytest.mark.parametrize("kind", [k for k in KINDS if STORE_KINDS[k][1]])
def test_concurrent_processes_count_exactly(kind: str, tmp_path: Path) -> None:
    """3 processes x 3 threads x 20 observations on one store: all counted, one block."""
    url = STORE_KINDS[kind][0](tmp_path)
    open_store(url).close()  # create / migrate once up front
    context = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue[object] = context.Queue()
    processes = [context.Process(target=worker, args=(url, "t1", 20, 3, results)) for _ in range(3)]
    for process in processes:
        process.start()
    outcomes = [cast(tuple[int, int], results.get(timeout=120)) for _ in processes]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    accepted = sum(a for a, _ in outcomes)
    refused = sum(r for _, r in outcomes)
    assert accepted + refused == 180
    assert accepted == SMALL_POLICY.message_limit
    with open_store(url) as store:
        assert store.load("t1").window.unregistered == 180
        assert [r.after for r in store.history("t1")] == ["blocked"]


@pytest.mark.parametrize("kind", [k for k in KINDS if STORE_KINDS[k][1]])
def test_block_survives_reopen(kind: str, tmp_path: Path) -> None:
    """A blocked tenant is still blocked after the store is closed and opened again."""
    url = STORE_KINDS[kind][0](tmp_path)
    with open_store(url) as store:
        for i in range(SMALL_POLICY.message_limit + 1):
            observe(store, "t1", NOW + i)
    with open_store(url) as store:
        assert store.load("t1").state is State.BLOCKED
        assert not observe(store, "t1", NOW + 200)
        assert len(store.history("t1")) == 1


@pytest.mark.parametrize("kind", [k for k in KINDS if STORE_KINDS[k][1]])
def test_closed_store_raises_store_unavailable(kind: str, tmp_path: Path) -> None:
    """Using a closed persistent store raises StoreUnavailable, not a driver error."""
    store = open_store(STORE_KINDS[kind][0](tmp_path))
    store.close()
    with pytest.raises(StoreUnavailable):
        observe(store, "t1", NOW)


def test_sqlite_refuses_in_memory_database() -> None:
    """':memory:' would be a different empty database per thread, so it is refused clearly."""
    with pytest.raises(InvalidConfiguration) as info:
        SQLiteStore(":memory:")
    assert "MemoryStore" in str(info.value)


def test_sqlite_refuses_a_newer_schema(tmp_path: Path) -> None:
    """A database from a newer domainpolicy is refused, not misread."""
    import sqlite3

    path = tmp_path / "new.db"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version=99")
    with pytest.raises(InvalidConfiguration) as info:
        SQLiteStore(path)
    assert "schema version 99" in str(info.value)


def test_sqlite_corrupt_state_is_store_unavailable(tmp_path: Path) -> None:
    """A corrupt stored state raises StoreUnavailable naming the tenant."""
    import sqlite3

    path = tmp_path / "s.db"
    with SQLiteStore(path) as store:
        observe(store, "t1", NOW)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE tenant_state SET state = '{\"schema\": 1}', version = version + 1")
    with SQLiteStore(path) as store, pytest.raises(StoreUnavailable) as info:
        store.load("t1")
    assert "'t1'" in str(info.value)


def test_unknown_store_url_is_a_configuration_error() -> None:
    """open_store names the URL it cannot open."""
    with pytest.raises(InvalidConfiguration) as info:
        open_store("postgres://db/x")
    assert "postgres://db/x" in str(info.value)
