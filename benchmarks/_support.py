"""Helpers shared by the benchmark scripts (imported as ``_support``: the scripts run from
this directory, which Python puts first on ``sys.path``)."""

from __future__ import annotations

import contextlib
import datetime
import json
import platform
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis

from domainpolicy import _names


def start_redis(directory: str) -> tuple[subprocess.Popen[bytes], str] | None:
    """Start ``redis-server`` on a free loopback port (no persistence, files in *directory*)
    and wait until it accepts connections; return the process and its URL, or None if
    ``redis-server`` is not installed."""
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
    process = subprocess.Popen([*argv, "no", "--dir", directory], stdout=subprocess.DEVNULL)
    for _ in range(100):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.1):
                break
        except OSError:
            time.sleep(0.05)
    return process, f"redis://127.0.0.1:{port}/0"


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _free_cluster_port() -> int:
    """A free loopback port whose cluster bus port (port + 10000, so at most 55535) is free."""
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(20000, 55536)
        if _bindable(port) and _bindable(port + 10000):
            return port
    raise RuntimeError("no free loopback port pair for a cluster node")


def start_cluster(directory: str, size: int = 3) -> tuple[list[subprocess.Popen[bytes]], list[int]]:
    """A local Redis Cluster of *size* primaries without replicas on free loopback ports."""
    processes, ports = [], []
    for n in range(size):
        port = _free_cluster_port()
        node = Path(directory) / f"node{n}"
        node.mkdir()
        processes.append(
            subprocess.Popen(
                [
                    "redis-server", "--port", str(port), "--bind", "127.0.0.1",
                    "--cluster-enabled", "yes", "--cluster-config-file", f"{node}/nodes.conf",
                    "--save", "", "--appendonly", "no", "--dir", str(node),
                ],
                stdout=subprocess.DEVNULL,
            )
        )  # fmt: skip
        ports.append(port)
    for port in ports:
        for _ in range(100):
            try:
                redis.Redis(port=port).ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
    subprocess.run(
        ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
         "--cluster-replicas", "0", "--cluster-yes"],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    for _ in range(200):
        if all("cluster_state:ok" in str(redis.Redis(port=p).cluster("INFO")) for p in ports):
            break
        time.sleep(0.05)
    return processes, ports


@contextlib.contextmanager
def old_path() -> Iterator[None]:
    """Switch the IDN shortcuts off: every mapping and U-label goes through idna, as before."""
    saved = (_names._plain_mapping, _names._plain_alabel)

    def no_mapping(text: str) -> str | None:
        return None

    def no_alabel(label: str) -> str | None:
        return None

    _names._plain_mapping = no_mapping
    _names._plain_alabel = no_alabel
    try:
        yield
    finally:
        _names._plain_mapping, _names._plain_alabel = saved


def write_json(path: str, benchmark: str, results: list[dict[str, Any]]) -> None:
    """Write a benchmark's *results* to *path* as the JSON that ``tools/gen_perf_plots.py``
    draws the performance page's plots from: which benchmark, the command line, the date
    (UTC), the Python version, and one record per measurement."""
    document = {
        "benchmark": benchmark,
        "command": " ".join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]]),
        "measured": datetime.datetime.now(datetime.UTC).date().isoformat(),
        "python": platform.python_version(),
        "source": "run",
        "results": results,
    }
    Path(path).write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n", "utf-8")
