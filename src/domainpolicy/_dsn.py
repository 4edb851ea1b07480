"""Non-delivery reports: RFC 3464 delivery status notifications, RFC 6533 for SMTPUTF8 mail.

Design
------
`build_dsn` returns an `email.message.EmailMessage` that serialises (``msg.as_bytes()``) to a
``multipart/report`` with three parts, as Postfix and Exchange send them:

1. ``text/plain``: what happened, why and what to do, from a language's template file
   (``domainpolicy/dsn_templates/<language>.toml``; adding a language is adding a file);
2. ``message/delivery-status``: one per-message block and one block per failed recipient;
3. the original: ``text/rfc822-headers`` (default), ``message/rfc822`` or nothing.

When any address involved has a non-ASCII local part, or the original's header block is not
ASCII, the report uses the RFC 6533 forms instead: ``message/global-delivery-status`` with
``utf-8;`` address types, ``message/global-headers`` or ``message/global``, and the message's
policy is ``email.policy.SMTPUTF8`` so that no address is ever RFC 2047-encoded.  Otherwise the
policy is ``email.policy.SMTP``.  Both clones have ``refold_source="none"``.

The original's headers are returned as received (kept raw by a ``compat32`` parse, never decoded
or refolded by the stdlib), with three exceptions: in the global form malformed UTF-8 becomes
U+FFFD; the controls VT, FF, FS, GS and RS, which Python's email generator takes for line ends,
become spaces; and a line longer than RFC 5322's 998 octets is broken as Postfix breaks it
(``smtp_line_length_limit``), before a space or tab where one allows it (unfolding restores the
header), else by inserting CRLF and a space.  No line of a report is longer than 998 octets.

Every value that reaches a header of the report has been validated (addresses by
`parse_address`, the reporting MTA by `normalize_domain`, the reply by `Reply`), except the
original's Subject: it is decoded here (RFC 2047 encoded-words of any charset Python knows,
leniently; unknown charsets and raw 8-bit octets read as UTF-8, malformed octets as U+FFFD), its
control characters become spaces, and it is encoded again here (encoded-words for non-ASCII
words and for any word holding ``=?``) and stored raw, so that no decoder finds in it an
encoded-word this module did not write.  So no input can add a header line or a MIME part, and
the report always serialises.  The original's Return-Path must be UTF-8 and parse as a path;
it is not RFC 2047-decoded (RFC 2047 section 5 allows no encoded-word in an address).  Reading
the original takes time linear in its size.

Loops: no report is made about a report.  `build_dsn` returns ``None`` (it does not raise) when
the original's envelope sender is the null path ``<>``, when it carries ``Auto-Submitted`` with any
value but ``no`` (RFC 3834 section 2), or when it is itself a delivery or disposition report.
"""

from __future__ import annotations

import binascii
import codecs
import datetime as _dt
import encodings
import encodings.aliases
import functools
import hashlib
import importlib.resources
import re
import textwrap
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from email import policy as _policy
from email.errors import MessageError
from email.headerregistry import Address as _HeaderAddress
from email.message import EmailMessage, Message, MIMEPart
from email.parser import BytesHeaderParser
from email.utils import format_datetime, make_msgid
from typing import Final, Literal

import attrs

from ._errors import DomainPolicyError, InvalidAddress, InvalidDomain, shown
from ._names import Address, domain_to_unicode, normalize_domain, parse_address
from ._replies import Reply

__all__ = ["DsnRecipient", "InvalidDsn", "build_dsn", "dsn_languages"]

ReturnContent = Literal["headers", "full", "none"]

_TEMPLATE_PACKAGE: Final = "domainpolicy"
_TEMPLATE_DIR: Final = "dsn_templates"
_LANGUAGE_RE: Final = re.compile(r"[a-z]{2,3}(?:-[a-z0-9]{1,8})*\Z")
_PLACEHOLDER_RE: Final = re.compile(r"\{([a-z_]*)\}")
_BODY_PLACEHOLDERS: Final = frozenset({"reporting_mta", "status", "code"})
_SUBJECT_PLACEHOLDERS: Final = _BODY_PLACEHOLDERS | {"subject"}
_MSGID_RE: Final = re.compile(r"<[!-;=?-~]+@[!-;=?-Z^-~]+>\Z")
_ENVID_RE: Final = re.compile(r"[!-~]{1,100}\Z")
_CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
_SPACES_RE: Final = re.compile(r"\s+")
_LINE_END_RE: Final = re.compile(rb"\r\n|\r|\n")
_HEADER_END_RE: Final = re.compile(rb"\r\n\r\n")
_SUBJECT_MAX: Final = 200
_REPORT_TYPES: Final = frozenset(
    {
        "delivery-status",
        "global-delivery-status",
        "disposition-notification",
        "global-disposition-notification",
    }
)
_CRLF: Final = "\r\n"


class InvalidDsn(DomainPolicyError, ValueError):
    """A delivery status notification cannot be built from the arguments given.

    The message names the offending value and the rule it breaks (for example a naive datetime,
    an unknown language, a reply that is not a failure, or an unusable original message).
    """


@attrs.frozen
class DsnRecipient:
    """A recipient the report is about: its final address and, optionally, the original one.

    Attributes:
        final: the address delivery was attempted to (``Final-Recipient``).
        original: the address the sender gave in ``ORCPT`` or before rewriting
            (``Original-Recipient``), if known.
    """

    final: Address
    original: Address | None = None


# --------------------------------------------------------------------------- templates


@attrs.frozen
class _Explanation:
    title: str
    explanation: str
    steps: tuple[str, ...]


@attrs.frozen
class _Template:
    language: str
    from_name: str
    subject: str
    subject_no_original: str
    wrap_width: int
    body: Mapping[str, str]
    by_status: Mapping[str, _Explanation]
    by_class: Mapping[str, _Explanation]


_BODY_KEYS: Final = (
    "intro",
    "steps_heading",
    "reply_heading",
    "return_headers",
    "return_full",
    "return_none",
)


def _fill(text: str, values: Mapping[str, str]) -> str:
    return _PLACEHOLDER_RE.sub(lambda m: values[m.group(1)], text)


def _template_problem(language: str, detail: str) -> InvalidDsn:
    return InvalidDsn(f"DSN template {language + '.toml'!r} is broken: {detail}")


def _string(table: Mapping[str, object], key: str, language: str, allowed: frozenset[str]) -> str:
    value = table.get(key)
    if not isinstance(value, str):
        raise _template_problem(language, f"{key!r} must be a string, got {shown(value)}")
    for name in _PLACEHOLDER_RE.findall(value):
        if name not in allowed:
            raise _template_problem(
                language,
                f"{key!r} uses unknown placeholder {{{name}}} (allowed: {sorted(allowed)})",
            )
    return value


def _explanations(data: object, language: str, what: str) -> dict[str, _Explanation]:
    if not isinstance(data, Mapping):
        raise _template_problem(language, f"[{what}] must be a table of tables")
    out: dict[str, _Explanation] = {}
    for key, table in data.items():
        if not isinstance(table, Mapping):
            raise _template_problem(language, f"[{what}.{key!r}] must be a table")
        steps = table.get("steps", [])
        if not isinstance(steps, list):
            raise _template_problem(language, f"[{what}.{key!r}].steps must be a list")
        step_texts = tuple(
            _string({"step": s}, "step", language, _BODY_PLACEHOLDERS) for s in steps
        )
        out[str(key)] = _Explanation(
            title=_string(table, "title", language, _BODY_PLACEHOLDERS),
            explanation=_string(table, "explanation", language, _BODY_PLACEHOLDERS),
            steps=step_texts,
        )
    return out


@functools.lru_cache(maxsize=32)
def _load_template(language: str) -> _Template:
    resource = importlib.resources.files(_TEMPLATE_PACKAGE).joinpath(
        _TEMPLATE_DIR, f"{language}.toml"
    )
    try:
        data = tomllib.loads(resource.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise InvalidDsn(
            f"no DSN template for language {language!r}; available: {', '.join(dsn_languages())}"
        ) from exc
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise _template_problem(language, str(exc)) from exc
    body = data.get("body")
    if not isinstance(body, Mapping):
        raise _template_problem(language, "[body] table missing")
    width = data.get("wrap_width", 76)
    if isinstance(width, bool) or not isinstance(width, int) or width < 0:
        raise _template_problem(
            language, f"wrap_width must be a non-negative integer, got {width!r}"
        )
    by_class = _explanations(data.get("class", {}), language, "class")
    for needed in ("4", "5"):
        if needed not in by_class:
            raise _template_problem(language, f'[class."{needed}"] missing')
    return _Template(
        language=language,
        from_name=_string(data, "from_name", language, frozenset()),
        subject=_string(data, "subject", language, _SUBJECT_PLACEHOLDERS),
        subject_no_original=_string(data, "subject_no_original", language, _BODY_PLACEHOLDERS),
        wrap_width=width,
        body={key: _string(body, key, language, _BODY_PLACEHOLDERS) for key in _BODY_KEYS},
        by_status=_explanations(data.get("status", {}), language, "status"),
        by_class=by_class,
    )


def dsn_languages() -> tuple[str, ...]:
    """The languages `build_dsn` has templates for (the names of ``dsn_templates/*.toml``)."""
    folder = importlib.resources.files(_TEMPLATE_PACKAGE).joinpath(_TEMPLATE_DIR)
    return tuple(
        sorted(
            entry.name[: -len(".toml")]
            for entry in folder.iterdir()
            if entry.name.endswith(".toml") and _LANGUAGE_RE.match(entry.name[: -len(".toml")])
        )
    )


def _template_for(language: object) -> _Template:
    if not isinstance(language, str) or not _LANGUAGE_RE.match(language.lower()):
        raise InvalidDsn(f"language {shown(language)} is not a language tag such as 'en' or 'ja'")
    tag = language.lower()
    available = dsn_languages()
    if tag in available:
        return _load_template(tag)
    primary = tag.split("-", 1)[0]
    if primary in available:
        return _load_template(primary)
    raise InvalidDsn(
        f"no DSN template for language {language!r}; available: {', '.join(available)}"
    )


# --------------------------------------------------------------------------- values


def _address(value: object, what: str, *, allow_null: bool = False) -> Address:
    if isinstance(value, Address):
        if value.is_null and not allow_null:
            raise InvalidDsn(f"{what} {value!r} is the null path, which cannot receive mail")
        return value
    if not isinstance(value, str):
        raise InvalidDsn(f"{what} {shown(value)} is neither an address string nor an Address")
    return parse_address(value, allow_null=allow_null)


def _recipients(values: object) -> list[DsnRecipient]:
    if isinstance(values, str | bytes | Address | DsnRecipient) or not isinstance(values, Iterable):
        raise InvalidDsn(
            f"failed_recipients {shown(values)} must be an iterable of addresses or DsnRecipient"
        )
    out: list[DsnRecipient] = []
    for value in values:
        if isinstance(value, DsnRecipient):
            final = _address(value.final, "final recipient")
            original = (
                None if value.original is None else _address(value.original, "original recipient")
            )
            out.append(DsnRecipient(final, original))
        else:
            out.append(DsnRecipient(_address(value, "failed recipient")))
    if not out:
        raise InvalidDsn("failed_recipients is empty: a DSN reports on at least one recipient")
    return out


def _aware(value: object, what: str) -> _dt.datetime:
    if not isinstance(value, _dt.datetime):
        raise InvalidDsn(f"{what} {shown(value)} is not a datetime")
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidDsn(f"{what} {value!r} is naive; give a timezone-aware datetime")
    return value


def _one_line(text: str) -> str:
    """Collapse controls and runs of whitespace into single spaces."""
    return _SPACES_RE.sub(" ", _CONTROL_RE.sub(" ", text)).strip()


# --------------------------------------------------------------------------- original headers
#
# Header values of the original come from a compat32 parse of its bytes: ASCII, with every 8-bit
# octet as a lone surrogate (surrogateescape).  They are decoded here, by code that never raises
# and takes linear time, into display text without control characters; nothing of the original
# is ever handed to the stdlib's header registry, which decodes encoded-words again when a value
# is set (so an undecodable word would come back to life) and writes decoded CR LF out as is.

_ENCODED_WORD_RE: Final = re.compile(r"=\?([^?\s]*)\?([bBqQ])\?([^?\s]*)\?=")
_NOT_BASE64_RE: Final = re.compile(r"[^A-Za-z0-9+/]+")
_SURROGATE_RE: Final = re.compile(r"[\ud800-\udfff]")
_COMMENT_TOKEN_RE: Final = re.compile(r"\\.|[()]|[^\\()]+", re.DOTALL)
_PARAMETER_TOKEN_RE: Final = re.compile(r'"(?:[^"\\]|\\.)*"?|;|[^";]+', re.DOTALL)
_LWSP: Final = " \t\r\n"
# Registered codec names and aliases: only these are looked up (so hostile names cannot grow the
# codec registry's cache); codecs that are not character sets are refused.
_CHARSETS: Final = frozenset(encodings.aliases.aliases) | frozenset(
    encodings.aliases.aliases.values()
)
_NOT_CHARSETS: Final = frozenset(
    {"idna", "punycode", "raw_unicode_escape", "unicode_escape", "undefined"}
)


def _octets(raw: str) -> bytes:
    """The octets of raw header text (ASCII, 8-bit octets as surrogates)."""
    try:
        return raw.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that no octet escapes: not from a parser
        return raw.encode("utf-8", "replace")


def _raw_text(raw: str) -> str:
    """Raw header text with its octets read as UTF-8 (RFC 6532), malformed ones as U+FFFD."""
    return _octets(raw).decode("utf-8", "replace")


@functools.lru_cache(maxsize=64)
def _codec(charset: str) -> str | None:
    """The Python codec for a MIME charset name (RFC 2231 ``*language`` ignored), if known."""
    name = encodings.normalize_encoding(charset.partition("*")[0].strip().lower())
    if name not in _CHARSETS:
        return None
    try:
        info = codecs.lookup(name)
    except LookupError:
        return None
    if info.name.replace("-", "_") in _NOT_CHARSETS or not getattr(info, "_is_text_encoding", True):
        return None
    return info.name


def _decoded_word(charset: str, encoding: str, text: str) -> str:
    """One RFC 2047 encoded-word's text, leniently: malformed base64 loses its broken tail,
    a malformed ``=`` escape stays as is, an unknown charset is read as UTF-8."""
    if encoding in "bB":
        data = _NOT_BASE64_RE.sub("", text)
        data = data[: len(data) - 1] if len(data) % 4 == 1 else data + "=" * (-len(data) % 4)
        octets = binascii.a2b_base64(data)
    else:
        octets = binascii.a2b_qp(_octets(text), header=True)
    codec = _codec(charset) if len(charset) <= 64 else None
    try:
        return octets.decode(codec or "utf-8", "replace")
    except (LookupError, UnicodeError, ValueError):  # pragma: no cover - a broken codec
        return octets.decode("utf-8", "replace")


def _header_text(raw: str) -> str:
    """A raw unstructured header value of the original as one line of display text.

    Octets outside encoded-words are read as UTF-8 (RFC 6532); RFC 2047 encoded-words are
    decoded wherever they appear, and the white space between two of them is dropped.  The
    result has no control characters, line separators or surrogates.
    """
    out: list[str] = []
    position = 0
    after_word = False
    for word in _ENCODED_WORD_RE.finditer(raw):
        between = raw[position : word.start()]
        if not (after_word and not between.strip(_LWSP)):
            out.append(_raw_text(between))
        out.append(_decoded_word(*word.groups()))
        position = word.end()
        after_word = True
    out.append(_raw_text(raw[position:]))
    return _one_line(_SURROGATE_RE.sub("\ufffd", "".join(out)))


def _without_comments(value: str) -> str:
    """*value* without RFC 5322 comments (nested, with quoted-pairs), in linear time."""
    out: list[str] = []
    depth = 0
    for token in _COMMENT_TOKEN_RE.findall(value):
        if token == "(":
            depth += 1
        elif token == ")" and depth:
            depth -= 1
        elif not depth:
            out.append(token)
    return "".join(out)


def _parameter(value: str, wanted: str) -> str | None:
    """The value of parameter *wanted* of a Content-Type value, unquoted, in linear time."""
    parameters: list[list[str]] = [[]]
    for token in _PARAMETER_TOKEN_RE.findall(value):
        if token == ";":
            parameters.append([])
        else:
            parameters[-1].append(token)
    for tokens in parameters[1:]:
        name, equals, text = "".join(tokens).partition("=")
        if equals and name.strip(_LWSP).lower() == wanted:
            text = text.strip(_LWSP)
            if text.startswith('"'):
                text = re.sub(r"\\(.)", r"\1", text[1:].removesuffix('"'), flags=re.DOTALL)
            return text
    return None


def _unitext(text: str) -> str:
    """RFC 6533 utf-8-addr-unitext: QCHAR and non-ASCII as is, everything else as ``\\x{HH}``."""
    return "".join(
        c if (33 <= ord(c) <= 126 and c not in "+=\\") or ord(c) > 127 else f"\\x{{{ord(c):02X}}}"
        for c in text
    )


def _display_mailbox(address: Address) -> str:
    if address.domain is None:
        return address.mailbox
    return f"{address.local_part}@{domain_to_unicode(address.domain)}"


def _dsn_address(address: Address, global_form: bool) -> str:
    if global_form and address.needs_smtputf8:
        return f"utf-8; {_unitext(_display_mailbox(address))}"
    return f"rfc822; {address.mailbox}"


def _header_address(address: Address, global_form: bool) -> str:
    """The address for a To header: RFC 5321 local part as given (quoted when it was)."""
    domain = address.domain if address.domain is not None else address.literal or ""
    if global_form and address.needs_smtputf8 and address.domain is not None:
        domain = domain_to_unicode(address.domain)
    return f"{address.local_part}@{domain}"


@attrs.frozen
class _Original:
    raw: bytes
    headers: bytes
    body: bytes
    envelope_sender: str | None
    auto_submitted: str | None
    content_type: str
    report_type: str | None
    subject: str | None


def _read_original(original: object) -> _Original:
    if isinstance(original, Message):
        try:
            raw = original.as_bytes(policy=original.policy.clone(linesep="\r\n"))
        except (
            ValueError,
            TypeError,
            LookupError,
            UnicodeError,
            AttributeError,
            MessageError,
        ) as exc:
            raise InvalidDsn(f"the original message cannot be serialised: {exc}") from exc
    elif isinstance(original, bytes | bytearray | memoryview):
        raw = bytes(original)
    else:
        raise InvalidDsn(f"original {shown(original)} is neither bytes nor an email Message")
    raw = _LINE_END_RE.sub(b"\r\n", raw)
    end = _HEADER_END_RE.search(raw)
    if raw.startswith(b"\r\n"):
        headers, body = b"", raw
    elif end:
        headers, body = raw[: end.start() + 2], raw[end.start() + 2 :]
    else:
        headers, body = (raw if raw.endswith(b"\r\n") else raw + b"\r\n"), b""
    parsed = BytesHeaderParser(policy=_policy.compat32).parsebytes(headers + b"\r\n")

    raw_values: dict[str, str] = {}
    for name, value in parsed.raw_items():  # raw: 8-bit octets stay surrogate-escaped
        raw_values.setdefault(name.lower(), str(value))

    def get(name: str) -> str | None:
        return raw_values.get(name.lower())

    content_type = get("Content-Type") or "text/plain"
    report_type = _parameter(content_type, "report-type")
    return _Original(
        raw=raw,
        headers=headers,
        body=body,
        envelope_sender=get("Return-Path"),
        auto_submitted=get("Auto-Submitted"),
        content_type=content_type.split(";", 1)[0].strip(_LWSP).lower(),
        report_type=report_type.lower() if report_type is not None else None,
        subject=get("Subject"),
    )


def _is_automatic(original: _Original) -> bool:
    if original.auto_submitted is not None:
        keyword = _without_comments(original.auto_submitted).split(";", 1)[0]
        if keyword.strip(_LWSP).lower() != "no":
            return True
    return original.content_type == "multipart/report" and original.report_type in _REPORT_TYPES


_LINE_MAX: Final = 998
_LONG_LINE_RE: Final = re.compile(rb"[^\r\n]{%d}" % (_LINE_MAX + 1))
# Controls that Python's email generator takes for line ends in a header value (str.splitlines).
_SPLITLINES_CONTROLS: Final = bytes.maketrans(b"\x0b\x0c\x1c\x1d\x1e", b"     ")


def _limited_lines(data: bytes) -> bytes:
    """*data* (CRLF lines) with every line over 998 octets broken as Postfix breaks them
    (``smtp_line_length_limit``): by inserting CRLF before a space or tab where one allows it
    (unfolding restores a header exactly), else CRLF and a space; never inside a UTF-8
    character."""
    if not _LONG_LINE_RE.search(data):
        return data
    out: list[bytes] = []
    for whole in data.split(b"\r\n"):
        line = whole
        while len(line) > _LINE_MAX:
            cut = max(line.rfind(b" ", 1, _LINE_MAX + 1), line.rfind(b"\t", 1, _LINE_MAX + 1))
            while cut > 0 and line[cut - 1] in b" \t":
                cut -= 1
            if cut > 0:
                out.append(line[:cut])
                line = line[cut:]
            else:
                cut = _LINE_MAX
                for _ in range(3):
                    if 0x80 <= line[cut] < 0xC0:
                        cut -= 1
                out.append(line[:cut])
                line = b" " + line[cut:]
        out.append(line)
    return b"\r\n".join(out)


def _returned(source: _Original, return_content: ReturnContent, global_form: bool) -> bytes:
    """The original as part 3 carries it: the header block (``"headers"``, ending with its
    blank line) or the whole message (``"full"``), malformed UTF-8 replaced in global form, the
    header block without the controls the generator would split lines at, no line over 998
    octets."""
    headers = source.headers.translate(_SPLITLINES_CONTROLS)
    data = headers + (b"\r\n" if return_content == "headers" else source.body)
    if global_form:
        data = data.decode("utf-8", "replace").encode("utf-8")
    return _limited_lines(data)


# --------------------------------------------------------------------------- the text part


def _wrap(text: str, width: int, indent: str = "", hanging: str = "") -> list[str]:
    if width <= 0:
        return [indent + text]
    return textwrap.wrap(
        text,
        width=width,
        initial_indent=indent,
        subsequent_indent=hanging or indent,
        break_long_words=False,
        break_on_hyphens=False,
    ) or [indent]


def _human_text(
    template: _Template,
    recipients: Sequence[DsnRecipient],
    reply: Reply,
    values: Mapping[str, str],
    return_content: ReturnContent,
) -> str:
    explanation = template.by_status.get(reply.status) or template.by_class[reply.status[0]]
    width = template.wrap_width
    out: list[str] = [*_wrap(_fill(template.body["intro"], values), width), ""]
    out += [f"    {_display_mailbox(r.final)}" for r in recipients]
    out += ["", *_wrap(_fill(explanation.title, values), width), ""]
    out += [*_wrap(_fill(explanation.explanation, values), width), ""]
    if explanation.steps:
        out += [*_wrap(_fill(template.body["steps_heading"], values), width), ""]
        for number, step in enumerate(explanation.steps, 1):
            out += _wrap(_fill(step, values), width, f"  {number}. ", "     ")
        out.append("")
    out += [*_wrap(_fill(template.body["reply_heading"], values), width), ""]
    out += [f"    {line}" for line in reply.lines()]
    out += ["", *_wrap(_fill(template.body[f"return_{return_content}"], values), width)]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- the builder


_FOLD_POINT_RE: Final = re.compile(r"(?= [^ \t])")
_FOLD_WIDTH: Final = 78


def _fold(name: str, value: str) -> str:
    """Fold *value* before spaces so lines stay within 78 octets where a space allows it.

    Every continuation line starts with the space it was folded at and has visible text, so
    unfolding (removing the CRLFs) gives back *value* exactly.
    """
    pieces = _FOLD_POINT_RE.split(value)
    out = [pieces[0]]
    width = len(name) + 2 + len(pieces[0])
    for piece in pieces[1:]:
        if width + len(piece) > _FOLD_WIDTH:
            out.append(_CRLF)
            width = 0
        out.append(piece)
        width += len(piece)
    return "".join(out)


_EW_LIMIT: Final = 75  # RFC 2047: an encoded-word is at most 75 characters
_Q_SAFE: Final = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-!*+/")


def _q_length(octets: bytes) -> int:
    return sum(1 if byte in _Q_SAFE or byte == 0x20 else 3 for byte in octets)


def _encoded_words(run: str) -> list[str]:
    """*run* as ``utf-8`` RFC 2047 encoded-words of at most 75 characters, split between
    characters; Q unless B is at least 5 characters shorter (the stdlib's choice)."""
    octets = run.encode("utf-8")
    use_b = _q_length(octets) - 4 * -(-len(octets) // 3) >= 5
    room = _EW_LIMIT - len("=?utf-8?q??=")
    words: list[str] = []
    chunk = bytearray()
    size = 0
    for char in run:
        data = char.encode("utf-8")
        grown = 4 * -(-(len(chunk) + len(data)) // 3) if use_b else size + _q_length(data)
        if chunk and grown > room:
            words.append(_encoded_word(bytes(chunk), use_b))
            chunk.clear()
            size = 0
        chunk += data
        size += _q_length(data)
    words.append(_encoded_word(bytes(chunk), use_b))
    return words


def _encoded_word(octets: bytes, use_b: bool) -> str:
    if use_b:
        return f"=?utf-8?b?{binascii.b2a_base64(octets, newline=False).decode('ascii')}?="
    text = "".join(
        chr(byte) if byte in _Q_SAFE else "_" if byte == 0x20 else f"={byte:02X}" for byte in octets
    )
    return f"=?utf-8?q?{text}?="


def _encoded_text(text: str, *, utf8: bool) -> str:
    """One line of display text (single spaces, no controls) as an unstructured header value
    that decodes back to exactly *text*.

    A word goes out as it is when it is at most 75 octets, ASCII (or *utf8*) and holds no
    ``=?``; runs of other words become RFC 2047 encoded-words.  So no decoder finds an
    encoded-word in the value that this function did not write.
    """
    tokens: list[str] = []
    run: list[str] = []
    for word in text.split(" "):
        if len(word.encode("utf-8")) <= _EW_LIMIT and "=?" not in word and (utf8 or word.isascii()):
            if run:
                tokens += _encoded_words(" ".join(run))
                run = []
            tokens.append(word)
        else:
            run.append(word)
    if run:
        tokens += _encoded_words(" ".join(run))
    return " ".join(tokens)


def _block(fields: Iterable[tuple[str, str]]) -> Message:
    """A header block written exactly as given (compat32 values are not refolded or checked).

    Only values validated by this module reach here, so the CRLFs are only those of `_fold`.
    """
    block = Message(policy=_policy.compat32)
    for name, value in fields:
        block[name] = _fold(name, value)
    return block


def build_dsn(
    original: bytes | Message,
    failed_recipients: Iterable[str | Address | DsnRecipient],
    reply: Reply,
    *,
    reporting_mta: str,
    arrival_date: _dt.datetime,
    language: str = "en",
    return_content: ReturnContent = "headers",
    envelope_sender: str | Address | None = None,
    original_envelope_id: str | None = None,
    message_id: str | None = None,
    date: _dt.datetime | None = None,
    last_attempt_date: _dt.datetime | None = None,
) -> EmailMessage | None:
    """Build the non-delivery report for a message refused with *reply*.

    The report is addressed to the original's envelope sender; send it with the null reverse-path
    ``<>`` (RFC 3464 section 2, RFC 5321 section 4.5.5).  It carries ``Auto-Submitted:
    auto-replied`` (RFC 3834).  Serialise it with ``msg.as_bytes()``: the message's own policy
    (``SMTP`` or ``SMTPUTF8``, CRLF line ends) is the right one.

    Args:
        original: the refused message as bytes (as received) or an `email.message.Message`.
        failed_recipients: the recipients refused: address strings, `Address` objects or
            `DsnRecipient` (to give an ``Original-Recipient`` too).
        reply: the 4xx or 5xx reply that refused them; it becomes ``Status`` and
            ``Diagnostic-Code: smtp; ...`` and is quoted in the text part.
        reporting_mta: host name of the MTA writing the report (``Reporting-MTA: dns; ...``,
            ``From: MAILER-DAEMON@...``, the default ``Message-ID`` domain).
        arrival_date: when the original arrived (timezone-aware).
        language: language tag of the text part and Subject (``en``, ``ja``, ``ja-JP``: the
            primary subtag is tried when the full tag has no template); see `dsn_languages`.
        return_content: ``"headers"`` (``text/rfc822-headers``), ``"full"`` (``message/rfc822``)
            or ``"none"``.
        envelope_sender: the original's envelope sender; defaults to its ``Return-Path`` header.
        original_envelope_id: the ``ENVID`` given with the original (RFC 3461), if any.
        message_id: ``Message-ID`` of the report (``<...@...>``); default: a fresh one.
        date: ``Date`` of the report (timezone-aware); default: now.
        last_attempt_date: ``Last-Attempt-Date`` of each recipient; default: *date*.

    Returns:
        The report, or ``None`` when the original must not be answered with one: its envelope
        sender is the null path, it has ``Auto-Submitted`` other than ``no``, or it is itself a
        delivery or disposition report (``multipart/report``).

    Raises:
        InvalidDsn: a datetime is naive, the language has no template, *reply* is not a 4xx or
            5xx `Reply`, *reporting_mta* or *message_id* or *original_envelope_id* is malformed,
            *failed_recipients* is empty, the envelope sender is unknown (no argument and no
            ``Return-Path``), or *original* is neither bytes nor a Message.
        InvalidAddress: a recipient or the envelope sender is not a valid address.

    Nothing in the original's headers or body makes it raise anything else: undecodable
    encoded-words, unknown charsets, 8-bit octets, control characters and over-long lines are
    all reported on (see the module documentation).
    """
    if not isinstance(reply, Reply):
        raise InvalidDsn(f"reply {shown(reply)} is not a domainpolicy Reply")
    if reply.code < 400:
        raise InvalidDsn(f"reply {str(reply)!r} is not a failure (4xx or 5xx); no DSN is due")
    if return_content not in ("headers", "full", "none"):
        raise InvalidDsn(
            f"return_content {shown(return_content)} must be 'headers', 'full' or 'none'"
        )
    template = _template_for(language)
    arrival = _aware(arrival_date, "arrival_date")
    now = _aware(date, "date") if date is not None else _dt.datetime.now(_dt.UTC)
    last_attempt = _aware(last_attempt_date, "last_attempt_date") if last_attempt_date else now
    try:
        mta = normalize_domain(reporting_mta, allow_single_label=True)
    except InvalidDomain as exc:
        raise InvalidDsn(
            f"reporting_mta {shown(reporting_mta)} is not a valid host name: {exc.detail}"
        ) from exc
    if message_id is None:
        message_id = make_msgid(domain=mta)
    elif not isinstance(message_id, str) or not _MSGID_RE.match(message_id):
        raise InvalidDsn(f"message_id {shown(message_id)} is not of the form <left@right>")
    if original_envelope_id is not None and (
        not isinstance(original_envelope_id, str) or not _ENVID_RE.match(original_envelope_id)
    ):
        raise InvalidDsn(
            f"original_envelope_id {shown(original_envelope_id)} must be 1-100 printable "
            "US-ASCII characters without spaces (RFC 3461 ENVID)"
        )
    recipients = _recipients(failed_recipients)
    source = _read_original(original)

    if envelope_sender is None:
        if source.envelope_sender is None:
            raise InvalidDsn(
                "the original's envelope sender is unknown: pass envelope_sender= or give the "
                "original a Return-Path header"
            )
        try:
            path = _octets(source.envelope_sender).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidDsn(
                f"the original's Return-Path {shown(source.envelope_sender)} is not UTF-8 "
                f"(octet {exc.object[exc.start]:#04x} at {exc.start})"
            ) from exc
        try:
            sender = parse_address(_one_line(path))
        except InvalidAddress as exc:
            raise InvalidDsn(
                f"the original's Return-Path {shown(source.envelope_sender)} is not a valid "
                f"path: {exc.detail}"
            ) from exc
    else:
        sender = _address(envelope_sender, "envelope sender", allow_null=True)
    if sender.is_null or _is_automatic(source):
        return None

    addresses = [sender, *(r.final for r in recipients)]
    addresses += [r.original for r in recipients if r.original is not None]
    global_form = any(a.needs_smtputf8 for a in addresses) or (
        return_content != "none" and not source.headers.isascii()
    )
    pol = (_policy.SMTPUTF8 if global_form else _policy.SMTP).clone(refold_source="none")
    values = {"reporting_mta": mta, "status": reply.status, "code": str(reply.code)}

    # -- part 1: the human-readable text
    text = _human_text(template, recipients, reply, values, return_content)
    human = MIMEPart(policy=pol)
    fits = all(len(line.encode("utf-8")) <= _LINE_MAX for line in text.split("\n"))
    if text.isascii() and fits:
        cte = "7bit"
    elif global_form and fits:
        cte = "8bit"
    else:  # mostly-ASCII text stays readable as quoted-printable
        cte = "quoted-printable" if sum(ord(c) > 127 for c in text) * 10 < len(text) else "base64"
    human.set_content(text, charset="utf-8", cte=cte)
    human["Content-Language"] = template.language

    # -- part 2: the machine-readable status
    per_message = [("Reporting-MTA", f"dns; {mta}")]
    if original_envelope_id is not None:
        per_message.append(("Original-Envelope-Id", original_envelope_id))
    per_message.append(("Arrival-Date", format_datetime(arrival)))
    diagnostic = "smtp; " + " ".join(reply.lines())
    blocks = [_block(per_message)]
    for recipient in recipients:
        fields = [("Final-Recipient", _dsn_address(recipient.final, global_form))]
        if recipient.original is not None:
            fields.append(("Original-Recipient", _dsn_address(recipient.original, global_form)))
        fields += [
            ("Action", "failed"),
            ("Status", reply.status),
            ("Diagnostic-Code", diagnostic),
            ("Last-Attempt-Date", format_datetime(last_attempt)),
        ]
        blocks.append(_block(fields))
    status_part = MIMEPart(policy=pol)
    if global_form:
        # The stdlib writes only the first sub-message of an unknown message/* type, so the
        # per-recipient blocks travel as the "body" of the per-message block (which is exactly
        # how the parser reads them back).
        status_part["Content-Type"] = "message/global-delivery-status"
        first = blocks[0]
        body = b"".join(block.as_bytes(policy=pol) for block in blocks[1:])
        first.set_payload(body[:-2].decode("ascii", "surrogateescape"))
        status_part.set_payload([first])
    else:
        status_part["Content-Type"] = "message/delivery-status"
        status_part.set_payload(list[Message | str](blocks))
    parts: list[Message | str] = [human, status_part]

    # -- part 3: the original
    returned_data = b""
    if return_content != "none":
        returned = MIMEPart(policy=pol)
        returned_data = _returned(source, return_content, global_form)
        if return_content == "headers" and not global_form:
            returned["Content-Type"] = "text/rfc822-headers"
            returned["Content-Transfer-Encoding"] = "7bit"
            returned.set_payload(returned_data.removesuffix(b"\r\n").decode("ascii"))
        else:
            # compat32 keeps every header value raw, and the body unparsed: the report's policy
            # writes them back as they are, and no header of the original is ever decoded.
            inner = BytesHeaderParser(policy=_policy.compat32).parsebytes(returned_data)
            kind = {"headers": "global-headers", "full": "global"}[return_content]
            returned["Content-Type"] = f"message/{kind if global_form else 'rfc822'}"
            if not returned_data.isascii():
                returned["Content-Transfer-Encoding"] = "8bit"
            returned.set_payload([inner])
        parts.append(returned)

    # -- the envelope of the report
    msg = EmailMessage(policy=pol)
    msg["From"] = _HeaderAddress(
        display_name=template.from_name, username="MAILER-DAEMON", domain=mta
    )
    msg["To"] = _header_address(sender, global_form)
    subject = _header_text(source.subject)[:_SUBJECT_MAX] if source.subject else ""
    subject_line = (
        _one_line(_fill(template.subject, {**values, "subject": subject}))
        if subject
        else _one_line(_fill(template.subject_no_original, values))
    )
    # Set raw, encoded here: the header registry would decode encoded-word lookalikes in it.
    msg.set_raw("Subject", _fold("Subject", _encoded_text(subject_line, utf8=global_form)))
    msg["Date"] = format_datetime(now)
    msg["Message-ID"] = message_id
    msg["Auto-Submitted"] = "auto-replied"
    msg["MIME-Version"] = "1.0"
    report_type = "global-delivery-status" if global_form else "delivery-status"
    msg["Content-Type"] = f"multipart/report; report-type={report_type}"
    msg.set_payload(parts)
    digest = hashlib.sha256(message_id.encode("ascii") + source.raw + text.encode("utf-8"))
    boundary = f"=_dsn_{digest.hexdigest()[:32]}"
    salt = 0
    while (  # pragma: no cover - needs a SHA-256 preimage
        boundary.encode("ascii") in source.raw or boundary.encode("ascii") in returned_data
    ):
        salt += 1
        digest.update(str(salt).encode("ascii"))
        boundary = f"=_dsn_{digest.hexdigest()[:32]}"
    msg.set_boundary(boundary)
    return msg
