"""A TCP fault proxy on loopback: forwards 127.0.0.1:port to a loopback upstream, and on
command delays, drops or cuts the traffic.

Modes (`FaultProxy.mode`): ``pass`` forwards; ``delay`` sleeps `delay` seconds before
forwarding each chunk; ``drop`` reads and discards everything (the client times out); ``cut``
closes every open connection at once and every new one as soon as it is accepted.  One thread
accepts, one thread serves each connection; `close` stops them all and closes every socket.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time

__all__ = ["FaultProxy"]

_MODES = ("pass", "delay", "drop", "cut")


class FaultProxy:
    """Forward ``127.0.0.1:port`` to ``127.0.0.1:upstream_port`` with injectable faults."""

    def __init__(self, upstream_port: int, *, delay: float = 0.2) -> None:
        self.upstream_port = upstream_port
        self.delay = delay
        self._mode = "pass"
        self._generation = 0  # bumped by a cut: connections of an older generation close
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self._listener.settimeout(0.05)
        self.port: int = self._listener.getsockname()[1]
        self.connections = 0
        self.cuts = 0
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, name="fault-proxy", daemon=True)
        self._acceptor.start()

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0`` through the proxy."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def mode(self) -> str:
        """The current fault mode."""
        return self._mode

    def set_mode(self, mode: str) -> None:
        """Switch to *mode* (``cut`` also closes every open connection)."""
        if mode not in _MODES:
            raise ValueError(f"unknown proxy mode {mode!r}")
        with self._lock:
            self._mode = mode
            if mode == "cut":
                self._generation += 1
                self.cuts += 1

    def cut_once(self) -> None:
        """Close every open connection now; new connections are served (mode unchanged)."""
        with self._lock:
            self._generation += 1
            self.cuts += 1

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._mode == "cut":
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=2)
            except OSError:
                client.close()
                continue
            self.connections += 1
            thread = threading.Thread(
                target=self._serve, args=(client, upstream, self._generation), daemon=True
            )
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
            thread.start()

    def _serve(self, client: socket.socket, upstream: socket.socket, generation: int) -> None:
        peer = {client: upstream, upstream: client}
        with selectors.DefaultSelector() as selector, client, upstream:
            selector.register(client, selectors.EVENT_READ)
            selector.register(upstream, selectors.EVENT_READ)
            while not self._closed.is_set() and self._generation == generation:
                for key, _ in selector.select(timeout=0.02):
                    sock: socket.socket = key.fileobj  # type: ignore[assignment]
                    try:
                        data = sock.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return
                    mode = self._mode
                    if mode == "drop":
                        continue
                    if mode == "delay":
                        time.sleep(self.delay)
                    if self._generation != generation:
                        return
                    try:
                        peer[sock].sendall(data)
                    except OSError:
                        return
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Stop accepting, close every connection and join every thread."""
        self._closed.set()
        self._acceptor.join()
        self._listener.close()
        for thread in self._threads:
            thread.join()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
