"""A real ``redis-server`` for the tests, started on a free loopback port.

The session server is started lazily on first use (`redis_url`) and stopped at exit; tests that
need their own server (persistence, a server that goes away) use `RedisServer` directly.  The
binary comes from the Debian package ``redis-server`` (the README's test command installs it);
when it is missing the tests fail with a message saying so -- they are never skipped.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import redis

__all__ = ["RedisServer", "redis_binary", "redis_url", "session_server"]

_START_TIMEOUT = 20.0


def redis_binary() -> str:
    """The path of ``redis-server``.

    Raises:
        RuntimeError: the binary is not installed.
    """
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
    )
    if found is None:
        raise RuntimeError(
            "redis-server is not installed: the Redis store tests need a real server. "
            "Install the Debian package: sudo apt-get install -y redis-server"
        )
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """One ``redis-server`` process bound to 127.0.0.1, optionally persistent (AOF in *directory*).

    Args:
        directory: the working directory (logs, and the AOF when *persistent*).
        persistent: append-only file with ``appendfsync always``; otherwise no persistence.
    """

    def __init__(self, directory: Path, *, persistent: bool = False) -> None:
        self.directory = directory
        self.persistent = persistent
        self.port = _free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        """A new client (close it)."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def start(self) -> None:
        """Start the server and wait until it answers PING.

        Raises:
            RuntimeError: the binary is missing, or the server did not come up.
        """
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
            if self.persistent
            else ["--appendonly", "no", "--save", ""]
        )
        log = self.directory / f"redis-{self.port}.log"
        command = [
            redis_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--logfile", str(log),
            "--daemonize", "no",
            *persistence,
        ]  # fmt: skip
        self._process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            if self._process.poll() is not None:
                self._process = None
                text = log.read_text(errors="replace") if log.exists() else "(no log)"
                raise RuntimeError(f"redis-server exited at start: {command}\n{text[-2000:]}")
            try:
                with self.client() as probe:
                    probe.ping()
                    if self.persistent:
                        while probe.info("persistence").get("loading"):
                            time.sleep(0.01)
                return
            except redis.ConnectionError as exc:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not answer on {self.url}") from exc
                time.sleep(0.02)

    def stop(self) -> None:
        """Stop the server (SIGTERM: it writes its AOF and exits) and reap it."""
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def restart(self) -> None:
        """Stop and start again on the same port and directory."""
        self.stop()
        self.start()


_session: list[RedisServer] = []
_session_lock = threading.Lock()


def session_server() -> RedisServer:
    """The server shared by the whole test session, started on first use, stopped at exit."""
    with _session_lock:
        if not _session:
            directory = Path(tempfile.mkdtemp(prefix="domainpolicy-redis-"))
            server = RedisServer(directory)
            server.start()
            atexit.register(_stop_session, server, directory)
            _session.append(server)
        return _session[0]


def _stop_session(server: RedisServer, directory: Path) -> None:
    server.stop()
    shutil.rmtree(directory, ignore_errors=True)


def redis_url(tmp_path: Path) -> str:
    """Flush the session server and return its URL (a store factory for the conformance suite)."""
    server = session_server()
    with server.client() as client:
        client.flushall()
    return server.url
