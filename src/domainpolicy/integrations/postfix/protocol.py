"""The Postfix policy protocol itself: the strict, bounded request parser (`parse_request`,
`PolicyRequest`, `PolicyLimits`, `MalformedRequest`), xtext (`xtext_decode`) and the action
sanitiser (`sanitize_action`).

No I/O and no asyncio: `server` feeds it the bytes read from a connection.  Imports only the
library's errors.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

import attrs

from domainpolicy._errors import DomainPolicyError, InvalidConfiguration, shown

__all__ = [
    "DEFAULT_LIMITS",
    "KNOWN_ATTRIBUTES",
    "MAX_ACTION_CHARS",
    "MalformedRequest",
    "PolicyLimits",
    "PolicyRequest",
    "parse_block",
    "parse_request",
    "positive",
    "request_end",
    "sanitize_action",
    "xtext_decode",
]


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


def positive(_instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise InvalidConfiguration([f"{attribute.name} must be positive, got {shown(value)}"])


@attrs.frozen
class PolicyLimits:
    """Bounds on what a peer may send in one request (all in octets, ``\\n`` excluded).

    Postfix 3.12 sends about 35 attributes; a long ``ccert_subject`` or ``helo_name`` stays well
    under 2 KiB.  The defaults leave room for that and stop a hostile peer early.
    """

    max_line_bytes: int = attrs.field(default=4096, validator=positive)
    max_attributes: int = attrs.field(default=100, validator=positive)
    max_request_bytes: int = attrs.field(default=32768, validator=positive)


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


def request_end(buffer: bytes | bytearray, start: int = 0) -> int:
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


def parse_block(block: bytes, limits: PolicyLimits) -> PolicyRequest:
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
    """`parse_block` line by line: every check in order, each failure with its reason."""
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
    end = request_end(data)
    if end < 0:
        raise MalformedRequest(data[-64:], "truncated", "a request must end with an empty line")
    if end != len(data):
        raise MalformedRequest(
            data[end : end + 64],
            "trailing_data",
            "data after the empty line that ends the request",
        )
    return parse_block(data, limits)


# --------------------------------------------------------------------------- actions


_UNSAFE_RE: Final = re.compile(r"[^\x20-\x7e]+")
MAX_ACTION_CHARS: Final = 400


def sanitize_action(text: str, *, max_chars: int = MAX_ACTION_CHARS) -> str:
    """Make *text* safe to send as one ``action=`` line.

    Every run of characters outside printable ASCII (CR, LF, NUL, TAB, other controls, non-ASCII)
    becomes one space, the result is stripped and cut to *max_chars*.  RFC 5321 reply text is
    printable ASCII and Postfix neither truncates nor filters what it relays, so the policy
    server keeps replies within the RFC itself.  Postfix adds ``<rcpt>: Recipient address
    rejected:`` to the text; keep *max_chars* well under the 512-octet reply line limit.
    """
    return _UNSAFE_RE.sub(" ", text).strip()[:max_chars].rstrip()
