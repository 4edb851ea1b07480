"""The store contract, run against every store: exact counts, one block, durability, failures."""

from __future__ import annotations

import itertools
import multiprocessing
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from domainpolicy import (
    BlockMachine,
    InvalidConfiguration,
    InvalidEvent,
    InvalidTransition,
    MemoryStore,
    SQLiteStore,
    State,
    StateStore,
    StoreUnavailable,
    TenantState,
    open_store,
)
from domainpolicy._stores import ObserveItem
from store_support import (
    BATCH_POLICY,
    SMALL_POLICY,
    STORE_KINDS,
    observe_sequentially,
    open_deterministic,
    result_summary,
    worker,
)
from threads import run_in_threads

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

    run_in_threads(*[run] * 8)
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


def test_sqlite_counter_writes_interleaved_with_another_connection(tmp_path: Path) -> None:
    """Observations that write only the head counters, from two stores on one file taking
    turns (each with its own copy), then a transition: the counts are exact and survive."""
    path = tmp_path / "s.db"
    memory = MemoryStore()
    with SQLiteStore(path) as one, SQLiteStore(path) as two:
        for i in range(6):
            for store in (one, memory, two, memory, two, memory):
                observe(store, "t1", NOW + i, registered=i % 2 == 0)
            assert one.load("t1") == two.load("t1") == memory.load("t1")
        for store in (one, memory):
            while observe(store, "t1", NOW + 7):
                pass
        assert one.load("t1") == memory.load("t1")
    with SQLiteStore(path) as again:
        assert again.load("t1") == memory.load("t1")
        assert again.history("t1") == memory.history("t1")


def test_unknown_store_url_is_a_configuration_error() -> None:
    """open_store names the URL it cannot open."""
    with pytest.raises(InvalidConfiguration) as info:
        open_store("postgres://db/x")
    assert "postgres://db/x" in str(info.value)


# --------------------------------------------------------------------------- observe_many

SPAM: ObserveItem = ("t1", False, "spam.example", 1)


def accepted(results: list[object]) -> list[bool]:
    """Whether each `observe_many` result is an accept (errors fail the test)."""
    out = []
    for result in results:
        assert isinstance(result, tuple), result
        decision = result[1].decision
        assert decision is not None
        out.append(decision.accepted)
    return out


def test_observe_many_of_nothing_is_nothing(store: StateStore) -> None:
    """An empty batch returns no results and stores nothing."""
    assert store.observe_many(MACHINE, [], NOW) == []
    assert store.observe_many(MACHINE, iter(()), []) == []
    assert store.tenants() == []


def test_observe_many_blocks_at_the_crossing_item(store: StateStore) -> None:
    """A batch that crosses the limit mid-way: earlier items accepted, the crossing one refused
    with the block transition, later ones refused; every item counted, one audit record."""
    limit = SMALL_POLICY.message_limit
    results = store.observe_many(MACHINE, [SPAM] * (limit + 5), NOW)
    assert accepted(list(results)) == [True] * limit + [False] * 5
    transitions = [r[1].transitions for r in results if isinstance(r, tuple)]
    assert [len(t) for t in transitions] == [0] * limit + [1] + [0] * 4
    assert transitions[limit][0].target is State.BLOCKED
    state = store.load("t1")
    assert (state.state, state.window.unregistered) == (State.BLOCKED, limit + 5)
    assert [(r.action, r.after) for r in store.history("t1")] == [("observe", "blocked")]


def test_observe_many_applies_items_in_order_across_batches(store: StateStore) -> None:
    """Batches continue where the previous one (or a single observe) left off."""
    limit = SMALL_POLICY.message_limit
    assert observe(store, "t1", NOW)
    first = store.observe_many(MACHINE, [SPAM] * (limit - 2), NOW + 1)
    assert accepted(list(first)) == [True] * (limit - 2)
    second = store.observe_many(MACHINE, [SPAM] * 3, NOW + 2)
    assert accepted(list(second)) == [True, False, False]
    assert not observe(store, "t1", NOW + 3)
    assert store.load("t1").window.unregistered == limit + 3


def test_observe_many_interleaved_tenants_are_independent(store: StateStore) -> None:
    """Tenants interleaved in one batch: one crosses its limit, the other is untouched by it,
    and registered mail of the blocked tenant later in the batch still flows."""
    limit = SMALL_POLICY.message_limit
    items: list[ObserveItem] = []
    for i in range(limit + 2):
        items += [SPAM, ("t2", True, None, 1)]
        if i % 2:
            items.append(("t2", False, "fwd.example", 1))
    items.append(("t1", True, None, 1))
    flags = accepted(list(store.observe_many(MACHINE, items, NOW)))
    t1 = [ok for item, ok in zip(items, flags, strict=True) if item[0] == "t1"]
    t2 = [ok for item, ok in zip(items, flags, strict=True) if item[0] == "t2"]
    assert t1 == [True] * limit + [False] * 2 + [True]
    assert all(t2)
    assert store.load("t1").state is State.BLOCKED
    state = store.load("t2")
    assert (state.state, state.window.total, state.window.unregistered) == (
        State.ACTIVE,
        len(t2),
        (limit + 2) // 2,
    )
    assert store.history("t2") == []


def test_observe_many_reports_a_malformed_item_and_applies_the_rest(store: StateStore) -> None:
    """A malformed item gets its InvalidEvent (as observe would raise) and counts nothing; the
    other items are applied."""
    items: list[ObserveItem] = [SPAM, ("t1", False, None, 1), ("t1", False, "x.example", 0), SPAM]
    results = store.observe_many(MACHINE, items, NOW)
    assert [type(r) for r in results] == [tuple, InvalidEvent, InvalidEvent, tuple]
    assert store.load("t1").window.unregistered == 2


def test_observe_many_takes_one_time_per_item(store_url: str) -> None:
    """A sequence of times gives each item its own time; a length mismatch counts nothing."""
    with open_deterministic(store_url) as store:
        items = [SPAM, SPAM]
        with pytest.raises(InvalidEvent):
            store.observe_many(MACHINE, items, [NOW])
        assert store.tenants() == []
        results = store.observe_many(MACHINE, items, [NOW, NOW + 3600])
        assert accepted(list(results)) == [True, True]
        assert store.load("t1").window.unregistered == 1  # the first fell out of the window


def test_concurrent_batches_count_exactly(store: StateStore) -> None:
    """4 threads x 10 batches of 5 on one tenant: every item counted, the block exactly once."""
    results: list[bool] = []
    lock = threading.Lock()

    def run() -> None:
        for _ in range(10):
            flags = accepted(list(store.observe_many(MACHINE, [SPAM] * 5, store.now())))
            with lock:
                results.extend(flags)

    run_in_threads(*[run] * 4)
    assert store.load("t1").window.unregistered == 200
    assert results.count(True) == SMALL_POLICY.message_limit
    assert [r.after for r in store.history("t1")] == ["blocked"]


@pytest.mark.parametrize("kind", [k for k in KINDS if STORE_KINDS[k][1]])
def test_observe_many_on_a_closed_store_fails_every_item(kind: str, tmp_path: Path) -> None:
    """A store that cannot be used reports StoreUnavailable for every item, never raises."""
    store = open_store(STORE_KINDS[kind][0](tmp_path))
    store.close()
    results = store.observe_many(MACHINE, [SPAM, ("t2", True, None, 1)], NOW)
    assert [type(r) for r in results] == [StoreUnavailable, StoreUnavailable]


def test_sqlite_batch_is_one_transaction_and_fails_whole(tmp_path: Path) -> None:
    """While another writer holds the SQLite write lock past the timeout, every item of the
    batch fails and nothing of it is counted; afterwards the batch applies."""
    import sqlite3

    path = tmp_path / "s.db"
    with SQLiteStore(path, timeout=0.05) as store:
        observe(store, "t1", NOW)
        blocker = sqlite3.connect(path, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            results = store.observe_many(MACHINE, [SPAM, ("t2", True, None, 1)], NOW)
            assert [type(r) for r in results] == [StoreUnavailable, StoreUnavailable]
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert store.load("t1").window.unregistered == 1
        assert store.tenants() == ["t1"]
        assert accepted(list(store.observe_many(MACHINE, [SPAM, SPAM], NOW))) == [True, True]
        assert store.load("t1").window.unregistered == 3


# The differential test: observe_many on each store against observe, one by one, on a
# MemoryStore.  One store per kind for the module; every example uses fresh tenant ids.

_tenant_ids = itertools.count()
DIFF_MACHINE = BlockMachine(BATCH_POLICY)


@pytest.fixture(scope="module", params=KINDS)
def diff_store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StateStore]:
    factory, _ = STORE_KINDS[request.param]
    opened = open_deterministic(factory(tmp_path_factory.mktemp(request.param)))
    yield opened
    opened.close()


_DOMAINS = ["a.example", "b.example", "c.example", "d.example", "e.example", "f.example"]
_item = st.tuples(
    st.sampled_from([0, 0, 0, 1, 2]),  # tenant (mostly one, so that it gets blocked, suspended)
    st.booleans(),  # registered
    st.sampled_from(_DOMAINS),
    st.one_of(st.just(1), st.integers(1, 3), st.just(0)),  # weight (0: malformed)
    st.sampled_from([0.0, 0.0, 0.0, 0.5, 3.0, 10.0, -2.0, 45.0]),  # time offset in the batch
)
_batch = st.tuples(
    st.sampled_from([0.0, 0.0, 1.0, 5.0, 10.0, 30.0, 120.0]),  # time step before the batch
    st.booleans(),  # one time per item (else one for the batch)
    st.lists(_item, max_size=30),
)


# a flood of one tenant's unregistered mail: blocks it, and suspends it when blocked already
_flood = st.tuples(
    st.sampled_from([0.0, 1.0]),
    st.just(False),
    st.lists(
        st.tuples(st.just(0), st.just(False), st.sampled_from(_DOMAINS), st.just(1), st.just(0.0)),
        min_size=10,
        max_size=40,
    ),
)


@given(batches=st.lists(st.one_of(_batch, _flood), min_size=1, max_size=6))
def test_observe_many_equals_sequential_observe(
    diff_store: StateStore,
    batches: list[tuple[float, bool, list[tuple[int, bool, str, int, float]]]],
) -> None:
    """Random batches (several tenants, registered and unregistered, per-item times, limits,
    warnings and suspensions crossed mid-batch, malformed items) give, on every store, the
    same decisions, effects, audit trails and final states as observe one by one on a
    MemoryStore."""
    reference = MemoryStore()
    tenants = [f"b{next(_tenant_ids)}-{i}" for i in range(3)]
    now = NOW
    for step, per_item, raw in batches:
        now += step
        items: list[ObserveItem] = [
            (tenants[t], registered, None if registered else domain, weight)
            for t, registered, domain, weight, _ in raw
        ]
        times = [now + offset for *_, offset in raw] if per_item else [now] * len(raw)
        expected = observe_sequentially(reference, DIFF_MACHINE, items, times)
        got = diff_store.observe_many(DIFF_MACHINE, items, times if per_item else now)
        for outcome in expected:
            if isinstance(outcome, tuple):
                for change in outcome[1]:
                    event(f"{change[0].value} -> {change[1].value}")
                if outcome[2]:
                    event("alert")
        assert [result_summary(r) for r in got] == expected
    for tenant in tenants:
        assert diff_store.load(tenant).to_dict() == reference.load(tenant).to_dict()
        assert [r.to_dict() for r in diff_store.history(tenant)] == [
            r.to_dict() for r in reference.history(tenant)
        ]
