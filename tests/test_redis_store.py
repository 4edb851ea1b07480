"""RedisStore against a real redis-server: differential test against MemoryStore, hostile tenant
ids, failures, script cache loss and durability across a server restart.  The differential tests
run on the test Redis Cluster too (see also tests/test_redis_cluster.py)."""

from __future__ import annotations

import itertools
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import redis
from hypothesis import event, given
from hypothesis import strategies as st
from redis.crc import key_slot

from domainpolicy import (
    BlockMachine,
    BlockPolicy,
    InvalidConfiguration,
    InvalidTransition,
    MemoryStore,
    State,
    StateStore,
    StoreUnavailable,
    TenantState,
    open_store,
)
from domainpolicy._blockstate import Effects, InvalidEvent
from domainpolicy._stores._resp import Wire as _Wire
from domainpolicy._stores.redis import RedisStore
from redis_support import RedisServer, redis_cluster_url, redis_url, session_server
from store_support import BATCH_POLICY, every_call
from threads import run_in_threads

pytestmark = pytest.mark.redis

NOW = 1_800_000_000.0
POLICIES = [
    BATCH_POLICY,
    BlockPolicy(
        window_seconds=40,
        bucket_seconds=10,
        message_limit=6,
        domain_limit=2,
        max_tracked_domains=4,
        min_unregistered_share=0.5,
        warn_fraction=0.7,
        suspend_factor=1.5,
        probation_seconds=50,
    ),
    BlockPolicy(
        window_seconds=30,
        bucket_seconds=10,
        message_limit=4,
        domain_limit=2,
        max_tracked_domains=4,
        warn_fraction=0.5,
        suspend_factor=50.0,
        probation_seconds=60,
    ),
    BlockPolicy(
        window_seconds=7,
        bucket_seconds=7,
        message_limit=5,
        domain_limit=2,
        max_tracked_domains=3,
        warn_fraction=1.0,
        suspend_factor=3.0,
        probation_seconds=30,
    ),
]
DOMAINS = [f"{c}.example" for c in "abcdefghij"]
_tenant_ids = itertools.count()


@pytest.fixture(scope="module", params=["redis", "redis-cluster"])
def shared_redis(request: pytest.FixtureRequest) -> Iterator[tuple[RedisStore, RedisStore]]:
    """Two stores on one server (or on the test Redis Cluster): two MTAs sharing the state."""
    url = (redis_cluster_url if request.param == "redis-cluster" else redis_url)(Path())
    with (
        RedisStore.from_url(url, server_time=False, prefix="diff:") as one,
        RedisStore.from_url(url, server_time=False, prefix="diff:") as two,
    ):
        yield one, two


@pytest.fixture
def url(tmp_path: Path) -> str:
    return redis_url(tmp_path)


# --------------------------------------------------------------------------- differential

_step = st.one_of(
    st.just(0.0),
    st.floats(min_value=0.0, max_value=3.0),
    st.sampled_from([0.0, 0.25, 1.0, 9.999, 10.0, 20.0, 40.0, 50.0, 400.0, -1.0, -10.0, -47.0]),
    st.sampled_from([0.0, 7.0, 10.0, 14.0, 20.0, 21.0, 30.0, 40.0]),
    st.floats(min_value=-30.0, max_value=60.0, allow_nan=False),
)
_observe = st.tuples(
    st.just("observe"),
    _step,
    st.booleans(),
    st.sampled_from(DOMAINS),
    st.integers(min_value=1, max_value=4),
)
_admin = st.tuples(
    st.sampled_from(["remediate", "operator_block", "operator_suspend", "connector"]), _step
)
# jump to the end of probation (exactly, or just before / after it)
_probation_end = st.tuples(st.just("probation_end"), st.sampled_from([-0.5, 0.0, 0.0, 1e-6]))
_ops = st.lists(
    st.one_of(*[_observe] * 6, _admin, _probation_end),
    min_size=10,
    max_size=80,
)


def _remediate(machine: BlockMachine) -> Callable[[TenantState, float], tuple[TenantState, Any]]:
    """Declare every offending domain, review connectors, attest, request and approve."""

    def run(state: TenantState, now: float) -> tuple[TenantState, Effects]:
        block = state.block
        if block is None:
            raise InvalidTransition("nothing to remediate")
        transitions: list[Any] = []
        if block.offending:
            state, _ = machine.declare_not_ours(state, now, block.offending, by="admin")
        for connector in block.to_review:
            state, _ = machine.review_connector(state, now, connector, kept=False, by="admin")
        state, _ = machine.attest(state, now, by="admin", note="patched")
        if state.state is not State.UNBLOCK_REQUESTED:
            assert state.block is not None
            state, effects = machine.request_unblock(
                state, now, code=state.block.code.value, evidence="cleaned"
            )
            transitions += effects.transitions
        state, effects = machine.approve(state, now, by="support", reason="ok")
        return state, Effects(None, (*transitions, *effects.transitions), effects.alerts)

    return run


def _mutation(op: str, machine: BlockMachine) -> Callable[[TenantState, float], Any]:
    if op == "remediate":
        return _remediate(machine)
    if op == "operator_block":
        return lambda s, now: machine.operator_block(s, now, by="ops", reason="abuse")
    if op == "operator_suspend":
        return lambda s, now: machine.operator_suspend(s, now, by="ops", reason="abuse")
    return lambda s, now: machine.create_connector(s, now, f"c{int(now * 1000)}")


def _summary(effects: Effects) -> tuple[object, ...]:
    return (
        effects.decision,
        [(t.source, t.target, t.event, t.reason, t.at, t.evidence) for t in effects.transitions],
        [(a.kind, a.message, a.at, a.evidence) for a in effects.alerts],
    )


Action = Callable[[StateStore], tuple[TenantState, Effects]]


def _action(op: tuple[Any, ...], machine: BlockMachine, tenant: str, at: float) -> Action:
    if op[0] == "observe":
        _, _, registered, domain, weight = op
        return lambda store: store.observe(
            machine,
            tenant,
            at,
            registered=registered,
            registrable=None if registered else domain,
            weight=weight,
        )
    mutation = _mutation(op[0], machine)
    return lambda store: store.apply(tenant, mutation, at, action=op[0], actor="ops")


def _run(store: StateStore, action: Action) -> object:
    try:
        state, effects = action(store)
    except InvalidTransition as exc:
        return type(exc)
    return state.to_dict(), _summary(effects)


@given(policy=st.sampled_from(POLICIES), ops=_ops, start=st.floats(0.0, 20.0))
def test_redis_matches_memory_store_step_by_step(
    shared_redis: tuple[RedisStore, RedisStore],
    policy: BlockPolicy,
    ops: list[tuple[Any, ...]],
    start: float,
) -> None:
    """Random observations and admin events, sent through two RedisStores in turns, give the
    same decisions, effects and states as one MemoryStore."""
    machine = BlockMachine(policy)
    memory = MemoryStore()
    tenant = f"diff-{next(_tenant_ids)}"
    now = NOW + start
    for i, op in enumerate(ops):
        redis_store = shared_redis[(i // 3) % 2]
        if op[0] == "probation_end":
            until = memory.load(tenant).probation_until
            if until is not None:
                now = max(now, until + op[1])
            continue
        now = max(0.0, now + op[1])
        action = _action(op, machine, tenant, now)
        expected = _run(memory, action)
        got = _run(redis_store, action)
        if isinstance(expected, tuple):
            for change in expected[1][1]:
                event(f"{change[0].value} -> {change[1].value}")
            for alert in expected[1][2]:
                event(f"alert {alert[0].value}")
        assert got == expected, op
        assert redis_store.load(tenant).to_dict() == memory.load(tenant).to_dict(), op
    assert [r.to_dict() for r in shared_redis[0].history(tenant)] == [
        r.to_dict() for r in memory.history(tenant)
    ]


# --------------------------------------------------------------------------- keys

HOSTILE = [
    "a}b",
    "{a}",
    "a%7Db",
    "a%7db",
    "}",
    "{",
    "{}",
    "x:state",
    "a}:state",
    "tenant one",
    "ténant",
    "租户",
    "a\x00b",
    "a\nb",
    "tenants",
    "%",
    "%25",
]


def test_hostile_tenant_ids_keep_their_own_keys_and_slot(url: str) -> None:
    """Tenant ids with braces, percent signs or control characters cannot break the hash tag."""
    machine = BlockMachine(POLICIES[0])
    with RedisStore.from_url(url, server_time=False) as store:
        for i, tenant in enumerate(HOSTILE):
            store.observe(
                machine, tenant, NOW, registered=False, registrable="a.example", weight=i + 1
            )
        for i, tenant in enumerate(HOSTILE):
            assert store.load(tenant).window.unregistered == i + 1
        assert store.tenants() == sorted(HOSTILE)
    with redis.Redis.from_url(url) as client:
        keys = [k.decode() for k in client.keys("*")]
    tenant_keys = [k for k in keys if k != "dp:tenants"]
    by_tenant: dict[str, set[int]] = {}
    kinds: dict[str, set[str]] = {}
    for key in tenant_keys:
        assert key.startswith("dp:{")
        tag = key[len("dp:{") : key.index("}")]
        assert "{" not in tag
        kinds.setdefault(unquote(tag), set()).add(key[key.index("}") :])
        by_tenant.setdefault(unquote(tag), set()).add(key_slot(key.encode()))
    assert sorted(by_tenant) == sorted(HOSTILE)
    assert all(len(slots) == 1 for slots in by_tenant.values())
    for found in kinds.values():
        assert (
            {"}:state", "}:bt", "}:bu", "}:dom"}
            <= found
            <= {"}:state", "}:bt", "}:bu", "}:dom", "}:audit"}
        )


def test_prefix_with_braces_is_refused(url: str) -> None:
    """A key prefix containing a brace would break the hash tag: InvalidConfiguration."""
    with pytest.raises(InvalidConfiguration, match="prefix"):
        RedisStore.from_url(url, prefix="dp{x}:")


def test_prefix_separates_stores_and_open_store_passes_options(url: str) -> None:
    """open_store() forwards options; two prefixes on one server do not see each other."""
    machine = BlockMachine(POLICIES[0])
    with open_store(url, prefix="one:", server_time=False) as one, open_store(url) as two:
        assert isinstance(one, RedisStore)
        assert one.kind == "redis"
        one.observe(machine, "t", NOW, registered=True, registrable=None)
        assert one.tenants() == ["t"]
        assert two.tenants() == []


# --------------------------------------------------------------------------- semantics


def test_invalid_observation_is_refused_before_counting(url: str) -> None:
    """Malformed arguments raise InvalidEvent and count nothing."""
    machine = BlockMachine(POLICIES[0])
    with RedisStore.from_url(url, server_time=False) as store:
        for kwargs in (
            {"registered": False, "registrable": None},
            {"registered": False, "registrable": "a.example", "weight": 0},
            {"registered": False, "registrable": "a.example", "weight": 2**40},
        ):
            with pytest.raises(InvalidEvent):
                store.observe(machine, "t", NOW, **kwargs)
        with pytest.raises(InvalidEvent):
            store.observe(machine, "t", float("nan"), registered=True, registrable=None)
        with pytest.raises(InvalidEvent):
            store.observe(machine, "", NOW, registered=True, registrable=None)
        assert store.tenants() == []


def test_server_time_replaces_the_callers_clock(url: str) -> None:
    """With server_time (the default) the window follows Redis TIME, not the caller's now."""
    machine = BlockMachine(POLICIES[0])
    with RedisStore.from_url(url) as store:
        before = store.now()
        state, _ = store.observe(machine, "t", 5.0, registered=True, registrable=None)
        after = store.now()
    assert int(before / 10) <= state.window.head <= int(after / 10)


def test_apply_retries_when_another_writer_gets_in_first(url: str) -> None:
    """A compare-and-set conflict re-runs the mutation on the newer state: nothing is lost."""
    machine = BlockMachine(POLICIES[0])
    calls = 0
    with (
        RedisStore.from_url(url, server_time=False) as store,
        RedisStore.from_url(url, server_time=False) as other,
    ):

        def mutation(state: TenantState, now: float) -> tuple[TenantState, Effects]:
            nonlocal calls
            calls += 1
            if calls == 1:
                other.observe(machine, "t", NOW, registered=False, registrable="a.example")
            return machine.create_connector(state, now, "conn-1")

        store.apply("t", mutation, NOW, action="create_connector", actor="ops")
        state = store.load("t")
    assert calls == 2
    assert state.window.unregistered == 1
    assert state.connectors == (("conn-1", NOW),)


def test_script_cache_flush_is_survived(url: str) -> None:
    """After SCRIPT FLUSH the store reloads its scripts and counts on."""
    machine = BlockMachine(POLICIES[0])
    with RedisStore.from_url(url, server_time=False) as store, redis.Redis.from_url(url) as client:
        store.observe(machine, "t", NOW, registered=False, registrable="a.example")
        client.script_flush()
        store.observe(machine, "t", NOW, registered=False, registrable="a.example")
        store.apply("t", lambda s, now: machine.create_connector(s, now, "c"), NOW, action="c")
        assert store.load("t").window.unregistered == 2


# --------------------------------------------------------------------------- failures


def _every_call(store: RedisStore) -> list[Callable[[], object]]:
    return every_call(store, BlockMachine(POLICIES[0]), NOW)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_unreachable_server_raises_store_unavailable() -> None:
    """Nothing listening: every operation raises StoreUnavailable naming the failure."""
    with RedisStore.from_url(f"redis://127.0.0.1:{_closed_port()}/0") as store:
        for call in _every_call(store):
            with pytest.raises(StoreUnavailable, match="unreachable"):
                call()


def test_silent_server_times_out_as_store_unavailable() -> None:
    """A server that accepts but never answers: the bounded socket timeout -> StoreUnavailable."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        with (
            RedisStore.from_url(f"redis://127.0.0.1:{port}/0", socket_timeout=0.2) as store,
            pytest.raises(StoreUnavailable, match="timed out"),
        ):
            store.load("t")


def test_stopped_server_raises_store_unavailable(tmp_path: Path) -> None:
    """A server that goes away mid-life turns every call into StoreUnavailable."""
    server = RedisServer(tmp_path)
    server.start()
    try:
        store = RedisStore.from_url(server.url, server_time=False)
        _every_call(store)[0]()
        server.stop()
        for call in _every_call(store):
            with pytest.raises(StoreUnavailable):
                call()
        store.close()
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("field", "value"),
    [("st", "weird"), ("doc", "not json"), ("doc", '{"tenant": "other"}'), ("T", "99")],
)
def test_corrupt_state_raises_store_unavailable(url: str, field: str, value: str) -> None:
    """Corrupt stored data (bad state, bad JSON, wrong tenant, bad sums) is StoreUnavailable."""
    machine = BlockMachine(POLICIES[0])
    with RedisStore.from_url(url, server_time=False) as store, redis.Redis.from_url(url) as client:
        store.observe(machine, "t", NOW, registered=False, registrable="a.example")
        client.hset("dp:{t}:state", field, value)
        with pytest.raises(StoreUnavailable, match="corrupt"):
            store.load("t")
    with (
        RedisStore.from_url(url, server_time=False) as fresh,  # holds no copy of the state
        pytest.raises(StoreUnavailable, match="corrupt"),
    ):
        fresh.observe(machine, "t", NOW, registered=False, registrable="a.example")


def test_wrong_key_type_raises_store_unavailable(url: str) -> None:
    """A key of the wrong type (a Redis WRONGTYPE error in the script) is StoreUnavailable."""
    machine = BlockMachine(POLICIES[0])
    with RedisStore.from_url(url, server_time=False) as store, redis.Redis.from_url(url) as client:
        client.set("dp:{t}:state", "x")
        with pytest.raises(StoreUnavailable, match="failed"):
            store.observe(machine, "t", NOW, registered=False, registrable="a.example")
        client.set("dp:{u}:audit", "x")
        with pytest.raises(StoreUnavailable):
            store.history("u")


# --------------------------------------------------------------------------- batches

SPAM_A = ("t", False, "a.example", 1)


def _count_rounds(store: RedisStore, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the number of items of each pipelined round the store sends."""
    sizes: list[int] = []
    send = store._round

    def spy(batch: Any, prepared: Any, pending: Any) -> Any:
        sizes.append(len(pending))
        return send(batch, prepared, pending)

    monkeypatch.setattr(store, "_round", spy)
    return sizes


def test_batch_without_state_change_is_one_round(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch that changes no state is one pipelined round trip, and leaves no round counter
    behind."""
    machine = BlockMachine(POLICIES[2])
    with RedisStore.from_url(url, server_time=False) as store, redis.Redis.from_url(url) as client:
        store.observe(machine, "t", NOW, registered=True, registrable=None)  # loads the script
        rounds = _count_rounds(store, monkeypatch)
        items = [("t", True, None, 1), ("u", True, None, 1)] * 10
        results = store.observe_many(machine, items, NOW)
        assert rounds == [20]
        assert all(isinstance(r, tuple) for r in results)
        assert store.load("t").window.total == 11
        assert client.exists("dp:{t}:seq") == 0


def test_items_after_a_slow_item_wait_for_it(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The item that blocks takes the slow path; the tenant's later items of the batch are not
    counted against the state before the block but sent again after it, while other tenants'
    items go through in the first round."""
    policy = POLICIES[2]  # message_limit 4, warn at 2
    machine = BlockMachine(policy)
    with RedisStore.from_url(url, server_time=False) as store:
        rounds = _count_rounds(store, monkeypatch)
        store.observe_many(machine, [("u", True, None, 1)], NOW)  # loads the script
        del rounds[:]
        items = [SPAM_A] * 8 + [("u", True, None, 1)] * 3
        results = store.observe_many(machine, items, NOW)
        reference = MemoryStore()
        reference.observe(machine, "u", NOW, registered=True, registrable=None)
        expected = [
            _summary(reference.observe(machine, t, NOW, registered=r, registrable=d, weight=w)[1])
            for t, r, d, w in items
        ]
        assert [_summary(r[1]) for r in results if isinstance(r, tuple)] == expected
        decisions = [e[0] for e in expected[:8]]
        assert decisions.count(decisions[0]) == policy.message_limit
        assert store.load("t").to_dict() == reference.load("t").to_dict()
        # round 1: everything; the warning is slow, t's later items wait; then the block
        assert rounds[0] == 11
        assert len(rounds) >= 3


def test_batches_of_two_mtas_count_exactly(url: str) -> None:
    """Two stores (two MTAs) x 3 threads sending batches of 7 on one tenant: every item
    counted once, the block exactly once."""
    machine = BlockMachine(POLICIES[0])
    accepted: list[bool] = []
    lock = threading.Lock()
    with (
        RedisStore.from_url(url, server_time=False) as one,
        RedisStore.from_url(url, server_time=False) as two,
    ):

        def run(store: RedisStore) -> None:
            for _ in range(8):
                results = store.observe_many(machine, [SPAM_A] * 7, NOW)
                with lock:
                    for result in results:
                        assert isinstance(result, tuple), result
                        assert result[1].decision is not None
                        accepted.append(result[1].decision.accepted)

        run_in_threads(*(partial(run, store) for store in (one, two) * 3))
        assert one.load("t").window.unregistered == 6 * 8 * 7
        assert accepted.count(True) == POLICIES[0].message_limit
        assert [r.after for r in one.history("t")][:1] == ["blocked"]
        assert [r.after for r in one.history("t")].count("blocked") == 1


def test_batch_survives_script_cache_flush(url: str) -> None:
    """After SCRIPT FLUSH a batch reloads the script and counts every item once."""
    machine = BlockMachine(POLICIES[0])
    with RedisStore.from_url(url, server_time=False) as store, redis.Redis.from_url(url) as client:
        store.observe_many(machine, [SPAM_A] * 3, NOW)
        client.script_flush()
        results = store.observe_many(machine, [SPAM_A] * 3 + [("u", True, None, 1)], NOW)
        assert all(isinstance(r, tuple) for r in results)
        assert store.load("t").window.unregistered == 6


def test_batch_on_a_stopped_server_fails_every_item(tmp_path: Path) -> None:
    """A server that went away: every item of a batch is StoreUnavailable, nothing raised."""
    machine = BlockMachine(POLICIES[0])
    server = RedisServer(tmp_path)
    server.start()
    try:
        with RedisStore.from_url(server.url, server_time=False) as store:
            store.observe_many(machine, [SPAM_A], NOW)
            server.stop()
            results = store.observe_many(machine, [SPAM_A, ("u", True, None, 1)], NOW)
            assert [type(r) for r in results] == [StoreUnavailable, StoreUnavailable]
    finally:
        server.stop()


def test_batch_corrupt_tenant_fails_only_its_items(url: str) -> None:
    """A tenant with a corrupt stored state gets StoreUnavailable for each of its items, as
    observe would raise; the other tenants of the batch are counted."""
    machine = BlockMachine(POLICIES[0])
    with RedisStore.from_url(url, server_time=False) as store, redis.Redis.from_url(url) as client:
        store.observe(machine, "t", NOW, registered=False, registrable="a.example")
        client.hset("dp:{t}:state", "st", "weird")
        items = [SPAM_A, ("u", True, None, 1), SPAM_A, ("u", True, None, 1)]
        results = store.observe_many(machine, items, NOW)
        assert [type(r) for r in results] == [StoreUnavailable, tuple, StoreUnavailable, tuple]
        assert store.load("u").window.total == 2


def test_observation_clock_skips_server_time_round_trip(url: str) -> None:
    """With server_time the policy may read the local clock for observations (the script uses
    the server's TIME anyway); without it, the server's clock."""
    with (
        RedisStore.from_url(url) as served,
        RedisStore.from_url(url, server_time=False) as local,
    ):
        assert served.observation_clock() is time.time
        assert local.observation_clock() == local.now


_mta_batch = st.tuples(
    st.sampled_from([0.0, 0.0, 1.0, 10.0, 30.0]),
    st.lists(
        st.tuples(st.sampled_from(["x", "x", "y"]), st.booleans(), st.sampled_from(DOMAINS[:5])),
        max_size=25,
    ),
)


@given(policy=st.sampled_from(POLICIES), batches=st.lists(_mta_batch, min_size=1, max_size=8))
def test_batches_from_two_mtas_match_memory_store(
    shared_redis: tuple[RedisStore, RedisStore],
    policy: BlockPolicy,
    batches: list[tuple[float, list[tuple[str, bool, str]]]],
) -> None:
    """Batches sent through two RedisStores in turns (each one's copy of the state goes stale)
    give the same effects, states and audit trail as observe one by one on a MemoryStore."""
    _batches_match_memory(shared_redis, policy, batches, prefix="")


# --------------------------------------------------------------------------- packed rounds


class _PlainSubclass(redis.Redis):
    """Not exactly ``redis.Redis``: the store keeps redis-py's pipeline for it."""


def _expected_round(store: RedisStore, items: list[tuple[str, bool, str | None, int]]) -> bytes:
    """The bytes redis-py's pipeline packs for the first round of *items* (token of round 0)."""
    machine = BlockMachine(POLICIES[0])
    token = f"{store._token_base}0"
    total = {t: sum(1 for i in items if i[0] == t) for t, *_ in items}
    rank: dict[str, int] = {}
    commands = []
    for tenant, registered, registrable, weight in items:
        keys, args = store._observe_args(machine, tenant, NOW, registered, registrable, weight)
        k = rank.get(tenant, 0)
        rank[tenant] = k + 1
        held = store._cache.get(tenant)
        args[-1] = "" if held is None else str(held[0] + k)
        more = "1" if k + 1 < total[tenant] else "0"
        commands.append(
            ("EVALSHA", store._observe.sha, 5, *keys.batched, *args, token, str(k), more)
        )
    packer: Any = redis.Connection  # untyped; never connected
    return b"".join(packer().pack_commands(commands))


@pytest.mark.parametrize("server_time", [False, True])
def test_packed_round_is_what_redis_py_sends(
    url: str, monkeypatch: pytest.MonkeyPatch, server_time: bool
) -> None:
    """On a plain redis.Redis a round is packed by hand, byte for byte as redis-py's pipeline
    would pack the same EVALSHA calls (held versions, ranks, the last-item flag, non-ASCII)."""
    machine = BlockMachine(POLICIES[0])
    with RedisStore.from_url(url, server_time=server_time) as store:
        assert store._wire is not None
        store.observe(machine, "x", NOW, registered=True, registrable=None)  # x: version held
        items = [
            ("x", False, "a.example", 1),
            ("ÿ{é}%", True, None, 3),
            ("x", True, None, 2),
            ("y", False, "bücher.example", 12345),
            ("x", False, "b.example", 1),
        ]
        expected = _expected_round(store, items)
        sent: list[tuple[bytes, int]] = []
        send = _Wire.round

        def spy(wire: _Wire, commands: bytes, count: int) -> list[object]:
            sent.append((commands, count))
            return send(wire, commands, count)

        monkeypatch.setattr(_Wire, "round", spy)
        store._rounds = itertools.count()
        results = store.observe_many(machine, items, NOW)
        assert all(isinstance(r, tuple) for r in results)
        assert sent[0] == (expected, len(items))


@pytest.mark.parametrize(
    "options",
    [{"decode_responses": True}, {"protocol": 2}, {"protocol": 3, "decode_responses": True}],
)
def test_packed_rounds_read_replies_as_the_client_decodes_them(
    url: str, options: dict[str, Any]
) -> None:
    """The replies of a packed round are read by the client's own parser (RESP2 or RESP3, bytes
    or text): the results, with warnings and a block, are those of observe one by one."""
    machine = BlockMachine(POLICIES[2])
    items = [SPAM_A] * 6 + [("u", True, None, 1), ("t", False, "b.example", 2)]
    with (
        redis.Redis.from_url(url, socket_timeout=5, **options) as client,
        RedisStore(client, server_time=False) as store,
    ):
        assert store._wire is not None
        reference = MemoryStore()
        expected = [
            _summary(reference.observe(machine, t, NOW, registered=r, registrable=d, weight=w)[1])
            for t, r, d, w in items
        ]
        results = store.observe_many(machine, items, NOW)
        assert [_summary(r[1]) if isinstance(r, tuple) else r for r in results] == expected
        assert store.load("t").to_dict() == reference.load("t").to_dict()


def test_other_clients_keep_the_redis_py_pipeline(url: str) -> None:
    """A client that is not exactly redis.Redis (here a subclass; Redis Cluster alike) gets
    redis-py's pipeline, with the same results, script cache flush included."""
    machine = BlockMachine(POLICIES[2])
    items = [SPAM_A] * 6 + [("u", True, None, 1)]
    with (
        _PlainSubclass.from_url(url, socket_timeout=5) as client,
        RedisStore(client, server_time=False) as store,
    ):
        assert store._wire is None
        reference = MemoryStore()
        for batch in (items, items[:2]):
            expected = [
                _summary(reference.observe(machine, t, NOW, registered=r, registrable=d)[1])
                for t, r, d, _ in batch
            ]
            results = store.observe_many(machine, batch, NOW)
            assert [_summary(r[1]) if isinstance(r, tuple) else r for r in results] == expected
            client.script_flush()
        assert store.load("t").to_dict() == reference.load("t").to_dict()


def test_packed_round_that_times_out_closes_and_releases_its_connection(url: str) -> None:
    """A round whose replies do not come in time: every item StoreUnavailable, the connection
    (which may still receive those replies) closed and given back; the next batch works."""
    machine = BlockMachine(POLICIES[0])
    with (
        RedisStore.from_url(url, server_time=False, socket_timeout=0.2) as store,
        redis.Redis.from_url(url) as admin,
    ):
        store.observe_many(machine, [("u", True, None, 1)], NOW)
        assert isinstance(store._client, redis.Redis)
        pool = store._client.connection_pool
        admin.client_pause(1500, all=False)  # write commands (EVALSHA) wait
        try:
            results = store.observe_many(machine, [("u", True, None, 1)] * 3, NOW)
        finally:
            admin.client_unpause()
        assert [type(r) for r in results] == [StoreUnavailable] * 3
        assert "timed out" in str(results[0])
        assert not pool._in_use_connections
        results = store.observe_many(machine, [("u", True, None, 1)] * 2, NOW)
        assert all(isinstance(r, tuple) for r in results)
        assert store.load("u").window.total in (3, 6)  # the timed-out round ran, or not


@pytest.fixture(scope="module")
def mixed_redis() -> Iterator[tuple[RedisStore, RedisStore]]:
    """Two MTAs on one server: one sending packed rounds, one through redis-py's pipeline."""
    url = redis_url(Path())
    with (
        _PlainSubclass.from_url(url, socket_timeout=5) as client,
        RedisStore.from_url(url, server_time=False, prefix="mixed:") as packed,
        RedisStore(client, server_time=False, prefix="mixed:") as pipelined,
    ):
        assert packed._wire is not None
        assert pipelined._wire is None
        yield packed, pipelined


@given(policy=st.sampled_from(POLICIES), batches=st.lists(_mta_batch, min_size=1, max_size=8))
def test_packed_and_pipelined_batches_match_memory_store(
    mixed_redis: tuple[RedisStore, RedisStore],
    policy: BlockPolicy,
    batches: list[tuple[float, list[tuple[str, bool, str]]]],
) -> None:
    """Batches sent in turns by a store packing its rounds and one using redis-py's pipeline
    give the effects, states and audit trail of observe one by one on a MemoryStore."""
    _batches_match_memory(mixed_redis, policy, batches, prefix="m")


# --------------------------------------------------------------------------- durability


def test_block_survives_redis_server_restart(tmp_path: Path) -> None:
    """With AOF persistence, a block and its audit record survive a restart of redis-server."""
    machine = BlockMachine(POLICIES[0])
    server = RedisServer(tmp_path, persistent=True)
    server.start()
    try:
        with RedisStore.from_url(server.url, server_time=False) as store:
            for i in range(POLICIES[0].message_limit + 1):
                store.observe(
                    machine, "t", NOW + i * 0.1, registered=False, registrable="a.example"
                )
            assert store.load("t").state is State.BLOCKED
            before = store.load("t").to_dict()
        server.restart()
        with RedisStore.from_url(server.url, server_time=False) as store:
            assert store.load("t").to_dict() == before
            assert [r.after for r in store.history("t")] == ["blocked"]
            assert store.tenants() == ["t"]
            _, effects = store.observe(
                machine, "t", NOW + 2, registered=False, registrable="a.example"
            )
            assert effects.decision is not None
            assert not effects.decision.accepted
    finally:
        server.stop()


def test_session_server_is_shared(url: str) -> None:
    """The conformance factory and the session server point at the same loopback server."""
    assert url == session_server().url
    assert url.startswith("redis://127.0.0.1:")


def _batches_match_memory(
    stores: Sequence[RedisStore],
    policy: BlockPolicy,
    batches: list[tuple[float, list[tuple[str, bool, str]]]],
    *,
    prefix: str,
) -> None:
    """Send *batches* through *stores* in turns and check every effect, the final states and the
    audit trails against observe one by one on a MemoryStore (tenants ``<prefix>x``/``y``)."""
    machine = BlockMachine(policy)
    memory = MemoryStore()
    run = next(_tenant_ids)
    now = NOW
    for i, (step, raw) in enumerate(batches):
        now += step
        items = [(f"{prefix}{t}{run}", r, None if r else d, 1) for t, r, d in raw]
        expected = [
            _summary(memory.observe(machine, t, now, registered=r, registrable=d, weight=w)[1])
            for t, r, d, w in items
        ]
        got = stores[i % len(stores)].observe_many(machine, items, now)
        assert [_summary(r[1]) if isinstance(r, tuple) else r for r in got] == expected
    for tenant in (f"{prefix}x{run}", f"{prefix}y{run}"):
        assert stores[0].load(tenant).to_dict() == memory.load(tenant).to_dict()
        assert [r.to_dict() for r in stores[-1].history(tenant)] == [
            r.to_dict() for r in memory.history(tenant)
        ]
