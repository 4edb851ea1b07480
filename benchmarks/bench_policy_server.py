"""Postfix policy server throughput and latency on loopback, with a trivial handler.

The server runs in a child process (``PolicyServer`` answering ``DUNNO``); this process opens
1, 10 and 50 connections and, like Postfix's smtpd, sends one request at a time on each,
waiting for the reply before sending the next.  It prints requests/s and p50/p99/max latency
seen by the client (the request is a realistic Postfix 3.7 RCPT-time request of 30 attributes).

    python benchmarks/bench_policy_server.py            # 20000 requests per level
    python benchmarks/bench_policy_server.py --quick    # 2000 requests per level
    python benchmarks/bench_policy_server.py --log      # with the per-request INFO log line on

The figures measure the protocol layer only: the relay policy facade is not involved.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path

from domainpolicy.integrations import PolicyRequest, PolicyServer

__all__ = ["main"]

REQUEST = (
    b"request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n"
    b"client_address=192.0.2.7\nclient_name=mx.client.example\nclient_port=40312\n"
    b"reverse_client_name=mx.client.example\nserver_address=127.0.0.1\nserver_port=25\n"
    b"helo_name=mx.client.example\nsender=alice@tenant.example\nrecipient=bob@dest.example\n"
    b"recipient_count=0\nqueue_id=\ninstance=1f2a.6553a2c1.8b1e9.0\nsize=12345\netrn_domain=\n"
    b"stress=\nsasl_method=\nsasl_username=\nsasl_sender=\nccert_subject=\nccert_issuer=\n"
    b"ccert_fingerprint=\nccert_pubkey_fingerprint=\nencryption_protocol=TLSv1.3\n"
    b"encryption_cipher=TLS_AES_256_GCM_SHA384\nencryption_keysize=256\npolicy_context=\n"
    b"compatibility_level=3.6\n\n"
)


async def _dunno(_request: PolicyRequest) -> str:
    return "DUNNO"


def serve(log: bool) -> None:
    """Child process: serve DUNNO on a free loopback port and print the port."""
    if log:
        logging.basicConfig(level=logging.INFO, stream=open("/dev/null", "w"))  # noqa: SIM115

    async def run() -> None:
        server = PolicyServer(_dunno)
        await server.start("127.0.0.1:0")
        print(server.address.port, flush=True)
        await server.serve_forever()

    asyncio.run(run())


async def _client(port: int, count: int, latencies: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(count):
        started = time.perf_counter()
        writer.write(REQUEST)
        reply = await reader.readuntil(b"\n\n")
        latencies.append(time.perf_counter() - started)
        if reply != b"action=DUNNO\n\n":
            raise RuntimeError(f"unexpected reply {reply!r}")
    writer.close()
    await writer.wait_closed()


async def _level(port: int, connections: int, total: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    per = max(1, total // connections)
    await asyncio.gather(*(_client(port, 50, []) for _ in range(connections)))  # warm up
    started = time.perf_counter()
    await asyncio.gather(*(_client(port, per, latencies) for _ in range(connections)))
    return time.perf_counter() - started, latencies


def main() -> None:
    """Run the benchmark and print one line per concurrency level."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--log", action="store_true", help="enable the per-request log line")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.log)
        return
    total = 2000 if args.quick else 20000
    argv = [sys.executable, str(Path(__file__).resolve()), "--serve"] + (
        ["--log"] if args.log else []
    )
    child = subprocess.Popen(argv, stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        print(f"policy server, trivial DUNNO handler, log line {'on' if args.log else 'off'}")
        print(
            f"{'connections':>11} {'requests':>9} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}"
        )
        for connections in (1, 10, 50):
            elapsed, lat = asyncio.run(_level(port, connections, total))
            lat.sort()
            q = statistics.quantiles(lat, n=100)
            print(
                f"{connections:>11} {len(lat):>9} {len(lat) / elapsed:>9.0f} "
                f"{q[49] * 1000:>8.3f} {q[98] * 1000:>8.3f} {lat[-1] * 1000:>8.3f}"
            )
    finally:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()


if __name__ == "__main__":
    main()
