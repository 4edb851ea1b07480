"""Postfix policy server throughput and latency on loopback: protocol layer and real facade.

The server runs in a child process; this process opens 1, 10 and 50 connections and, like
Postfix's smtpd, sends one request at a time on each, waiting for the reply before sending the
next.  It prints requests/s and p50/p99/max latency seen by the client.  Each request is a
realistic Postfix 3.7 RCPT-time request of 30 attributes.

Servers measured (``--servers``, default all):

* ``trivial``: `PolicyServer` with a handler answering ``DUNNO`` (the protocol layer alone);
* ``memory``, ``sqlite``, ``redis``: the real ``domainpolicy serve`` command (`make_handler`
  and `RelayPolicy`) with that store, ``--log-level warning``; every request is a new message
  (its ``instance`` carries a serial number over the whole run: warm-up, levels, contenders and
  rounds never repeat one, so no request is answered from the per-message cache) from one of
  1,000 tenants' accepted domains, so every request is a decision that counts in the store.
  Redis: a ``redis-server`` started on a free loopback port (skipped if it is not installed).
  These run with `make_handler`'s group commit (requests that arrive while a decision runs are
  decided together by one `RelayPolicy.evaluate_many`, up to 256);
* ``sqlite-nobatch``, ``redis-nobatch``: the same with ``--max-batch 1`` (each request decided
  alone), so one run measures batching on and off side by side;
* ``--workers 1,2,auto``: each store server once per value of ``serve --workers`` (the
  supervisor and its forked workers), printed as ``sqlite w2`` and compared with one worker.

Every server is started first and stays up; each concurrency level is then measured in
``--rounds`` passes, each pass running every contender once in a rotated order (round-robin),
so a change of load on this shared machine hits every contender alike.  Besides requests/s and
latency, each row gives the CPU seconds per request of the server (its processes, from
``/proc``) and of the load generator: on a host with as many cores as needed, N workers can
reach about N / (server CPU per request) requests/s until the store is the limit.

``--rss-domains N`` measures memory instead: ``serve --workers W`` (memory store) on N
generated accepted domains, 32,000 requests for random domains through the workers, then the
RSS, PSS and private memory of the supervisor and each worker (``/proc/PID/smaps_rollup``):
what an extra worker adds is its private memory.

The load generator is one thread driving non-blocking sockets with `selectors` (a few
microseconds of Python per request), so most of the machine goes to the server; it still runs
on the same cores.

    python benchmarks/bench_policy_server.py            # 20000 requests per level
    python benchmarks/bench_policy_server.py --quick    # 4000 requests per level
    python benchmarks/bench_policy_server.py --log      # with the per-request INFO log line
    python benchmarks/bench_policy_server.py --servers sqlite,sqlite-nobatch --levels 1,10,50
    python benchmarks/bench_policy_server.py --quick --servers trivial,memory,sqlite,redis \
        --workers 1,2,auto
    python benchmarks/bench_policy_server.py --rss-domains 1000000 --workers 1,2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import os
import random
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import _support
from domainpolicy._cli.workers import usable_cpus
from domainpolicy.integrations import PolicyRequest, PolicyServer

__all__ = ["main"]

TENANTS = 1000
_SCALE = {"tenants": TENANTS}
_HEAD = (
    "request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n"
    "client_address=192.0.2.7\nclient_name=mx.client.example\nclient_port=40312\n"
    "reverse_client_name=mx.client.example\nserver_address=127.0.0.1\nserver_port=25\n"
    "helo_name=mx.client.example\n"
)
_TAIL = (
    "recipient=bob@dest.example\nrecipient_count=0\nqueue_id=\nsize=12345\netrn_domain=\n"
    "stress=\nsasl_method=\nsasl_username=\nsasl_sender=\nccert_subject=\nccert_issuer=\n"
    "ccert_fingerprint=\nccert_pubkey_fingerprint=\nencryption_protocol=TLSv1.3\n"
    "encryption_cipher=TLS_AES_256_GCM_SHA384\nencryption_keysize=256\npolicy_context=\n"
    "compatibility_level=3.6\n\n"
)
REQUEST = (
    _HEAD + "sender=alice@tenant0.example\ninstance=1f2a.6553a2c1.8b1e9.0\n" + _TAIL
).encode()


_SERIAL = itertools.count()
Maker = Callable[[int, int], bytes]


def request(connection: int, number: int) -> bytes:
    """A request for a new message from one tenant's accepted domain: its instance carries a
    serial number over the whole run, so no request (warm-up, levels, contenders, rounds) is
    ever answered from a server's per-message cache."""
    serial = next(_SERIAL)
    tenant = (connection * 7919 + serial) % _SCALE["tenants"]
    return (
        f"{_HEAD}sender=user{number}@tenant{tenant}.example\n"
        f"instance={os.getpid():x}.{serial:x}.{connection:x}.{number:x}\n{_TAIL}"
    ).encode()


def config_text(tenants: int = TENANTS, domains_file: str | None = None) -> str:
    """A configuration with *tenants* tenants and limits the run never reaches (their other
    accepted domains in *domains_file*, if given)."""
    lines = [f'domains_file = "{domains_file}"', ""] if domains_file else []
    lines += [
        "[policy]",
        "message_limit = 1000000000",
        "domain_limit = 1000000",
        "max_tracked_domains = 1000001",
        "",
    ]
    for i in range(tenants):
        lines += [f"[tenants.t{i}]", f'domains = ["tenant{i}.example"]', ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- servers


async def _dunno(_request: PolicyRequest) -> str:
    return "DUNNO"


def serve_trivial(log: bool) -> None:
    """Child process: serve DUNNO on a free loopback port and print the port."""
    if log:
        logging.basicConfig(level=logging.INFO, stream=open(os.devnull, "w"))  # noqa: SIM115

    async def run() -> None:
        server = PolicyServer(_dunno)
        await server.start("127.0.0.1:0")
        print(f"listening on {server.address}", flush=True)
        await server.serve_forever()

    asyncio.run(run())


def start_server(argv: list[str], stderr: int | None = None) -> tuple[subprocess.Popen[bytes], int]:
    """Start a server child and read the port from its ``listening on HOST:PORT`` line."""
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr)
    assert child.stdout is not None
    line = child.stdout.readline().decode()
    if not line.startswith("listening on 127.0.0.1:"):
        child.kill()
        child.wait()
        raise SystemExit(f"server did not start: {line!r}")
    return child, int(line.split()[2].split(":")[1].rstrip(";"))


# --------------------------------------------------------------------------- load


def run_level(
    port: int, connections: int, per_connection: int, make: Callable[[int, int], bytes]
) -> tuple[float, list[float]]:
    """Drive *connections* connections, each sending *per_connection* requests one at a time.

    Returns the elapsed seconds and every request's latency.
    """
    payloads = [[make(c, n) for n in range(per_connection)] for c in range(connections)]
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(connections)]
    selector = selectors.DefaultSelector()
    latencies: list[float] = []
    sent_at = [0.0] * connections
    done = [0] * connections
    buffers = [b""] * connections
    clock = time.perf_counter
    try:
        started = clock()
        for c, sock in enumerate(socks):
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, c)
            sent_at[c] = clock()
            sock.sendall(payloads[c][0])
        active = connections
        while active:
            for key, _ in selector.select():
                c = key.data
                sock = socks[c]
                data = buffers[c] + sock.recv(65536)
                if not data.endswith(b"\n\n"):
                    if not data:
                        raise RuntimeError("the server closed a connection")
                    buffers[c] = data
                    continue
                now = clock()
                latencies.append(now - sent_at[c])
                buffers[c] = b""
                if not data.startswith(b"action=DUNNO\n\n"):
                    raise RuntimeError(f"unexpected reply {data!r}")
                done[c] += 1
                if done[c] == per_connection:
                    selector.unregister(sock)
                    active -= 1
                else:
                    sent_at[c] = clock()
                    sock.sendall(payloads[c][done[c]])
        return clock() - started, latencies
    finally:
        selector.close()
        for sock in socks:
            sock.close()


def level_record(
    server: str, connections: int, elapsed: float, latencies: list[float]
) -> dict[str, Any]:
    """One measurement as ``--json`` writes it: requests/s and p50/p99/max latency in ms."""
    lat = sorted(latencies)
    q = statistics.quantiles(lat, n=100)
    return {
        "server": server,
        "connections": connections,
        "req_per_s": round(len(lat) / elapsed),
        "p50_ms": round(q[49] * 1000, 3),
        "p99_ms": round(q[98] * 1000, 3),
        "max_ms": round(lat[-1] * 1000, 3),
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of *pid* and of its children still running (the workers of
    ``serve --workers N``), from ``/proc``; 0 where ``/proc`` is missing."""
    total = 0.0
    pids = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as file:
            pids += [int(p) for p in file.read().split()]
    except OSError:
        pass
    tick = os.sysconf("SC_CLK_TCK")
    for one in pids:
        try:
            with open(f"/proc/{one}/stat") as file:
                fields = file.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


class Contender:
    """One server measured: a name, its child process and port, and what it measured."""

    def __init__(self, name: str, workers: str, argv: list[str], make: Maker) -> None:
        """Start the server child (stderr to /dev/null) and read its port."""
        self.name = name
        self.workers = workers
        self.label = name if workers == "1" else f"{name} w{workers}"
        self.make = make
        with open(os.devnull, "wb") as sink:
            self.child, self.port = start_server(argv, stderr=sink.fileno())
        self.elapsed: dict[int, float] = {}
        self.latencies: dict[int, list[float]] = {}
        self.server_cpu: dict[int, float] = {}
        self.client_cpu: dict[int, float] = {}

    def run(self, connections: int, per_connection: int) -> None:
        """One measured pass at *connections* connections, added to this level's figures."""
        cpu = cpu_seconds(self.child.pid)
        mine = time.process_time()
        elapsed, lat = run_level(self.port, connections, per_connection, self.make)
        self.client_cpu[connections] = self.client_cpu.get(connections, 0.0) + (
            time.process_time() - mine
        )
        self.server_cpu[connections] = self.server_cpu.get(connections, 0.0) + (
            cpu_seconds(self.child.pid) - cpu
        )
        self.elapsed[connections] = self.elapsed.get(connections, 0.0) + elapsed
        self.latencies.setdefault(connections, []).extend(lat)

    def rate(self, connections: int) -> float:
        """Requests per second at *connections* over every pass."""
        return len(self.latencies[connections]) / self.elapsed[connections]

    def row(self, connections: int) -> str:
        """The table row at *connections*."""
        lat = sorted(self.latencies[connections])
        q = statistics.quantiles(lat, n=100)
        n = len(lat)
        return (
            f"| {self.label} | {connections} | {self.rate(connections):,.0f} | "
            f"{q[49] * 1000:.3f} | {q[98] * 1000:.3f} | {lat[-1] * 1000:.3f} | "
            f"{self.server_cpu[connections] / n * 1e6:.0f} | "
            f"{self.client_cpu[connections] / n * 1e6:.0f} |"
        )

    def stop(self) -> None:
        """SIGTERM the server (a supervisor drains its workers) and reap it."""
        self.child.terminate()
        self.child.wait()
        if self.child.stdout is not None:
            self.child.stdout.close()


def contenders_for(
    servers: Sequence[str],
    workers: Sequence[str],
    scratch: str,
    config: Path,
    log: bool,
    redis_url: Callable[[], str | None],
    cluster_url: Callable[[], str],
) -> list[Contender]:
    """Start every server of the run (each stays up, idle while the others are measured)."""
    started: list[Contender] = []
    for name in servers:
        if name == "trivial":
            argv = [sys.executable, str(Path(__file__).resolve()), "--serve-trivial"]
            argv += ["--log"] if log else []
            started.append(Contender(name, "1", argv, lambda _c, _n: REQUEST))
            continue
        if name.startswith("redis-cluster"):
            store, variant = "redis-cluster", name[len("redis-cluster") :].lstrip("-")
        else:
            store, _, variant = name.partition("-")
        if variant not in ("", "nobatch"):
            raise SystemExit(f"unknown server {name!r}")
        for count in workers:
            if store == "memory":
                url = "memory:"
            elif store == "sqlite":
                url = f"sqlite:{scratch}/state-{len(os.listdir(scratch))}.sqlite3"
            elif store == "redis-cluster":
                url = cluster_url()
            elif store == "redis":
                found = redis_url()
                if found is None:
                    print(f"redis-server not installed: {name} skipped")
                    break
                url = found
            else:
                raise SystemExit(f"unknown server {name!r}")
            argv = [sys.executable, "-m", "domainpolicy", "serve", "--config", str(config)]
            argv += ["--listen", "127.0.0.1:0", "--store", url, "--workers", count]
            argv += ["--log-level", "info" if log else "warning"]
            argv += ["--max-batch", "1"] if variant == "nobatch" else []
            started.append(Contender(name, count, argv, request))
    return started


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark and print Markdown tables."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4000 requests per level")
    parser.add_argument("--log", action="store_true", help="enable the per-request log line")
    parser.add_argument(
        "--servers", default="trivial,memory,sqlite,sqlite-nobatch,redis,redis-nobatch"
    )
    parser.add_argument("--levels", default="1,10,50")
    parser.add_argument("--json", metavar="FILE", help="also write every measurement here")
    parser.add_argument(
        "--workers", default="1", help="comma-separated serve --workers values (N or auto)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="round-robin passes per level")
    parser.add_argument("--tenants", type=int, default=TENANTS, help="tenants (default 1000)")
    parser.add_argument(
        "--domains-per-tenant",
        type=int,
        default=1,
        metavar="N",
        help="accepted domains per tenant (the others in a domains file; default 1)",
    )
    parser.add_argument(
        "--rss-domains",
        type=int,
        default=0,
        metavar="N",
        help="instead: RSS/PSS/private memory of the supervisor and each worker with an "
        "N-domain matcher, for each --workers value",
    )
    parser.add_argument("--serve-trivial", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_trivial:
        serve_trivial(args.log)
        return
    workers = args.workers.split(",")
    if args.rss_domains:
        measure_rss(args.rss_domains, workers)
        return
    total = 4000 if args.quick else 20000
    levels = [int(x) for x in args.levels.split(",")]
    servers = args.servers.split(",")
    print(
        f"per-request INFO log line {'on' if args.log else 'off'}; {total} requests per level "
        f"and contender in {args.rounds} round-robin passes; {usable_cpus()} usable CPUs; "
        "every request a new message"
    )
    with tempfile.TemporaryDirectory(prefix="bench-policy-server-") as scratch:
        config = Path(scratch) / "tenants.toml"
        _SCALE["tenants"] = args.tenants
        extra = None
        if args.domains_per_tenant > 1:
            extra = "domains.tsv"
            with open(Path(scratch) / extra, "w") as out:
                for t in range(args.tenants):
                    for d in range(1, args.domains_per_tenant):
                        out.write(f"d{d}.tenant{t}.example\tt{t}\n")
        config.write_text(config_text(args.tenants, extra))
        cluster: list[tuple[list[subprocess.Popen[bytes]], list[int]]] = []

        def cluster_url() -> str:
            if not cluster:
                cluster.append(_support.start_cluster(scratch))
            ports = cluster[0][1]
            return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports)

        redis: list[tuple[subprocess.Popen[bytes], str] | None] = []

        def redis_url() -> str | None:
            if not redis:
                redis.append(_support.start_redis(scratch))
            return None if redis[0] is None else redis[0][1]

        contenders: list[Contender] = []
        try:
            contenders = contenders_for(
                servers, workers, scratch, config, args.log, redis_url, cluster_url
            )
            for contender in contenders:  # warm-up (fresh messages too)
                run_level(contender.port, 2, 200, contender.make)
            for connections in levels:
                per_pass = max(1, total // connections // args.rounds)
                for round_number in range(args.rounds):
                    shift = round_number % len(contenders)
                    for contender in contenders[shift:] + contenders[:shift]:
                        contender.run(connections, per_pass)
            print()
            print(
                "| server | connections | req/s | p50 ms | p99 ms | max ms "
                "| server CPU us/req | load generator CPU us/req |"
            )
            print("|---|---:|---:|---:|---:|---:|---:|---:|")
            for connections in levels:
                for contender in contenders:
                    print(contender.row(connections), flush=True)
        finally:
            for contender in contenders:
                contender.stop()
            if redis and redis[0] is not None:
                redis[0][0].terminate()
                redis[0][0].wait()
            for processes, _ in cluster:
                for process in processes:
                    process.terminate()
                    process.wait()
    print_ratios(contenders, levels)
    if args.json:
        records = [
            level_record(c.label, connections, c.elapsed[connections], c.latencies[connections])
            for connections in levels
            for c in contenders
        ]
        _support.write_json(args.json, "bench_policy_server", records)


def print_ratios(contenders: Sequence[Contender], levels: Sequence[int]) -> None:
    """Batching on / off and N workers / 1 worker throughput, measured in this run."""
    by_label = {c.label: c for c in contenders}
    pairs = [
        (c.label, by_label[c.label.replace(c.name, f"{c.name}-nobatch", 1)])
        for c in contenders
        if c.label.replace(c.name, f"{c.name}-nobatch", 1) in by_label
        and not c.name.endswith("-nobatch")
    ]
    if pairs:
        print()
        print("| server | " + " | ".join(f"{c} conn on/off" for c in levels) + " |")
        print("|---|" + "---:|" * len(levels))
        for label, off in pairs:
            on = by_label[label]
            cells = [f"{on.rate(c) / off.rate(c):.2f}x" for c in levels]
            print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
    scaled = [(c, by_label[c.name]) for c in contenders if c.workers != "1" and c.name in by_label]
    if scaled:
        print()
        print("| server | workers | " + " | ".join(f"{c} conn vs 1 worker" for c in levels) + " |")
        print("|---|---:|" + "---:|" * len(levels))
        for many, one in scaled:
            cells = [f"{many.rate(c) / one.rate(c):.2f}x" for c in levels]
            print(f"| {many.name} | {many.workers} | " + " | ".join(cells) + " |", flush=True)


# --------------------------------------------------------------------------- memory


def memory_of(pid: int) -> dict[str, int]:
    """``Rss``, ``Pss`` and private (``Private_Clean`` + ``Private_Dirty``) kB of *pid*."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as file:
        for line in file:
            name, _, rest = line.partition(":")
            if rest.strip().endswith("kB"):
                fields[name] = int(rest.split()[0])
    return {
        "rss": fields["Rss"],
        "pss": fields["Pss"],
        "private": fields["Private_Clean"] + fields["Private_Dirty"],
    }


def measure_rss(domains: int, workers: Sequence[str]) -> None:
    """Start ``serve --workers W`` on an N-domain configuration, look up random accepted
    domains through every worker, and print each process's memory."""
    tenants = max(1, domains // 100)
    with tempfile.TemporaryDirectory(prefix="bench-policy-rss-") as scratch:
        table = Path(scratch) / "domains.tsv"
        with open(table, "w") as out:
            for i in range(domains):
                out.write(f"d{i}.tenant{i % tenants}.example\tt{i % tenants}\n")
        config = Path(scratch) / "tenants.toml"
        lines = [
            'domains_file = "domains.tsv"',
            "",
            "[policy]",
            "message_limit = 1000000000",
            "domain_limit = 1000000",
            "max_tracked_domains = 1000001",
            "",
        ]
        config.write_text("\n".join(lines))
        print(f"{domains:,} accepted domains of {tenants:,} tenants; memory store")
        print()
        print(
            "| workers | start s | process | RSS MB | PSS MB | private MB | private / first "
            "worker's RSS |"
        )
        print("|---:|---:|---|---:|---:|---:|---:|")
        rng = random.Random(7)
        for count in workers:
            argv = [sys.executable, "-m", "domainpolicy", "serve", "--config", str(config)]
            argv += ["--listen", "127.0.0.1:0", "--store", "memory:", "--workers", count]
            argv += ["--log-level", "warning"]
            started = time.perf_counter()
            with open(os.devnull, "wb") as sink:
                child, port = start_server(argv, stderr=sink.fileno())
            took = time.perf_counter() - started
            try:

                def make(c: int, n: int) -> bytes:
                    i = rng.randrange(domains)
                    tenant = i % tenants
                    return (
                        f"{_HEAD}sender=u{n}@d{i}.tenant{tenant}.example\n"
                        f"instance=rss.{c}.{n}.{next(_SERIAL):x}\n{_TAIL}"
                    ).encode()

                run_level(port, 16, 2000, make)  # 32,000 lookups of random domains
                time.sleep(1.5)
                pids = [child.pid]
                with (
                    contextlib.suppress(OSError),
                    open(f"/proc/{child.pid}/task/{child.pid}/children") as file,
                ):
                    pids += [int(p) for p in file.read().split()]
                first_rss = None
                for number, pid in enumerate(pids):
                    mem = memory_of(pid)
                    who = (
                        "single process"
                        if count == "1"
                        else ("supervisor" if number == 0 else f"worker {number}")
                    )
                    if number == 1 or count == "1":
                        first_rss = first_rss or mem["rss"]
                    share = (
                        f"{mem['private'] / first_rss:.0%}"
                        if first_rss and (number >= 1 or count == "1")
                        else ""
                    )
                    print(
                        f"| {count} | {took:.1f} | {who} | {mem['rss'] / 1024:.0f} | "
                        f"{mem['pss'] / 1024:.0f} | {mem['private'] / 1024:.0f} | {share} |",
                        flush=True,
                    )
            finally:
                child.terminate()
                child.wait()
                if child.stdout is not None:
                    child.stdout.close()


if __name__ == "__main__":
    main()
