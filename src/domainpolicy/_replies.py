"""SMTP replies: a validated `Reply` value, its rendering and parsing, and the reply catalogue.

Design
------
A `Reply` is correct by construction.  Its three fields are checked when it is made:

* ``code``: three digits, ``[2-5][0-5][0-9]`` (RFC 5321 section 4.2, ``Reply-code``);
* ``status``: an RFC 3463 enhanced status code ``class.subject.detail`` whose class is the first
  digit of ``code`` (so 3xx replies, which have no enhanced code class, are refused);
* ``text``: one or more lines of printable US-ASCII and HT (``textstring``, ``%d09 / %d32-126``).

Lines that would not fit in 512 octets once rendered (``550-5.7.750 `` prefix and CRLF included)
are wrapped at spaces when the reply is made, so the stored ``text`` is always the exact list of
lines that `Reply.lines` renders and `Reply.parse` reads back: ``Reply.parse(str(r)) == r``.

Nothing a caller supplies can add a line or a second reply: the constructor refuses CR, LF, NUL
and every other control character (`InvalidReply`), and `Reply.safe` folds them (and non-ASCII
text) into harmless printable characters instead.

The catalogue (`ReplyCode`, `ReplyCatalog`) gives each refusal the policy makes a stable name,
Microsoft's Exchange Online text as its default, optional per-code and per-tenant text overrides
and the Exchange habit of appending the answering server's name in brackets.
"""

from __future__ import annotations

import enum
import re
import unicodedata
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Final

import attrs

from ._errors import InvalidConfiguration, InvalidDomain, InvalidReply, shown, shown_key
from ._names import normalize_domain

__all__ = [
    "MAX_REPLY_LINE_OCTETS",
    "POSTFIX_REJECT_RESERVE",
    "Reply",
    "ReplyCatalog",
    "ReplyCode",
    "sanitize_reply_text",
]

MAX_REPLY_LINE_OCTETS: Final = 512
"""Longest reply line, CRLF included (RFC 5321 section 4.5.3.1.5)."""

POSTFIX_REJECT_RESERVE: Final = len("<>: Recipient address rejected: ") + 256
"""Octets Postfix inserts into a policy ``action=`` reject text at the RCPT stage at most.

Postfix turns ``550 5.7.750 text`` into ``550 5.7.750 <rcpt>: Recipient address rejected: text``
and does not enforce the 512-octet limit itself; a path is at most 256 octets (RFC 5321).  Pass
this (or the exact length for a known recipient) as *reserve* to `Reply.single_line`.
"""

_CRLF: Final = "\r\n"
_CODE_RE: Final = re.compile(r"[2-5][0-5][0-9]\Z")
_NUMBER: Final = r"(?:0|[1-9][0-9]{0,2})"
_STATUS_RE: Final = re.compile(rf"([245])\.{_NUMBER}\.{_NUMBER}\Z")
_STATUS_PREFIX_RE: Final = re.compile(rf"([245]\.{_NUMBER}\.{_NUMBER})(?: |\Z)")
_TEXT_RE: Final = re.compile(r"[\t\x20-\x7e]*\Z")
_BAD_TEXT_CHAR_RE: Final = re.compile(r"[^\t\x20-\x7e]")
_LINE_RE: Final = re.compile(r"([2-5][0-5][0-9])(?:([ -])([\t\x20-\x7e]*))?\Z")
_DEFAULT_TOKEN: Final = "{default}"
_ELLIPSIS: Final = "..."


def _first_bad_char(text: str) -> int | None:
    found = _BAD_TEXT_CHAR_RE.search(text)
    return found.start() if found else None


def _check_code(code: object) -> int:
    if isinstance(code, bool) or not isinstance(code, int) or not _CODE_RE.match(str(code)):
        raise InvalidReply(
            f"reply code {shown(code)} is not a three-digit SMTP reply code "
            "(2xx to 5xx, second digit 0-5; RFC 5321 section 4.2)"
        )
    return code


def _check_status(status: object, code: int) -> str:
    if not isinstance(status, str) or not _STATUS_RE.match(status):
        raise InvalidReply(
            f"enhanced status code {shown(status)} is not class.subject.detail with class "
            "2, 4 or 5 and 1-3 digit subject and detail without leading zeros (RFC 3463)"
        )
    if status[0] != str(code)[0]:
        raise InvalidReply(
            f"enhanced status code {status!r} has class {status[0]} but the reply code {code} "
            f"needs class {str(code)[0]} (RFC 3463 section 2; 3xx replies carry no enhanced code)"
        )
    return status


def _prefix_octets(status: str) -> int:
    """Octets of ``550-5.7.750 `` plus CRLF: everything on a line but the text."""
    return 3 + 1 + len(status) + 1 + 2


def _wrap(line: str, budget: int) -> list[str]:
    """Split *line* into pieces of at most *budget* characters, at spaces or tabs when possible.

    The whitespace character a break is made at is dropped; a word longer than *budget* is cut.
    Pieces that already fit are returned unchanged, so wrapping wrapped text changes nothing.
    """
    out: list[str] = []
    while len(line) > budget:
        cut = max(line.rfind(" ", 0, budget + 1), line.rfind("\t", 0, budget + 1))
        if cut <= 0:
            out.append(line[:budget])
            line = line[budget:]
        else:
            out.append(line[:cut])
            line = line[cut + 1 :]
        if not line:
            return out
    out.append(line)
    return out


def _text_lines(text: object) -> tuple[str, ...]:
    if isinstance(text, str):
        lines: tuple[object, ...] = (text,)
    elif isinstance(text, Iterable) and not isinstance(text, bytes | bytearray):
        lines = tuple(text)
    else:
        raise InvalidReply(f"reply text {shown(text)} must be a str or an iterable of str")
    if not lines:
        raise InvalidReply("a reply needs at least one line of text (it may be empty)")
    for number, line in enumerate(lines):
        if not isinstance(line, str):
            raise InvalidReply(f"reply text line {number} {shown(line)} is not a str")
        bad = _first_bad_char(line)
        if bad is not None:
            raise InvalidReply(
                f"reply text line {number} {shown(line)} has U+{ord(line[bad]):04X} at position "
                f"{bad}; only printable US-ASCII and HT are allowed (RFC 5321 textstring)"
            )
    return tuple(str(line) for line in lines)


def sanitize_reply_text(text: str) -> str:
    """Return *text* made safe for an SMTP reply line: printable US-ASCII and HT only.

    Controls (CR, LF, NUL, DEL, C1), Unicode line and paragraph separators and non-ASCII spaces
    become a space; other non-ASCII characters become their compatibility-decomposed ASCII
    letters where there are some (``é`` gives ``e``) and ``?`` otherwise; leading and trailing
    whitespace is removed.  The result never contains a line break.

    Raises:
        InvalidReply: *text* is not a str.
    """
    if not isinstance(text, str):
        raise InvalidReply(f"reply text {shown(text)} is not a str")
    if _TEXT_RE.match(text):
        return text.strip(" \t")
    out: list[str] = []
    for char in text:
        code = ord(char)
        if char == "\t" or 32 <= code <= 126:
            out.append(char)
        elif code < 32 or 127 <= code <= 159:
            out.append(" ")
        elif 0xD800 <= code <= 0xDFFF:
            out.append("?")
        elif unicodedata.category(char) in ("Zs", "Zl", "Zp"):
            out.append(" ")
        else:
            folded = "".join(c for c in unicodedata.normalize("NFKD", char) if 32 < ord(c) <= 126)
            out.append(folded or "?")
    return "".join(out).strip(" \t")


@attrs.frozen
class Reply:
    """An SMTP reply: code, RFC 3463 enhanced status code and one or more lines of text.

    ``Reply(550, "5.7.750", "Service unavailable")``.  *text* may be a str (one line) or an
    iterable of str (one line each); lines too long for 512 octets are wrapped at spaces when
    the reply is made, so ``text`` holds the lines exactly as rendered.

    Attributes:
        code: the three-digit reply code, e.g. ``550``.
        status: the enhanced status code, e.g. ``"5.7.750"``; its class is ``code``'s first digit.
        text: the text of each line, without the code prefixes.

    Raises:
        InvalidReply: the code, status or text breaks RFC 5321 or RFC 3463 (the message names the
            offending value and the rule).  Use `Reply.safe` for text from untrusted sources.
    """

    code: int
    status: str
    text: tuple[str, ...] = attrs.field(converter=_text_lines)

    def __attrs_post_init__(self) -> None:
        code = _check_code(self.code)
        status = _check_status(self.status, code)
        budget = MAX_REPLY_LINE_OCTETS - _prefix_octets(status)
        if any(len(line) > budget for line in self.text):
            wrapped = tuple(piece for line in self.text for piece in _wrap(line, budget))
            object.__setattr__(self, "text", wrapped)

    @classmethod
    def safe(cls, code: int, status: str, text: str | Iterable[str]) -> Reply:
        """Make a reply from untrusted text, folding anything not allowed instead of refusing it.

        Each given line goes through `sanitize_reply_text`, so CR and LF inside a line never
        start a new one.

        Raises:
            InvalidReply: *code* or *status* is invalid (text never causes an error unless it is
                not text at all).
        """
        lines = [text] if isinstance(text, str) else list(text)
        return cls(code, status, [sanitize_reply_text(line) for line in lines] or [""])

    def lines(self) -> tuple[str, ...]:
        """The rendered lines without CRLF: ``550-5.7.750 first`` ... ``550 5.7.750 last``.

        Every line starts with the code and repeats the enhanced status code (RFC 2034); an empty
        text line renders as the code and status alone.
        """
        last = len(self.text) - 1
        return tuple(
            f"{self.code}{' ' if i == last else '-'}{self.status}{' ' + line if line else ''}"
            for i, line in enumerate(self.text)
        )

    def __str__(self) -> str:
        """The reply as one string, lines joined by CRLF, no final CRLF (aiosmtpd adds it)."""
        return _CRLF.join(self.lines())

    def to_bytes(self) -> bytes:
        """The reply as sent on the wire: US-ASCII, every line ended by CRLF."""
        return "".join(line + _CRLF for line in self.lines()).encode("ascii")

    @property
    def is_permanent(self) -> bool:
        """True for 5xx replies."""
        return self.code >= 500

    @property
    def is_transient(self) -> bool:
        """True for 4xx replies."""
        return 400 <= self.code < 500

    def with_server(self, server_name: str) -> Reply:
        """Return a copy with `` [server_name]`` appended to the last line, as Exchange does.

        The name is normalised (`normalize_domain`, single labels allowed), so it cannot carry
        anything but letters, digits, hyphens and dots.

        Raises:
            InvalidReply: *server_name* is not a valid host name (``__cause__`` is the
                `InvalidDomain`).
        """
        try:
            name = normalize_domain(server_name, allow_single_label=True)
        except InvalidDomain as exc:
            raise InvalidReply(
                f"server name {shown(server_name)} is not a valid host name: {exc.detail}"
            ) from exc
        if server_name.isascii():
            # Same characters as the normalised form; keep the operator's capitalisation.
            name = type(name)(server_name[:-1] if server_name.endswith(".") else server_name)
        last = self.text[-1]
        return Reply(
            self.code, self.status, (*self.text[:-1], f"{last} [{name}]" if last else f"[{name}]")
        )

    def single_line(self, *, reserve: int = 0) -> Reply:
        """Return a one-line copy whose line still fits in 512 octets after *reserve* more octets.

        Lines are joined with ``". "`` (just a space after a line that already ends in
        punctuation); text that does not fit is cut at a space (or inside a word longer than the
        room left) and ``...`` appended.  This is the form for a Postfix policy
        ``action=`` value: pass `POSTFIX_REJECT_RESERVE` or the exact length of the
        ``<rcpt>: Recipient address rejected: `` text Postfix inserts.

        Raises:
            InvalidReply: *reserve* is negative or leaves no room for the code and status.
        """
        if isinstance(reserve, bool) or not isinstance(reserve, int) or reserve < 0:
            raise InvalidReply(f"reserve {shown(reserve)} must be a non-negative int")
        budget = MAX_REPLY_LINE_OCTETS - _prefix_octets(self.status) - reserve
        if budget < len(_ELLIPSIS):
            raise InvalidReply(
                f"reserve {reserve} leaves {budget} octets for text in a 512-octet line "
                f"(at least {len(_ELLIPSIS)} needed)"
            )
        joined = ""
        for line in self.text:
            if not line:
                continue
            if joined:
                # Lines are separate statements: keep them apart when they are run together.
                joined += " " if joined[-1] in ".!?;:," else ". "
            joined += line
        if len(joined) > budget:
            room = budget - len(_ELLIPSIS)
            cut = joined.rfind(" ", 0, room + 1)
            head = joined[:cut] if cut > 0 else joined[:room]
            joined = head.rstrip(" \t") + _ELLIPSIS
        return Reply(self.code, self.status, joined)

    @classmethod
    def parse(cls, data: str | bytes) -> Reply:
        """Parse one SMTP reply with enhanced status codes: the exact inverse of rendering.

        Accepts what `str` and `to_bytes` produce (a final CRLF is optional) and any other reply
        that follows RFC 5321 and RFC 2034: every line the same code, ``-`` on all lines but the
        last, lines of at most 512 octets, the enhanced status code at the start of the first
        line's text.  Continuation lines that repeat the status code have it removed.

        Raises:
            InvalidReply: *data* is not a single well-formed reply (the message says which line
                and rule).
        """
        if isinstance(data, bytes | bytearray):
            try:
                data = bytes(data).decode("ascii")
            except UnicodeDecodeError as exc:
                raise InvalidReply(
                    f"reply {shown(data)} has a non-ASCII octet at position {exc.start}"
                ) from exc
        if not isinstance(data, str):
            raise InvalidReply(f"reply {shown(data)} is not str or bytes")
        body = data[:-2] if data.endswith(_CRLF) else data
        raw_lines = body.split(_CRLF)
        status: str | None = None
        code: str | None = None
        texts: list[str] = []
        for number, raw in enumerate(raw_lines):
            if len(raw) + 2 > MAX_REPLY_LINE_OCTETS:
                raise InvalidReply(
                    f"reply line {number} {shown(raw)} is {len(raw) + 2} octets with CRLF, "
                    f"more than {MAX_REPLY_LINE_OCTETS}"
                )
            match = _LINE_RE.match(raw)
            if match is None:
                raise InvalidReply(
                    f"reply line {number} {shown(raw)} is not 'code[SP/-]text' with printable "
                    "US-ASCII text (RFC 5321 Reply-line; CR and LF only as CRLF)"
                )
            line_code, separator, rest = match.group(1), match.group(2), match.group(3) or ""
            last = number == len(raw_lines) - 1
            if code is not None and line_code != code:
                raise InvalidReply(
                    f"reply line {number} {shown(raw)} has code {line_code}, not {code} "
                    "(every line of a reply has the same code)"
                )
            code = line_code
            if (separator == "-") == last:
                raise InvalidReply(
                    f"reply line {number} {shown(raw)}: only the last line may end the reply "
                    "(use '-' after the code on every other line, a space or nothing on the last)"
                )
            found = _STATUS_PREFIX_RE.match(rest)
            if status is None:
                if found is None:
                    raise InvalidReply(
                        f"reply line 0 {shown(raw)} does not start its text with an enhanced "
                        "status code (RFC 2034)"
                    )
                status = found.group(1)
            if found is not None and found.group(1) == status:
                rest = rest[len(status) + 1 :]
            texts.append(rest)
        if code is None or status is None:  # pragma: no cover - split always yields a line
            raise InvalidReply(f"reply {shown(data)} is empty")
        return cls(int(code), status, texts)


# --------------------------------------------------------------------------- the catalogue


class ReplyCode(enum.Enum):
    """Stable names for the replies the relay policy gives; the value is the name in lower case.

    Each member knows its reply ``code``, enhanced ``status`` and ``default_text``:

    =====================  =========  =========================================================
    member                 reply      default text
    =====================  =========  =========================================================
    BLOCKED_UNREGISTERED   550 5.7.750  Service unavailable. Client blocked from sending from
                                        unregistered domains
    TENANT_SUSPENDED       550 5.7.705  Access denied, tenant has exceeded threshold
    RELAY_DENIED           550 5.7.64   TenantAttribution; Relay Access Denied
    IP_REJECTED            550 5.7.708  Access denied, traffic not accepted from this IP
    TEMP_RESTRICTED        451 4.7.500  Access denied, please try again later
    STORE_UNAVAILABLE      451 4.3.0    Temporary policy failure, please try again later
    BAD_SENDER             501 5.1.7    Bad sender address syntax
    =====================  =========  =========================================================

    The first five texts are Exchange Online's; the last two are ours (Exchange publishes none
    for these situations; ``Bad sender address syntax`` is Postfix's wording).
    """

    BLOCKED_UNREGISTERED = "blocked_unregistered"
    TENANT_SUSPENDED = "tenant_suspended"
    RELAY_DENIED = "relay_denied"
    IP_REJECTED = "ip_rejected"
    TEMP_RESTRICTED = "temp_restricted"
    STORE_UNAVAILABLE = "store_unavailable"
    BAD_SENDER = "bad_sender"

    @property
    def code(self) -> int:
        """The three-digit reply code, e.g. 550."""
        return _DEFAULTS[self][0]

    @property
    def status(self) -> str:
        """The enhanced status code, e.g. ``"5.7.750"``."""
        return _DEFAULTS[self][1]

    @property
    def default_text(self) -> str:
        """The default reply text (Microsoft's where it publishes one)."""
        return _DEFAULTS[self][2]

    def reply(self, *, server_name: str | None = None) -> Reply:
        """The default reply for this code, with `` [server_name]`` appended when given.

        Raises:
            InvalidReply: *server_name* is not a valid host name.
        """
        result = Reply(self.code, self.status, self.default_text)
        return result if server_name is None else result.with_server(server_name)

    @classmethod
    def lookup(cls, key: str) -> ReplyCode:
        """Find a member by name (any case, ``BLOCKED_UNREGISTERED``) or status (``5.7.750``).

        Raises:
            InvalidReply: no member has that name or status.
        """
        if isinstance(key, str):
            for member in cls:
                if key.strip().lower() in (member.value, member.status):
                    return member
        names = ", ".join(m.name for m in cls)
        raise InvalidReply(f"unknown reply code {shown(key)}; expected one of {names} or a status")


_DEFAULTS: Final[Mapping[ReplyCode, tuple[int, str, str]]] = MappingProxyType(
    {
        ReplyCode.BLOCKED_UNREGISTERED: (
            550,
            "5.7.750",
            "Service unavailable. Client blocked from sending from unregistered domains",
        ),
        ReplyCode.TENANT_SUSPENDED: (
            550,
            "5.7.705",
            "Access denied, tenant has exceeded threshold",
        ),
        ReplyCode.RELAY_DENIED: (550, "5.7.64", "TenantAttribution; Relay Access Denied"),
        ReplyCode.IP_REJECTED: (550, "5.7.708", "Access denied, traffic not accepted from this IP"),
        ReplyCode.TEMP_RESTRICTED: (451, "4.7.500", "Access denied, please try again later"),
        ReplyCode.STORE_UNAVAILABLE: (
            451,
            "4.3.0",
            "Temporary policy failure, please try again later",
        ),
        ReplyCode.BAD_SENDER: (501, "5.1.7", "Bad sender address syntax"),
    }
)

_OverrideKey = tuple[str | None, ReplyCode]


def _override_lines(text: object, what: str) -> tuple[str, ...]:
    """Validate operator text: one str (may contain ``\\n`` for several lines) or a list of str."""
    if isinstance(text, str):
        candidate: object = text.split("\n")
    else:
        candidate = text
    try:
        return _text_lines(candidate)
    except InvalidReply as exc:
        raise InvalidReply(f"override text for {what}: {exc}") from exc


def _freeze_overrides(
    value: Mapping[_OverrideKey, tuple[str, ...]] | None,
) -> Mapping[_OverrideKey, tuple[str, ...]]:
    return MappingProxyType(dict(value or {}))


def _check_server_name(_instance: object, _attribute: object, value: str | None) -> None:
    if value is not None:
        Reply(250, "2.0.0", "").with_server(value)


@attrs.frozen(eq=False)
class ReplyCatalog:
    """The replies the policy gives, with operator text overrides per code and per tenant.

    ``ReplyCatalog()`` gives the defaults of `ReplyCode`; `with_text` returns a catalogue with an
    override; `reply` looks a reply up::

        catalog = ReplyCatalog(server_name="mx1.example.net").with_text(
            ReplyCode.BLOCKED_UNREGISTERED,
            "{default}. Help: https://support.example.net/t/42",
            tenant="tenant-42",
        )
        catalog.reply(ReplyCode.BLOCKED_UNREGISTERED, tenant="tenant-42")

    Override text may contain ``{default}``, replaced by the code's default text, and ``\\n`` to
    start another line of a multi-line reply.  Precedence: the tenant's override for the code,
    then the operator's override for the code, then the default.

    Attributes:
        server_name: host name appended in brackets to every reply (``None``: none appended).
        overrides: ``(tenant or None, code) -> lines``; build it with `with_text`.

    Raises:
        InvalidReply: *server_name* is not a valid host name.
    """

    server_name: str | None = attrs.field(default=None, validator=_check_server_name)
    overrides: Mapping[_OverrideKey, tuple[str, ...]] = attrs.field(
        factory=dict, converter=_freeze_overrides, eq=False, hash=False, repr=False
    )

    @property
    def _override_items(self) -> frozenset[tuple[_OverrideKey, tuple[str, ...]]]:
        return frozenset(self.overrides.items())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ReplyCatalog):
            return NotImplemented
        return (self.server_name, self._override_items) == (
            other.server_name,
            other._override_items,
        )

    def __hash__(self) -> int:
        return hash((self.server_name, self._override_items))

    def with_text(
        self, code: ReplyCode, text: str | Iterable[str], *, tenant: str | None = None
    ) -> ReplyCatalog:
        """Return a catalogue in which *code* (for *tenant* only, if given) has *text*.

        Raises:
            InvalidReply: *code* is not a `ReplyCode`, or *text* has characters other than
                printable US-ASCII and HT (``\\n`` separates lines when *text* is a str), or the
                tenant is not a str.
        """
        if not isinstance(code, ReplyCode):
            raise InvalidReply(f"reply code {shown(code)} is not a ReplyCode member")
        if tenant is not None and not isinstance(tenant, str):
            raise InvalidReply(f"tenant {shown(tenant)} is not a str")
        where = f"{code.name}" + (f" of tenant {shown(tenant)}" if tenant is not None else "")
        lines = _override_lines(text, where)
        # Check that the result makes a valid reply now, not at the first refusal.
        Reply(
            code.code, code.status, [ln.replace(_DEFAULT_TOKEN, code.default_text) for ln in lines]
        )
        return attrs.evolve(self, overrides={**self.overrides, (tenant, code): lines})

    def reply(
        self,
        code: ReplyCode,
        *,
        tenant: str | None = None,
        server_name: str | None = None,
    ) -> Reply:
        """Return the reply for *code*, as *tenant* should see it.

        Args:
            code: which refusal.
            tenant: the tenant the message was attributed to, if any; its overrides win.
            server_name: host name to append in brackets instead of the catalogue's.

        Raises:
            InvalidReply: *code* is not a `ReplyCode` or *server_name* is not a valid host name.
        """
        if not isinstance(code, ReplyCode):
            raise InvalidReply(f"reply code {shown(code)} is not a ReplyCode member")
        lines = self.overrides.get((tenant, code)) if tenant is not None else None
        if lines is None:
            lines = self.overrides.get((None, code), (_DEFAULT_TOKEN,))
        result = Reply(
            code.code, code.status, [ln.replace(_DEFAULT_TOKEN, code.default_text) for ln in lines]
        )
        name = server_name if server_name is not None else self.server_name
        return result if name is None else result.with_server(name)

    @classmethod
    def from_mapping(cls, data: Mapping[str, object], *, source: str | None = None) -> ReplyCatalog:
        """Build a catalogue from configuration data (e.g. a parsed TOML table)::

            server_name = "mx1.example.net"
            [texts]
            BLOCKED_UNREGISTERED = "{default}. See https://help.example.net/unblock"
            [tenants.tenant-42]
            "5.7.750" = "{default}. Call +1 555 0100"

        Codes are named as in `ReplyCode.lookup` (member name or status).

        Raises:
            InvalidConfiguration: listing every problem found (unknown keys or codes, bad text).
        """
        problems: list[str] = []
        catalog = cls()
        if not isinstance(data, Mapping):
            raise InvalidConfiguration(
                [f"reply configuration {shown(data)} is not a table"], source=source
            )
        for key in data:
            if key not in ("server_name", "texts", "tenants"):
                problems.append(f"unknown key {shown(key)} (expected server_name, texts, tenants)")
        server = data.get("server_name")
        if server is not None:
            try:
                catalog = cls(server_name=server)  # type: ignore[arg-type]
            except InvalidReply as exc:
                problems.append(f"server_name: {exc}")

        def add(table: object, tenant: str | None, where: str) -> None:
            nonlocal catalog
            if not isinstance(table, Mapping):
                problems.append(f"{where}: {shown(table)} is not a table")
                return
            for name, text in table.items():
                try:
                    catalog = catalog.with_text(ReplyCode.lookup(name), text, tenant=tenant)
                except InvalidReply as exc:
                    problems.append(f"{where}.{shown_key(name)}: {exc}")

        if "texts" in data:
            add(data["texts"], None, "texts")
        tenants = data.get("tenants", {})
        if not isinstance(tenants, Mapping):
            problems.append(f"tenants: {shown(tenants)} is not a table")
        else:
            for tenant, table in tenants.items():
                add(table, str(tenant), f"tenants.{shown_key(tenant)}")
        if problems:
            raise InvalidConfiguration(problems, source=source)
        return catalog
