"""Group commit in `make_handler`: concurrent Postfix requests decided in batches.

The server runs on 127.0.0.1 with real SQLite and Redis stores.  Batches are made to form
deterministically, never by timing: one request is sent first and held at a gate in the worker
thread (the test waits until the policy has been called), the others are sent while it is held
and queue behind it, and the gate opens when every one of them has reached the handler.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from aio import run
from domainpolicy import (
    AcceptedDomain,
    Alert,
    BlockPolicy,
    ConnectorTable,
    Decision,
    DomainMatcher,
    InboundConnector,
    InvalidConfiguration,
    MemoryStore,
    RelayPolicy,
    RelayRequest,
    StateStore,
    open_store,
)
from domainpolicy._cli import main
from domainpolicy._cli import serve as cli_serve
from domainpolicy.integrations import (
    DEFAULT_FALLBACK_ACTION,
    InstanceCache,
    PolicyRequest,
    PolicyServer,
    PostfixHandler,
    ServerSettings,
    make_handler,
    parse_request,
)
from domainpolicy.integrations.postfix import DEFAULT_MAX_BATCH
from redis_support import redis_url

SAFETY = 20.0  # seconds: a safety net against hangs, never an assertion about speed


class CountingPolicy(RelayPolicy):
    """A `RelayPolicy` that records its calls and can hold them at a gate or fail batches.

    contoso owns contoso.example; loopback clients are contoso's connector.
    """

    def __init__(self, store: StateStore, **options: Any) -> None:
        """Build the policy on *store* with a fixed clock."""
        matcher = DomainMatcher.compile([AcceptedDomain("contoso.example", "contoso")])
        connectors = ConnectorTable.compile(
            [InboundConnector("onprem", "contoso", sender_ip_ranges=("127.0.0.0/8",))], matcher
        )
        self.alerts: list[Alert] = []
        now = time.time()  # a fixed clock: every observation falls in the same window
        options.setdefault("block_policy", BlockPolicy(message_limit=20, domain_limit=8))
        super().__init__(
            matcher,
            connectors,
            store=store,
            clock=lambda: now,
            on_alert=self.alerts.append,
            **options,
        )
        self.singles = 0
        self.batches: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail_batches = False

    @property
    def calls(self) -> int:
        """`evaluate` and `evaluate_many` calls so far."""
        return self.singles + len(self.batches)

    def _wait(self) -> None:
        assert self.gate.wait(SAFETY), "the gate was never opened"

    def evaluate(self, request: RelayRequest) -> Decision:
        """`RelayPolicy.evaluate`, counted and gated."""
        self.singles += 1
        self._wait()
        return super().evaluate(request)

    def evaluate_many(self, requests: Iterable[RelayRequest]) -> list[Decision]:
        """`RelayPolicy.evaluate_many`, counted and gated; raises if `fail_batches`."""
        batch = list(requests)
        self.batches.append(len(batch))
        self._wait()
        if self.fail_batches:
            raise RuntimeError("a bug in evaluate_many")
        return super().evaluate_many(batch)


def request(sender: str, instance: str, recipient: str = "bob@dest.example") -> bytes:
    """A RCPT-time request from a loopback client (contoso's connector)."""
    return (
        "request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=127.0.0.1\n"
        f"client_port=40000\nsender={sender}\nrecipient={recipient}\ninstance={instance}\n\n"
    ).encode()


class Arrivals:
    """Wrap a handler: open *gate* once *expected* requests have reached it."""

    def __init__(self, inner: PostfixHandler, gate: threading.Event, expected: int) -> None:
        """Wrap *inner*; *gate* is cleared now and set on the *expected*-th request."""
        self.inner = inner
        self.gate = gate
        self.expected = expected
        self.count = 0
        gate.clear()

    async def __call__(self, request: PolicyRequest) -> str:
        """Count the request, open the gate on the last one, then answer with the inner one."""
        self.count += 1
        if self.count == self.expected:
            self.gate.set()
        return await self.inner(request)


async def start(handler: PostfixHandler, **settings: Any) -> tuple[PolicyServer, int]:
    """A PolicyServer on a free loopback port."""
    server = PolicyServer(handler, settings=ServerSettings(**settings))
    await server.start("127.0.0.1:0")
    port = server.address.port
    assert port is not None
    return server, port


async def client(port: int, requests: list[bytes]) -> list[str]:
    """One connection sending *requests* one at a time, as Postfix's smtpd does."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answers = []
    try:
        for data in requests:
            writer.write(data)
            reply = await reader.readuntil(b"\n\n")
            assert reply.startswith(b"action=")
            answers.append(reply[len(b"action=") : -2].decode())
    finally:
        writer.close()
        await writer.wait_closed()
    return answers


async def clients(port: int, workloads: list[list[bytes]]) -> list[list[str]]:
    """Run one `client` per workload concurrently."""
    return list(await asyncio.gather(*(client(port, work) for work in workloads)))


async def held_first(
    port: int, policy: CountingPolicy, first: list[bytes], rest: list[list[bytes]]
) -> list[list[str]]:
    """Send *first* on one connection; once its first request is in the policy (held at the
    gate, which the caller closed), run the *rest* concurrently.  The answers, *first*'s first.
    """
    calls = policy.calls
    leader = asyncio.ensure_future(client(port, first))
    while policy.calls == calls:
        await asyncio.sleep(0.005)  # waiting for an event, not measuring time
    followers = await clients(port, rest)
    return [await leader, *followers]


def serve_held(
    handler: Any, policy: CountingPolicy, first: list[bytes], rest: list[list[bytes]]
) -> list[list[str]]:
    """Start a server with *handler*, run `held_first` against it, close it; the answers."""

    async def scenario() -> list[list[str]]:
        server, port = await start(handler)
        try:
            return await held_first(port, policy, first, rest)
        finally:
            await server.close()

    return run(scenario())


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateStore]:
    """A real store that does I/O: a SQLite file or the test session's redis-server."""
    url = f"sqlite:{tmp_path}/state.sqlite3" if request.param == "sqlite" else redis_url(tmp_path)
    opened = open_store(url)
    try:
        yield opened
    finally:
        opened.close()


def sequential(work: list[bytes]) -> tuple[list[str], Any, Counter[str]]:
    """The answers, final counts and alerts of *work* decided one by one with a MemoryStore."""
    policy = CountingPolicy(MemoryStore())
    handler = make_handler(policy)

    async def scenario() -> list[str]:
        return [await handler(parse_request(data)) for data in work]

    answers = run(scenario())
    status = policy.status("contoso")
    return answers, (status.state, status.total, status.unregistered), alert_kinds(policy)


def alert_kinds(policy: CountingPolicy) -> Counter[str]:
    """How many alerts of each kind *policy* raised."""
    return Counter(alert.kind.value for alert in policy.alerts)


# --------------------------------------------------------------------------- tests


def test_concurrent_connections_get_the_sequential_decisions(store: StateStore) -> None:
    """40 connections spraying one tenant get exactly the decisions of one-by-one evaluation:
    message_limit accepted, one block, and fewer policy calls than requests."""
    connections, each = 40, 3
    policy = CountingPolicy(store)
    handler = Arrivals(make_handler(policy), policy.gate, connections)
    workloads = [
        [request("x@spam.example", f"c{c}.{n}") for n in range(each)] for c in range(connections)
    ]

    answers = [
        a
        for per_connection in serve_held(handler, policy, workloads[0], workloads[1:])
        for a in per_connection
    ]
    expected, counts, alerts = sequential([data for work in workloads for data in work])
    assert Counter(answers) == Counter(expected)
    assert Counter(answers)["DUNNO"] == 20  # the tenant's message_limit
    status = policy.status("contoso")
    assert (status.state, status.total, status.unregistered) == counts
    assert alert_kinds(policy) == alerts
    assert alerts["blocked"] == 1
    assert policy.batches[0] == connections - 1  # every other first request, queued together
    assert policy.singles + sum(policy.batches) == connections * each
    assert policy.calls < connections * each


def test_batches_are_bounded_by_max_batch(caplog: pytest.LogCaptureFixture) -> None:
    """Requests queued beyond max_batch wait for the following batch (a batch of one is
    decided with evaluate); each request's log line says the size of its batch."""
    policy = CountingPolicy(MemoryStore())
    handler = Arrivals(make_handler(policy, blocking=True, max_batch=4), policy.gate, 10)
    workloads = [[request("x@spam.example", f"m{n}")] for n in range(10)]

    with caplog.at_level(logging.INFO, logger="domainpolicy.integrations.postfix"):
        assert serve_held(handler, policy, workloads[0], workloads[1:]) == [["DUNNO"]] * 10
    assert (policy.singles, policy.batches) == (2, [4, 4])
    assert policy.status("contoso").unregistered == 10
    lines = [r for r in caplog.records if hasattr(r, "policy")]
    assert Counter(r.policy["batch"] for r in lines) == {1: 2, 4: 8}
    assert all(" batch=" in r.getMessage() for r in lines)


@pytest.mark.parametrize(("count", "expected"), [("messages", 1), ("recipients", 2)])
def test_two_recipients_of_one_message_in_one_batch_count_once(
    store: StateStore, count: Any, expected: int
) -> None:
    """Two recipients of one message queued together are decided once (once per recipient
    with count="recipients")."""
    policy = CountingPolicy(store, count=count)
    handler = Arrivals(make_handler(policy), policy.gate, 4)
    rest = [
        [request("x@spam.example", "m1", "r1@dest.example")],
        [request("x@spam.example", "m1", "r2@dest.example")],
        [request("y@other.example", "m2")],
    ]

    assert (
        serve_held(handler, policy, [request("alice@contoso.example", "a")], rest)
        == [["DUNNO"]] * 4
    )
    assert policy.batches == [expected + 1]
    status = policy.status("contoso")
    assert (status.total, status.unregistered) == (expected + 2, expected + 1)


def test_waiter_timing_out_leaves_its_decision_cached(store: StateStore) -> None:
    """A queued request that times out gets the fallback; its batch still runs and its
    decision serves the message's later recipients without a second count."""
    policy = CountingPolicy(store)
    cache: InstanceCache[Decision] = InstanceCache()
    handler = make_handler(policy, cache=cache)
    policy.gate.clear()

    async def scenario() -> tuple[list[list[str]], list[str]]:
        server, port = await start(handler, request_timeout=0.05)
        try:
            first = await held_first(
                port,
                policy,
                [request("alice@contoso.example", "held")],
                [[request("x@spam.example", "m1")], [request("y@other.example", "m2")]],
            )
            policy.gate.set()
            while len(cache) < 3:
                await asyncio.sleep(0.01)  # the worker thread finishes the late decisions
            later = await client(port, [request("x@spam.example", "m1", "r2@dest.example")])
            return first, later
        finally:
            await server.close()

    first, later = run(scenario())
    assert first == [[DEFAULT_FALLBACK_ACTION]] * 3
    assert later == ["DUNNO"]
    assert (policy.singles, policy.batches) == (1, [2])
    status = policy.status("contoso")
    assert (status.total, status.unregistered) == (3, 2)


def test_failing_batch_gives_every_waiter_the_fallback(
    store: StateStore, caplog: pytest.LogCaptureFixture
) -> None:
    """An evaluate_many that raises answers every request of its batch with the fallback; the
    server keeps serving and the failed messages are decided again on retry."""
    policy = CountingPolicy(store)
    policy.fail_batches = True
    handler = Arrivals(make_handler(policy), policy.gate, 4)
    rest = [[request("x@spam.example", f"m{n}")] for n in range(3)]

    async def scenario() -> tuple[list[list[str]], list[str]]:
        server, port = await start(handler)
        try:
            first = await held_first(port, policy, [request("alice@contoso.example", "a")], rest)
            retry = await client(port, [request("x@spam.example", "m0")])
            return first, retry
        finally:
            await server.close()

    with caplog.at_level(logging.ERROR):
        first, retry = run(scenario())
    assert first == [["DUNNO"]] + [[DEFAULT_FALLBACK_ACTION]] * 3
    assert retry == ["DUNNO"]
    assert (policy.singles, policy.batches) == (2, [3])
    assert policy.status("contoso").unregistered == 1  # only the retry counted
    assert "deciding a batch of 3 policy requests failed" in caplog.text


def test_one_connection_decides_each_request_alone(store: StateStore) -> None:
    """At low load (one connection) nothing is batched and the answers are those of
    evaluating each request in turn."""
    policy = CountingPolicy(store)
    work = [request("x@spam.example", f"m{n}") for n in range(25)]
    work += [request("alice@contoso.example", "ok")]

    async def scenario() -> list[str]:
        server, port = await start(make_handler(policy))
        try:
            return await client(port, work)
        finally:
            await server.close()

    answers = run(scenario())
    expected, counts, alerts = sequential(work)
    assert answers == expected
    assert (policy.singles, policy.batches) == (26, [])
    status = policy.status("contoso")
    assert (status.state, status.total, status.unregistered) == counts
    assert alert_kinds(policy) == alerts


def test_max_batch_one_decides_each_request_in_its_own_thread(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """max_batch=1 turns batching off: concurrent requests never meet in evaluate_many, and
    each log line says batch=1."""
    policy = CountingPolicy(MemoryStore())
    handler = make_handler(policy, blocking=True, max_batch=1)

    async def scenario() -> list[list[str]]:
        server, port = await start(handler)
        try:
            return await clients(port, [[request("x@spam.example", f"m{n}")] for n in range(8)])
        finally:
            await server.close()

    with caplog.at_level(logging.INFO, logger="domainpolicy.integrations.postfix"):
        assert run(scenario()) == [["DUNNO"]] * 8
    assert (policy.singles, policy.batches) == (8, [])
    assert [r.policy["batch"] for r in caplog.records if hasattr(r, "policy")] == [1] * 8


def test_memory_store_is_evaluated_inline() -> None:
    """A MemoryStore is decided inside the handler's first step: no thread, no batch."""
    policy = CountingPolicy(MemoryStore())
    handler = make_handler(policy)

    async def first_step() -> object:
        steps = handler(parse_request(request("x@spam.example", "m1"))).__await__()
        try:
            steps.send(None)
        except StopIteration as done:
            return done.value
        raise AssertionError("the handler suspended")

    assert run(first_step()) == "DUNNO"
    assert (policy.singles, policy.batches) == (1, [])


@pytest.mark.parametrize("bad", [0, -1, True, 2.5, "8"])
def test_make_handler_refuses_a_bad_max_batch(bad: Any) -> None:
    """max_batch must be a positive integer."""
    with pytest.raises(InvalidConfiguration, match="max_batch"):
        make_handler(CountingPolicy(MemoryStore()), max_batch=bad)


def test_serve_passes_max_batch_to_the_handler(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``serve --max-batch N`` reaches make_handler (default 256); 0 is refused."""
    seen: list[dict[str, Any]] = []

    def recording(policy: RelayPolicy, **options: Any) -> PostfixHandler:
        seen.append(options)
        return make_handler(policy, **options)

    monkeypatch.setattr(cli_serve, "make_handler", recording)
    policy = CountingPolicy(MemoryStore())
    config: Any = type("Config", (), {"pinned_certificates": {}})()
    cli_serve._Service("tenants.toml", config, policy, 7).handler()
    assert seen[-1]["max_batch"] == 7
    cli_serve._Service("tenants.toml", config, policy).handler()
    assert seen[-1]["max_batch"] == DEFAULT_MAX_BATCH == 256

    with pytest.raises(SystemExit) as exited:
        main(["serve", "--config", "x.toml", "--listen", "127.0.0.1:0", "--max-batch", "0"])
    assert exited.value.code == 2
    assert "--max-batch" in capsys.readouterr().err


def test_cancelled_batch_fails_its_waiters_instead_of_hanging() -> None:
    """If the task deciding batches is cancelled (the loop shutting down), the request being
    decided and those queued raise at once rather than wait forever."""
    policy = CountingPolicy(MemoryStore())
    handler = make_handler(policy, blocking=True)
    policy.gate.clear()

    async def scenario() -> list[BaseException | str]:
        held = asyncio.ensure_future(handler(parse_request(request("x@spam.example", "m0"))))
        while policy.calls == 0:
            await asyncio.sleep(0.005)  # waiting for an event, not measuring time
        queued = asyncio.ensure_future(handler(parse_request(request("x@spam.example", "m1"))))
        await asyncio.sleep(0)  # the second request reaches the queue
        (driver,) = [
            task
            for task in asyncio.all_tasks()
            if getattr(task.get_coro(), "__qualname__", "") == "_Batcher._drive"
        ]
        driver.cancel()
        try:
            return list(await asyncio.gather(held, queued, return_exceptions=True))
        finally:
            policy.gate.set()  # let the worker thread finish

    outcomes = run(scenario())
    assert [type(outcome).__name__ for outcome in outcomes] == ["_BatchFailed"] * 2
    assert (policy.singles, policy.batches) == (1, [])
