"""Postfix SMTPD access policy delegation: a strict request parser and an asyncio server.

Protocol (``SMTPD_POLICY_README``): Postfix sends ``name=value`` lines ended by an empty line;
the server answers one ``action=...`` line and an empty line.  One connection carries many
requests, across many SMTP sessions, so per-message state is keyed on the ``instance``
attribute (see `InstanceCache`), never on the connection.

Design
------
* `parse_request` / `PolicyRequest`: every attribute Postfix 2.1 to 3.12 sends is a field
  (an absent attribute is ``""``, as Postfix itself sends ``name=`` for empty values); unknown
  attributes are kept in `PolicyRequest.unknown` and otherwise ignored; ``ccert_*`` values are
  xtext-decoded (RFC 3461); values are UTF-8 (SMTPUTF8 senders arrive raw), and bytes that are
  not UTF-8 become U+FFFD so that the policy, not the transport, refuses them.
* The parser is strict and bounded (`PolicyLimits`): line length, attribute count and request
  size are capped, attribute names must be ``[A-Za-z0-9_.-]+``, NUL bytes and duplicate
  attributes are refused, ``request=smtpd_access_policy`` is required.  Lines end with LF
  alone, as Postfix sends them: a CR is part of the value (and ``\\r\\n`` is not an empty
  line).
* A malformed request gets **no reply**: `PolicyServer` logs a warning, counts it and closes
  the connection, as the protocol requires.  Postfix then reconnects, retries and finally
  applies ``smtpd_policy_service_default_action``.
* The handler (`PostfixHandler`) returns the action text.  The server sanitises it
  (`sanitize_action`: one line of printable ASCII, bounded length) so a handler bug can never
  inject protocol lines.  A handler that raises or returns a non-string, or that does not answer
  within ``request_timeout``, gets the fallback action (default ``451 4.3.0 Policy service
  temporarily unavailable``) instead of a disconnect: the answer is explicit and immediate,
  Postfix does not retry (which would call the failing handler again and could count the
  message twice) and the problem is logged and counted.
* Group commit (`make_handler`, stores that do I/O): Postfix opens many policy connections and
  sends one request at a time on each, so under load many requests wait at once.  A request
  that arrives when no decision is running is decided at once, alone; requests that arrive
  while one runs in the worker thread are queued and decided together by one
  `RelayPolicy.evaluate_many` when it returns (one SQLite transaction, one Redis round trip),
  at most ``max_batch`` (`DEFAULT_MAX_BATCH`, 256) at a time.  The decisions are those of
  deciding the requests one by one in arrival order; a waiter that times out does not cancel
  its batch.
* Structured logging: one INFO line per request on ``domainpolicy.integrations.postfix``,
  ``key=value`` formatted, with the fields also attached as ``record.policy`` (a dict) for JSON
  formatters.  The handler adds its own fields (tenant, verdict, ...) with `annotate`.
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
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any, Final, Generic, TypeAlias, TypeVar

import attrs

from domainpolicy._errors import DomainPolicyError, InvalidConfiguration, shown
from domainpolicy._policy import Decision, Outcome, RelayPolicy, RelayRequest
from domainpolicy._replies import POSTFIX_REJECT_RESERVE, Reply
from domainpolicy._stores import MemoryStore

from ._metrics import MetricsEndpoint, PolicyMetrics

__all__ = [
    "DECIDING_STATES",
    "DEFAULT_FALLBACK_ACTION",
    "DEFAULT_MAX_BATCH",
    "KNOWN_ATTRIBUTES",
    "InstanceCache",
    "ListenAddress",
    "MalformedRequest",
    "PolicyLimits",
    "PolicyRequest",
    "PolicyServer",
    "PostfixHandler",
    "ServerSettings",
    "annotate",
    "certificate_name",
    "install_signal_handlers",
    "make_handler",
    "parse_listen_address",
    "parse_request",
    "relay_request",
    "sanitize_action",
    "xtext_decode",
]

_log = logging.getLogger("domainpolicy.integrations.postfix")

DEFAULT_FALLBACK_ACTION: Final = "451 4.3.0 Policy service temporarily unavailable"
"""Answered when the handler fails or times out: a temporary failure, the client retries."""

KNOWN_ATTRIBUTES: Final = (
    # Postfix 2.1
    "request",
    "protocol_state",
    "protocol_name",
    "helo_name",
    "queue_id",
    "sender",
    "recipient",
    "recipient_count",
    "client_address",
    "client_name",
    "reverse_client_name",
    "instance",
    # 2.2
    "sasl_method",
    "sasl_username",
    "sasl_sender",
    "size",
    "ccert_subject",
    "ccert_issuer",
    "ccert_fingerprint",
    # 2.3
    "encryption_protocol",
    "encryption_cipher",
    "encryption_keysize",
    "etrn_domain",
    # 2.5
    "stress",
    # 2.9
    "ccert_pubkey_fingerprint",
    # 3.0
    "client_port",
    # 3.1
    "policy_context",
    # 3.2
    "server_address",
    "server_port",
    # 3.8
    "compatibility_level",
    "mail_version",
    # 3.12
    "tls_sni",
)
"""Every attribute Postfix 2.1 to 3.12 sends; each is a `PolicyRequest` field."""

_XTEXT_ATTRIBUTES: Final = frozenset(a for a in KNOWN_ATTRIBUTES if a.startswith("ccert_"))
_KNOWN: Final = frozenset(KNOWN_ATTRIBUTES)
_NAME_RE: Final = re.compile(rb"[A-Za-z0-9_.\-]+\Z")
_REQUEST_TYPE: Final = "smtpd_access_policy"
_READ_CHUNK: Final = 65536


# --------------------------------------------------------------------------- errors


class MalformedRequest(DomainPolicyError, ValueError):
    """A policy request broke the protocol or a limit; the server disconnects without reply.

    Reason codes: ``missing_equals``, ``bad_name``, ``nul_byte``, ``line_too_long``,
    ``too_many_attributes``, ``request_too_large``, ``duplicate_attribute``, ``missing_request``,
    ``unsupported_request``, ``bad_xtext``, ``truncated``, ``trailing_data`` (`parse_request`
    only), ``read_timeout`` (server only).
    """

    def __init__(self, value: object, reason: str, detail: str) -> None:
        """Record the offending *value*, a stable *reason* code and a human *detail*."""
        self.value = value
        self.reason = reason
        self.detail = detail
        super().__init__(f"malformed policy request near {shown(value)}: {detail} [{reason}]")

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.value, self.reason, self.detail))


# --------------------------------------------------------------------------- limits and values


def _positive(_instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise InvalidConfiguration([f"{attribute.name} must be positive, got {shown(value)}"])


@attrs.frozen
class PolicyLimits:
    """Bounds on what a peer may send in one request (all in octets, ``\\n`` excluded).

    Postfix 3.12 sends about 35 attributes; a long ``ccert_subject`` or ``helo_name`` stays well
    under 2 KiB.  The defaults leave room for that and stop a hostile peer early.
    """

    max_line_bytes: int = attrs.field(default=4096, validator=_positive)
    max_attributes: int = attrs.field(default=100, validator=_positive)
    max_request_bytes: int = attrs.field(default=32768, validator=_positive)


DEFAULT_LIMITS: Final = PolicyLimits()


def xtext_decode(text: str) -> str:
    """Decode RFC 3461 xtext (``+XX`` hex escapes) into text; the octets are read as UTF-8.

    Upper- and lower-case hex digits are accepted; octets that are not UTF-8 become U+FFFD.

    Raises:
        MalformedRequest: a ``+`` is not followed by two hex digits (reason ``bad_xtext``).
    """
    if "+" not in text:
        return text
    out = bytearray()
    i = 0
    n = len(text)
    while i < n:
        char = text[i]
        if char == "+":
            pair = text[i + 1 : i + 3]
            if len(pair) != 2 or not all(c in "0123456789abcdefABCDEF" for c in pair):
                raise MalformedRequest(
                    text, "bad_xtext", f"'+' at position {i} is not followed by two hex digits"
                )
            out.append(int(pair, 16))
            i += 3
        else:
            out += char.encode("utf-8")
            i += 1
    return out.decode("utf-8", errors="replace")


def _frozen_mapping(value: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(value))


@attrs.frozen(kw_only=True)
class PolicyRequest:
    """One parsed Postfix policy request (``request=smtpd_access_policy``).

    Every attribute Postfix 2.1 to 3.12 sends is a string field, ``""`` when absent or empty,
    kept as sent (numbers such as ``recipient_count`` or ``size`` too), except that ``ccert_*``
    values are xtext-decoded.  Attributes this module does not know are in `unknown`.
    """

    request: str = _REQUEST_TYPE
    protocol_state: str = ""
    protocol_name: str = ""
    helo_name: str = ""
    queue_id: str = ""
    sender: str = ""
    recipient: str = ""
    recipient_count: str = ""
    client_address: str = ""
    client_name: str = ""
    reverse_client_name: str = ""
    instance: str = ""
    sasl_method: str = ""
    sasl_username: str = ""
    sasl_sender: str = ""
    size: str = ""
    ccert_subject: str = ""
    ccert_issuer: str = ""
    ccert_fingerprint: str = ""
    encryption_protocol: str = ""
    encryption_cipher: str = ""
    encryption_keysize: str = ""
    etrn_domain: str = ""
    stress: str = ""
    ccert_pubkey_fingerprint: str = ""
    client_port: str = ""
    policy_context: str = ""
    server_address: str = ""
    server_port: str = ""
    compatibility_level: str = ""
    mail_version: str = ""
    tls_sni: str = ""
    unknown: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_mapping, hash=False)

    @property
    def message_key(self) -> str | None:
        """Key identifying the message this request is about, or None without ``instance``.

        Postfix sends the same ``instance`` for every recipient of one message.  The key also
        holds the client address and port and the sender, so two Postfix hosts sharing one
        policy server cannot collide on an ``instance`` string.
        """
        if not self.instance:
            return None
        return "\x00".join((self.instance, self.client_address, self.client_port, self.sender))


def _request_end(buffer: bytes | bytearray, start: int = 0) -> int:
    """Offset just past the empty line ending the request at the start of *buffer*, or -1.

    *start* is where the search for ``\\n\\n`` may begin (data before it was searched already).
    A request whose first line is empty ends after that line (and is refused when parsed).
    """
    if buffer[:1] == b"\n":
        return 1
    found = buffer.find(b"\n\n", max(start - 1, 0))
    return found + 2 if found >= 0 else -1


_BODY_RE: Final = re.compile(r"(?:[A-Za-z0-9_.\-]+=[^\n]*\n)*\Z")
"""Every line ``name=value`` with a valid name (the body with a final LF; checked as text)."""
_KNOWN_SET: Final = frozenset(KNOWN_ATTRIBUTES)


def _parse_block(block: bytes, limits: PolicyLimits) -> PolicyRequest:
    """Parse one request: its attribute lines and the empty line that ends it.

    *block* ends with ``\\n\\n`` (or is ``\\n``) and holds no other empty line (`_request_end`
    cut it so).

    Fast path (a well-formed request): the size and NUL checks on the octets, one decode of the
    whole request, one regular expression checking every line's name and ``=``, one split.
    Decoding the whole request at once gives the same text as decoding each value: UTF-8
    never lets a multi-octet sequence span an ASCII ``=`` or LF, and a broken sequence ends at
    one.  Anything the fast path does not accept is parsed again by `_parse_block_checked`,
    which finds the exact problem (the same checks, in the same order).
    """
    size = len(block) - 1
    if (
        size <= limits.max_line_bytes
        and size <= limits.max_request_bytes
        and b"\x00" not in block
        and size > 0
    ):
        text = block[:-1].decode("utf-8", errors="replace")
        if _BODY_RE.match(text):
            pairs = [line.split("=", 1) for line in text[:-1].split("\n")]
            attributes = dict(pairs)
            if (
                len(attributes) == len(pairs)
                and len(pairs) <= limits.max_attributes
                and attributes.get("request") == _REQUEST_TYPE
            ):
                unknown: dict[str, str] = {}
                if not attributes.keys() <= _KNOWN_SET:
                    unknown = {k: v for k, v in attributes.items() if k not in _KNOWN_SET}
                    for key in unknown:
                        del attributes[key]
                for key in _XTEXT_ATTRIBUTES:
                    value = attributes.get(key)
                    if value and "+" in value:
                        attributes[key] = xtext_decode(value)
                return PolicyRequest(**attributes, unknown=unknown)
    return _parse_block_checked(block, limits)


def _parse_block_checked(block: bytes, limits: PolicyLimits) -> PolicyRequest:
    """`_parse_block` line by line: every check in order, each failure with its reason."""
    size = len(block) - 1  # the attribute lines, each with its LF
    if size > limits.max_request_bytes:
        raise MalformedRequest(
            block[:64], "request_too_large", f"request exceeds {limits.max_request_bytes} octets"
        )
    body = block[:-2]
    lines = body.split(b"\n") if body else []
    if size > limits.max_line_bytes:  # otherwise no line can be too long
        for line in lines:
            if len(line) > limits.max_line_bytes:
                raise MalformedRequest(
                    line[:64],
                    "line_too_long",
                    f"line of {len(line)} octets exceeds {limits.max_line_bytes}",
                )
    if len(lines) > limits.max_attributes:
        raise MalformedRequest(
            lines[limits.max_attributes].partition(b"=")[0],
            "too_many_attributes",
            f"more than {limits.max_attributes} attributes",
        )
    if b"\x00" in body:
        line = next(line for line in lines if b"\x00" in line)
        raise MalformedRequest(line, "nul_byte", "NUL byte in a request line")
    attributes: dict[str, bytes] = {}
    for line in lines:
        name, equals, value = line.partition(b"=")
        if not equals:
            raise MalformedRequest(line, "missing_equals", "a request line must be name=value")
        if not _NAME_RE.match(name):
            raise MalformedRequest(
                name, "bad_name", "attribute names are ASCII letters, digits, '_', '.' and '-'"
            )
        key = name.decode("ascii")
        if key in attributes:
            raise MalformedRequest(key, "duplicate_attribute", f"attribute {key!r} repeated")
        attributes[key] = value
    kind = attributes.get("request")
    if kind is None:
        raise MalformedRequest(sorted(attributes)[:8], "missing_request", "no 'request' attribute")
    if kind != b"smtpd_access_policy":
        raise MalformedRequest(
            kind, "unsupported_request", f"only request={_REQUEST_TYPE} is supported"
        )
    known: dict[str, str] = {}
    unknown: dict[str, str] = {}
    for key, raw in attributes.items():
        # Values are UTF-8 (SMTPUTF8); other octets become U+FFFD for the policy to refuse.
        text = raw.decode("utf-8", errors="replace")
        if key in _KNOWN:
            known[key] = xtext_decode(text) if key in _XTEXT_ATTRIBUTES else text
        else:
            unknown[key] = text
    return PolicyRequest(**known, unknown=unknown)


def parse_request(data: bytes, *, limits: PolicyLimits = DEFAULT_LIMITS) -> PolicyRequest:
    """Parse one complete request: ``name=value`` lines, each ended by LF, then an empty line.

    *data* must hold exactly one request: the terminating empty line is required and nothing may
    follow it.  The server applies the same rules to each request it cuts from the stream.

    Raises:
        MalformedRequest: the request breaks the protocol or a limit of *limits*; ``reason``
            says which (``truncated`` when the empty line is missing, ``trailing_data`` when
            something follows it).
    """
    end = _request_end(data)
    if end < 0:
        raise MalformedRequest(data[-64:], "truncated", "a request must end with an empty line")
    if end != len(data):
        raise MalformedRequest(
            data[end : end + 64],
            "trailing_data",
            "data after the empty line that ends the request",
        )
    return _parse_block(data, limits)


# --------------------------------------------------------------------------- actions


_UNSAFE_RE: Final = re.compile(r"[^\x20-\x7e]+")
_MAX_ACTION_CHARS: Final = 400


def sanitize_action(text: str, *, max_chars: int = _MAX_ACTION_CHARS) -> str:
    """Make *text* safe to send as one ``action=`` line.

    Every run of characters outside printable ASCII (CR, LF, NUL, TAB, other controls, non-ASCII)
    becomes one space, the result is stripped and cut to *max_chars*.  RFC 5321 reply text is
    printable ASCII and Postfix neither truncates nor filters what it relays, so the policy
    server keeps replies within the RFC itself.  Postfix adds ``<rcpt>: Recipient address
    rejected:`` to the text; keep *max_chars* well under the 512-octet reply line limit.
    """
    return _UNSAFE_RE.sub(" ", text).strip()[:max_chars].rstrip()


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
        unix_socket_mode: permissions of a UNIX socket (None: leave them to the umask); the
            default 0o660 lets the socket's group (put Postfix's user in it) connect.
        limits: request size limits.
    """

    request_timeout: float = attrs.field(default=2.0, validator=_positive)
    fallback_action: str = attrs.field(default=DEFAULT_FALLBACK_ACTION)
    max_action_chars: int = attrs.field(default=_MAX_ACTION_CHARS, validator=_positive)
    idle_timeout: float = attrs.field(default=600.0, validator=_positive)
    read_timeout: float = attrs.field(default=30.0, validator=_positive)
    write_timeout: float = attrs.field(default=10.0, validator=_positive)
    max_connections: int = attrs.field(default=1024, validator=_positive)
    shutdown_grace: float = attrs.field(default=5.0, validator=_positive)
    unix_socket_mode: int | None = 0o660
    limits: PolicyLimits = DEFAULT_LIMITS

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
            end = _request_end(buffer, self.searched)
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
                request = _parse_block(block, limits)
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

    async def start(self, listen: str | ListenAddress) -> None:
        """Bind *listen* (see `parse_listen_address`) and start accepting connections.

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
        if address.path is not None:
            _remove_stale_socket(address.path)
            self._server = await loop.create_unix_server(self._protocol, path=address.path)
            if self.settings.unix_socket_mode is not None:
                os.chmod(address.path, self.settings.unix_socket_mode)
        else:
            assert address.port is not None
            self._server = await loop.create_server(self._protocol, address.host, address.port)
        self._listen = address
        self.log.info("policy server listening on %s", self.address)

    async def start_metrics(self, host: str = "127.0.0.1", port: int = 0) -> MetricsEndpoint:
        """Serve `PolicyMetrics.render_prometheus` at ``http://HOST:PORT/metrics`` (loopback).

        Raises:
            InvalidConfiguration: *host* is not a loopback IP address.
            OSError: the address could not be bound.
        """
        endpoint = MetricsEndpoint(self.metrics.render_prometheus)
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
        if self._listen is not None and self._listen.path is not None:
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


def _peer_name(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer) if peer else "unix"


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


# --------------------------------------------------------------------------- per-message cache


T = TypeVar("T")


class _ComputeFailed(Exception):
    """Internal: the computation another caller was running failed; compute again."""


class InstanceCache(Generic[T]):
    """A bounded LRU with TTL, holding the first decision made for each message.

    Postfix asks once per recipient; the policy must count once per message.  Key the cache on
    `PolicyRequest.message_key` and later recipients of the same message get the first answer
    without a second count::

        cache: InstanceCache[str] = InstanceCache()

        async def handler(request: PolicyRequest) -> str:
            key = request.message_key
            if key is None:
                return await decide(request)
            return await cache.get_or_compute(key, lambda: decide(request))

    Concurrent callers with the same key share one computation.  A computation that raises
    (or is cancelled) is not cached: the next caller computes again.
    """

    def __init__(
        self,
        maxsize: int = 100_000,
        ttl: float = 3600.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Keep at most *maxsize* entries, each for *ttl* seconds as measured by *clock*.

        Raises:
            InvalidConfiguration: *maxsize* or *ttl* is not positive.
        """
        if maxsize <= 0 or not ttl > 0:
            raise InvalidConfiguration(
                [f"InstanceCache needs a positive maxsize and ttl, got {maxsize!r}, {ttl!r}"]
            )
        self.maxsize = maxsize
        self.ttl = ttl
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, T]] = OrderedDict()
        self._pending: dict[str, asyncio.Future[T]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> T | None:
        """The value stored for *key*, or None if absent or expired."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, value = entry
        if expires <= self._clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return value

    def put(self, key: str, value: T) -> None:
        """Store *value* for *key* (replacing any), evicting the least recently used entry."""
        self._entries[key] = (self._clock() + self.ttl, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.maxsize:
            self._entries.popitem(last=False)

    async def get_or_compute(self, key: str, compute: Callable[[], Awaitable[T]]) -> T:
        """Return the cached value for *key*, or await *compute()* once and cache its result.

        Raises:
            Exception: whatever *compute* raises (then nothing is cached).
        """
        while True:
            cached = self.get(key)
            if cached is not None:
                return cached
            pending = self._pending.get(key)
            if pending is None:
                break
            try:
                return await asyncio.shield(pending)
            except _ComputeFailed:
                continue
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            value = await compute()
        except BaseException:
            future.set_exception(_ComputeFailed())
            future.exception()  # mark retrieved: nobody may be waiting
            raise
        else:
            self.put(key, value)
            future.set_result(value)
            return value
        finally:
            del self._pending[key]


# --------------------------------------------------------------------------- the relay policy


DECIDING_STATES: Final = frozenset({"MAIL", "RCPT", "DATA", "END-OF-MESSAGE"})
"""Protocol states in which the handler consults the policy; other states get ``DUNNO``.

``CONNECT``, ``EHLO``/``HELO``, ``VRFY`` and ``ETRN`` carry no envelope sender, so there is
nothing to decide (and nothing is counted).  Put ``check_policy_service`` in
``smtpd_relay_restrictions`` (state ``RCPT``), as documented.
"""

_CN_RE: Final = re.compile(r"(?:^|[,/+])\s*CN\s*=\s*([^,/+]+)", re.IGNORECASE)
_FINGERPRINT_SEPARATORS: Final = str.maketrans("", "", ":- ")


def _fingerprint_key(value: str) -> str:
    return value.translate(_FINGERPRINT_SEPARATORS).upper()


def certificate_name(request: PolicyRequest, pinned: Mapping[str, str] | None = None) -> str | None:
    """The TLS client certificate name to attribute the connection by, or None.

    1. ``ccert_fingerprint`` (or ``ccert_pubkey_fingerprint``) found in *pinned* (fingerprint ->
       certificate name, keys as upper-case hex digits without separators; `make_handler`
       prepares them from any spelling): the pinned name.  Postfix sends the
       fingerprints for any certificate presented, verified or not, so pinning is how an
       operator vouches for a certificate that no trusted CA signed.
    2. Else ``ccert_subject``: Postfix sends the **CommonName** of the subject (not the whole
       DN), xtext-encoded, and only for a certificate it verified against its trusted CAs
       (empty otherwise).  A value that looks like a distinguished name
       (``CN=mail.contoso.com,O=Contoso``, as some proxies pass it) yields its last ``CN``.
    3. Else None: attribution falls back to the client address and the sender domain.

    The name is only a claim to match against connectors: `ConnectorTable` trusts it only if it
    is (under) one of the connector tenant's accepted domains.
    """
    if pinned:
        for fingerprint in (request.ccert_fingerprint, request.ccert_pubkey_fingerprint):
            if fingerprint:
                name = pinned.get(_fingerprint_key(fingerprint))
                if name is not None:
                    return name
    subject = request.ccert_subject.strip()
    if not subject:
        return None
    if "=" in subject:
        found = _CN_RE.findall(subject)
        return (found[-1].strip() or None) if found else None
    return subject


def relay_request(
    request: PolicyRequest, *, pinned: Mapping[str, str] | None = None
) -> RelayRequest:
    """Map a Postfix policy request onto the facade's `RelayRequest`.

    ``sender`` as sent (empty: the null sender), ``client_address`` -> ``client_ip``,
    `certificate_name` -> ``tls_cert_name``, ``sasl_username`` -> ``sasl_user``, ``recipient``
    -> ``recipients`` (empty before RCPT), ``instance`` -> ``message_id``.  Empty attributes
    become None.
    """
    return RelayRequest(
        sender=request.sender,
        client_ip=request.client_address or None,
        tls_cert_name=certificate_name(request, pinned),
        sasl_user=request.sasl_username or None,
        recipients=(request.recipient,) if request.recipient else (),
        message_id=request.instance or None,
    )


# --------------------------------------------------------------------------- batching


DEFAULT_MAX_BATCH: Final = 256
"""Largest batch `make_handler` decides in one `RelayPolicy.evaluate_many` call."""


class _BatchFailed(RuntimeError):
    """Internal: a batch failed as a whole (a bug); each of its requests gets the fallback."""


_Decided: TypeAlias = tuple[Decision, int]
"""A decision and the number of requests decided together with it (itself included)."""


class _Batcher:
    """Group commit for a policy whose store does I/O: decide concurrent requests together.

    `submit` queues a request and returns a future for its decision.  A request that arrives
    while no batch is running starts one at once (a batch of one, decided with
    `RelayPolicy.evaluate`: no added latency at low load); requests that arrive while a batch is
    being decided in the worker thread wait and go together, in arrival order, as the next
    `RelayPolicy.evaluate_many` (at most *max_batch*; the rest waits for the following batch).
    The decisions are those of calling `RelayPolicy.evaluate` for each request in arrival order.

    The futures belong to the batcher: a waiter must not cancel them (``asyncio.shield``), so a
    waiter that times out or goes away leaves the batch running.  If deciding a batch raises
    (it should not: `RelayPolicy.evaluate_many` never raises for its requests), or the driver
    task is cancelled, every waiter of that batch and of the queue gets `_BatchFailed`.
    """

    __slots__ = ("_queue", "_task", "max_batch", "policy")

    def __init__(self, policy: RelayPolicy, max_batch: int) -> None:
        self.policy = policy
        self.max_batch = max_batch
        self._queue: list[tuple[RelayRequest, asyncio.Future[_Decided]]] = []
        self._task: asyncio.Task[None] | None = None

    def submit(self, relay: RelayRequest) -> asyncio.Future[_Decided]:
        """Queue *relay*; the future completes with its decision and the size of the batch it
        was decided in (or `_BatchFailed`)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_Decided] = loop.create_future()
        self._queue.append((relay, future))
        if self._task is None:
            self._task = loop.create_task(self._drive())
        return future

    def _decide(self, relays: list[RelayRequest]) -> list[Decision]:
        """In the worker thread: one request with `evaluate`, more with `evaluate_many`."""
        if len(relays) == 1:
            return [self.policy.evaluate(relays[0])]
        return self.policy.evaluate_many(relays)

    async def _drive(self) -> None:
        queue = self._queue
        batch: list[tuple[RelayRequest, asyncio.Future[_Decided]]] = []
        try:
            while queue:
                batch = queue[: self.max_batch]
                del queue[: self.max_batch]
                try:
                    decisions = await asyncio.to_thread(self._decide, [r for r, _ in batch])
                    if len(decisions) != len(batch):
                        raise _BatchFailed(
                            f"{len(decisions)} decisions for a batch of {len(batch)} requests"
                        )
                except Exception as exc:
                    _log.exception("deciding a batch of %d policy requests failed", len(batch))
                    _fail(batch, exc)
                else:
                    for (_, future), decision in zip(batch, decisions, strict=True):
                        if not future.done():
                            future.set_result((decision, len(batch)))
                batch = []
        except BaseException as exc:  # cancelled (the loop is shutting down): nobody may hang
            _fail(batch + queue, exc)
            queue.clear()
            raise
        finally:
            self._task = None


def _fail(
    waiters: Iterable[tuple[RelayRequest, asyncio.Future[_Decided]]], cause: BaseException
) -> None:
    for _, future in waiters:
        if not future.done():
            error = _BatchFailed(f"the batch of policy requests failed: {cause!r}")
            error.__cause__ = cause
            future.set_exception(error)


def make_handler(
    policy: RelayPolicy,
    *,
    cache: InstanceCache[Decision] | None = None,
    pinned_certificates: Mapping[str, str] | None = None,
    blocking: bool | None = None,
    max_batch: int | None = None,
) -> PostfixHandler:
    """A `PostfixHandler` answering Postfix with *policy*'s decisions.

    * **Once per message.**  The decision is made on the first request of a message and reused
      for its other recipients (keyed on `PolicyRequest.message_key` in *cache*, default a new
      `InstanceCache` of 100,000 messages for an hour), so a message counts once however many
      recipients it has.  With the policy's ``count="recipients"`` the key also holds the
      recipient: each recipient counts once.  A request without ``instance`` is decided alone.
    * **Answer.**  ``DUNNO`` when accepted (the remaining restrictions decide), else the reply
      as one line, ``<code> <status> <text>``, from ``decision.reply.single_line(reserve=
      POSTFIX_REJECT_RESERVE)`` (room for the ``<rcpt>: Recipient address rejected:`` text
      Postfix inserts).  States without an envelope (`DECIDING_STATES`) get ``DUNNO``.
    * **Log line.**  `annotate` adds ``tenant``, ``sender_domain``, ``verdict`` (``accept``,
      ``refuse``, ``tempfail``, or ``skip``), ``code``, ``status``, ``reason``, ``cached``
      (the decision of an earlier recipient) and, for a request decided in the worker thread,
      ``batch`` (how many requests were decided together with it, itself included: 1 when
      alone) to the server's line for the request.
    * **Never hangs.**  With a store that does I/O (*blocking*; default: any store but a
      `MemoryStore`) the policy runs in a worker thread and the server's ``request_timeout``
      bounds the wait (answering its fallback ``451 4.3.0``).  A decision that completes after
      that timeout is still cached for the message's later recipients, so a slow store does
      not count the message twice.  Store failures are already ``451 4.3.0`` decisions
      (`RelayPolicy.evaluate` never raises).  A `MemoryStore` is evaluated inline: no thread
      hop, no I/O to wait for, no batching.
    * **Group commit** (blocking stores).  Requests that arrive while a decision is running in
      the worker thread are queued and decided together, in arrival order, by one
      `RelayPolicy.evaluate_many` when it returns (SQLite: one transaction; Redis: one
      pipelined round trip), at most *max_batch* (default `DEFAULT_MAX_BATCH`, 256) at a time;
      the rest waits for the following batch.  A request that arrives when nothing is running
      starts at once, alone (`RelayPolicy.evaluate`), so low load sees no added latency.  The
      decisions are exactly those of deciding the requests one after the other in arrival
      order; the other recipients of a message being decided wait for its decision instead
      of joining a batch.  A request that times out, or whose connection closes, does not
      cancel its batch.  A batch that fails as a whole (a bug: `RelayPolicy.evaluate_many`
      never raises for its requests) makes each of its requests raise, which the server
      answers with its fallback action.  With SQLite a store failure fails the whole batch
      (each of its messages gets ``451 4.3.0``, none is counted).  ``max_batch=1`` turns
      batching off: each request is decided alone, in its own worker thread
      (`RelayPolicy.evaluate_async`), as before batching existed.

    *pinned_certificates* maps certificate fingerprints to names (see `certificate_name`).

    Raises:
        InvalidConfiguration: *max_batch* is not a positive integer.
    """
    if max_batch is None:
        max_batch = DEFAULT_MAX_BATCH
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise InvalidConfiguration(
            [f"max_batch must be a positive integer, got {shown(max_batch)}"]
        )
    decisions: InstanceCache[Decision] = cache if cache is not None else InstanceCache()
    pinned = {_fingerprint_key(k): v for k, v in (pinned_certificates or {}).items()} or None
    in_thread = not isinstance(policy.store, MemoryStore) if blocking is None else blocking
    batcher = _Batcher(policy, max_batch) if in_thread and max_batch > 1 else None
    per_recipient = policy.count == "recipients"
    rendered: dict[Reply, str] = {}

    def action_of(decision: Decision) -> str:
        if decision.outcome is Outcome.ACCEPT:
            return "DUNNO"
        reply = decision.reply
        text = rendered.get(reply)
        if text is None:
            if len(rendered) >= 1024:  # replies come from a finite catalogue; stay bounded
                rendered.clear()
            text = rendered[reply] = str(reply.single_line(reserve=POSTFIX_REJECT_RESERVE))
        return text

    def cache_late(key: str | None, done: asyncio.Future[_Decided]) -> None:
        if done.cancelled() or done.exception() is not None:  # (marks the error retrieved)
            return
        if key is not None:
            decisions.put(key, done.result()[0])

    async def alone(relay: RelayRequest) -> _Decided:
        return await policy.evaluate_async(relay), 1

    async def evaluate(relay: RelayRequest, key: str | None) -> Decision:
        if not in_thread:
            return policy.evaluate(relay)
        pending = (
            batcher.submit(relay) if batcher is not None else asyncio.ensure_future(alone(relay))
        )
        try:
            decision, size = await asyncio.shield(pending)
        except asyncio.CancelledError:
            # Timed out (or shut down): the decision goes on; keep it for the later recipients.
            pending.add_done_callback(lambda done: cache_late(key, done))
            raise
        annotate(batch=size)
        return decision

    async def handler(request: PolicyRequest) -> str:
        if request.protocol_state not in DECIDING_STATES:
            annotate(verdict="skip", reason="protocol_state")
            return "DUNNO"
        relay = relay_request(request, pinned=pinned)
        key = request.message_key
        if key is not None and per_recipient:
            key = f"{key}\x00{request.recipient}"
        cached = False
        if key is None:
            decision = await evaluate(relay, None)
        else:
            found = decisions.get(key)
            if found is not None:
                decision, cached = found, True
            else:
                decision = await decisions.get_or_compute(key, lambda: evaluate(relay, key))
        reply = decision.reply
        annotate(
            tenant=decision.tenant or "",
            sender_domain=decision.sender_domain or "",
            verdict=decision.outcome.value,
            code=reply.code,
            status=reply.status,
            reason=decision.reason,
            cached=cached,
        )
        return action_of(decision)

    return handler
