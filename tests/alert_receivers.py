"""Real alert receivers for the tests, on loopback: an aiosmtpd SMTP sink that keeps every
message, and an HTTP server that answers a scripted list of statuses and keeps every request."""

from __future__ import annotations

import datetime
import http.server
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

__all__ = [
    "HttpReceiver",
    "Logins",
    "SmtpReceiver",
    "http_receiver",
    "server_context",
    "smtp_receiver",
    "tls_smtp_receiver",
    "write_pki",
]


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
    statuses: list[int] | None = None,
    delay: float = 0.0,
    *,
    context: ssl.SSLContext | None = None,
) -> Iterator[tuple[HttpReceiver, str]]:
    """A running HTTP receiver on 127.0.0.1 (HTTPS with the server *context*):
    ``(receiver, url)``."""
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
    scheme = "http"
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver, f"{scheme}://127.0.0.1:{server.server_address[1]}/hook"
    finally:
        server.shutdown()
        server.server_close()


def write_pki(directory: Path) -> tuple[Path, Path, Path]:
    """A test CA and a server certificate for 127.0.0.1 and localhost signed by it:
    ``(ca.pem, server.pem, server.key)``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    start = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    end = datetime.datetime(2100, 1, 1, tzinfo=datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "alerts test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = (directory / "ca.pem", directory / "server.pem", directory / "server.key")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def server_context(certificate: Path, key: Path) -> ssl.SSLContext:
    """A TLS server context with *certificate* and *key*."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificate, key)
    return context


class Logins:
    """An aiosmtpd authenticator that accepts one user and password, and keeps every attempt."""

    def __init__(self, user: str, password: str) -> None:
        self.user, self.password = user, password
        self.attempts: list[str] = []

    def __call__(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        login = auth_data.login.decode() if isinstance(auth_data, LoginPassword) else ""
        self.attempts.append(login)
        password = auth_data.password.decode() if isinstance(auth_data, LoginPassword) else ""
        ok = login == self.user and password == self.password
        return AuthResult(success=ok, handled=False)  # aiosmtpd answers 235 or 535


@contextmanager
def tls_smtp_receiver(
    context: ssl.SSLContext, *, implicit: bool = False, logins: Logins | None = None
) -> Iterator[tuple[SmtpReceiver, int]]:
    """A running SMTP sink on 127.0.0.1 with STARTTLS required (or implicit TLS) and, with
    *logins*, AUTH required after TLS: ``(receiver, port)``."""
    receiver = SmtpReceiver()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    options: dict[str, Any] = {}
    if implicit:
        options["ssl_context"] = context
    else:
        options.update(tls_context=context, require_starttls=True)
    if logins is not None:
        # aiosmtpd does not count implicit TLS as TLS for auth_require_tls; the transport is
        # TLS from the first byte there anyway.  AUTH PLAIN only: one refusal is final.
        options.update(
            authenticator=logins,
            auth_required=True,
            auth_require_tls=not implicit,
            auth_exclude_mechanism=["LOGIN"],
        )
    controller = _TlsController(receiver, hostname="127.0.0.1", port=port, **options)
    controller.start()
    try:
        yield receiver, port
    finally:
        controller.stop()


class _TlsController(Controller):
    """A Controller whose readiness probe speaks TLS when the server does (implicit TLS)."""

    def _trigger_server(self) -> None:
        with socket.create_connection((self.hostname, self.port), 5.0) as raw:
            if self.ssl_context is None:
                raw.recv(1024)
                return
            client = ssl.create_default_context()
            client.check_hostname = False
            client.verify_mode = ssl.CERT_NONE
            with client.wrap_socket(raw) as wrapped:
                wrapped.recv(1024)
