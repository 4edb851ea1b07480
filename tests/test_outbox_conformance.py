"""The alert outbox contract, the same for every store kind: rows written with the transition
that raised the alert, claim with a lease, ack, fail (retry or dead letter), retry, list."""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from domainpolicy import BlockMachine, BlockPolicy, StateStore, open_store
from domainpolicy._stores.outbox import DEAD, DELIVERED, PENDING, OutboxRow
from domainpolicy._tenant_state import Alert
from store_support import STORE_KINDS

OUTBOX_KINDS = sorted(STORE_KINDS)

POLICY = BlockPolicy(message_limit=5, domain_limit=5, max_tracked_domains=20, warn_fraction=1.0)
T0 = 1_700_000_000.0


def open_kind(kind: str, tmp: Path) -> StateStore:
    url = STORE_KINDS[kind][0](tmp)
    if url.startswith("redis"):
        return open_store(url, server_time=False, prefix=f"ob{uuid.uuid4().hex[:8]}:")
    return open_store(url)


@pytest.fixture(params=OUTBOX_KINDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateStore]:
    opened = open_kind(request.param, tmp_path)
    yield opened
    opened.close()


def row(n: int, sink: str = "hook", *, due: float = T0, tenant: str = "t") -> OutboxRow:
    alert_id = f"{n:032x}"
    return OutboxRow(
        id=f"{alert_id}.{sink}",
        alert_id=alert_id,
        sink=sink,
        tenant=tenant,
        kind="blocked",
        created=due,
        payload={"n": n, "list": []},
        due=due,
    )


def everything(alert: Alert) -> tuple[str, ...]:
    return ("mail", "hook")


def block(store: StateStore, tenant: str = "acme") -> None:
    machine = BlockMachine(POLICY)
    for i in range(6):
        store.observe(machine, tenant, T0 + i, registered=False, registrable=f"d{i}.example")


def test_block_writes_one_row_per_routed_sink(store: StateStore) -> None:
    """The block writes one pending row per sink the route names, sharing one alert id."""
    store.route_alerts(everything)
    block(store)
    rows = store.alert_rows()
    assert sorted(r.sink for r in rows) == ["hook", "mail"]
    assert len({r.alert_id for r in rows}) == 1
    (first, *_) = rows
    assert first.status == PENDING
    assert first.attempts == 0
    assert first.kind == "blocked"
    assert first.payload["block"]["code"] == "5.7.750"
    assert "d0.example" in first.payload["block"]["offending_domains"]
    assert first.payload["limits"]["messages"] == 5
    assert first.payload["checklist"]["missing"]


def test_no_route_writes_no_rows(store: StateStore) -> None:
    """Without a route a block writes no outbox row."""
    block(store)
    assert store.alert_rows() == []


def test_route_may_name_no_sink(store: StateStore) -> None:
    """A route that names no sink for an alert writes no row for it."""
    store.route_alerts(lambda alert: ())
    block(store)
    assert store.alert_rows() == []


def test_admin_event_alert_is_enqueued(store: StateStore) -> None:
    """An alert raised by an administrative event (an operator block) is enqueued too."""
    store.route_alerts(lambda alert: ("hook",))
    machine = BlockMachine(POLICY)
    store.apply(
        "acme",
        lambda s, at: machine.operator_block(s, at, by="ops", reason="abuse"),
        T0,
        action="operator_block",
        actor="ops",
    )
    (only,) = store.alert_rows()
    assert only.tenant == "acme"
    assert only.kind == "blocked"


def test_enqueue_is_idempotent(store: StateStore) -> None:
    """Enqueueing a row whose id exists adds nothing."""
    assert store.enqueue_alerts([row(1), row(2)]) == 2
    assert store.enqueue_alerts([row(1), row(3)]) == 1
    assert [r.id for r in store.alert_rows()] == [row(n).id for n in (1, 2, 3)]


@pytest.mark.parametrize(
    ("due", "now", "sinks", "claimed"),
    [
        (T0, T0, ["hook"], True),
        (T0 + 1, T0, ["hook"], False),
        (T0, T0 + 5, ["hook", "mail"], True),
        (T0, T0, ["mail"], False),
        (T0, T0, [], False),
    ],
)
def test_claim_examples(
    store: StateStore, due: float, now: float, sinks: list[str], claimed: bool
) -> None:
    """A row is claimed when it is due and its sink is asked for."""
    store.enqueue_alerts([row(1, due=due)])
    got = store.claim_alerts(sinks, now, lease=30, owner="w1")
    assert bool(got) is claimed
    if claimed:
        assert got[0].attempts == 1
        assert got[0].owner == "w1"


def test_lease_excludes_other_workers_until_it_expires(store: StateStore) -> None:
    """A leased row is not claimed by another worker until the lease runs out."""
    store.enqueue_alerts([row(1)])
    assert len(store.claim_alerts(["hook"], T0, lease=30, owner="w1")) == 1
    assert store.claim_alerts(["hook"], T0 + 29, lease=30, owner="w2") == []
    (again,) = store.claim_alerts(["hook"], T0 + 31, lease=30, owner="w2")
    assert again.attempts == 2
    assert again.owner == "w2"


def test_ack_delivers_once(store: StateStore) -> None:
    """An acked row is delivered, never claimed again, and a second ack is refused."""
    store.enqueue_alerts([row(1)])
    (got,) = store.claim_alerts(["hook"], T0, lease=30, owner="w1")
    assert store.ack_alert(got.id, T0 + 1)
    assert not store.ack_alert(got.id, T0 + 2)
    assert store.claim_alerts(["hook"], T0 + 100, lease=30, owner="w1") == []
    (done,) = store.alert_rows(status=DELIVERED)
    assert done.attempts == 1


def test_fail_then_retry_then_dead_then_retry(store: StateStore) -> None:
    """fail with a time makes the row due then; fail without is the dead letter; retry revives."""
    store.enqueue_alerts([row(1)])
    (got,) = store.claim_alerts(["hook"], T0, lease=30, owner="w1")
    assert not store.fail_alert(got.id, "w2", T0, error="x", retry_at=T0 + 10)  # not the owner
    assert store.fail_alert(got.id, "w1", T0, error="HTTP 500", retry_at=T0 + 10)
    assert store.claim_alerts(["hook"], T0 + 9, lease=30, owner="w1") == []
    (got,) = store.claim_alerts(["hook"], T0 + 10, lease=30, owner="w1")
    assert got.attempts == 2
    assert got.last_error == "HTTP 500"
    assert store.fail_alert(got.id, "w1", T0 + 10, error="HTTP 503", retry_at=None)
    (dead,) = store.alert_rows(status=DEAD)
    assert dead.last_error == "HTTP 503"
    assert store.claim_alerts(["hook"], T0 + 1000, lease=30, owner="w1") == []
    assert store.retry_alert(dead.id, T0 + 1000)
    assert not store.retry_alert(dead.id, T0 + 1000)
    (got,) = store.claim_alerts(["hook"], T0 + 1000, lease=30, owner="w1")
    assert got.attempts == 1


class OutboxMachine(RuleBasedStateMachine):
    """claim / ack / fail / retry against a model of the rows, on each store kind."""

    kind = "memory"

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory()
        self.store = open_kind(self.kind, Path(self.tmp.name))
        self.now = T0
        self.model: dict[str, dict[str, object]] = {}
        self.next = 0

    def teardown(self) -> None:
        self.store.close()
        self.tmp.cleanup()

    @initialize()
    def start(self) -> None:
        pass

    @rule(sink=st.sampled_from(["a", "b"]), delay=st.integers(0, 20))
    def enqueue(self, sink: str, delay: int) -> None:
        r = row(self.next, sink, due=self.now + delay)
        self.next += 1
        assert self.store.enqueue_alerts([r]) == 1
        self.model[r.id] = {
            "status": PENDING,
            "due": r.due,
            "attempts": 0,
            "lease": 0.0,
            "owner": None,
        }

    @rule(step=st.integers(0, 40))
    def tick(self, step: int) -> None:
        self.now += step

    @rule(sinks=st.sampled_from([["a"], ["b"], ["a", "b"]]), owner=st.sampled_from(["w1", "w2"]))
    def claim(self, sinks: list[str], owner: str) -> None:
        got = self.store.claim_alerts(sinks, self.now, lease=15, owner=owner, limit=1000)
        expected = {
            i
            for i, m in self.model.items()
            if m["status"] == PENDING
            and i.split(".")[1] in sinks
            and m["due"] <= self.now  # type: ignore[operator]
            and m["lease"] <= self.now  # type: ignore[operator]
        }
        assert {r.id for r in got} == expected
        for r in got:
            m = self.model[r.id]
            m["attempts"] = m["attempts"] + 1  # type: ignore[operator]
            m["lease"] = self.now + 15
            m["owner"] = owner
            assert r.attempts == m["attempts"]

    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        if not self.model:
            return
        i = data.draw(st.sampled_from(sorted(self.model)))
        ok = self.store.ack_alert(i, self.now)
        assert ok == (self.model[i]["status"] == PENDING)
        if ok:
            self.model[i].update(status=DELIVERED, lease=0.0, owner=None)

    @rule(data=st.data(), owner=st.sampled_from(["w1", "w2"]), dead=st.booleans())
    def fail(self, data: st.DataObject, owner: str, dead: bool) -> None:
        if not self.model:
            return
        i = data.draw(st.sampled_from(sorted(self.model)))
        m = self.model[i]
        ok = self.store.fail_alert(
            i, owner, self.now, error="boom", retry_at=None if dead else self.now + 5
        )
        assert ok == (m["status"] == PENDING and m["owner"] == owner)
        if ok:
            m.update(
                status=DEAD if dead else PENDING,
                due=self.now if dead else self.now + 5,
                lease=0.0,
                owner=None,
            )

    @rule(data=st.data())
    def retry(self, data: st.DataObject) -> None:
        if not self.model:
            return
        i = data.draw(st.sampled_from(sorted(self.model)))
        ok = self.store.retry_alert(i, self.now)
        assert ok == (self.model[i]["status"] == DEAD)
        if ok:
            self.model[i].update(status=PENDING, attempts=0, due=self.now)

    @invariant()
    def statuses_agree(self) -> None:
        rows = {r.id: r for r in self.store.alert_rows(limit=10_000)}
        assert {i: m["status"] for i, m in self.model.items()} == {
            i: r.status for i, r in rows.items()
        }
        for i, r in rows.items():
            assert r.attempts == self.model[i]["attempts"]


for _kind in OUTBOX_KINDS:
    _machine = type(f"Outbox_{_kind.replace('-', '_')}", (OutboxMachine,), {"kind": _kind})
    _test = _machine.TestCase  # type: ignore[attr-defined]
    _test.settings = __import__("hypothesis").settings(max_examples=25, stateful_step_count=30)
    globals()[f"TestOutbox_{_kind.replace('-', '_')}"] = _test


def test_redis_rows_the_index_lost_are_found_again(tmp_path: Path) -> None:
    """Rows written by a transition whose index update was lost (a crash) are still claimed."""
    from redis_support import redis_url

    prefix = f"ob{uuid.uuid4().hex[:8]}:"
    url = redis_url(tmp_path)
    writer = open_store(url, server_time=False, prefix=prefix)
    writer.route_alerts(lambda alert: ("hook",))
    block(writer)
    client = writer._client  # type: ignore[attr-defined]
    client.delete(f"{prefix}outbox:pending", f"{prefix}outbox:all")  # as if it crashed
    worker = open_store(url, server_time=False, prefix=prefix)
    (got,) = worker.claim_alerts(["hook"], T0 + 10, lease=30, owner="w")
    assert got.tenant == "acme"
    assert got.kind == "blocked"
    writer.close()
    worker.close()
