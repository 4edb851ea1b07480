"""Postfix policy server throughput and latency on loopback: protocol layer and real facade.

The server runs in a child process; this process opens 1, 10 and 50 connections and, like
Postfix's smtpd, sends one request at a time on each, waiting for the reply before sending the
next.  It prints requests/s and p50/p99/max latency seen by the client.  Each request is a
realistic Postfix 3.7 RCPT-time request of 30 attributes.

Servers measured (``--servers``, default all):

* ``trivial``: `PolicyServer` with a handler answering ``DUNNO`` (the protocol layer alone);
* ``memory``, ``sqlite``, ``redis``: the real ``domainpolicy serve`` command (`make_handler`
  and `RelayPolicy`) with that store, ``--log-level warning``; every request is a new message
  (its own ``instance``) from one of 1,000 tenants' accepted domains, so every request is a
  decision that counts in the store.  Redis: a ``redis-server`` started on a free loopback
  port (skipped if it is not installed).  These run with `make_handler`'s group commit
  (requests that arrive while a decision runs are decided together by one
  `RelayPolicy.evaluate_many`, up to 256);
* ``sqlite-nobatch``, ``redis-nobatch``: the same with ``--max-batch 1`` (each request decided
  alone in its own worker thread hop, as before group commit), so one run measures batching
  on and off side by side; the script prints the on/off throughput ratio per level.

The load generator is one thread driving non-blocking sockets with `selectors` (a few
microseconds of Python per request), so most of the machine goes to the server; it still runs
on the same cores.

    python benchmarks/bench_policy_server.py            # 20000 requests per level
    python benchmarks/bench_policy_server.py --quick    # 4000 requests per level
    python benchmarks/bench_policy_server.py --log      # with the per-request INFO log line
    python benchmarks/bench_policy_server.py --servers sqlite,sqlite-nobatch --levels 1,10,50
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
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
from domainpolicy.integrations import PolicyRequest, PolicyServer

__all__ = ["main"]

TENANTS = 1000
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


def request(connection: int, number: int) -> bytes:
    """A request for a new message (its own instance) from one tenant's accepted domain."""
    tenant = (connection * 7919 + number) % TENANTS
    return (
        f"{_HEAD}sender=user{number}@tenant{tenant}.example\n"
        f"instance={os.getpid():x}.{connection:x}.{number:x}.0\n{_TAIL}"
    ).encode()


def config_text(tenants: int = TENANTS) -> str:
    """A configuration with *tenants* tenants and limits the run never reaches."""
    lines = [
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


def measure(
    name: str, port: int, total: int, levels: Sequence[int], make: Callable[[int, int], bytes]
) -> list[dict[str, Any]]:
    """Warm up, then print one table row per concurrency level; the `level_record` of each."""
    run_level(port, 2, 200, make)
    records = []
    for connections in levels:
        elapsed, lat = run_level(port, connections, max(1, total // connections), make)
        record = level_record(name, connections, elapsed, lat)
        records.append(record)
        print(
            f"| {name} | {connections} | {record['req_per_s']:,} | {record['p50_ms']:.3f} "
            f"| {record['p99_ms']:.3f} | {record['max_ms']:.3f} |",
            flush=True,
        )
    return records


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark and print a Markdown table."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4000 requests per level")
    parser.add_argument("--log", action="store_true", help="enable the per-request log line")
    parser.add_argument(
        "--servers", default="trivial,memory,sqlite,sqlite-nobatch,redis,redis-nobatch"
    )
    parser.add_argument("--levels", default="1,10,50")
    parser.add_argument("--json", metavar="FILE", help="also write every measurement here")
    parser.add_argument("--serve-trivial", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_trivial:
        serve_trivial(args.log)
        return
    total = 4000 if args.quick else 20000
    levels = [int(x) for x in args.levels.split(",")]
    servers = args.servers.split(",")
    print(f"per-request INFO log line {'on' if args.log else 'off'}; {total} requests per level")
    print("| server | connections | req/s | p50 ms | p99 ms | max ms |")
    print("|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="bench-policy-server-") as scratch:
        config = Path(scratch) / "tenants.toml"
        config.write_text(config_text())
        redis: tuple[subprocess.Popen[bytes], str] | None = None
        records: list[dict[str, Any]] = []
        try:
            for name in servers:
                if name == "trivial":
                    argv = [sys.executable, str(Path(__file__).resolve()), "--serve-trivial"]
                    argv += ["--log"] if args.log else []
                    make: Callable[[int, int], bytes] = lambda _c, _n: REQUEST  # noqa: E731
                else:
                    store, _, variant = name.partition("-")
                    if variant not in ("", "nobatch"):
                        raise SystemExit(f"unknown server {name!r}")
                    if store == "memory":
                        url = "memory:"
                    elif store == "sqlite":
                        url = f"sqlite:{scratch}/state-{len(os.listdir(scratch))}.sqlite3"
                    elif store == "redis":
                        if redis is None:
                            redis = _support.start_redis(scratch)
                        if redis is None:
                            print(f"| {name} | - | redis-server not installed | | | |")
                            continue
                        url = redis[1]
                    else:
                        raise SystemExit(f"unknown server {name!r}")
                    argv = [sys.executable, "-m", "domainpolicy", "serve", "--config", str(config)]
                    argv += ["--listen", "127.0.0.1:0", "--store", url]
                    argv += ["--log-level", "info" if args.log else "warning"]
                    argv += ["--max-batch", "1"] if variant == "nobatch" else []
                    make = request
                with open(os.devnull, "wb") as sink:
                    child, port = start_server(argv, stderr=sink.fileno())
                try:
                    records += measure(name, port, total, levels, make)
                finally:
                    child.terminate()
                    child.wait()
                    if child.stdout is not None:
                        child.stdout.close()
        finally:
            if redis is not None:
                redis[0].terminate()
                redis[0].wait()
    rates: dict[str, dict[int, float]] = {}
    for record in records:
        rates.setdefault(record["server"], {})[record["connections"]] = record["req_per_s"]
    print_ratios(rates, levels)
    if args.json:
        _support.write_json(args.json, "bench_policy_server", records)


def print_ratios(rates: dict[str, dict[int, float]], levels: Sequence[int]) -> None:
    """Print batching on / off throughput per store and level (measured in this run)."""
    pairs = [name for name in rates if f"{name}-nobatch" in rates]
    if not pairs:
        return
    print()
    print("| store | " + " | ".join(f"{c} conn on/off" for c in levels) + " |")
    print("|---|" + "---:|" * len(levels))
    for name in pairs:
        on, off = rates[name], rates[f"{name}-nobatch"]
        cells = [f"{on[c] / off[c]:.2f}x" for c in levels]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
