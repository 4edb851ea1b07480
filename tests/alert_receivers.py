"""Real alert receivers for the tests, on loopback: an aiosmtpd SMTP sink that keeps every
message, and an HTTP server that answers a scripted list of statuses and keeps every request."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from aiosmtpd.controller import Controller

__all__ = ["HttpReceiver", "SmtpReceiver", "http_receiver", "smtp_receiver"]


class SmtpReceiver:
    """Keeps ``(mail_from, rcpt_tos, content bytes)`` of every message received."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 OK"


@contextmanager
def smtp_receiver() -> Iterator[tuple[SmtpReceiver, int]]:
    """A running SMTP sink on 127.0.0.1: ``(receiver, port)``."""
    receiver = SmtpReceiver()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    controller = Controller(receiver, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield receiver, port
    finally:
        controller.stop()


class HttpReceiver:
    """Answers POSTs with the scripted statuses (then 200), after *delay* seconds."""

    def __init__(self, statuses: list[int], delay: float = 0.0) -> None:
        self.statuses = list(statuses)
        self.delay = delay
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.lock = threading.Lock()


@contextmanager
def http_receiver(
    statuses: list[int] | None = None, delay: float = 0.0
) -> Iterator[tuple[HttpReceiver, str]]:
    """A running HTTP receiver on 127.0.0.1: ``(receiver, url)``."""
    receiver = HttpReceiver(statuses or [], delay)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with receiver.lock:
                receiver.requests.append((dict(self.headers.items()), body))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
            if receiver.delay:
                time.sleep(receiver.delay)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver, f"http://127.0.0.1:{server.server_address[1]}/hook"
    finally:
        server.shutdown()
        server.server_close()
