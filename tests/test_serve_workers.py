"""``domainpolicy serve --workers N``: several processes on one socket, under a supervisor.

Each test runs the real command in a child process (with the SQLite store, or Redis where the
store matters), drives it over TCP or a UNIX socket, and reads the store back: decisions are
those of one worker, a tenant crossing its limit from both workers is blocked once, SIGHUP
reaches every worker, a SIGKILLed worker loses no counted decision and comes back, SIGTERM
drains and exits 0, and the metrics are the sum over the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from domainpolicy._cli import EXIT_USAGE, main
from domainpolicy._config import load_config
from domainpolicy._stores import open_store
from domainpolicy.integrations._metrics import (
    PolicyMetrics,
    SummedMetrics,
    retire_snapshot,
    write_snapshot,
    write_supervisor_snapshot,
)
from domainpolicy.integrations.postfix import make_handler, parse_request
from postfix_harness import PostfixInstance, postfix_instance, postfix_root
from redis_support import redis_url

__all__ = ["postfix_instance", "postfix_root"]  # fixtures, imported for pytest to find

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.append(str(BENCHMARKS))  # the load generator of bench_policy_server

SAFETY = 60.0  # seconds: a safety net against hangs, never an assertion about speed

CONFIG = """\
[store]
url = "sqlite:state.sqlite3"

[policy]
message_limit = 1000
domain_limit = 8

[tenants.contoso]
domains = ["contoso.example"]

[[connectors]]
name = "contoso-onprem"
tenant = "contoso"
sender_ip_ranges = ["192.0.2.0/24"]
created_at = 2020-01-01T00:00:00Z
"""
WITH_FABRIKAM = CONFIG + '\n[tenants.fabrikam]\ndomains = ["fabrikam.example"]\n'


def request(sender: str, instance: str, client: str = "192.0.2.1") -> bytes:
    """A RCPT-time policy request for message *instance*."""
    return (
        "request=smtpd_access_policy\nprotocol_state=RCPT\n"
        f"client_address={client}\nsender={sender}\nrecipient=bob@dest.example\n"
        f"instance={instance}\n\n"
    ).encode()


def connect(address: str) -> socket.socket:
    """A client socket connected to ``HOST:PORT`` or ``unix:/path``."""
    if address.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(SAFETY)
        sock.connect(address[5:])
        return sock
    host, _, port = address.rpartition(":")
    return socket.create_connection((host, int(port)), timeout=SAFETY)


def exchange(sock: socket.socket, data: bytes) -> str:
    """Send one request on *sock*; its action (ConnectionError if the server went away)."""
    sock.sendall(data)
    reply = b""
    while not reply.endswith(b"\n\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionResetError("the server closed the connection")
        reply += chunk
    assert reply.startswith(b"action=")
    return reply[len(b"action=") : -2].decode()


def ask(address: str, data: bytes) -> str:
    """One request on a new connection."""
    with connect(address) as sock:
        return exchange(sock, data)


def metric(url: str, name: str) -> int:
    """The value of the unlabelled metric *name* at *url*."""
    with urllib.request.urlopen(url, timeout=SAFETY) as response:
        text: str = response.read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return int(float(line.split()[1]))
    raise AssertionError(f"{name} not in the exposition")


class Serve:
    """``domainpolicy serve --json --workers N`` in a child process, with metrics."""

    def __init__(
        self, config: Path, workers: int, listen: str = "127.0.0.1:0", store: str | None = None
    ) -> None:
        """Start it and read its line (address, metrics URL, worker pids)."""
        self.stderr = config.parent / f"serve-{workers}.stderr"
        argv = [sys.executable, "-m", "domainpolicy", "serve", "--json", "--config", str(config)]
        argv += ["--listen", listen, "--metrics", "127.0.0.1:0", "--workers", str(workers)]
        argv += ["--store", store] if store is not None else []
        with open(self.stderr, "wb") as log:
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                cwd=config.parent,
            )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line, self.stderr.read_text()
        self.ready = json.loads(line)
        self.address: str = self.ready["listening"]
        self.metrics: str = self.ready["metrics"]
        self.probes = 0  # registered messages sent by connections_on_each_worker

    def log(self) -> str:
        """What it logged so far."""
        return self.stderr.read_text()

    def wait_for(self, name: str, value: int) -> None:
        """Poll the metric *name* until it reaches *value* (a bounded wait, not a timing)."""
        for _ in range(int(SAFETY / 0.05)):
            if metric(self.metrics, name) >= value:
                return
            assert self.process.poll() is None, self.log()
            time.sleep(0.05)
        raise AssertionError(f"{name} never reached {value}")

    def wait_for_log(self, text: str) -> None:
        """Wait until *text* appears in the log."""
        for _ in range(int(SAFETY / 0.05)):
            if text in self.log():
                return
            time.sleep(0.05)
        raise AssertionError(f"{text!r} never logged:\n{self.log()}")

    def close(self) -> int:
        """SIGKILL it (and its workers) if it still runs; reap it; its exit code."""
        if self.process.poll() is None:
            for pid in _children(self.process.pid):
                os.kill(pid, signal.SIGKILL)
            self.process.kill()
        code = self.process.wait(SAFETY)
        assert self.process.stdout is not None
        self.process.stdout.close()
        return code


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as file:
            return [int(p) for p in file.read().split()]
    except OSError:
        return []


def workers_that_answered(log: str) -> set[str]:
    """The ``worker=N`` of every request log line."""
    return {
        line.split(" worker=", 1)[1].split()[0]
        for line in log.splitlines()
        if " policy conn=" in line
    }


def store_url(kind: str, tmp_path: Path) -> str:
    """A fresh store of *kind*: a new SQLite file or the flushed session Redis server."""
    if kind == "redis":
        return redis_url(tmp_path)
    return f"sqlite:{tmp_path}/state-{len(list(tmp_path.iterdir()))}.sqlite3"


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """The configuration file (a SQLite store next to it unless a test says otherwise)."""
    path = tmp_path / "tenants.toml"
    path.write_text(CONFIG)
    return path


def sequence() -> list[bytes]:
    """Distinct messages: contoso's own domain, and forged domains from its connector that
    cross the distinct-domain limit (the 9th blocks), then more of both."""
    requests = []
    for i in range(30):
        if i % 3 == 0:
            requests.append(request(f"user{i}@contoso.example", f"seq-{i}"))
        else:
            requests.append(request(f"spam@forged{i % 14}.example", f"seq-{i}"))
    return requests


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_two_workers_decide_as_one(config: Path, tmp_path: Path, kind: str) -> None:
    """The same sequence of distinct messages gets the same answers from one worker and from
    two, the two taking the messages in turn (a connection held on each)."""
    answers = {}
    for workers in (1, 2):
        serve = Serve(config, workers, store=store_url(kind, tmp_path))
        try:
            pinned = connections_on_each_worker(serve, 1, workers)
            turns = [sock for group in pinned.values() for sock in group]
            answers[workers] = [
                exchange(turns[i % len(turns)], data) for i, data in enumerate(sequence())
            ]
            for sock in turns:
                sock.close()
            assert serve.process.poll() is None
            serve.process.send_signal(signal.SIGTERM)
            assert serve.process.wait(SAFETY) == 0
        finally:
            serve.close()
    assert answers[1] == answers[2]
    assert "DUNNO" in answers[1]
    assert any(action.startswith("550 5.7.750 ") for action in answers[1])


def worker_of(serve: Serve, instance: str) -> str:
    """The worker whose log line answered the message *instance* (logged before the reply)."""
    for line in serve.log().splitlines():
        if f" instance={instance} " in line and " policy conn=" in line:
            if " worker=" not in line:
                return "1"  # --workers 1: the single-process server
            return line.split(" worker=", 1)[1].split()[0]
    raise AssertionError(f"no log line for {instance}")


_PROBES = iter(range(10**9))


def connections_on_each_worker(
    serve: Serve, per_worker: int, workers: int = 2
) -> dict[str, list[socket.socket]]:
    """Open connections until each worker holds *per_worker* of them (found with a probe
    request from contoso's own domain on each: it counts one registered message); the
    kernel and the workers' accept loops choose, the test only keeps what it needs."""
    found: dict[str, list[socket.socket]] = {str(w): [] for w in range(1, workers + 1)}
    for _ in range(400):
        sock = connect(serve.address)
        probe = f"probe-{next(_PROBES)}"
        assert exchange(sock, request("probe@contoso.example", probe)) == "DUNNO"
        serve.probes += 1
        group = found[worker_of(serve, probe)]
        if len(group) < per_worker:
            group.append(sock)
        else:
            sock.close()
        if all(len(group) == per_worker for group in found.values()):
            return found
    raise AssertionError(f"connections did not reach every worker: {found}")


def blast(
    address: str,
    connections: int | list[socket.socket],
    per_connection: int,
    prefix: str,
    domain: str | None = None,
) -> list[str]:
    """*connections* clients at once (new connections, or these), each sending
    *per_connection* distinct messages on its own connection, from distinct forged domains (or
    from *domain*); every action (a request whose connection was lost is sent again on a new
    one, as Postfix does)."""
    actions: list[str] = []
    lock = threading.Lock()
    errors: list[BaseException] = []
    given = connections if isinstance(connections, list) else None
    count = len(given) if given is not None else int(connections)  # type: ignore[arg-type]
    barrier = threading.Barrier(count)

    def client(c: int) -> None:
        try:
            sock = given[c] if given is not None else connect(address)
            barrier.wait(SAFETY)
            for n in range(per_connection):
                sender = f"u{c}x{n}@{domain}" if domain else f"spam@{prefix}{c}x{n}.example"
                data = request(sender, f"{prefix}-{c}-{n}")
                while True:
                    try:
                        action = exchange(sock, data)
                        break
                    except OSError:
                        sock.close()
                        sock = connect(address)
                with lock:
                    actions.append(action)
            sock.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(SAFETY)
    assert not errors, errors
    return actions


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_one_block_transition_from_both_workers_at_once(
    config: Path, tmp_path: Path, kind: str
) -> None:
    """A tenant crossing its limit from both workers at once is blocked exactly once, and
    every request is answered."""
    url = store_url(kind, tmp_path)
    serve = Serve(config, 2, store=url)
    try:
        pinned = connections_on_each_worker(serve, 8)
        actions = blast(serve.address, pinned["1"] + pinned["2"], 6, "burst")
        assert len(actions) == 96
        serve.process.send_signal(signal.SIGTERM)
        assert serve.process.wait(SAFETY) == 0
    finally:
        serve.close()
    assert actions.count("DUNNO") == 8  # the 9th distinct forged domain blocks
    assert all(a.startswith("550 5.7.750 ") for a in actions if a != "DUNNO")
    with open_store(url) as store:
        history = store.history("contoso")
        state = store.load("contoso")
    blocks = [r for r in history if r.before != "blocked" and r.after == "blocked"]
    assert len(blocks) == 1, history
    assert state.state.value == "blocked"


def test_reload_kill_and_drain_on_a_unix_socket(config: Path, tmp_path: Path) -> None:
    """SIGHUP reloads every worker; a SIGKILLed worker loses no counted decision and is
    restarted; the metrics are the sum and never go backwards; SIGTERM drains and exits 0."""
    listen = f"unix:{tmp_path}/policy.sock"
    serve = Serve(config, 2, listen=listen)
    try:
        assert serve.ready["workers"] == 2
        assert oct(os.stat(tmp_path / "policy.sock").st_mode & 0o777) == oct(0o660)
        assert ask(serve.address, request("a@fabrikam.example", "r0", "203.0.113.1")).startswith(
            "550 5.7.64 "
        )
        config.write_text(WITH_FABRIKAM)
        os.kill(serve.process.pid, signal.SIGHUP)
        serve.wait_for("domainpolicy_policy_reloads_total", 2)  # one per worker
        log = serve.log()
        assert "worker=1 reload: configuration" in log
        assert "worker=2 reload: configuration" in log
        for i in range(20):  # new connections, whichever worker takes them
            assert ask(serve.address, request("a@fabrikam.example", f"f{i}", "203.0.113.1")) == (
                "DUNNO"
            )

        # Load on both workers while one is killed: every request gets an answer.
        victim = serve.ready["pids"][0]
        answered: list[str] = []
        pinned = connections_on_each_worker(serve, 4)
        probes = serve.probes  # each counted one registered message

        def load() -> None:
            answered.extend(
                blast(serve.address, pinned["1"] + pinned["2"], 40, "kill", "contoso.example")
            )

        thread = threading.Thread(target=load)
        thread.start()
        serve.wait_for("domainpolicy_policy_requests_total", 80)
        before = metric(serve.metrics, "domainpolicy_policy_requests_total")
        os.kill(victim, signal.SIGKILL)
        thread.join(SAFETY)
        assert len(answered) == 320
        assert set(answered) == {"DUNNO"}
        serve.wait_for_log(f"worker 1 (pid {victim}) died (killed by SIGKILL)")
        serve.wait_for_log("worker 1 ready (pid ")
        serve.wait_for("domainpolicy_policy_worker_restarts_total", 1)
        assert metric(serve.metrics, "domainpolicy_policy_worker_restarts_total") == 1
        serve.wait_for("domainpolicy_policy_workers", 2)
        assert metric(serve.metrics, "domainpolicy_policy_requests_total") >= before
        for i in range(20):
            assert ask(serve.address, request("a@contoso.example", f"after-{i}")) == "DUNNO"
        serve.process.send_signal(signal.SIGTERM)
        assert serve.process.wait(SAFETY) == 0
    finally:
        serve.close()
    assert not (tmp_path / "policy.sock").exists()
    with open_store(f"sqlite:{tmp_path}/state.sqlite3") as store:
        counted = store.load("contoso").window.total
    # Every answered message was counted (a request lost with the worker and sent again may
    # have been counted twice: at most one per connection of the killed worker).
    assert 320 + 20 + probes <= counted <= 320 + 20 + probes + 4
    log = serve.log()
    assert "Traceback" not in log
    assert "all workers stopped" in log


def test_workers_refuse_an_address_in_use(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    """With --workers the supervisor binds: an address in use exits 2 with one line (before
    anything is forked)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(
            ["serve", "--config", str(config), "--listen", f"127.0.0.1:{port}", "--workers", "2"]
        )
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert err.startswith(f"domainpolicy: error: cannot listen on 127.0.0.1:{port}: ")
    assert err.count("\n") == 1


@pytest.mark.parametrize("value", ["0", "-1", "many"])
def test_workers_option_is_validated(
    capsys: pytest.CaptureFixture[str], config: Path, value: str
) -> None:
    """--workers takes a positive number or auto."""
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--config", str(config), "--listen", "127.0.0.1:0", "--workers", value])
    assert exited.value.code == EXIT_USAGE
    assert "--workers" in capsys.readouterr().err


def test_summed_metrics_add_up_workers_and_keep_the_dead(tmp_path: Path) -> None:
    """The sum over workers' files; a retired worker's counters stay, its connections don't."""
    one, two = PolicyMetrics(), PolicyMetrics()
    one.observe("DUNNO", 0.0004)
    one.observe("550 5.7.750 no", 0.02)
    one.connections = one.connections_active = 2
    two.observe("DUNNO", 3.0)
    two.count_malformed("truncated")
    two.connections = two.connections_active = 1
    write_snapshot(one, str(tmp_path), "worker1-10")
    write_snapshot(two, str(tmp_path), "worker2-11")
    summed = SummedMetrics(str(tmp_path))
    total = summed.total()
    assert total.requests == 3
    assert total.actions["dunno"] == 2
    assert total.actions["5xx"] == 1
    assert total.malformed == {"truncated": 1}
    assert total.connections_active == 3
    assert total.latency_counts()[0] == (0.0005, 1)
    assert total.latency_counts()[-1] == (float("inf"), 3)
    assert total.latency_sum == pytest.approx(3.0204)
    retire_snapshot(str(tmp_path), "worker1-10")
    total = summed.total()
    assert (total.requests, total.connections, total.connections_active) == (3, 3, 1)
    text = generate_latest(summed.registry)
    assert b"domainpolicy_policy_requests_total 3.0" in text
    assert b"domainpolicy_policy_workers 0.0" in text  # no supervisor file yet
    write_supervisor_snapshot(str(tmp_path), 2, 5)
    text = generate_latest(summed.registry)
    assert b"domainpolicy_policy_workers 2.0" in text
    assert b"domainpolicy_policy_worker_restarts_total 5.0" in text


def test_the_same_instance_on_two_workers_counts_once_per_worker(
    config: Path, tmp_path: Path
) -> None:
    """What two workers do with one message whose requests arrive on two connections that
    land on different workers: each worker has its own per-message cache, so each decides and
    counts the message once (at most one count per worker); on one worker, once in all."""
    url = f"sqlite:{tmp_path}/instances.sqlite3"
    configuration = load_config(config)
    stores = [open_store(url), open_store(url)]  # a connection per process, as after the fork
    try:
        handlers = [make_handler(configuration.build_policy(store=s)) for s in stores]
        first = parse_request(request("a@contoso.example", "shared-1"))
        second = parse_request(request("a@contoso.example", "shared-1").replace(b"bob@", b"eve@"))

        async def run() -> list[str]:
            one_worker = [await handlers[0](first), await handlers[0](second)]
            other = parse_request(request("a@contoso.example", "shared-2"))
            other_second = parse_request(
                request("a@contoso.example", "shared-2").replace(b"bob@", b"eve@")
            )
            two_workers = [await handlers[0](other), await handlers[1](other_second)]
            return one_worker + two_workers

        assert asyncio.run(run()) == ["DUNNO"] * 4
        # shared-1 on one worker: 1; shared-2 on two workers: 2.
        assert stores[0].load("contoso").window.total == 3
    finally:
        for store in stores:
            store.close()


POSTFIX_CONFIG = CONFIG.replace('"192.0.2.0/24"', '"127.0.0.0/8"')
REJECTED = (
    "5.7.750 <bob@dest.example>: Recipient address rejected: Service unavailable. "
    "Client blocked from sending from unregistered domains"
)


@pytest.mark.postfix
def test_workers_behind_a_real_postfix(postfix_instance: PostfixInstance, tmp_path: Path) -> None:
    """``serve --workers 2`` on Postfix's policy port: several smtpd processes (each with its
    own policy connection) relay through it; the 9th distinct forged domain is refused with
    exactly 550 5.7.750, once, and SIGTERM exits 0."""
    config = tmp_path / "tenants.toml"
    config.write_text(POSTFIX_CONFIG)
    serve = Serve(config, 2, listen=f"127.0.0.1:{postfix_instance.policy_port}")
    clients = [smtplib.SMTP("127.0.0.1", postfix_instance.smtp_port, timeout=30) for _ in range(6)]
    try:
        replies = []
        for i in range(12):
            client = clients[i % len(clients)]
            if i == 0:
                for c in clients:
                    c.ehlo("onprem.contoso.example")
            assert client.mail(f"spam@forged{i}.example")[0] == 250
            code, text = client.rcpt("bob@dest.example")
            replies.append((code, text.decode()))
            client.rset()
        assert replies[:8] == [(250, "2.1.5 Ok")] * 8
        assert replies[8:] == [(550, REJECTED)] * 4
        assert clients[0].mail("alice@contoso.example")[0] == 250
        assert clients[0].rcpt("bob@dest.example")[0] == 250
        clients[0].rset()
    finally:
        for client in clients:
            with contextlib.suppress(smtplib.SMTPException, OSError):
                client.quit()
    serve.process.send_signal(signal.SIGTERM)
    try:
        assert serve.process.wait(SAFETY) == 0
    finally:
        serve.close()
    with open_store(f"sqlite:{tmp_path}/state.sqlite3") as store:
        history = store.history("contoso")
    assert len([r for r in history if r.after == "blocked" and r.before != "blocked"]) == 1
    assert workers_that_answered(serve.log()) <= {"1", "2"}
    assert "policy server closed" in serve.log()


def test_workers_under_the_load_generator(tmp_path: Path) -> None:
    """The benchmark's load generator (one request at a time on each of 20 connections, every
    request a new message of one of its 1,000 tenants) against two workers with a SQLite
    store: every request is answered DUNNO, both workers answer."""
    bench = importlib.import_module("bench_policy_server")
    config = tmp_path / "bench.toml"
    config.write_text(bench.config_text())
    serve = Serve(config, 2, store=f"sqlite:{tmp_path}/bench.sqlite3")
    try:
        port = int(serve.address.rsplit(":", 1)[1])
        _elapsed, latencies = bench.run_level(port, 20, 50, bench.request)
        assert len(latencies) == 1000  # run_level raises on any answer but DUNNO
        serve.process.send_signal(signal.SIGTERM)
        assert serve.process.wait(SAFETY) == 0
        assert workers_that_answered(serve.log()) <= {"1", "2"}
    finally:
        serve.close()


def test_workers_follow_a_killed_supervisor(config: Path) -> None:
    """SIGKILL of the supervisor: its workers get SIGTERM and exit; none keeps the port."""
    serve = Serve(config, 2)
    try:
        pids = serve.ready["pids"]
        serve.process.kill()
        serve.process.wait(SAFETY)
        for pid in pids:
            for _ in range(int(SAFETY / 0.05)):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
            else:
                raise AssertionError(f"worker {pid} outlived its supervisor")
        with pytest.raises(ConnectionRefusedError):
            ask(serve.address, request("a@contoso.example", "orphan"))
    finally:
        serve.close()


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_every_worker_follows_a_registry_change_without_sighup(
    config: Path, tmp_path: Path, kind: str
) -> None:
    """A domain registered with the CLI while two workers serve is accepted by each of them
    (``reason=accepted_domain`` in its log line) within the poll interval: no SIGHUP."""
    url = store_url(kind, tmp_path)
    serve = Serve(config, 2, store=url)
    try:
        pinned = connections_on_each_worker(serve, 1)
        code = main(
            [
                *("tenant", "register-domain", "contoso", "--domain", "contoso-news.example"),
                *("--by", "admin@contoso.example", "--config", str(config), "--store", url),
            ]
        )
        assert code == 0
        for worker, (sock,) in pinned.items():
            for attempt in range(int(SAFETY / 0.1)):
                instance = f"news-{worker}-{attempt}"
                assert exchange(sock, request("news@contoso-news.example", instance)) == "DUNNO"
                line = next(
                    line for line in serve.log().splitlines() if f" instance={instance} " in line
                )
                assert worker_of(serve, instance) == worker
                if "reason=accepted_domain" in line:
                    break
                time.sleep(0.1)
            else:
                raise AssertionError(f"worker {worker} never accepted the new domain")
            sock.close()
        serve.process.send_signal(signal.SIGTERM)
        assert serve.process.wait(SAFETY) == 0
    finally:
        serve.close()
