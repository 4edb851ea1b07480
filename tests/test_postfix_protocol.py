"""The Postfix policy delegation protocol: request parser, server over loopback sockets, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import pwd
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

import aio
from domainpolicy import (
    POSTFIX_REJECT_RESERVE,
    AcceptedDomain,
    BlockPolicy,
    ConnectorTable,
    Decision,
    DomainMatcher,
    DomainPolicyError,
    InboundConnector,
    InvalidConfiguration,
    MemoryStore,
    RelayPolicy,
    RelayRequest,
    ReplyCatalog,
    StoreUnavailable,
)
from domainpolicy.integrations import (
    ACTION_CLASSES,
    DEFAULT_FALLBACK_ACTION,
    KNOWN_ATTRIBUTES,
    InstanceCache,
    ListenAddress,
    MalformedRequest,
    PolicyLimits,
    PolicyMetrics,
    PolicyRequest,
    PolicyServer,
    PostfixHandler,
    ServerSettings,
    action_class,
    annotate,
    certificate_name,
    install_signal_handlers,
    make_handler,
    parse_listen_address,
    parse_request,
    relay_request,
    sanitize_action,
    xtext_decode,
)

T = TypeVar("T")

REJECT_TEXT = (
    "550 5.7.750 Service unavailable. Client blocked from sending from unregistered domains"
)
SAFETY = 10.0  # seconds: a safety net against hangs, never an assertion about speed


def run(coro: Awaitable[T]) -> T:
    """Run *coro* to completion with this module's safety timeout."""
    return aio.run(coro, safety=SAFETY)


def req(**attributes: str) -> bytes:
    """Encode a policy request with ``request=smtpd_access_policy`` first."""
    lines = ["request=smtpd_access_policy"] + [f"{k}={v}" for k, v in attributes.items()]
    return ("\n".join(lines) + "\n\n").encode("utf-8")


async def dunno(_request: PolicyRequest) -> str:
    """A handler that lets every request through."""
    return "DUNNO"


async def by_sender(request: PolicyRequest) -> str:
    """Reject senders at bad.example, let others through."""
    return REJECT_TEXT if request.sender.endswith("@bad.example") else "DUNNO"


async def start(
    handler: Callable[[PolicyRequest], Awaitable[str]], **overrides: Any
) -> tuple[PolicyServer, int]:
    """Start a PolicyServer on 127.0.0.1 with a free port."""
    server = PolicyServer(handler, settings=ServerSettings(**overrides))
    await server.start("127.0.0.1:0")
    port = server.address.port
    assert port is not None
    return server, port


async def read_to_eof(reader: asyncio.StreamReader) -> bytes:
    """Read until the peer closes; a reset counts as a close."""
    chunks = []
    try:
        while chunk := await reader.read(65536):
            chunks.append(chunk)
    except ConnectionError:
        pass
    return b"".join(chunks)


async def send_and_close(port: int, data: bytes) -> bytes:
    """Send *data*, half-close, and return everything the server sent before closing."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        writer.write_eof()
    except OSError:  # the server closed first (ENOTCONN, a reset): what it sent is still read
        pass
    out = await read_to_eof(reader)
    writer.close()
    return out


def split_replies(data: bytes) -> list[str]:
    """Split server output into action texts; fail on anything that is not a reply block."""
    assert data.endswith(b"\n\n") or not data
    blocks = data.split(b"\n\n")[:-1] if data else []
    out = []
    for block in blocks:
        text = block.decode("ascii")
        assert text.startswith("action=")
        assert "\n" not in text
        out.append(text[len("action=") :])
    return out


# --------------------------------------------------------------------------- parser: valid input


FULL_312 = {name: f"v-{name}" for name in KNOWN_ATTRIBUTES if name != "request"}


def test_parse_every_known_attribute() -> None:
    """Every attribute Postfix 2.1..3.12 sends lands in its own field."""
    parsed = parse_request(req(**FULL_312))
    for name, value in FULL_312.items():
        assert getattr(parsed, name) == value
    assert parsed.request == "smtpd_access_policy"
    assert dict(parsed.unknown) == {}


def test_known_attributes_are_fields() -> None:
    """KNOWN_ATTRIBUTES and the PolicyRequest fields are the same set (plus ``unknown``)."""
    names = {a.name for a in attrs.fields(PolicyRequest)}
    assert names == {*KNOWN_ATTRIBUTES, "unknown"}


def test_parse_realistic_postfix_37_request() -> None:
    """A request as Postfix 3.7 sends it at RCPT time parses to the expected values."""
    data = (
        b"request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n"
        b"client_address=192.0.2.7\nclient_name=unknown\nclient_port=40312\n"
        b"reverse_client_name=unknown\nserver_address=127.0.0.1\nserver_port=10025\n"
        b"helo_name=client.example\nsender=alice@good.example\nrecipient=bob@dest.example\n"
        b"recipient_count=0\nqueue_id=\ninstance=1f2a.6553a2c1.8b1e9.0\nsize=0\netrn_domain=\n"
        b"stress=\nsasl_method=\nsasl_username=\nsasl_sender=\nccert_subject=\nccert_issuer=\n"
        b"ccert_fingerprint=\nccert_pubkey_fingerprint=\nencryption_protocol=\n"
        b"encryption_cipher=\nencryption_keysize=0\npolicy_context=\ncompatibility_level=3.6\n"
        b"mail_version=3.7.11\n\n"
    )
    parsed = parse_request(data)
    assert parsed.protocol_state == "RCPT"
    assert parsed.sender == "alice@good.example"
    assert parsed.recipient == "bob@dest.example"
    assert parsed.queue_id == ""
    assert parsed.instance == "1f2a.6553a2c1.8b1e9.0"
    assert parsed.mail_version == "3.7.11"
    assert parsed.tls_sni == ""  # not sent before 3.12: absent means empty


@pytest.mark.parametrize(
    ("data", "field", "expected"),
    [
        (req(sender=""), "sender", ""),
        (req(helo_name="a=b=c"), "helo_name", "a=b=c"),
        (req(sender="用户@例子.广告"), "sender", "用户@例子.广告"),
        (req(recipient="Jörg@bücher.example"), "recipient", "Jörg@bücher.example"),
        (
            req(ccert_subject="CN+3Dmail.example+2CO+3DACME"),
            "ccert_subject",
            "CN=mail.example,O=ACME",
        ),
        (req(ccert_issuer="CN+3Dm+C3+A9"), "ccert_issuer", "CN=mé"),
        (req(ccert_issuer="CN+3dlower"), "ccert_issuer", "CN=lower"),
        (req(ccert_fingerprint="AB:CD:EF"), "ccert_fingerprint", "AB:CD:EF"),
        (req(sasl_username="user+tag"), "sasl_username", "user+tag"),  # not xtext
        (b"sender=a@b.example\nrequest=smtpd_access_policy\n\n", "sender", "a@b.example"),
        (b"request=smtpd_access_policy\nhelo_name=cr\r\n\n", "helo_name", "cr\r"),
        (
            b"request=smtpd_access_policy\nsender=\xff\xfe@x.example\n\n",
            "sender",
            "\ufffd\ufffd@x.example",
        ),
    ],
)
def test_parse_values(data: bytes, field: str, expected: str) -> None:
    """Values: empty, with '=', raw UTF-8, xtext-decoded ccert_*, any order, CRLF, bad UTF-8."""
    assert getattr(parse_request(data), field) == expected


def test_unknown_attributes_are_kept_and_ignored() -> None:
    """Attributes from future Postfix versions go to ``unknown`` and do not disturb the rest."""
    parsed = parse_request(req(sender="a@b.example", future_thing="x", **{"dotted.name": "y"}))
    assert dict(parsed.unknown) == {"future_thing": "x", "dotted.name": "y"}
    assert parsed.sender == "a@b.example"


def test_request_value_semantics() -> None:
    """PolicyRequest is frozen, hashable, compares by value, and its unknown map is read-only."""
    first = parse_request(req(sender="a@b.example", x="1"))
    second = parse_request(req(x="1", sender="a@b.example"))
    assert first == second
    assert hash(first) == hash(second)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        first.sender = "c@d.example"  # type: ignore[misc]
    with pytest.raises(TypeError):
        first.unknown["x"] = "2"  # type: ignore[index]


def test_message_key() -> None:
    """The message key combines instance, client and sender, and is None without instance."""
    assert PolicyRequest().message_key is None
    a = PolicyRequest(instance="1.2.3", client_address="192.0.2.1", sender="a@b.example")
    b = PolicyRequest(
        instance="1.2.3", client_address="192.0.2.1", sender="a@b.example", recipient="z@q.example"
    )
    c = PolicyRequest(instance="1.2.3", client_address="192.0.2.2", sender="a@b.example")
    assert a.message_key == b.message_key
    assert a.message_key != c.message_key


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", ""), ("plain", "plain"), ("a+2Bb", "a+b"), ("+E6+97+A5", "日"), ("+ff", "\ufffd")],
)
def test_xtext_decode(text: str, expected: str) -> None:
    """xtext ``+XX`` escapes decode to UTF-8 text."""
    assert xtext_decode(text) == expected


# --------------------------------------------------------------------------- parser: malformed


SMALL = PolicyLimits(max_line_bytes=40, max_attributes=3, max_request_bytes=100)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"request=smtpd_access_policy\nnoequals\n\n", "missing_equals"),
        (b"request=smtpd_access_policy\n=value\n\n", "bad_name"),
        (b"request=smtpd_access_policy\nsp ace=1\n\n", "bad_name"),
        (b"request=smtpd_access_policy\nn\xc3\xa4me=1\n\n", "bad_name"),
        (b"request=smtpd_access_policy\nsender=a\x00b\n\n", "nul_byte"),
        (b"request=smtpd_access_policy\nsender=a\nsender=b\n\n", "duplicate_attribute"),
        (b"sender=a@b.example\n\n", "missing_request"),
        (b"\n", "missing_request"),
        (b"request=junk_policy\n\n", "unsupported_request"),
        (b"request=SMTPD_ACCESS_POLICY\n\n", "unsupported_request"),
        (b"request=smtpd_access_policy\nccert_subject=CN+3\n\n", "bad_xtext"),
        (b"request=smtpd_access_policy\nccert_issuer=+zz\n\n", "bad_xtext"),
        (b"request=smtpd_access_policy\nsender=a@b.example\n", "truncated"),
        (b"request=smtpd_access_policy", "truncated"),
        (b"", "truncated"),
        (b"request=smtpd_access_policy\n\nsender=x\n\n", "trailing_data"),
        (b"request=smtpd_access_policy\n\n\n", "trailing_data"),
        (b"request=smtpd_access_policy\r\nsender=x\r\n\r\n", "truncated"),  # CRLF: no end
    ],
)
def test_malformed(data: bytes, reason: str) -> None:
    """Each protocol violation is refused with its own reason code."""
    with pytest.raises(MalformedRequest) as info:
        parse_request(data)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"request=smtpd_access_policy\nx=" + b"a" * 39 + b"\n\n", "line_too_long"),
        (b"request=smtpd_access_policy\na=1\nb=2\nc=3\n\n", "too_many_attributes"),
        (
            b"request=smtpd_access_policy\na=" + b"1" * 37 + b"\nb=" + b"2" * 37 + b"\n\n",
            "request_too_large",
        ),
    ],
)
def test_limits_refuse(data: bytes, reason: str) -> None:
    """Going one past a limit (line, attribute count, request size) is refused."""
    with pytest.raises(MalformedRequest) as info:
        parse_request(data, limits=SMALL)
    assert info.value.reason == reason


def test_limits_boundaries_accepted() -> None:
    """Exactly at each limit is still accepted."""
    at_line = b"request=smtpd_access_policy\nx=" + b"a" * 38 + b"\n\n"
    assert parse_request(at_line, limits=SMALL).unknown["x"] == "a" * 38
    at_count = b"request=smtpd_access_policy\na=1\nb=2\n\n"
    assert len(parse_request(at_count, limits=SMALL).unknown) == 2
    at_size = b"request=smtpd_access_policy\na=" + b"1" * 37 + b"\nb=" + b"2" * 29 + b"\n\n"
    assert len(at_size) - 1 == 100
    assert parse_request(at_size, limits=SMALL).unknown["b"] == "2" * 29


def test_malformed_error_contract() -> None:
    """MalformedRequest is a DomainPolicyError and ValueError, names the value and pickles."""
    with pytest.raises(MalformedRequest) as info:
        parse_request(b"request=smtpd_access_policy\nnoequals\n\n")
    exc = info.value
    assert isinstance(exc, DomainPolicyError)
    assert isinstance(exc, ValueError)
    assert "b'noequals'" in str(exc)
    assert "[missing_equals]" in str(exc)
    again = pickle.loads(pickle.dumps(exc))
    assert (again.reason, again.value, str(again)) == (exc.reason, exc.value, str(exc))


def test_limits_validate() -> None:
    """Limits and settings must be positive; the fallback must be a clean single line."""
    with pytest.raises(InvalidConfiguration, match="max_line_bytes"):
        PolicyLimits(max_line_bytes=0)
    with pytest.raises(InvalidConfiguration, match="request_timeout"):
        ServerSettings(request_timeout=0)
    with pytest.raises(InvalidConfiguration, match="fallback_action"):
        ServerSettings(fallback_action="451 4.3.0 a\naction=OK")
    with pytest.raises(InvalidConfiguration, match="fallback_action"):
        ServerSettings(fallback_action="")


# --------------------------------------------------------------------------- actions and addresses


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("DUNNO", "DUNNO"),
        (REJECT_TEXT, REJECT_TEXT),
        ("DUNNO\n\naction=OK", "DUNNO action=OK"),
        ("550 5.7.1 a\r\n550 5.7.1 b", "550 5.7.1 a 550 5.7.1 b"),
        ("OK\x00\x00", "OK"),
        ("  REJECT\ttabs  ", "REJECT tabs"),
        ("550 5.7.1 Jörg", "550 5.7.1 J rg"),
        ("DEFER\u2028x\x85y", "DEFER x y"),
        ("\n\r\x00", ""),
    ],
)
def test_sanitize_action(text: str, expected: str) -> None:
    """Action text becomes one line of printable ASCII: no CR, LF, NUL or other controls."""
    assert sanitize_action(text) == expected


def test_sanitize_action_bounds_length() -> None:
    """Action text is cut to the configured length."""
    assert sanitize_action("550 5.7.1 " + "x" * 1000, max_chars=50) == "550 5.7.1 " + "x" * 40


@pytest.mark.parametrize(
    ("action", "expected"),
    [
        ("DUNNO", "dunno"),
        ("dunno", "dunno"),
        ("OK", "ok"),
        ("REJECT no", "reject"),
        ("DEFER_IF_PERMIT x", "defer_if_permit"),
        (REJECT_TEXT, "5xx"),
        (DEFAULT_FALLBACK_ACTION, "4xx"),
        ("250 fine", "2xx"),
        ("999 what", "other"),
        ("frobnicate", "other"),
        ("", "other"),
    ],
)
def test_action_class(action: str, expected: str) -> None:
    """Actions are counted by a bounded set of classes."""
    assert action_class(action) == expected
    assert expected in ACTION_CLASSES


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:10040", ListenAddress(host="127.0.0.1", port=10040)),
        ("inet:127.0.0.1:0", ListenAddress(host="127.0.0.1", port=0)),
        ("[::1]:10040", ListenAddress(host="::1", port=10040)),
        ("unix:/run/policy.sock", ListenAddress(path="/run/policy.sock")),
    ],
)
def test_parse_listen_address(text: str, expected: ListenAddress) -> None:
    """Listen addresses: host:port, inet:host:port, [v6]:port and unix:/path."""
    assert parse_listen_address(text) == expected
    assert str(expected).removeprefix("inet:") in text


@pytest.mark.parametrize(
    "text", ["localhost:10040", "127.0.0.1", "127.0.0.1:99999", "127.0.0.1:x", "unix:rel", "[::1]"]
)
def test_parse_listen_address_refuses(text: str) -> None:
    """Bad listen addresses are refused, naming the value."""
    with pytest.raises(InvalidConfiguration) as info:
        parse_listen_address(text)
    assert repr(text) in str(info.value)


# --------------------------------------------------------------------------- server: conversations


def test_pipelined_requests_on_one_connection() -> None:
    """Several requests written at once on one connection get their replies in order."""

    async def scenario() -> list[str]:
        server, port = await start(by_sender)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                req(sender="a@good.example", instance="1")
                + req(sender="x@bad.example", instance="2")
                + req(sender="b@good.example", instance="3")
            )
            await writer.drain()
            replies = [await reader.readuntil(b"\n\n") for _ in range(3)]
            writer.close()
            await writer.wait_closed()
            return [r.decode() for r in replies]
        finally:
            await server.close()

    assert run(scenario()) == ["action=DUNNO\n\n", f"action={REJECT_TEXT}\n\n", "action=DUNNO\n\n"]


def test_connection_reused_for_many_requests() -> None:
    """One connection carries request after request, each answered before the next is sent."""

    async def scenario() -> PolicyMetrics:
        server, port = await start(by_sender)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for i in range(50):
                sender = "x@bad.example" if i % 2 else "a@good.example"
                writer.write(req(sender=sender, instance=str(i)))
                reply = await reader.readuntil(b"\n\n")
                expected = REJECT_TEXT if i % 2 else "DUNNO"
                assert reply == f"action={expected}\n\n".encode()
            writer.close()
            await writer.wait_closed()
            return server.metrics
        finally:
            await server.close()

    metrics = run(scenario())
    assert metrics.requests == 50
    assert metrics.actions["dunno"] == 25
    assert metrics.actions["5xx"] == 25
    assert metrics.connections == 1


def test_concurrent_connections_are_served_concurrently() -> None:
    """Handlers for many connections run at the same time (all are in flight before any answers)."""
    clients = 20

    async def scenario() -> list[bytes]:
        in_flight = 0
        all_in = asyncio.Event()

        async def barrier(request: PolicyRequest) -> str:
            nonlocal in_flight
            in_flight += 1
            if in_flight == clients:
                all_in.set()
            await all_in.wait()
            return f"REJECT {request.instance}"

        server, port = await start(barrier)
        try:

            async def client(n: int) -> bytes:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(req(instance=f"i{n}"))
                reply = await reader.readuntil(b"\n\n")
                writer.close()
                await writer.wait_closed()
                return reply

            return await asyncio.gather(*(client(n) for n in range(clients)))
        finally:
            await server.close()

    assert run(scenario()) == [f"action=REJECT i{n}\n\n".encode() for n in range(clients)]


@pytest.mark.parametrize(
    "payload",
    [
        b"garbage\n\n",
        b"request=smtpd_access_policy\nsender=a\x00b\n\n",
        b"request=other\n\n",
        b"\n",
        b"request=smtpd_access_policy\n" + b"x=" + b"a" * 10000 + b"\n\n",
        b"request=smtpd_access_policy\n" + b"a" * 100000,
        b"request=smtpd_access_policy\nsender=half",
    ],
)
def test_malformed_gets_no_reply_and_disconnect(
    payload: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """A malformed, oversize or truncated request gets no reply; the server logs and disconnects."""

    async def scenario() -> tuple[bytes, PolicyMetrics]:
        server, port = await start(dunno)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(payload)
                await writer.drain()
                if not payload.endswith(b"\n\n") and payload != b"\n":
                    writer.write_eof()
            except ConnectionError:
                pass
            out = await read_to_eof(reader)
            writer.close()
            return out, server.metrics
        finally:
            await server.close()

    with caplog.at_level(logging.WARNING, logger="domainpolicy.integrations.postfix"):
        out, metrics = run(scenario())
    assert out == b""
    assert sum(metrics.malformed.values()) == 1
    assert metrics.requests == 0
    assert any("disconnecting without reply" in r.getMessage() for r in caplog.records)


def test_malformed_after_valid_requests() -> None:
    """Replies already due are sent; the malformed request that follows ends the connection."""

    async def scenario() -> bytes:
        server, port = await start(dunno)
        try:
            return await send_and_close(port, req(instance="1") + req(instance="2") + b"bad\n\n")
        finally:
            await server.close()

    assert split_replies(run(scenario())) == ["DUNNO", "DUNNO"]


def test_limits_apply_over_the_socket() -> None:
    """The server enforces the configured limits (too many attributes -> disconnect)."""

    async def scenario() -> tuple[bytes, PolicyMetrics]:
        server, port = await start(dunno, limits=SMALL)
        try:
            out = await send_and_close(port, req(a="1") + req(a="1", b="2", c="3"))
            return out, server.metrics
        finally:
            await server.close()

    out, metrics = run(scenario())
    assert split_replies(out) == ["DUNNO"]
    assert metrics.malformed == {"too_many_attributes": 1}


def test_handler_exception_answers_fallback(caplog: pytest.LogCaptureFixture) -> None:
    """A handler that raises gets the fallback action (logged); the connection stays usable."""

    async def flaky(request: PolicyRequest) -> str:
        if request.instance == "boom":
            raise RuntimeError("store exploded")
        return "DUNNO"

    async def scenario() -> tuple[bytes, PolicyMetrics]:
        server, port = await start(flaky)
        try:
            out = await send_and_close(port, req(instance="boom") + req(instance="fine"))
            return out, server.metrics
        finally:
            await server.close()

    with caplog.at_level(logging.ERROR, logger="domainpolicy.integrations.postfix"):
        out, metrics = run(scenario())
    assert split_replies(out) == [DEFAULT_FALLBACK_ACTION, "DUNNO"]
    assert metrics.handler_errors == 1
    assert metrics.actions["4xx"] == 1
    assert any(r.exc_info and "store exploded" in str(r.exc_info[1]) for r in caplog.records)


@pytest.mark.parametrize("bad", [None, 550, b"DUNNO", "", "\r\n"])
def test_handler_bad_return_answers_fallback(bad: object) -> None:
    """A handler returning a non-string or nothing printable gets the fallback action."""

    async def broken(_request: PolicyRequest) -> Any:
        return bad

    async def scenario() -> bytes:
        server, port = await start(broken, fallback_action="451 4.3.0 try later")
        try:
            return await send_and_close(port, req(instance="1"))
        finally:
            await server.close()

    assert split_replies(run(scenario())) == ["451 4.3.0 try later"]


def test_handler_timeout_answers_fallback() -> None:
    """A handler that never answers gets the fallback action after the request timeout."""

    async def scenario() -> tuple[bytes, PolicyMetrics, bool]:
        cancelled = False

        async def stuck(_request: PolicyRequest) -> str:
            nonlocal cancelled
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled = True
                raise
            return "DUNNO"

        server, port = await start(stuck, request_timeout=0.05)
        try:
            out = await send_and_close(port, req(instance="1") + req(instance="2"))
            return out, server.metrics, cancelled
        finally:
            await server.close()

    out, metrics, cancelled = run(scenario())
    assert split_replies(out) == [DEFAULT_FALLBACK_ACTION, DEFAULT_FALLBACK_ACTION]
    assert metrics.timeouts == 2
    assert cancelled


def test_handler_own_timeout_error_is_an_error_not_a_timeout() -> None:
    """A TimeoutError raised by the handler itself counts as a handler error."""

    async def raises_timeout(_request: PolicyRequest) -> str:
        raise TimeoutError("redis read timed out")

    async def scenario() -> PolicyMetrics:
        server, port = await start(raises_timeout)
        try:
            await send_and_close(port, req())
            return server.metrics
        finally:
            await server.close()

    metrics = run(scenario())
    assert (metrics.timeouts, metrics.handler_errors) == (0, 1)


@pytest.mark.parametrize(
    "evil",
    [
        "DUNNO\n\naction=OK",
        "DUNNO\naction=OK\n",
        "550 5.7.1 no\r\n\r\naction=OK\r\n\r\n",
        "OK\x00action=REJECT",
        "REJECT " + "A" * 5000,
    ],
)
def test_action_injection_is_neutralised(evil: str) -> None:
    """Whatever a handler returns, each request gets exactly one single-line reply."""

    async def injector(request: PolicyRequest) -> str:
        return evil if request.instance == "evil" else "DUNNO"

    async def scenario() -> tuple[bytes, PolicyMetrics]:
        server, port = await start(injector)
        try:
            out = await send_and_close(port, req(instance="evil") + req(instance="ok"))
            return out, server.metrics
        finally:
            await server.close()

    out, metrics = run(scenario())
    replies = split_replies(out)
    assert len(replies) == 2
    assert replies[0] == sanitize_action(evil)
    assert len(replies[0]) <= 400
    assert replies[1] == "DUNNO"
    assert metrics.sanitised == 1


def test_idle_connection_is_closed() -> None:
    """A connection idle longer than the idle timeout is closed without a reply."""

    async def scenario() -> bytes:
        server, port = await start(dunno, idle_timeout=0.05)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            out = await read_to_eof(reader)
            writer.close()
            return out
        finally:
            await server.close()

    assert run(scenario()) == b""


def test_slow_request_is_dropped() -> None:
    """A request not completed within the read timeout is malformed: no reply, disconnect."""

    async def scenario() -> tuple[bytes, PolicyMetrics]:
        server, port = await start(dunno, read_timeout=0.05)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"request=smtpd_access_policy\n")
            out = await read_to_eof(reader)
            writer.close()
            return out, server.metrics
        finally:
            await server.close()

    out, metrics = run(scenario())
    assert out == b""
    assert metrics.malformed == {"read_timeout": 1}


def test_connection_limit() -> None:
    """Connections beyond max_connections are closed at once and counted."""

    async def scenario() -> tuple[bytes, bytes, PolicyMetrics]:
        server, port = await start(dunno, max_connections=1)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(req())
            first = await reader.readuntil(b"\n\n")
            second = await send_and_close(port, req())
            writer.close()
            await writer.wait_closed()
            return first, second, server.metrics
        finally:
            await server.close()

    first, second, metrics = run(scenario())
    assert first == b"action=DUNNO\n\n"
    assert second == b""
    assert metrics.connections_refused == 1


def test_graceful_shutdown_lets_in_flight_request_finish() -> None:
    """close() stops accepting, drops idle connections and lets an in-flight request answer."""

    async def scenario() -> tuple[bytes, bytes, type[BaseException] | None]:
        started = asyncio.Event()
        release = asyncio.Event()

        async def slow(_request: PolicyRequest) -> str:
            started.set()
            await release.wait()
            return "DUNNO"

        server, port = await start(slow, request_timeout=SAFETY)
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(req(instance="in-flight"))
        await started.wait()
        closing = asyncio.create_task(server.close())
        idle_out = await read_to_eof(idle_reader)  # idle connection: closed, no reply
        refused: type[BaseException] | None = None
        try:
            _r, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
        except OSError as exc:
            refused = type(exc)
        assert not closing.done()
        release.set()
        busy_out = await read_to_eof(reader)
        await closing
        idle_writer.close()
        writer.close()
        return idle_out, busy_out, refused

    idle_out, busy_out, refused = run(scenario())
    assert idle_out == b""
    assert busy_out == b"action=DUNNO\n\n"
    assert refused is not None
    assert issubclass(refused, ConnectionRefusedError)


def test_shutdown_grace_cancels_stuck_requests() -> None:
    """Requests still running after the grace period are cancelled; close() returns."""

    async def scenario() -> bytes:
        started = asyncio.Event()

        async def stuck(_request: PolicyRequest) -> str:
            started.set()
            await asyncio.Event().wait()
            return "DUNNO"

        server, port = await start(stuck, request_timeout=SAFETY)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(req())
        await started.wait()
        await server.close(grace=0.05)
        out = await read_to_eof(reader)
        writer.close()
        return out

    assert run(scenario()) == b""


def test_unix_socket_server(tmp_path: Path) -> None:
    """The server listens on a UNIX socket, replaces a stale one and removes it on close."""
    path = tmp_path / "policy.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on

    async def scenario() -> bytes:
        server = PolicyServer(by_sender)
        await server.start(f"unix:{path}")
        try:
            assert server.address == ListenAddress(path=str(path))
            assert oct(path.stat().st_mode & 0o777) == oct(0o660)
            reader, writer = await asyncio.open_unix_connection(str(path))
            writer.write(req(sender="x@bad.example"))
            reply = await reader.readuntil(b"\n\n")
            writer.close()
            await writer.wait_closed()
            return reply
        finally:
            await server.close()

    assert run(scenario()) == f"action={REJECT_TEXT}\n\n".encode()
    assert not path.exists()


def _socket_groups() -> list[int | str]:
    """Groups this process may give a socket to: its own gid; as root also ``nogroup``."""
    import grp

    groups: list[int | str] = [os.getgid()]
    if os.geteuid() == 0:
        try:
            grp.getgrnam("nogroup")
        except KeyError:
            pass
        else:
            groups.append("nogroup")
    return groups


@pytest.mark.parametrize("group", _socket_groups())
def test_unix_socket_mode_and_group(tmp_path: Path, group: int | str) -> None:
    """unix_socket_mode and unix_socket_group set the bound socket's mode and group."""
    import grp

    path = tmp_path / "policy.sock"
    gid = group if isinstance(group, int) else grp.getgrnam(group).gr_gid
    settings = ServerSettings(unix_socket_mode=0o666, unix_socket_group=group)

    async def scenario() -> os.stat_result:
        server = PolicyServer(dunno, settings=settings)
        await server.start(f"unix:{path}")
        try:
            return path.stat()
        finally:
            await server.close()

    info = run(scenario())
    assert oct(info.st_mode & 0o777) == oct(0o666)
    assert info.st_gid == gid
    assert not path.exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"unix_socket_mode": 0o1777}, "unix_socket_mode must be permission bits"),
        ({"unix_socket_mode": -1}, "unix_socket_mode must be permission bits"),
        ({"unix_socket_group": "no-such-group-here"}, "'no-such-group-here' does not exist"),
        ({"unix_socket_group": -3}, "is not a gid"),
        ({"unix_socket_group": 1.5}, "must be a name or a gid"),
    ],
)
def test_unix_socket_settings_are_validated(options: dict[str, Any], message: str) -> None:
    """A bad socket mode or an unknown group is one InvalidConfiguration."""
    with pytest.raises(InvalidConfiguration, match=message):
        ServerSettings(**options)


@contextlib.contextmanager
def _not_root() -> Iterator[Path]:
    """A fresh directory, with the effective user and group ``nobody`` inside the block when we
    are root (restored after), so that giving a socket to group 0 is refused as it is for any
    other user."""
    directory = Path(tempfile.mkdtemp(prefix="dp-not-root-"))
    try:
        if os.geteuid() != 0:
            yield directory
            return
        nobody = pwd.getpwnam("nobody")
        directory.chmod(0o777)
        os.setegid(nobody.pw_gid)
        os.seteuid(nobody.pw_uid)
        try:
            yield directory
        finally:
            os.seteuid(0)
            os.setegid(0)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_unix_socket_group_not_allowed_is_refused() -> None:
    """A group the server may not give the socket to: InvalidConfiguration, no socket left."""
    settings = ServerSettings(unix_socket_group=0)  # root's group; we are not root

    async def scenario(path: Path) -> None:
        server = PolicyServer(dunno, settings=settings)
        with pytest.raises(InvalidConfiguration, match="cannot set the group 0"):
            await server.start(f"unix:{path}")
        await server.close()
        assert not path.exists()

    with _not_root() as directory:
        run(scenario(directory / "policy.sock"))


def test_unix_socket_in_use_is_refused(tmp_path: Path) -> None:
    """Starting on a UNIX socket a live server owns is refused; a non-socket file too."""
    path = tmp_path / "policy.sock"
    plain = tmp_path / "plain"
    plain.write_text("x")

    async def scenario() -> None:
        first = PolicyServer(dunno)
        await first.start(f"unix:{path}")
        try:
            with pytest.raises(InvalidConfiguration, match="another server"):
                await PolicyServer(dunno).start(f"unix:{path}")
            with pytest.raises(InvalidConfiguration, match="not a socket"):
                await PolicyServer(dunno).start(f"unix:{plain}")
        finally:
            await first.close()

    run(scenario())


def test_reload_hook_and_handler_swap(caplog: pytest.LogCaptureFixture) -> None:
    """reload() runs the hook (failures logged and counted); set_handler swaps atomically."""

    async def scenario() -> tuple[list[bool], bytes, PolicyMetrics]:
        calls = 0

        async def hook() -> None:
            nonlocal calls
            calls += 1
            if calls == 2:
                raise InvalidConfiguration(["tenants.toml: bad"])

        server = PolicyServer(dunno, reload_hook=hook, settings=ServerSettings())
        await server.start("127.0.0.1:0")
        try:
            results = [await server.reload(), await server.reload()]

            async def reject_all(_request: PolicyRequest) -> str:
                return "REJECT swapped"

            server.set_handler(reject_all)
            port = server.address.port
            assert port is not None
            out = await send_and_close(port, req())
            return results, out, server.metrics
        finally:
            await server.close()

    with caplog.at_level(logging.ERROR, logger="domainpolicy.integrations.postfix"):
        results, out, metrics = run(scenario())
    assert results == [True, False]
    assert (metrics.reloads, metrics.reload_failures) == (1, 1)
    assert split_replies(out) == ["REJECT swapped"]
    assert any("reload failed" in r.getMessage() for r in caplog.records)


def test_signal_handlers_call_back() -> None:
    """SIGHUP calls the reload callback and SIGTERM the shutdown callback (async ones awaited)."""

    async def scenario() -> list[str]:
        seen: list[str] = []
        done = asyncio.Event()

        def on_reload() -> None:
            seen.append("reload")

        async def on_shutdown() -> None:
            seen.append("shutdown")
            done.set()

        remove = install_signal_handlers(asyncio.get_running_loop(), on_reload, on_shutdown)
        try:
            os.kill(os.getpid(), signal.SIGHUP)
            os.kill(os.getpid(), signal.SIGTERM)
            await done.wait()
        finally:
            remove()
        return seen

    assert run(scenario()) == ["reload", "shutdown"]


def test_one_log_line_per_request_with_handler_fields(caplog: pytest.LogCaptureFixture) -> None:
    """Each request logs one INFO line with request fields, handler fields and the outcome."""

    async def annotating(request: PolicyRequest) -> str:
        annotate(tenant="t-1", verdict="blocked", note='say "hi"')
        return REJECT_TEXT

    async def scenario() -> None:
        server, port = await start(annotating)
        try:
            await send_and_close(port, req(sender="x@bad.example", instance="42"))
        finally:
            await server.close()

    with caplog.at_level(logging.INFO, logger="domainpolicy.integrations.postfix"):
        run(scenario())
    lines = [r for r in caplog.records if r.getMessage().startswith("policy conn=")]
    assert len(lines) == 1
    message = lines[0].getMessage()
    assert "instance=42" in message
    assert "sender=x@bad.example" in message
    assert "tenant=t-1" in message
    assert 'note="say \\"hi\\""' in message
    assert f'action="{REJECT_TEXT}"' in message
    fields = lines[0].policy  # type: ignore[attr-defined]
    assert fields["verdict"] == "blocked"
    assert fields["outcome"] == "ok"
    annotate(ignored=True)  # outside a request: a no-op


# --------------------------------------------------------------------------- metrics


def test_metrics_rendering() -> None:
    """The Prometheus exposition holds counters, action classes and a cumulative histogram."""
    metrics = PolicyMetrics()
    metrics.observe("DUNNO", 0.0002)
    metrics.observe(REJECT_TEXT, 0.003)
    metrics.observe(DEFAULT_FALLBACK_ACTION, 7.0)
    metrics.count_malformed("bad_name")
    metrics.timeouts += 1
    text = metrics.render_prometheus()
    lines = text.splitlines()
    assert "domainpolicy_policy_requests_total 3.0" in lines
    assert "# TYPE domainpolicy_policy_requests_total counter" in lines
    assert 'domainpolicy_policy_actions_total{class="dunno"} 1.0' in lines
    assert 'domainpolicy_policy_actions_total{class="5xx"} 1.0' in lines
    assert 'domainpolicy_policy_actions_total{class="4xx"} 1.0' in lines
    assert 'domainpolicy_policy_actions_total{class="other"} 0.0' in lines
    assert 'domainpolicy_policy_malformed_total{reason="bad_name"} 1.0' in lines
    assert "domainpolicy_policy_timeouts_total 1.0" in lines
    assert "# TYPE domainpolicy_policy_connections_active gauge" in lines
    assert 'domainpolicy_policy_request_duration_seconds_bucket{le="0.0005"} 1.0' in lines
    assert 'domainpolicy_policy_request_duration_seconds_bucket{le="0.005"} 2.0' in lines
    assert 'domainpolicy_policy_request_duration_seconds_bucket{le="5.0"} 2.0' in lines
    assert 'domainpolicy_policy_request_duration_seconds_bucket{le="+Inf"} 3.0' in lines
    assert "domainpolicy_policy_request_duration_seconds_count 3.0" in lines
    assert text.endswith("\n")
    for line in lines:
        if not line.startswith("#"):
            name_and_labels, value = line.rsplit(" ", 1)
            float(value)
            assert name_and_labels.startswith("domainpolicy_policy_")
    openmetrics = metrics.render_openmetrics()
    assert "domainpolicy_policy_requests_total 3.0" in openmetrics.splitlines()
    assert openmetrics.endswith("# EOF\n")
    snapshot = metrics.snapshot()
    assert snapshot["requests"] == 3
    assert snapshot["actions"] == {"dunno": 1, "5xx": 1, "4xx": 1}


def test_metrics_registries_are_separate() -> None:
    """Each PolicyMetrics has its own registry, not prometheus_client's global one."""
    import prometheus_client

    first, second = PolicyMetrics(), PolicyMetrics()
    first.observe("DUNNO", 0.001)
    assert first.registry is not second.registry
    assert first.registry is not prometheus_client.REGISTRY
    assert "domainpolicy_policy_requests_total 1.0" in first.render_prometheus()
    assert "domainpolicy_policy_requests_total 0.0" in second.render_prometheus()
    assert b"domainpolicy_policy" not in prometheus_client.generate_latest()


def test_metrics_exposition_without_prometheus_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the extra the counters count; the exposition names the extra to install."""
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    metrics = PolicyMetrics()
    metrics.observe("DUNNO", 0.001)
    assert metrics.snapshot()["requests"] == 1
    with pytest.raises(InvalidConfiguration, match=r"pip install 'domainpolicy\[metrics\]'"):
        metrics.render_prometheus()


def test_metrics_buckets_validate() -> None:
    """Histogram buckets must be strictly increasing."""
    with pytest.raises(InvalidConfiguration):
        PolicyMetrics(buckets=(0.1, 0.1))


def test_metrics_endpoint_over_http() -> None:
    """GET /metrics on loopback serves the Prometheus text format, or OpenMetrics when the
    Accept header asks for it; other paths and methods are refused."""
    import urllib.error
    import urllib.request

    def http(url: str, accept: str | None = None, method: str = "GET") -> tuple[int, str, str]:
        request = urllib.request.Request(url, method=method)
        if accept is not None:
            request.add_header("Accept", accept)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.headers["Content-Type"], response.read().decode()
        except urllib.error.HTTPError as exc:
            exc.close()
            return exc.code, "", ""

    async def scenario() -> list[tuple[int, str, str]]:
        server, port = await start(dunno)
        try:
            endpoint = await server.start_metrics("127.0.0.1", 0)
            await send_and_close(port, req())
            base = f"http://127.0.0.1:{endpoint.port}"
            return [
                await asyncio.to_thread(http, f"{base}/metrics"),
                await asyncio.to_thread(
                    http, f"{base}/metrics", "application/openmetrics-text; version=1.0.0"
                ),
                await asyncio.to_thread(http, f"{base}/"),
                await asyncio.to_thread(http, f"{base}/metrics", None, "POST"),
            ]
        finally:
            await server.close()

    text, openmetrics, missing, post = run(scenario())
    assert text[0] == 200
    assert text[1].startswith("text/plain; version=0.0.4")
    assert "domainpolicy_policy_requests_total 1.0" in text[2].splitlines()
    assert "# EOF" not in text[2]
    assert openmetrics[0] == 200
    assert openmetrics[1].startswith("application/openmetrics-text")
    assert "domainpolicy_policy_requests_total 1.0" in openmetrics[2].splitlines()
    assert openmetrics[2].endswith("# EOF\n")
    assert missing[0] == 404
    assert post[0] == 405


def test_metrics_endpoint_refuses_non_loopback() -> None:
    """The metrics endpoint refuses to bind anything but a loopback address."""

    async def scenario() -> None:
        server = PolicyServer(dunno)
        with pytest.raises(InvalidConfiguration, match="loopback"):
            await server.start_metrics("0.0.0.0", 0)
        with pytest.raises(InvalidConfiguration, match="not an IP"):
            await server.start_metrics("localhost", 0)

    run(scenario())


# --------------------------------------------------------------------------- instance cache


class FakeClock:
    """A settable clock for TTL tests."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_instance_cache_ttl_and_lru() -> None:
    """Entries expire after the TTL and the least recently used entry is evicted first."""
    clock = FakeClock()
    cache: InstanceCache[str] = InstanceCache(maxsize=2, ttl=10.0, clock=clock)
    cache.put("a", "A")
    cache.put("b", "B")
    assert cache.get("a") == "A"  # a is now most recently used
    cache.put("c", "C")
    assert cache.get("b") is None  # evicted
    assert (cache.get("a"), cache.get("c"), len(cache)) == ("A", "C", 2)
    clock.now = 10.0
    assert cache.get("a") is None
    assert len(cache) == 1


def test_instance_cache_validates() -> None:
    """Size and TTL must be positive."""
    with pytest.raises(InvalidConfiguration):
        InstanceCache(maxsize=0)
    with pytest.raises(InvalidConfiguration):
        InstanceCache(ttl=0)


def test_instance_cache_counts_once_per_message() -> None:
    """Every recipient of one message gets the first decision; the decision is made once."""

    async def scenario() -> tuple[list[str], int]:
        cache: InstanceCache[str] = InstanceCache()
        decisions = 0

        async def decide(request: PolicyRequest) -> str:
            nonlocal decisions
            decisions += 1
            return REJECT_TEXT if decisions > 1 else "DUNNO"  # a second count would flip it

        async def handler(request: PolicyRequest) -> str:
            key = request.message_key
            assert key is not None
            return await cache.get_or_compute(key, lambda: decide(request))

        server, port = await start(handler)
        try:
            out = await send_and_close(
                port,
                b"".join(
                    req(instance="m1", sender="a@x.example", recipient=f"r{i}@y.example")
                    for i in range(5)
                ),
            )
            return split_replies(out), decisions
        finally:
            await server.close()

    replies, decisions = run(scenario())
    assert replies == ["DUNNO"] * 5
    assert decisions == 1


def test_instance_cache_shares_concurrent_computation() -> None:
    """Concurrent callers with one key share one computation."""

    async def scenario() -> tuple[list[str], int]:
        cache: InstanceCache[str] = InstanceCache()
        calls = 0
        release = asyncio.Event()

        async def compute() -> str:
            nonlocal calls
            calls += 1
            await release.wait()
            return "DUNNO"

        tasks = [asyncio.create_task(cache.get_or_compute("k", compute)) for _ in range(5)]
        await asyncio.sleep(0)
        release.set()
        return list(await asyncio.gather(*tasks)), calls

    assert run(scenario()) == (["DUNNO"] * 5, 1)


def test_instance_cache_does_not_cache_failures() -> None:
    """A failed or cancelled computation is not cached; waiters compute again."""

    async def scenario() -> tuple[str, str, int]:
        cache: InstanceCache[str] = InstanceCache()
        calls = 0
        release = asyncio.Event()

        async def failing() -> str:
            nonlocal calls
            calls += 1
            await release.wait()
            raise ConnectionError("store down")

        async def working() -> str:
            nonlocal calls
            calls += 1
            return "DUNNO"

        first = asyncio.create_task(cache.get_or_compute("k", failing))
        second = asyncio.create_task(cache.get_or_compute("k", working))
        await asyncio.sleep(0)
        release.set()
        with pytest.raises(ConnectionError):
            await first
        waited = await second  # retried with its own computation
        blocker = asyncio.create_task(cache.get_or_compute("j", lambda: asyncio.Event().wait()))  # type: ignore[arg-type, return-value]
        await asyncio.sleep(0)
        blocker.cancel()
        with pytest.raises(asyncio.CancelledError):
            await blocker
        after_cancel = await cache.get_or_compute("j", working)
        return waited, after_cancel, calls

    assert run(scenario()) == ("DUNNO", "DUNNO", 3)


# --------------------------------------------------------------------------- robustness


@given(
    chunks=st.lists(
        st.one_of(
            st.binary(max_size=200),
            st.sampled_from(
                [
                    b"request=smtpd_access_policy\n",
                    b"sender=a@b.example\n",
                    b"\n",
                    b"=",
                    b"\x00",
                    b"\r\n",
                    b"ccert_subject=+4",
                    b"x" * 5000,
                ]
            ),
        ),
        max_size=8,
    )
)
def test_arbitrary_bytes_never_crash_the_server(chunks: list[bytes]) -> None:
    """Any byte stream gets only well-formed replies then a close, and the server keeps serving."""
    payload = b"".join(chunks)

    async def scenario() -> tuple[bytes, bytes]:
        server, port = await start(dunno)
        try:
            out = await send_and_close(port, payload)
            after = await send_and_close(port, req())
            return out, after
        finally:
            await server.close()

    out, after = run(scenario())
    assert all(r == "DUNNO" for r in split_replies(out))
    assert after == b"action=DUNNO\n\n"


# --------------------------------------------------------------------------- relay policy adapter


def relay_policy(**options: Any) -> RelayPolicy:
    """A policy: contoso owns contoso.example, loopback clients are contoso's connector; the
    9th distinct unregistered domain in the hour blocks the tenant."""
    matcher = DomainMatcher.compile([AcceptedDomain("contoso.example", "contoso")])
    connectors = ConnectorTable.compile(
        [InboundConnector("onprem", "contoso", sender_ip_ranges=("127.0.0.0/8",))], matcher
    )
    options.setdefault("store", MemoryStore())
    return RelayPolicy(
        matcher, connectors, BlockPolicy(message_limit=20, domain_limit=8), **options
    )


def rcpt(sender: str, recipient: str = "bob@dest.example", **attributes: str) -> PolicyRequest:
    """A RCPT-time request from a loopback client."""
    fields: dict[str, Any] = {
        "protocol_state": "RCPT",
        "client_address": "127.0.0.1",
        "instance": "m1",
    }
    fields.update(attributes)
    return PolicyRequest(sender=sender, recipient=recipient, **fields)


def ask(handler: PostfixHandler, *requests: PolicyRequest) -> list[str]:
    """Answer *requests* in order with *handler*."""

    async def scenario() -> list[str]:
        return [await handler(request) for request in requests]

    return run(scenario())


def test_make_handler_decides_once_per_message() -> None:
    """Every recipient of one message gets the first decision; the message counts once."""
    policy = relay_policy()
    handler = make_handler(policy)
    recipients = [rcpt("x@spam.example", f"r{i}@dest.example") for i in range(30)]
    assert ask(handler, *recipients) == ["DUNNO"] * 30
    status = policy.status("contoso")
    assert (status.total, status.unregistered) == (1, 1)


def test_make_handler_counts_recipients_when_configured() -> None:
    """With count="recipients" each recipient of a message counts once (a repeat does not)."""
    policy = relay_policy(count="recipients")
    handler = make_handler(policy)
    asked = [rcpt("x@spam.example", f"r{i}@dest.example") for i in (0, 1, 2, 0)]
    assert ask(handler, *asked) == ["DUNNO"] * 4
    assert policy.status("contoso").unregistered == 3


def test_make_handler_blocks_with_one_line_reply() -> None:
    """Past the limit the action is the 5.7.750 reply on one line; registered mail passes."""
    policy = relay_policy()
    handler = make_handler(policy)
    spam = [rcpt(f"x@spam{i}.example", instance=f"m{i}") for i in range(10)]
    answers = ask(handler, *spam, rcpt("alice@contoso.example", instance="ok"))
    assert answers == ["DUNNO"] * 8 + [REJECT_TEXT] * 2 + ["DUNNO"]


def test_make_handler_flattens_multi_line_replies() -> None:
    """A multi-line tenant reply becomes one line that leaves room for Postfix's prefix."""
    replies = ReplyCatalog.from_mapping(
        {"tenants": {"contoso": {"5.7.750": "{default}\n" + "See https://example.net/" * 40}}}
    )
    policy = relay_policy(replies=replies)
    policy.block("contoso", by="ops", reason="test")
    (action,) = ask(make_handler(policy), rcpt("x@spam.example"))
    assert action.startswith(REJECT_TEXT + ". See https://example.net/")
    assert action.endswith("...")
    assert "\n" not in action
    assert len(action) + POSTFIX_REJECT_RESERVE + 2 <= 512


@pytest.mark.parametrize("state", ["CONNECT", "EHLO", "HELO", "VRFY", "ETRN"])
def test_make_handler_skips_states_without_envelope(state: str) -> None:
    """Before MAIL there is nothing to decide: DUNNO, nothing counted."""
    policy = relay_policy()
    assert ask(make_handler(policy), rcpt("x@spam.example", protocol_state=state)) == ["DUNNO"]
    assert policy.store.tenants() == []


@pytest.mark.parametrize("state", ["", "rcpt", "Rcpt", "BDAT", "NOT-A-STATE"])
def test_make_handler_decides_missing_or_unknown_states(state: str) -> None:
    """A missing or unknown protocol_state is no way around the counting: it is decided."""
    policy = relay_policy()
    assert ask(make_handler(policy), rcpt("x@spam.example", protocol_state=state)) == ["DUNNO"]
    status = policy.status("contoso")
    assert (status.total, status.unregistered) == (1, 1)


def test_make_handler_refuses_a_sender_that_was_not_utf8() -> None:
    """Octets that were not UTF-8 in the sender (U+FFFD after parsing) are a bad sender, not
    an SMTPUTF8 address to accept."""
    request = parse_request(
        b"request=smtpd_access_policy\nprotocol_state=RCPT\nsender=a\xffb@contoso.example\n"
        b"recipient=bob@dest.example\nclient_address=127.0.0.1\ninstance=m1\n\n"
    )
    assert request.sender == "a\ufffdb@contoso.example"
    (action,) = ask(make_handler(relay_policy()), request)
    assert action.split()[0][0] == "5", action


def test_make_handler_without_instance_decides_each_request() -> None:
    """A request without an instance is decided (and counted) on its own."""
    policy = relay_policy()
    asked = [rcpt("x@spam.example", instance="") for _ in range(3)]
    assert ask(make_handler(policy), *asked) == ["DUNNO"] * 3
    assert policy.status("contoso").unregistered == 3


def test_make_handler_null_sender_and_no_tenant() -> None:
    """The null sender is let through; a stranger's domain from elsewhere is refused 5.7.64."""
    policy = relay_policy()
    answers = ask(
        make_handler(policy),
        rcpt("", instance="bounce"),
        rcpt("x@stranger.example", client_address="192.0.2.1", instance="s"),
    )
    assert answers[0] == "DUNNO"
    assert answers[1].startswith("550 5.7.64 ")


def test_make_handler_permit_connectors_answers_ok() -> None:
    """With permit_connectors, accepted mail a connector attributed gets OK (permit); refusals
    and mail of no tenant are unchanged, and without the option it stays DUNNO."""
    policy = relay_policy()
    asked = [
        rcpt("alice@contoso.example", instance="a"),
        rcpt("x@spam.example", instance="b"),
        rcpt("", instance="bounce"),
        rcpt("x@stranger.example", client_address="192.0.2.1", instance="s"),
        rcpt("alice@contoso.example", client_address="192.0.2.1", instance="d"),
    ]
    answers = ask(make_handler(policy, permit_connectors=True), *asked)
    assert answers[:3] == ["OK", "OK", "OK"]
    assert answers[3].startswith("550 5.7.64 ")
    assert answers[4] == "DUNNO"  # the tenant comes from the sender's domain, not a connector
    policy.block("contoso", by="ops", reason="test")
    blocked = ask(
        make_handler(policy, permit_connectors=True), rcpt("x@spam.example", instance="c")
    )
    assert blocked == [REJECT_TEXT]
    plain = ask(make_handler(relay_policy()), rcpt("alice@contoso.example", instance="a"))
    assert plain == ["DUNNO"]


def test_make_handler_annotates_the_log_line(caplog: pytest.LogCaptureFixture) -> None:
    """The server's line for each request carries the decision's fields."""
    policy = relay_policy()

    async def scenario() -> bytes:
        server, port = await start(make_handler(policy))
        try:
            data = req(
                protocol_state="RCPT",
                client_address="127.0.0.1",
                instance="m1",
                sender="x@spam.example",
                recipient="bob@dest.example",
            )
            return await send_and_close(port, data + data)
        finally:
            await server.close()

    with caplog.at_level(logging.INFO, logger="domainpolicy.integrations.postfix"):
        assert split_replies(run(scenario())) == ["DUNNO", "DUNNO"]
    lines = [r.policy for r in caplog.records if hasattr(r, "policy")]
    assert [line["cached"] for line in lines] == [False, True]
    assert lines[0]["tenant"] == "contoso"
    assert lines[0]["sender_domain"] == "spam.example"
    assert (lines[0]["verdict"], lines[0]["code"], lines[0]["reason"]) == (
        "accept",
        250,
        "unregistered_allowed",
    )


class FailingStore(MemoryStore):
    """A store whose every observation fails."""

    def observe(self, *args: Any, **kwargs: Any) -> Any:
        """Fail like an unreachable store."""
        raise StoreUnavailable("the store is down")


def test_make_handler_store_failure_is_451() -> None:
    """A failing store gives the facade's 451 4.3.0, never an exception or a hang."""
    (action,) = ask(make_handler(relay_policy(store=FailingStore())), rcpt("x@spam.example"))
    assert action.startswith("451 4.3.0 ")


class GatedStore(MemoryStore):
    """A store whose observations wait until `gate` is set (a slow store)."""

    def __init__(self) -> None:
        """Start closed."""
        super().__init__()
        self.gate = threading.Event()
        self.calls = 0

    def observe(self, *args: Any, **kwargs: Any) -> Any:
        """Count the call, wait for the gate, then observe."""
        self.calls += 1
        self.gate.wait(SAFETY)
        return super().observe(*args, **kwargs)


def test_make_handler_slow_store_times_out_and_counts_once() -> None:
    """A slow store gets the server's 451 fallback; its late decision still serves the rest."""
    store = GatedStore()
    policy = relay_policy(store=store)
    cache: InstanceCache[Decision] = InstanceCache()
    handler = make_handler(policy, cache=cache, blocking=True)
    data = req(
        protocol_state="RCPT",
        client_address="127.0.0.1",
        instance="m1",
        sender="x@spam.example",
        recipient="bob@dest.example",
    )

    async def scenario() -> list[str]:
        server, port = await start(handler, request_timeout=0.05)
        try:
            first = split_replies(await send_and_close(port, data))
            store.gate.set()
            while not len(cache):
                await asyncio.sleep(0.01)  # the worker thread finishes the first decision
            second = split_replies(await send_and_close(port, data))
            return first + second
        finally:
            await server.close()

    assert run(scenario()) == [DEFAULT_FALLBACK_ACTION, "DUNNO"]
    assert store.calls == 1
    assert policy.status("contoso").unregistered == 1


@pytest.mark.parametrize(
    ("attributes", "expected"),
    [
        ({}, None),
        ({"ccert_subject": "mail.contoso.example"}, "mail.contoso.example"),
        (
            {"ccert_subject": "CN=ca.example,CN=mail.contoso.example,O=Contoso"},
            "mail.contoso.example",
        ),
        ({"ccert_subject": "O=Contoso"}, None),
        ({"ccert_fingerprint": "11:22:33"}, None),
        ({"ccert_fingerprint": "AB:CD:EF"}, "pinned.contoso.example"),
        ({"ccert_fingerprint": "ab:cd:ef", "ccert_subject": "x.example"}, "pinned.contoso.example"),
        ({"ccert_pubkey_fingerprint": "abcdef"}, "pinned.contoso.example"),
    ],
)
def test_certificate_name(attributes: dict[str, Any], expected: str | None) -> None:
    """Pinned fingerprints first, then the subject CN Postfix sends, else nothing."""
    request = PolicyRequest(**attributes)
    assert certificate_name(request, {"ABCDEF": "pinned.contoso.example"}) == expected


def test_relay_request_mapping() -> None:
    """Postfix attributes map onto RelayRequest; empty ones become None."""
    request = rcpt(
        "",
        sasl_username="alice",
        ccert_subject="mail.contoso.example",
        instance="1f2a.6553a2c1.8b1e9.0",
    )
    assert relay_request(request) == RelayRequest(
        sender="",
        client_ip="127.0.0.1",
        tls_cert_name="mail.contoso.example",
        sasl_user="alice",
        recipients=("bob@dest.example",),
        message_id="1f2a.6553a2c1.8b1e9.0",
    )
    bare = relay_request(PolicyRequest(protocol_state="MAIL", sender="a@b.example"))
    assert bare == RelayRequest(sender="a@b.example")
