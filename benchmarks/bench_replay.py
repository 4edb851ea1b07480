"""``domainpolicy replay`` on a bursty log: relay events of one instant decided together
(`RelayPolicy.evaluate_many`) against each decided alone, side by side in one process.

The log is generated (seeded, deterministic): *events* relay events from the bundled
configuration's compromised client (half from the tenant's accepted domain, half forged), *burst*
of them per second.  Both ways replay the same file into a fresh temporary SQLite store (the
command's default); the "alone" runs set ``MAX_BATCH`` to 1.  Rounds alternate the two ways.

    python benchmarks/bench_replay.py                       # 20000 events, bursts of 50
    python benchmarks/bench_replay.py --events 5000 --burst 10 --rounds 5
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from domainpolicy._cli import main as cli_main
from domainpolicy._cli import replay as _cli_replay

__all__ = ["main"]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
START = 1_793_606_400  # 2026-11-02T00:00:00Z


def write_log(path: str, events: int, burst: int) -> None:
    """*events* relay events, *burst* per second."""
    with open(path, "w", encoding="utf-8") as handle:
        for number in range(events):
            event = {
                "at": START + number // burst,
                "event": "relay",
                "client_ip": "198.51.100.25",
                "sender": "alice@contoso.com" if number % 2 else f"x@forged{number % 13}.example",
                "recipients": ["bob@partner.example"],
                "message_id": f"m{number}",
            }
            handle.write(json.dumps(event) + "\n")


def replay_seconds(log: str, batch: int) -> float:
    """Seconds of one ``domainpolicy replay LOG --json`` with ``MAX_BATCH`` = *batch*."""
    saved = _cli_replay.MAX_BATCH
    _cli_replay.MAX_BATCH = batch
    try:
        args = ["replay", log, "--config", str(EXAMPLES / "tenants.toml"), "--json"]
        args.append("--no-progress")
        start = time.perf_counter()
        code = cli_main(args, out=io.StringIO())
        seconds = time.perf_counter() - start
    finally:
        _cli_replay.MAX_BATCH = saved
    if code != 0:
        raise SystemExit(f"replay exited with {code}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--burst", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        log = os.path.join(directory, "bursts.jsonl")
        write_log(log, args.events, args.burst)
        times: dict[str, list[float]] = {"batched": [], "alone": []}
        for _ in range(args.rounds):
            times["batched"].append(replay_seconds(log, _cli_replay.MAX_BATCH))
            times["alone"].append(replay_seconds(log, 1))
    print(f"Python {sys.version.split()[0]}; {args.events:,} events, {args.burst} per second")
    print("| way | median s | events/s |")
    print("|---|---:|---:|")
    for way, values in times.items():
        median = statistics.median(values)
        print(f"| {way} | {median:.2f} | {args.events / median:,.0f} |")
    ratio = statistics.median(times["alone"]) / statistics.median(times["batched"])
    print(f"\nbatched / alone: {ratio:.2f}x faster")


if __name__ == "__main__":
    main()
