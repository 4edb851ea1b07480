"""The asyncio policy server (`PolicyServer`, `ServerSettings`): connections, timeouts, the
fallback action, the per-request log line (`annotate`), listen addresses and signal handling.

Imports `protocol` and the metrics; it knows nothing of the relay policy: it calls a
`PostfixHandler` (`handler.make_handler` makes the one that applies a `RelayPolicy`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ipaddress
import itertools
import json
import logging
import os
import re
import signal
import socket
import stat
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Final

import attrs

from domainpolicy._errors import DomainPolicyError, InvalidConfiguration, shown
from domainpolicy.integrations._metrics import MetricsEndpoint, PolicyMetrics
from domainpolicy.integrations.postfix.protocol import (
    DEFAULT_LIMITS,
    MAX_ACTION_CHARS,
    MalformedRequest,
    PolicyLimits,
    PolicyRequest,
    parse_block,
    positive,
    request_end,
    sanitize_action,
)

__all__ = [
    "DEFAULT_FALLBACK_ACTION",
    "ListenAddress",
    "PolicyServer",
    "PostfixHandler",
    "ServerSettings",
    "annotate",
    "install_signal_handlers",
    "parse_listen_address",
]


_log = logging.getLogger("domainpolicy.integrations.postfix")

DEFAULT_FALLBACK_ACTION: Final = "451 4.3.0 Policy service temporarily unavailable"
"""Answered when the handler fails or times out: a temporary failure, the client retries."""


# --------------------------------------------------------------------------- logging fields


_LOG_FIELDS: contextvars.ContextVar[dict[str, object] | None] = contextvars.ContextVar(
    "domainpolicy_postfix_log_fields", default=None
)


def annotate(**fields: object) -> None:
    """Add *fields* to the log line of the policy request being answered in this task.

    Call it from a `PostfixHandler` (``annotate(tenant="t1", verdict="blocked")``); outside a
    request it does nothing.
    """
    current = _LOG_FIELDS.get()
    if current is not None:
        current.update(fields)


_PLAIN_RE: Final = re.compile(r"[A-Za-z0-9_.:@/+\-]*\Z")


def _logfmt(fields: Mapping[str, object]) -> str:
    parts = []
    for key, value in fields.items():
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        if not text or not _PLAIN_RE.match(text):
            text = json.dumps(text, ensure_ascii=False)
        parts.append(f"{key}={text}")
    return " ".join(parts)


# --------------------------------------------------------------------------- listen addresses


@attrs.frozen
class ListenAddress:
    """Where a server listens: a TCP ``host``/``port`` or a UNIX socket ``path``."""

    host: str | None = None
    port: int | None = None
    path: str | None = None

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_listen_address(text: str) -> ListenAddress:
    """Parse ``127.0.0.1:10040``, ``inet:127.0.0.1:10040``, ``[::1]:10040`` or ``unix:/path``.

    The host must be an IP address (no name lookups at start-up); port 0 picks a free port.

    Raises:
        InvalidConfiguration: *text* is not one of these forms.
    """
    if text.startswith("unix:"):
        path = text[5:]
        if not path.startswith("/"):
            raise InvalidConfiguration([f"unix socket path in {shown(text)} must be absolute"])
        return ListenAddress(path=path)
    rest = text.removeprefix("inet:")
    if rest.startswith("["):
        host, bracket, port_text = rest[1:].partition("]:")
        if not bracket:
            raise InvalidConfiguration([f"listen address {shown(text)}: expected [IPv6]:PORT"])
    else:
        host, colon, port_text = rest.rpartition(":")
        if not colon:
            raise InvalidConfiguration([f"listen address {shown(text)}: expected HOST:PORT"])
    try:
        ipaddress.ip_address(host)
    except ValueError as exc:
        raise InvalidConfiguration(
            [f"listen address {shown(text)}: host {shown(host)} is not an IP address"]
        ) from exc
    if not (port_text.isascii() and port_text.isdigit() and int(port_text) <= 65535):
        raise InvalidConfiguration(
            [f"listen address {shown(text)}: port {shown(port_text)} is not 0..65535"]
        )
    return ListenAddress(host=host, port=int(port_text))


# --------------------------------------------------------------------------- server


PostfixHandler = Callable[[PolicyRequest], Awaitable[str]]
"""The seam: an async callable that turns one request into the action text to answer."""


@attrs.frozen(kw_only=True)
class ServerSettings:
    """Tuning of a `PolicyServer`; the defaults suit ``check_policy_service { ..., timeout=5s }``.

    Attributes:
        request_timeout: seconds the handler may take before the fallback action is answered;
            keep it well under Postfix's policy ``timeout`` (``smtpd_policy_service_timeout``).
        fallback_action: answered when the handler times out, raises or returns nothing usable.
        max_action_chars: longest action text sent (after sanitising).
        idle_timeout: an idle connection (between requests) is closed after this many seconds;
            Postfix's own ``smtpd_policy_service_max_idle`` is 300 s.
        read_timeout: seconds a peer has to finish a request once its first line arrived.
        write_timeout: seconds to hand a reply to a peer that does not read.
        max_connections: connections beyond this are closed at once (and counted).
        shutdown_grace: seconds `PolicyServer.close` waits for in-flight requests.
        unix_socket_mode: permissions of a UNIX socket (None: leave them to the umask), 0 to
            0o777; the default 0o660 lets the socket's group connect: set *unix_socket_group*
            to Postfix's group (or put Postfix's user in the server's group), or use 0o666.
        unix_socket_group: the group a UNIX socket is given after it is bound, a name or a
            numeric gid (None: the server's own group); the server must be root or a member.
        limits: request size limits.

    Raises:
        InvalidConfiguration: a value is out of range, or *unix_socket_group* names no group.
    """

    request_timeout: float = attrs.field(default=2.0, validator=positive)
    fallback_action: str = attrs.field(default=DEFAULT_FALLBACK_ACTION)
    max_action_chars: int = attrs.field(default=MAX_ACTION_CHARS, validator=positive)
    idle_timeout: float = attrs.field(default=600.0, validator=positive)
    read_timeout: float = attrs.field(default=30.0, validator=positive)
    write_timeout: float = attrs.field(default=10.0, validator=positive)
    max_connections: int = attrs.field(default=1024, validator=positive)
    shutdown_grace: float = attrs.field(default=5.0, validator=positive)
    unix_socket_mode: int | None = attrs.field(default=0o660)
    unix_socket_group: int | str | None = attrs.field(default=None)
    limits: PolicyLimits = DEFAULT_LIMITS

    @unix_socket_mode.validator
    def _check_mode(self, _attribute: attrs.Attribute[int | None], value: int | None) -> None:
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o777:
            raise InvalidConfiguration(
                [f"unix_socket_mode must be permission bits 0 to 0o777, got {shown(value)}"]
            )

    @unix_socket_group.validator
    def _check_group(
        self, _attribute: attrs.Attribute[int | str | None], value: int | str | None
    ) -> None:
        if value is not None:
            _group_id(value)

    @fallback_action.validator
    def _check_fallback(self, _attribute: attrs.Attribute[str], value: str) -> None:
        if not value or sanitize_action(value) != value:
            raise InvalidConfiguration(
                [f"fallback_action {shown(value)} must be one non-empty line of printable ASCII"]
            )


_IDLE, _READING, _WRITING = 0, 1, 2


class _Resumed:
    """Awaitable that continues a handler whose first step already ran (see `_Connection`).

    The connection runs the handler's first step synchronously inside ``data_received``: a
    handler that does not suspend (an in-memory policy) is answered without a task or a timer.
    One that suspends hands this object, which re-yields what the handler yielded and then
    drives it on, to a task that applies ``request_timeout``.  ``send``/``throw`` (cancellation
    included) are forwarded exactly as ``yield from`` would.
    """

    __slots__ = ("first", "steps")

    def __init__(self, steps: Any, first: object) -> None:
        self.steps = steps
        self.first = first

    def __await__(self) -> Any:
        steps, value = self.steps, self.first
        self.steps = self.first = None
        while True:
            try:
                sent = yield value
            except GeneratorExit:
                steps.close()
                raise
            except BaseException as exc:
                try:
                    value = steps.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    value = steps.send(sent)
                except StopIteration as stop:
                    return stop.value


class _Connection(asyncio.Protocol):
    """One policy client connection: cuts requests from the byte stream and answers them.

    A `asyncio.Protocol` rather than streams: a request that arrives in one segment is parsed
    and, if the handler does not suspend, answered within the same ``data_received`` call (no
    task wake-up, no future, no timer per request).  Requests are answered one at a time, in
    order; while one is being answered (or the peer does not read its replies) reading is
    paused, so the buffer never holds more than one maximal request plus one segment.

    Deadlines (idle, read, write) share one lazily re-armed timer: each request only updates a
    float, and the timer, when it fires, re-arms itself at the current deadline if that has
    moved.  The handler's ``request_timeout`` applies only to a handler that suspends (it runs
    in a task under `asyncio.timeout_at`); one that answers synchronously cannot overrun it.
    """

    def __init__(self, server: PolicyServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.id = 0
        self.peer = "?"
        self.buffer = bytearray()
        self.searched = 0
        self.busy = False  # a handler is suspended (its task is `self.task`)
        self.task: asyncio.Task[None] | None = None
        self.eof = False
        self.paused = False  # the transport's write buffer is over its high-water mark
        self.reading = True
        self.ended = False  # closed or closing: no more requests
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self.deadline = 0.0
        self.deadline_kind = _IDLE
        self.timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.peer = _peer_name(transport)
        server = self.server
        if server._closing or len(server._connections) >= server.settings.max_connections:
            server.metrics.connections_refused += 1
            server.log.warning(
                "policy connection from %s refused: connection limit reached", self.peer
            )
            self.ended = True
            transport.close()
            return
        self.id = next(server._ids)
        server._connections[self.id] = self
        server.metrics.connections += 1
        server.metrics.connections_active += 1
        self._set_deadline(self.loop.time() + server.settings.idle_timeout, _IDLE)

    def data_received(self, data: bytes) -> None:
        if self.ended:
            return
        if not self.buffer:
            self.searched = 0
        self.buffer += data
        if not self.busy and not self.paused:
            self._process()

    def eof_received(self) -> bool:
        self.eof = True
        if not self.busy and not self.paused and not self.ended:
            self._process()
        return True  # keep the transport open to send the answers still due

    def pause_writing(self) -> None:
        self.paused = True
        self._set_deadline(self.loop.time() + self.server.settings.write_timeout, _WRITING)

    def resume_writing(self) -> None:
        self.paused = False
        if not self.busy and not self.ended:
            self._set_deadline(self.loop.time() + self.server.settings.idle_timeout, _IDLE)
            self._process()

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        server = self.server
        if server._connections.pop(self.id, None) is not None:
            server.metrics.connections_active -= 1
            if exc is not None:
                server.log.debug("policy connection %d from %s lost: %s", self.id, self.peer, exc)
        if not self.closed.done():
            self.closed.set_result(None)

    # ------------------------------------------------------------ requests

    def _process(self) -> None:
        """Answer every complete request in the buffer (stopping at a suspended handler)."""
        try:
            self._process_requests()
        except Exception:  # a bug here must not leave a peer waiting: log and disconnect
            self.server.log.exception("policy connection %d from %s failed", self.id, self.peer)
            self._abort()

    def _process_requests(self) -> None:
        server = self.server
        settings = server.settings
        limits = settings.limits
        buffer = self.buffer
        while not self.busy and not self.paused and not self.ended:
            if server._closing:
                self._close()
                return
            end = request_end(buffer, self.searched)
            if end < 0:
                if len(buffer) > limits.max_request_bytes + 1:
                    self._malformed(
                        MalformedRequest(
                            bytes(buffer[:64]),
                            "request_too_large",
                            f"request exceeds {limits.max_request_bytes} octets",
                        )
                    )
                elif self.eof:
                    if buffer:
                        self._malformed(
                            MalformedRequest(
                                bytes(buffer[:64]), "truncated", "end of stream inside a request"
                            )
                        )
                    else:
                        self._close()
                elif buffer:
                    self.searched = len(buffer)
                    if self.deadline_kind != _READING:
                        self._set_deadline(self.loop.time() + settings.read_timeout, _READING)
                self._set_reading(True)
                return
            block = bytes(buffer[:end])
            del buffer[:end]
            self.searched = 0
            try:
                request = parse_block(block, limits)
            except MalformedRequest as exc:
                self._malformed(exc)
                return
            self._answer(request)
            if not self.busy:
                self._set_deadline(self.loop.time() + settings.idle_timeout, _IDLE)
        self._set_reading(False)

    def _answer(self, request: PolicyRequest) -> None:
        server = self.server
        fields: dict[str, object] = {}
        token = _LOG_FIELDS.set(fields)
        started = time.perf_counter()
        try:
            steps = server._handler(request).__await__()
            first = steps.send(None)
        except StopIteration as stop:
            self._reply(request, fields, started, stop.value, None)
            return
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            self._reply(request, fields, started, None, exc)
            return
        finally:
            _LOG_FIELDS.reset(token)
        # The handler suspended: finish it in a task (which copies the context, log fields
        # included) under the request timeout; reading waits until it has answered.
        self.busy = True
        self.deadline_kind = _IDLE
        self.deadline = float("inf")
        self.task = self.loop.create_task(self._finish(request, fields, started, steps, first))

    async def _finish(
        self,
        request: PolicyRequest,
        fields: dict[str, object],
        started: float,
        steps: Any,
        first: object,
    ) -> None:
        settings = self.server.settings
        _LOG_FIELDS.set(fields)  # this task's own context: the handler's later steps annotate
        deadline = self.loop.time() - (time.perf_counter() - started) + settings.request_timeout
        raw: object = None
        error: BaseException | None = None
        try:
            async with asyncio.timeout_at(deadline) as scope:
                raw = await _Resumed(steps, first)
        except asyncio.CancelledError:
            self._abort()  # shutdown grace ran out: no answer
            raise
        except Exception as exc:
            error = _TimedOut() if isinstance(exc, TimeoutError) and scope.expired() else exc
        self.busy = False
        self.task = None
        self._reply(request, fields, started, raw, error)
        if not self.ended:
            self._set_deadline(self.loop.time() + settings.idle_timeout, _IDLE)
            self._process()

    def _reply(
        self,
        request: PolicyRequest,
        fields: dict[str, object],
        started: float,
        raw: object,
        error: BaseException | None,
    ) -> None:
        server = self.server
        settings = server.settings
        outcome = "ok"
        if error is None and not isinstance(raw, str):
            error = TypeError(f"policy handler returned {shown(raw)}, not a string")
        if isinstance(error, _TimedOut):
            outcome = "timeout"
            server.metrics.timeouts += 1
            server.log.warning(
                "policy handler timed out after %ss (instance=%s); answering %r",
                settings.request_timeout,
                request.instance,
                settings.fallback_action,
            )
            action = settings.fallback_action
        elif error is not None:
            outcome = "error"
            server.metrics.handler_errors += 1
            server.log.error(
                "policy handler failed (instance=%s); answering %r",
                request.instance,
                settings.fallback_action,
                exc_info=error,
            )
            action = settings.fallback_action
        else:
            assert isinstance(raw, str)
            action = raw
            if not _SAFE_ACTION_RE.match(action) or len(action) > settings.max_action_chars:
                action = sanitize_action(raw, max_chars=settings.max_action_chars)
                if action != raw:
                    server.metrics.sanitised += 1
                    server.log.warning(
                        "policy handler action %s sanitised to %r", shown(raw), action
                    )
                if not action:
                    outcome = "error"
                    action = settings.fallback_action
        elapsed = time.perf_counter() - started
        server.metrics.observe(action, elapsed)
        log = server.log
        if log.isEnabledFor(logging.INFO):
            record: dict[str, object] = {
                "conn": self.id,
                "state": request.protocol_state,
                "instance": request.instance,
                "client_address": request.client_address,
                "sasl_username": request.sasl_username,
                "sender": request.sender,
                "recipient": request.recipient,
            }
            record.update(fields)
            record.update(action=action, outcome=outcome, latency_ms=elapsed * 1000.0)
            log.info("policy %s", _logfmt(record), extra={"policy": record})
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(b"action=" + action.encode("ascii") + b"\n\n")

    # ------------------------------------------------------------ flow and deadlines

    def _set_reading(self, wanted: bool) -> None:
        transport = self.transport
        if wanted == self.reading or transport is None or transport.is_closing():
            return
        self.reading = wanted
        if wanted:
            transport.resume_reading()
        else:
            transport.pause_reading()

    def _set_deadline(self, when: float, kind: int) -> None:
        self.deadline = when
        self.deadline_kind = kind
        timer = self.timer
        if timer is None or timer.when() > when:
            if timer is not None:
                timer.cancel()
            self.timer = self.loop.call_at(when, self._expire)

    def _expire(self) -> None:
        self.timer = None
        if self.ended or self.busy:
            return
        if self.loop.time() < self.deadline:
            self.timer = self.loop.call_at(self.deadline, self._expire)
            return
        settings = self.server.settings
        kind = self.deadline_kind
        if kind == _WRITING and self.paused:
            self.server.log.warning(
                "policy connection %d from %s does not read replies; disconnecting",
                self.id,
                self.peer,
            )
            self._abort()
        elif kind == _READING and self.buffer:
            self._malformed(
                MalformedRequest(
                    bytes(self.buffer[:64]),
                    "read_timeout",
                    f"request not completed within {settings.read_timeout}s",
                )
            )
        else:
            self.server.log.debug("policy connection from %s idle, closing", self.peer)
            self._close()

    def _malformed(self, exc: MalformedRequest) -> None:
        self.server.metrics.count_malformed(exc.reason)
        self.server.log.warning(
            "policy connection %d from %s: %s; disconnecting without reply",
            self.id,
            self.peer,
            exc,
        )
        self._close()

    def _close(self) -> None:
        """Close after sending what was written (answers already due)."""
        self.ended = True
        self.buffer.clear()
        if self.transport is not None:
            self.transport.close()

    def _abort(self) -> None:
        self.ended = True
        self.buffer.clear()
        if self.transport is not None:
            self.transport.abort()


class _TimedOut(Exception):
    """Internal: the handler did not answer within ``request_timeout``."""


_SAFE_ACTION_RE: Final = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?\Z")


class PolicyServer:
    """An asyncio server speaking Postfix's SMTPD access policy delegation protocol.

    Example::

        async def handler(request: PolicyRequest) -> str:
            return "DUNNO"

        server = PolicyServer(handler)
        await server.start("127.0.0.1:10040")
        await server.serve_forever()  # until close() is called, e.g. on SIGTERM

    The handler can be swapped atomically with `set_handler` (requests already running finish
    with the handler they started with); `reload` runs the *reload_hook* given at construction
    (a failing reload is logged and the old state kept).
    """

    def __init__(
        self,
        handler: PostfixHandler,
        *,
        settings: ServerSettings | None = None,
        metrics: PolicyMetrics | None = None,
        logger: logging.Logger | None = None,
        reload_hook: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Create a server answering with *handler*; nothing is bound until `start`."""
        self._handler = handler
        self.settings = settings if settings is not None else ServerSettings()
        self.metrics = metrics if metrics is not None else PolicyMetrics()
        self.log = logger if logger is not None else _log
        self._reload_hook = reload_hook
        self._server: asyncio.Server | None = None
        self._listen: ListenAddress | None = None
        self._connections: dict[int, _Connection] = {}
        self._ids = itertools.count(1)
        self._closing = False
        self._closed = asyncio.Event()
        self._metrics_endpoint: MetricsEndpoint | None = None
        self._owns_path = True  # a UNIX socket file this server bound (and removes at close)

    # ---------------------------------------------------------------- lifecycle

    @property
    def address(self) -> ListenAddress:
        """The address actually bound (a TCP port 0 is replaced by the chosen port).

        Raises:
            RuntimeError: the server is not started.
        """
        if self._server is None or self._listen is None:
            raise RuntimeError("the policy server is not started")
        if self._listen.path is not None:
            return self._listen
        port: int = self._server.sockets[0].getsockname()[1]
        return ListenAddress(host=self._listen.host, port=port)

    async def start(
        self, listen: str | ListenAddress, *, sock: socket.socket | None = None
    ) -> None:
        """Bind *listen* (see `parse_listen_address`) and start accepting connections.

        With *sock*, a listening socket bound to *listen* already (by a supervisor that forks
        several servers sharing it), accept on *sock* instead of binding: its mode, group and
        listen backlog are left as they are, `close` leaves a UNIX socket's file to the
        socket's owner, and the server takes one waiting connection each time the socket is
        ready (rather than up to a hundred), so that a burst of new connections is shared
        among the processes accepting on it instead of going to the first one awake.

        Raises:
            InvalidConfiguration: *listen* cannot be parsed, or a live server already owns the
                UNIX socket path.
            RuntimeError: the server was already started.
            OSError: the address could not be bound.
        """
        if self._server is not None:
            raise RuntimeError("the policy server is already started")
        address = parse_listen_address(listen) if isinstance(listen, str) else listen
        loop = asyncio.get_running_loop()
        if sock is not None:
            shared = _SharedListener(sock.family, sock.type, sock.proto, os.dup(sock.fileno()))
            if address.path is not None:
                self._server = await loop.create_unix_server(self._protocol, sock=shared, backlog=1)
            else:
                self._server = await loop.create_server(self._protocol, sock=shared, backlog=1)
            self._owns_path = False
        elif address.path is not None:
            _remove_stale_socket(address.path)
            self._server = await loop.create_unix_server(self._protocol, path=address.path)
            try:
                _set_socket_access(address.path, self.settings)
            except BaseException:
                self._server.close()
                await self._server.wait_closed()
                self._server = None
                with contextlib.suppress(OSError):  # asyncio leaves the socket file behind
                    os.unlink(address.path)
                raise
        else:
            assert address.port is not None
            self._server = await loop.create_server(self._protocol, address.host, address.port)
        self._listen = address
        self.log.info("policy server listening on %s", self.address)

    async def start_metrics(self, host: str = "127.0.0.1", port: int = 0) -> MetricsEndpoint:
        """Serve `metrics` (its `PolicyMetrics.registry`) at ``http://HOST:PORT/metrics``
        (loopback only; Prometheus text or OpenMetrics, as the scraper's ``Accept`` asks).

        Raises:
            InvalidConfiguration: *host* is not a loopback IP address, or ``prometheus_client``
                (the ``metrics`` extra) is not installed.
            OSError: the address could not be bound.
        """
        endpoint = MetricsEndpoint(self.metrics.registry)
        await endpoint.start(host, port)
        self._metrics_endpoint = endpoint
        return endpoint

    async def serve_forever(self) -> None:
        """Wait until `close` has finished.

        Raises:
            RuntimeError: the server is not started.
        """
        if self._server is None:
            raise RuntimeError("the policy server is not started")
        await self._closed.wait()

    async def close(self, grace: float | None = None) -> None:
        """Shut down gracefully: stop accepting, close idle connections, let requests finish.

        Requests being answered get up to *grace* seconds (default
        ``settings.shutdown_grace``) to finish and send their reply; connections still open
        after that are cancelled.  Safe to call more than once.
        """
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        grace = self.settings.shutdown_grace if grace is None else grace
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections.values()):
            if not conn.busy:
                conn._close()  # idle: nothing is owed to it
        closed = [c.closed for c in self._connections.values()]
        if closed:
            _done, pending = await asyncio.wait(closed, timeout=grace)
            if pending:
                stuck = [c for c in self._connections.values() if not c.closed.done()]
                self.log.warning(
                    "policy server: %d connection(s) cancelled after %.1fs grace",
                    len(stuck),
                    grace,
                )
                for conn in stuck:
                    if conn.task is not None:
                        conn.task.cancel()
                    conn._abort()
                await asyncio.wait(pending)
        if self._server is not None:
            await self._server.wait_closed()
        if self._listen is not None and self._listen.path is not None and self._owns_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._listen.path)
        if self._metrics_endpoint is not None:
            await self._metrics_endpoint.close()
        self.log.info("policy server closed")
        self._closed.set()

    async def __aenter__(self) -> PolicyServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ---------------------------------------------------------------- reload

    def set_handler(self, handler: PostfixHandler) -> None:
        """Answer every request that starts from now on with *handler* (an atomic swap)."""
        self._handler = handler

    async def reload(self) -> bool:
        """Run the reload hook; returns whether it succeeded.

        A failing hook is logged with its traceback and counted; the server keeps serving with
        what it had.  Without a hook this only logs.
        """
        if self._reload_hook is None:
            self.log.info("policy server: reload requested, nothing to reload")
            return True
        try:
            await self._reload_hook()
        except DomainPolicyError as exc:  # e.g. an invalid configuration: no traceback needed
            self.metrics.reload_failures += 1
            self.log.error(
                "policy server: reload failed, keeping the previous configuration: %s",
                "; ".join(
                    line.strip().removeprefix("- ")
                    for line in str(exc).splitlines()
                    if line.strip()
                ),
            )
            return False
        except Exception:
            self.metrics.reload_failures += 1
            self.log.exception("policy server: reload failed, keeping the previous configuration")
            return False
        self.metrics.reloads += 1
        self.log.info("policy server: reloaded")
        return True

    # ---------------------------------------------------------------- connections

    def _protocol(self) -> _Connection:
        return _Connection(self)


class _SharedListener(socket.socket):
    """A socket another process already listens on: ``listen`` keeps its backlog (asyncio
    calls it with the number of connections to accept per wake-up, here 1)."""

    def listen(self, backlog: int = 0, /) -> None:
        """Nothing to do: the socket listens already."""


def _peer_name(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer) if peer else "unix"


def _group_id(group: int | str) -> int:
    """The numeric id of *group*: a gid (``int`` or digits) or a group name.

    Raises:
        InvalidConfiguration: *group* is negative, empty or names no group.
    """
    import grp

    if isinstance(group, bool) or not isinstance(group, int | str):
        raise InvalidConfiguration([f"unix socket group {shown(group)} must be a name or a gid"])
    if isinstance(group, int) or group.isdigit():
        gid = int(group)
        if gid < 0:
            raise InvalidConfiguration([f"unix socket group {shown(group)} is not a gid"])
        return gid
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise InvalidConfiguration([f"unix socket group {shown(group)} does not exist"]) from None


def _set_socket_access(path: str, settings: ServerSettings) -> None:
    """Give the bound socket at *path* its group, then its mode (the group first, so that the
    socket is never open to the wrong group).

    Raises:
        InvalidConfiguration: the group or mode cannot be set (not root, not a member...).
    """
    try:
        if settings.unix_socket_group is not None:
            os.chown(path, -1, _group_id(settings.unix_socket_group))
        if settings.unix_socket_mode is not None:
            os.chmod(path, settings.unix_socket_mode)
    except OSError as exc:
        raise InvalidConfiguration(
            [
                f"cannot set the group {shown(settings.unix_socket_group)} and mode "
                f"{_octal(settings.unix_socket_mode)} of unix:{path}: {exc.strerror or exc}"
            ]
        ) from exc


def _octal(mode: int | None) -> str:
    return "unchanged" if mode is None else f"{mode:04o}"


def _remove_stale_socket(path: str) -> None:
    """Remove a UNIX socket left behind by a dead server; refuse to steal a live one."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise InvalidConfiguration([f"{shown(path)} exists and is not a socket"])
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    finally:
        probe.close()
    raise InvalidConfiguration([f"another server is listening on unix:{path}"])


# --------------------------------------------------------------------------- signals


SignalCallback = Callable[[], object]


def install_signal_handlers(
    loop: asyncio.AbstractEventLoop,
    on_reload: SignalCallback,
    on_shutdown: SignalCallback,
    *,
    reload_signals: Iterable[signal.Signals] = (signal.SIGHUP,),
    shutdown_signals: Iterable[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
) -> Callable[[], None]:
    """Call *on_reload* on SIGHUP and *on_shutdown* on SIGTERM/SIGINT, inside *loop*.

    The callbacks take no argument and may return an awaitable (typically
    ``server.reload`` and ``server.close``), which is run as a task.  Returns a function that
    removes the handlers again.  UNIX only (uses `asyncio.loop.add_signal_handler`).
    """
    tasks: set[asyncio.Future[object]] = set()

    def fire(callback: SignalCallback, name: str) -> None:
        _log.info("received %s", name)
        result = callback()
        if isinstance(result, Awaitable):
            task = asyncio.ensure_future(result)
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    installed: list[signal.Signals] = []
    for signals, callback in ((reload_signals, on_reload), (shutdown_signals, on_shutdown)):
        for sig in signals:
            loop.add_signal_handler(sig, fire, callback, sig.name)
            installed.append(sig)

    def remove() -> None:
        for sig in installed:
            loop.remove_signal_handler(sig)

    return remove
