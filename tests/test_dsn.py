"""Tests for non-delivery reports: structure, every field, localisation, SMTPUTF8, loops, injection.

Golden files live in ``tests/golden/dsn/``.  After an intended change to the output, regenerate
them with ``DOMAINPOLICY_REGEN_GOLDEN=1 pytest tests/test_dsn.py tests/test_replies.py`` and
review the diff.
"""

from __future__ import annotations

import base64
import codecs
import datetime as dt
import os
import re
import time
from email import policy
from email.message import EmailMessage, Message
from email.parser import BytesParser, HeaderParser
from email.policy import EmailPolicy
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from domainpolicy import (
    DomainPolicyError,
    DsnRecipient,
    InvalidAddress,
    InvalidDsn,
    Reply,
    ReplyCode,
    build_dsn,
    dsn_languages,
    parse_address,
)
from domainpolicy.testing import addresses, hostile_text

GOLDEN = Path(__file__).parent / "golden" / "dsn"
REGEN = os.environ.get("DOMAINPOLICY_REGEN_GOLDEN") == "1"
WHEN = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)
ARRIVED = dt.datetime(2024, 5, 1, 11, 59, 30, tzinfo=dt.timezone(dt.timedelta(hours=9)))
ORIGINAL = (
    b"Return-Path: <alice@example.com>\r\n"
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: Quarterly report\r\n"
    b"Message-ID: <orig-1@example.com>\r\n"
    b"\r\n"
    b"Hello Bob.\r\n"
)
ORIGINAL_UTF8 = (
    "Return-Path: <アリス@例え.jp>\r\n"
    "From: アリス <アリス@例え.jp>\r\n"
    "To: 花子@例え.jp\r\n"
    "Subject: 四半期報告\r\n"
    "\r\n"
    "本文です。\r\n"
).encode()


def make(
    original: bytes | Message = ORIGINAL,
    recipients: list[str | DsnRecipient] | None = None,
    reply: Reply | None = None,
    **kwargs: object,
) -> EmailMessage | None:
    """build_dsn with deterministic defaults."""
    options: dict[str, object] = {
        "reporting_mta": "mx1.example.net",
        "arrival_date": ARRIVED,
        "message_id": "<dsn-1@mx1.example.net>",
        "date": WHEN,
    }
    options.update(kwargs)
    return build_dsn(
        original,
        recipients if recipients is not None else ["bob@example.org"],
        reply if reply is not None else ReplyCode.BLOCKED_UNREGISTERED.reply(),
        **options,  # type: ignore[arg-type]
    )


def parts_of(msg: Message) -> list[Any]:
    """The sub-parts of a multipart or message/* part."""
    payload = msg.get_payload()
    assert isinstance(payload, list)
    return payload


def parse(data: bytes) -> tuple[EmailMessage, list[dict[str, str]]]:
    """Parse a DSN with the stdlib under policy.default; return it and its status blocks."""
    msg = BytesParser(policy=policy.default).parsebytes(data)
    assert isinstance(msg, EmailMessage)
    status = parts_of(msg)[1]
    assert isinstance(status, EmailMessage)
    if status.get_content_type() == "message/delivery-status":
        blocks = [dict(block.items()) for block in parts_of(status)]
    else:
        first = parts_of(status)[0]
        blocks = [dict(first.items())]
        body = first.get_payload(decode=True).decode("utf-8")
        for chunk in body.split("\r\n\r\n"):
            if chunk.strip():
                blocks.append(dict(HeaderParser(policy=policy.default).parsestr(chunk).items()))
    return msg, blocks


def check_golden(name: str, data: bytes) -> None:
    """Compare with (or, with DOMAINPOLICY_REGEN_GOLDEN=1, rewrite) a golden file."""
    path = GOLDEN / name
    if REGEN:
        path.write_bytes(data)
    assert path.read_bytes() == data, f"{name} differs; see the module docstring to regenerate"


# --------------------------------------------------------------------------- golden files


@pytest.mark.parametrize("language", ["en", "ja"])
@pytest.mark.parametrize("code", list(ReplyCode), ids=lambda c: c.value)
def test_golden_per_code_and_language(code: ReplyCode, language: str) -> None:
    """The DSN for every catalogue code in every language matches its golden file and parses."""
    reply = code.reply(server_name="mx1.example.net")
    msg = make(reply=reply, language=language, original_envelope_id="QQ314159")
    assert msg is not None
    data = msg.as_bytes()
    check_golden(f"{code.value}.{language}.eml", data)
    parsed, blocks = parse(data)
    assert parsed["Content-Language"] is None
    text = parts_of(parsed)[0]
    assert text["Content-Language"] == language
    assert str(reply) in text.get_content()
    assert blocks[0] == {
        "Reporting-MTA": "dns; mx1.example.net",
        "Original-Envelope-Id": "QQ314159",
        "Arrival-Date": "Wed, 01 May 2024 11:59:30 +0900",
    }
    assert blocks[1]["Status"] == code.status
    assert blocks[1]["Diagnostic-Code"] == f"smtp; {reply}"


@pytest.mark.parametrize("language", ["en", "ja"])
@pytest.mark.parametrize("content", ["headers", "full", "none"])
def test_golden_smtputf8(language: str, content: str) -> None:
    """SMTPUTF8 originals give RFC 6533 global reports, matching golden files."""
    msg = make(
        ORIGINAL_UTF8,
        [
            "花子@例え.jp",
            DsnRecipient(parse_address("ñ@bücher.de"), parse_address("o@example.org")),
        ],
        language=language,
        return_content=content,
    )
    assert msg is not None
    data = msg.as_bytes()
    check_golden(f"smtputf8-{content}.{language}.eml", data)
    parsed, blocks = parse(data)
    assert parsed.get_content_type() == "multipart/report"
    assert parsed["Content-Type"].params["report-type"] == "global-delivery-status"
    assert "アリス@例え.jp".encode() in data.split(b"\r\n\r\n", 1)[0]  # raw, not RFC 2047
    assert b"=?utf-8?" not in data.split(b"Subject:", 1)[0]
    assert blocks[1]["Final-Recipient"] == "utf-8; 花子@例え.jp"
    assert blocks[2]["Final-Recipient"] == "utf-8; ñ@bücher.de"
    assert blocks[2]["Original-Recipient"] == "rfc822; o@example.org"
    kinds = [part.get_content_type() for part in parts_of(parsed)]
    expected = {"headers": ["message/global-headers"], "full": ["message/global"], "none": []}
    assert kinds == ["text/plain", "message/global-delivery-status", *expected[content]]
    if content == "full":
        assert "本文です。".encode() in data


# --------------------------------------------------------------------------- every field


def test_every_field_of_an_ascii_report() -> None:
    """Top-level headers, the three parts and every delivery-status field are as specified."""
    msg = make(
        recipients=[
            "bob@example.org",
            DsnRecipient(parse_address("carol@bücher.de"), parse_address("<c@example.org>")),
        ],
        reply=ReplyCode.BLOCKED_UNREGISTERED.reply(server_name="mx1.example.net"),
        last_attempt_date=WHEN + dt.timedelta(minutes=1),
    )
    assert msg is not None
    assert isinstance(msg.policy, EmailPolicy)
    assert msg.policy.utf8 is False
    parsed, blocks = parse(msg.as_bytes())
    assert str(parsed["From"]) == "Mail Delivery System <MAILER-DAEMON@mx1.example.net>"
    assert parsed["To"] == "alice@example.com"
    assert parsed["Subject"] == "Undeliverable: Quarterly report"
    assert parsed["Date"] == "Wed, 01 May 2024 12:00:00 +0000"
    assert parsed["Message-ID"] == "<dsn-1@mx1.example.net>"
    assert parsed["Auto-Submitted"] == "auto-replied"
    assert parsed["MIME-Version"] == "1.0"
    assert parsed["Content-Type"].params["report-type"] == "delivery-status"
    kinds = [part.get_content_type() for part in parts_of(parsed)]
    assert kinds == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    diagnostic = (
        "smtp; 550 5.7.750 Service unavailable. Client blocked from sending from unregistered"
        " domains [mx1.example.net]"
    )
    common = {
        "Action": "failed",
        "Status": "5.7.750",
        "Diagnostic-Code": diagnostic,
        "Last-Attempt-Date": "Wed, 01 May 2024 12:01:00 +0000",
    }
    assert blocks == [
        {
            "Reporting-MTA": "dns; mx1.example.net",
            "Arrival-Date": "Wed, 01 May 2024 11:59:30 +0900",
        },
        {"Final-Recipient": "rfc822; bob@example.org", **common},
        {
            "Final-Recipient": "rfc822; carol@xn--bcher-kva.de",
            "Original-Recipient": "rfc822; c@example.org",
            **common,
        },
    ]
    returned = parts_of(parsed)[2].get_content()
    expected = ORIGINAL.split(b"\r\n\r\n")[0].decode() + "\r\n"
    assert returned.replace("\r\n", "\n") == expected.replace("\r\n", "\n")
    text = parts_of(parsed)[0].get_content()
    for needle in ("bob@example.org", "carol@bücher.de", "1. Register every domain", "4. Contact"):
        assert needle in text


def test_multiline_reply_in_diagnostic_code() -> None:
    """A multi-line reply becomes one Diagnostic-Code value with its lines in order."""
    reply = Reply(550, "5.7.750", ["line one", "line two"])
    msg = make(reply=reply)
    assert msg is not None
    _, blocks = parse(msg.as_bytes())
    assert blocks[1]["Diagnostic-Code"] == "smtp; 550-5.7.750 line one 550 5.7.750 line two"


def test_full_return_embeds_the_original() -> None:
    """return_content='full' returns the whole original as message/rfc822."""
    msg = make(return_content="full")
    assert msg is not None
    parsed, _ = parse(msg.as_bytes())
    inner = parts_of(parsed)[2]
    assert inner.get_content_type() == "message/rfc822"
    original = parts_of(inner)[0]
    assert original["Message-ID"] == "<orig-1@example.com>"
    assert original.get_content().replace("\r\n", "\n") == "Hello Bob.\n"


def test_email_message_input_and_explicit_sender() -> None:
    """An EmailMessage works as the original; envelope_sender overrides Return-Path."""
    original = EmailMessage()
    original["From"] = "x@example.com"
    original["Subject"] = "Hi"
    original.set_content("body")
    msg = make(original, envelope_sender="<bounces@example.com>", language="ja-JP")
    assert msg is not None
    parsed, _ = parse(msg.as_bytes())
    assert parsed["To"] == "bounces@example.com"
    assert parsed["Subject"] == "配信不能: Hi"
    assert parts_of(parsed)[0]["Content-Language"] == "ja"


def test_original_without_subject_and_encoded_subject() -> None:
    """No Subject gives the generic subject; an RFC 2047 Subject is decoded before quoting."""
    no_subject = b"Return-Path: <a@example.com>\r\n\r\nx"
    msg = make(no_subject)
    assert msg is not None
    assert msg["Subject"] == "Undeliverable message"
    encoded = b"Return-Path: <a@example.com>\r\nSubject: =?utf-8?b?5pel5pys?=\r\n\r\nx"
    msg = make(encoded)
    assert msg is not None
    assert msg["Subject"] == "Undeliverable: 日本"


def test_languages_are_data_files() -> None:
    """The available languages are the template files shipped in the package."""
    assert {"en", "ja"} <= set(dsn_languages())


def test_default_message_id_and_date_are_fresh() -> None:
    """Without message_id and date, a unique Message-ID at the reporting MTA and now are used."""
    first = build_dsn(
        ORIGINAL,
        ["b@example.org"],
        ReplyCode.BAD_SENDER.reply(),
        reporting_mta="mx1.example.net",
        arrival_date=ARRIVED,
    )
    second = build_dsn(
        ORIGINAL,
        ["b@example.org"],
        ReplyCode.BAD_SENDER.reply(),
        reporting_mta="mx1.example.net",
        arrival_date=ARRIVED,
    )
    assert first is not None
    assert second is not None
    assert first["Message-ID"] != second["Message-ID"]
    assert first["Message-ID"].endswith("@mx1.example.net>")
    assert first["Date"].datetime.tzinfo is not None


# --------------------------------------------------------------------------- loops


@pytest.mark.parametrize(
    "original",
    [
        b"Return-Path: <>\r\nSubject: bounce\r\n\r\nx",
        b"Return-Path: <a@example.com>\r\nAuto-Submitted: auto-replied\r\n\r\nx",
        b"Return-Path: <a@example.com>\r\nAuto-Submitted: Auto-Generated (vacation)\r\n\r\nx",
        b"Return-Path: <a@example.com>\r\nContent-Type: multipart/report;"
        b" report-type=delivery-status; boundary=x\r\n\r\n--x--\r\n",
    ],
)
def test_no_report_about_a_report(original: bytes) -> None:
    """Null senders, Auto-Submitted other than 'no' and delivery reports get None, not a DSN."""
    assert make(original) is None


@pytest.mark.parametrize(
    ("header", "reported"),
    [
        (b"Auto-Submitted: no (a human (really)) ; x=1", True),
        (b"Auto-Submitted: (no) auto-generated", False),
        (b"Auto-Submitted: no (a \\) b)", True),
        (b"Auto-Submitted: (unclosed no", False),
        (b'Content-Type: multipart/report; x=";"; report-type="delivery-status"', False),
        (b'Content-Type: multipart/report; x="\\";report-type=a"; boundary=b', True),
        (b"Content-Type: multipart/report;report-type = Disposition-Notification", False),
        (b"Content-Type: multipart/report; report-type=delivery-status-x", True),
        (b"Content-Type: multipart/mixed; report-type=delivery-status", True),
    ],
)
def test_auto_submitted_comments_and_report_type_parameter(header: bytes, reported: bool) -> None:
    """Comments (nested, quoted-pairs) in Auto-Submitted and quoted Content-Type parameters are
    read as RFC 5322 and RFC 2045 say."""
    msg = make(b"Return-Path: <a@example.com>\r\n" + header + b"\r\n\r\nx")
    assert (msg is not None) is reported


@pytest.mark.parametrize(
    "header",
    [
        b"Auto-Submitted: no " + b"(" * 1_000_000,
        b'Content-Type: multipart/report; a="' + b";" * 1_000_000,
        b"Subject: " + b"=?a?q?" * 200_000,
        b"Subject: " + b"=?" * 500_000,
        b"Subject: =?utf-8?b?" + b"a" * 1_000_000 + b"?=",
        b"Subject: " + b"=?utf-8?q?=C3?= " * 70_000,
    ],
    ids=["comments", "parameters", "word-starts", "question-marks", "base64", "words"],
)
def test_reading_a_hostile_original_takes_linear_time(header: bytes) -> None:
    """A megabyte header shaped to make comment, parameter or encoded-word parsing quadratic
    takes well under 10 seconds (the quadratic parsers took many minutes)."""
    start = time.perf_counter()
    msg = make(b"Return-Path: <a@example.com>\r\n" + header + b"\r\n\r\nx")
    assert msg is None or msg.as_bytes()
    assert time.perf_counter() - start < 10


def test_null_envelope_sender_argument_gives_none() -> None:
    """An explicit null envelope sender also suppresses the report."""
    assert make(envelope_sender="<>") is None


def test_auto_submitted_no_still_gets_a_report() -> None:
    """Auto-Submitted: no marks ordinary mail, which is reported on."""
    assert make(b"Return-Path: <a@example.com>\r\nAuto-Submitted: no\r\n\r\nx") is not None


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"arrival_date": dt.datetime(2024, 1, 1)}, "naive"),
        ({"date": "yesterday"}, "not a datetime"),
        ({"language": "xx"}, "no DSN template"),
        ({"language": "../en"}, "not a language tag"),
        ({"return_content": "body"}, "return_content"),
        ({"reporting_mta": "mx1\r\nBcc: x@example.com"}, "reporting_mta"),
        ({"message_id": "<a@b>\r\nBcc: x"}, "message_id"),
        ({"original_envelope_id": "a b"}, "original_envelope_id"),
        ({"reply": Reply(250, "2.0.0", "ok")}, "not a failure"),
        ({"reply": "550 5.7.1 no"}, "not a domainpolicy Reply"),
        ({"recipients": []}, "empty"),
        ({"recipients": "bob@example.org"}, "iterable"),
        ({"original": b"Subject: x\r\n\r\n"}, "envelope sender is unknown"),
        ({"original": b"Return-Path: <bad address>\r\n\r\n"}, "Return-Path"),
        ({"original": "text"}, "neither bytes"),
    ],
)
def test_bad_arguments_raise_invalid_dsn(kwargs: dict[str, object], match: str) -> None:
    """Each malformed argument raises InvalidDsn naming the value and the rule."""
    with pytest.raises(InvalidDsn, match=match):
        make(**kwargs)  # type: ignore[arg-type]


def test_bad_recipient_raises_invalid_address() -> None:
    """A recipient that is not an address raises InvalidAddress from the names core."""
    with pytest.raises(InvalidAddress):
        make(recipients=["bob@\r\nexample.org"])


# --------------------------------------------------------------------------- injection

_TOP = {
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "Auto-Submitted",
    "MIME-Version",
    "Content-Type",
}


def assert_shape(data: bytes) -> None:
    """The report has exactly the expected headers, three parts and well-formed blocks."""
    parsed, blocks = parse(data)
    assert set(parsed.keys()) == _TOP
    assert len(parts_of(parsed)) == 3
    assert set(blocks[0]) <= {"Reporting-MTA", "Arrival-Date", "Original-Envelope-Id"}
    for block in blocks[1:]:
        assert set(block) <= {
            "Final-Recipient",
            "Original-Recipient",
            "Action",
            "Status",
            "Diagnostic-Code",
            "Last-Attempt-Date",
        }


def test_crlf_in_subject_adds_no_header() -> None:
    """A folded original Subject carrying a fake header stays inside the Subject."""
    original = b"Return-Path: <a@example.com>\r\nSubject: hi\r\n Bcc: evil@example.com\r\n\r\nx"
    msg = make(original)
    assert msg is not None
    assert_shape(msg.as_bytes())
    assert msg["Subject"] == "Undeliverable: hi Bcc: evil@example.com"


@given(hostile_text(max_size=300), hostile_text(max_size=300), hostile_text(max_size=120))
def test_hostile_inputs_never_add_headers_or_parts(subject: str, rcpt: str, mta: str) -> None:
    """Hostile Subject, recipient and MTA text either raise DomainPolicyError or change nothing."""
    original = (
        b"Return-Path: <a@example.com>\r\nSubject: "
        + subject.encode("utf-8", "surrogatepass").replace(b"\r", b" ").replace(b"\n", b" ")
        + b"\r\n\r\nbody"
    )
    try:
        msg = make(original, recipients=[rcpt], reporting_mta=mta or "mx.example")
    except DomainPolicyError:
        return
    assert msg is not None
    assert_shape(msg.as_bytes())


@given(st.lists(addresses(), min_size=1, max_size=3), addresses(forms=False))
def test_any_valid_addresses_round_trip(rcpts: list[str], sender: str) -> None:
    """For arbitrary valid addresses the report parses and names each recipient exactly."""
    msg = make(recipients=list(rcpts), envelope_sender=sender)
    assert msg is not None
    data = msg.as_bytes()
    parsed, blocks = parse(data)
    assert len(blocks) == len(rcpts) + 1
    for rcpt, block in zip(rcpts, blocks[1:], strict=True):
        address = parse_address(rcpt)
        kind, _, value = block["Final-Recipient"].partition("; ")
        if kind == "rfc822":
            assert value == address.mailbox
        else:
            assert kind == "utf-8"
            assert address.needs_smtputf8
    if not parse_address(sender).needs_smtputf8:
        assert (
            parsed["To"].addresses[0].addr_spec.lower().endswith(str(parse_address(sender).domain))
        )


# --------------------------------------------------------------------------- hostile originals


def original_with(*lines: bytes, body: bytes = b"body\r\n") -> bytes:
    """An original with Return-Path <a@example.com>, the given header lines and *body*."""
    header = b"".join(line + b"\r\n" for line in lines)
    return b"Return-Path: <a@example.com>\r\n" + header + b"\r\n" + body


def report(original: bytes, **kwargs: object) -> tuple[EmailMessage, bytes]:
    """The report for *original* and its serialisation."""
    msg = make(original, None, None, **kwargs)
    assert msg is not None
    return msg, msg.as_bytes()


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        (b"=?bogus?q?=0D=0AX-Injected:_1?=", "Undeliverable: X-Injected: 1"),
        (
            b"=?utf-8?q?=FF?= =?utf-8?q?=0D=0ABcc:_evil@x.example?=",
            "Undeliverable: \ufffd Bcc: evil@x.example",
        ),
        (b"=?utf-8?q?=0D=0ABcc:_evil@x.example?=", "Undeliverable: Bcc: evil@x.example"),
        (b"=?utf-8?b?DQpYLUluamVjdGVkOiAx?=", "Undeliverable: X-Injected: 1"),
        (b"=?utf-8?b?a?=", "Undeliverable message"),
        (b"=?utf-8?q?=C3=BC=FF?=", "Undeliverable: \xfc\ufffd"),
    ],
)
def test_issue_repros_subject_cannot_add_headers_and_always_serialises(
    subject: bytes, expected: str
) -> None:
    """The issue's Subjects (CR LF behind an unknown charset or bad UTF-8, malformed base64,
    unencodable text) stay inside one Subject of a report that serialises and parses."""
    msg, data = report(original_with(b"Subject: " + subject))
    assert_shape(data)
    assert b"\r\nX-Injected:" not in data
    assert b"\r\nBcc:" not in data
    assert msg["Subject"] == expected
    assert BytesParser(policy=policy.default).parsebytes(data)["Subject"] == expected


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        (b"Quarterly report", "Quarterly report"),
        (b"=?iso-8859-1?q?caf=E9?=", "caf\xe9"),
        (b"=?ISO-2022-JP?B?GyRCRnxLXDhsGyhC?=", "日本語"),
        (b"=?shift_jis?b?k/qWe4zq?=", "日本語"),
        (b"=?utf-8?b?5pel5pys?=\r\n =?utf-8?b?6Kqe?=", "日本語"),  # space between words dropped
        (b"a =?utf-8?q?b?= c", "a b c"),
        (b"x=?utf-8?q?y?=z", "xyz"),  # decoded inside a word, as MUAs do
        (b"=?utf-8*ja?q?hi?=", "hi"),  # RFC 2231 language suffix
        (b"=?x-unknown?q?caf=C3=A9?=", "caf\xe9"),  # unknown charset: read as UTF-8
        (b"=?idna?q?xn--bcher-kva?=", "xn--bcher-kva"),  # not a character set: UTF-8
        (b"=?rot13?q?uryyb?=", "uryyb"),
        (b"=?" + b"a" * 100 + b"?q?hi?=", "hi"),
        (b"=?utf-8?q?=0?=", "=0"),  # malformed escape kept
        (b"=?utf-8?b?5pel5pys6K?=", "日本\ufffd"),  # missing padding, cut character
        (b"=?utf-8?b?5p*el!5pys?=", "日本"),  # junk in base64 ignored
        (b"=?utf-7?q?+2D0-?=", "\ufffd"),  # a lone surrogate from a codec
        (b"=?utf-8?q?a=00b=09c?=", "a b c"),  # controls become spaces
        (b"=?utf-8?q?a=E2=80=A8b=C2=85c?=", "a b c"),  # so do line separators
        (b"caf\xc3\xa9", "caf\xe9"),  # raw UTF-8 (RFC 6532)
        (b"caf\xe9", "caf\ufffd"),  # raw 8-bit that is not UTF-8
        (b"=?utf-8?b?5pel5pys6Kqe?", "=?utf-8?b?5pel5pys6Kqe?"),  # not an encoded-word
        (  # an encoded-word whose text looks like one is decoded once, never twice
            b"=?utf-8?q?=3D=3Fbogus=3Fq=3F=3D0D=3D0AX-Injected:=5F1=3F=3D?=",
            "=?bogus?q?=0D=0AX-Injected:_1?=",
        ),
        (b"  ", None),
    ],
)
@pytest.mark.parametrize("return_content", ["headers", "full", "none"])
def test_subject_is_decoded_leniently_and_encoded_again(
    subject: bytes, expected: str | None, return_content: str
) -> None:
    """The original's Subject is decoded (any known charset, leniently) into one line without
    controls, and the report's Subject decodes back to exactly that under the stdlib."""
    msg, data = report(original_with(b"Subject: " + subject), return_content=return_content)
    want = f"Undeliverable: {expected}" if expected is not None else "Undeliverable message"
    parsed = BytesParser(policy=policy.default).parsebytes(data)
    assert set(parsed.keys()) == _TOP
    assert msg["Subject"] == want
    assert parsed["Subject"] == want
    top = data.split(b"\r\n\r\n", 1)[0]
    assert all(32 <= byte < 127 or byte > 127 or byte in b"\r\n" for byte in top)


def test_subject_encoded_words_are_bounded_and_ascii_without_smtputf8() -> None:
    """Non-ASCII or over-long words go out as encoded-words of at most 75 characters."""
    subject = "日本語の件名 " * 40 + "x" * 120
    msg, data = report(original_with(b"Subject: " + subject.encode()), return_content="none")
    top = data.split(b"\r\n\r\n", 1)[0]
    assert top.isascii()
    for word in top.split():
        if word.startswith(b"=?"):
            assert len(word) <= 75
    parsed = BytesParser(policy=policy.default).parsebytes(data)
    assert parsed["Subject"] == msg["Subject"] == ("Undeliverable: " + subject)[:215].strip()


@pytest.mark.parametrize(
    "sender",
    [
        b"=?utf-8?b?a?=",
        b"=?utf-8?q?a@example.com?=",  # no encoded-word in an address (RFC 2047 section 5)
        b"<caf\xe9@example.com>",
        b"<a@exa\x00mple.com>",
        b"<a@example.com" + b"x" * 100_000 + b">",
    ],
)
def test_malformed_return_path_raises_invalid_dsn(sender: bytes) -> None:
    """A Return-Path that is not a path raises InvalidDsn, never a stray exception."""
    with pytest.raises(InvalidDsn, match="Return-Path") as info:
        make(b"Return-Path: " + sender + b"\r\nSubject: x\r\n\r\nbody")
    assert len(str(info.value)) < 500


@pytest.mark.parametrize("return_content", ["headers", "full"])
@pytest.mark.parametrize("utf8", [False, True])
def test_returned_headers_are_raw_and_keep_their_lines(return_content: str, utf8: bool) -> None:
    """Every header of the original is returned raw (encoded-words undecoded), and controls
    the stdlib generator would split lines at become spaces: no header is added to the copy."""
    lines = [
        b"Subject: " + ("日本" if utf8 else "plain").encode(),
        b"X-Encoded: =?bogus?q?=0D=0AX-Injected:_1?=",
        b"X-Controls: a\x0bb\x0cBcc: evil@x.example\x1cc\x1dd\x1ee\x00f",
    ]
    _, data = report(original_with(*lines), return_content=return_content)
    parsed, _ = parse(data)
    assert set(parsed.keys()) == _TOP
    returned = parts_of(parsed)[2]
    if returned.get_content_type() == "text/rfc822-headers":
        copy = HeaderParser(policy=policy.default).parsestr(returned.get_content())
    else:
        copy = parts_of(returned)[0]
    assert list(copy.keys()) == ["Return-Path", "Subject", "X-Encoded", "X-Controls"]
    assert b"\r\nX-Encoded: =?bogus?q?=0D=0AX-Injected:_1?=\r\n" in data
    assert b"\r\nX-Controls: a b Bcc: evil@x.example c d e\x00f\r\n" in data
    if return_content == "full":
        body = copy.get_payload()
        assert isinstance(body, str)
        assert body.replace("\r\n", "\n") == "body\n"


def longest_line(data: bytes) -> int:
    """The length in octets of the longest CRLF-terminated line of *data*."""
    return max(len(line) for line in data.split(b"\r\n"))


@pytest.mark.parametrize("return_content", ["headers", "full"])
def test_over_long_header_lines_are_folded_at_white_space(return_content: str) -> None:
    """A header line over 998 octets is folded before a space or tab where one allows it, so
    that unfolding gives back the value exactly."""
    value = " ".join(f"word{n}" for n in range(700)) + "\t" + "x" * 900 + " tail"
    _, data = report(original_with(b"X-Long: " + value.encode()), return_content=return_content)
    assert longest_line(data) <= 998
    folded = data.split(b"X-Long: ", 1)[1].split(b"\r\n\r\n", 1)[0]
    lines = folded.split(b"\r\n")
    assert all(line[:1] in (b" ", b"\t") for line in lines[1:] if line)
    unfolded = folded.replace(b"\r\n", b"")
    assert unfolded == value.encode()


@pytest.mark.parametrize(
    ("line", "return_content"),
    [
        (b"X-Long: " + b"a" * 5000, "headers"),
        (b"X-Long: " + b"a" * 5000, "full"),
        (b"X-Long: " + "é".encode() * 2000, "headers"),
        (b"X-Long: " + "é".encode() * 2000, "full"),
        (b"X-Long: " + b"\xe9" * 2000, "full"),  # each octet becomes U+FFFD: 3 octets
        (b"X-Long:" + b" " * 3000 + b"x", "headers"),
    ],
)
def test_header_lines_without_a_fold_point_are_broken(line: bytes, return_content: str) -> None:
    """With no white space to fold at, CRLF and a space are inserted (as Postfix's
    smtp_line_length_limit does), never inside a UTF-8 character."""
    _, data = report(original_with(line), return_content=return_content)
    assert longest_line(data) <= 998
    copy = data.split(b"X-Long:", 1)[1].split(b"\r\n\r\n", 1)[0]
    for piece in copy.split(b"\r\n"):
        piece.decode("utf-8")  # no character was cut
    parsed, _ = parse(data)
    assert set(parsed.keys()) == _TOP
    assert len(parts_of(parsed)) == 3


def test_over_long_body_lines_of_a_full_return_are_broken() -> None:
    """With return_content='full', body lines over 998 octets are broken too."""
    body = b"b" * 5000 + b"\r\n" + b"short\r\n" + b"c " * 2000 + b"\r\n"
    _, data = report(original_with(b"Subject: x", body=body), return_content="full")
    assert longest_line(data) <= 998
    assert b"\r\nshort\r\n" in data
    assert data.count(b"b") >= 5000


# --------------------------------------------------------------------------- fuzz target

_FUZZ_CHARSETS = [
    "utf-8",
    "UTF-8",
    "us-ascii",
    "iso-8859-1",
    "iso-2022-jp",
    "shift_jis",
    "euc-kr",
    "gb2312",
    "koi8-r",
    "utf-16",
    "utf-7",
    "utf-8*en",
    "x-unknown",
    "unknown-8bit",
    "bogus",
    "",
    "idna",
    "punycode",
    "base64",
    "rot13",
    "unicode_escape",
    "a" * 80,
]
_FUZZ_NASTY = [
    b"\r",
    b"\n",
    b"\r\n",
    b"\r\n ",
    b"\r\n\r\n",
    b"\x00",
    b"\r\nBcc: evil@x.example",
    b"\nX-Injected: 1\r\n",
    b"\x0b\x0c\x1c\x1d\x1e\x7f",
    "\u2028\x85\u2029".encode(),
    b"\xc2\x85",
    b"\xff\xfe",
    b"=?",
    b"?=",
    b" ",
    b"\t",
    b"(",
    b")",
    b";",
    b'"',
    b"\\",
]
_FUZZ_PAYLOADS = st.one_of(
    st.text(max_size=30),
    st.sampled_from(
        ["\r\nBcc: evil@x.example", "\r\n\r\n", "\x00", "=?utf-8?q?=0D=0A?=", "\u2028"]
    ),
)


def _q_encode(octets: bytes) -> str:
    safe = set(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    return "".join(chr(b) if b in safe else f"={b:02X}" for b in octets)


@st.composite
def encoded_words(draw: st.DrawFn) -> bytes:
    """An RFC 2047 encoded-word of any charset and encoding: well-formed around hostile text
    (CR LF, NUL, encoded-word lookalikes), around raw octets (invalid in its charset), or junk."""
    charset = draw(st.sampled_from(_FUZZ_CHARSETS))
    encoding = draw(st.sampled_from("bBqQ"))
    form = draw(st.sampled_from(["text", "octets", "junk"]))
    if form == "junk":
        encoded = draw(st.text(alphabet="ABCabc019+/=_-?!*. \t\u00e9", max_size=40))
    else:
        if form == "text":
            text = draw(_FUZZ_PAYLOADS)
            try:
                octets = text.encode(codecs.lookup(charset.partition("*")[0]).name)
            except (LookupError, UnicodeError, ValueError, TypeError):
                octets = text.encode("utf-8", "surrogatepass")
        else:
            octets = draw(st.binary(max_size=30))
        if encoding in "bB":
            encoded = base64.b64encode(octets).decode("ascii")
            if draw(st.booleans()):  # malformed: cut or padding lost
                encoded = encoded[: draw(st.integers(0, len(encoded)))]
        else:
            encoded = _q_encode(octets)
    return f"=?{charset}?{encoding}?{encoded}?=".encode("utf-8", "surrogatepass")


def _long(piece: bytes, count: int) -> bytes:
    return piece * count


_FRAGMENTS = st.one_of(
    encoded_words(),
    st.binary(max_size=30),
    st.sampled_from(_FUZZ_NASTY),
    st.text(max_size=20).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.builds(
        _long,
        st.sampled_from([b"x", b"x ", "é".encode(), "日".encode(), b"\xe9", b"=?", b"\t"]),
        st.integers(300, 2500),
    ),
)
_HEADER_VALUES = st.lists(_FRAGMENTS, max_size=6).map(b"".join)
_HEADER_NAMES = st.sampled_from(
    ["Subject"] * 4
    + ["X-Test", "From", "To", "Received", "Message-ID", "Content-Transfer-Encoding"]
    + ["Content-Type", "Auto-Submitted", "Return-Path", "Bcc", "Subject "]
)
_SENDER = b"Return-Path: <a@example.com>\r\n"


@st.composite
def hostile_originals(draw: st.DrawFn) -> bytes:
    """An original with a valid Return-Path (mostly) and hostile header lines and body:
    encoded-words of every charset, encoding and validity, raw 8-bit, CR/LF/NUL anywhere,
    over-long lines."""
    sender = _SENDER if draw(st.integers(0, 9)) else b"Return-Path: " + draw(_HEADER_VALUES)
    lines = draw(
        st.lists(st.tuples(_HEADER_NAMES, _HEADER_VALUES), min_size=1, max_size=5).map(
            lambda items: b"".join(name.encode() + b": " + value + b"\r\n" for name, value in items)
        )
    )
    body = draw(st.lists(_FRAGMENTS, max_size=4).map(b"".join))
    return sender + lines + b"\r\n" + body


_PART_HEADERS = [
    {"Content-Type", "Content-Transfer-Encoding", "Content-Language"},
    {"Content-Type"},
]
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


@pytest.mark.fuzz
@given(
    hostile_originals(),
    st.sampled_from(["headers", "full", "none"]),
    st.sampled_from(dsn_languages()),
    st.booleans(),
)
def test_fuzz_hostile_headers_never_add_headers_or_long_lines(
    original: bytes, return_content: str, language: str, utf8_recipient: bool
) -> None:
    """For any original, in every return_content mode and language, the report serialises,
    re-parses with the stdlib to exactly the expected headers and parts, has a Subject without
    controls, and no line over 998 octets; the only error is InvalidDsn for a bad Return-Path."""
    recipient = "花子@例え.jp" if utf8_recipient else "bob@example.org"
    try:
        msg = make(original, [recipient], language=language, return_content=return_content)
    except InvalidDsn:
        assert not original.startswith(_SENDER)
        event("InvalidDsn")
        return
    if msg is None:  # Auto-Submitted or a multipart/report original: no report, by design
        event("no report")
        return
    event(f"report, {return_content}")
    data = msg.as_bytes()
    assert b"\r" not in data.replace(b"\r\n", b"")
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert longest_line(data) <= 998
    parsed, blocks = parse(data)
    assert set(parsed.keys()) == _TOP
    assert not parsed.defects
    subject = parsed["Subject"]
    assert subject == msg["Subject"]
    assert not _CONTROLS.search(subject)
    assert subject.startswith({"en": "Undeliverable", "ja": "配信不能"}.get(language, ""))
    assert len(blocks) == 2
    assert set(blocks[0]) == {"Reporting-MTA", "Arrival-Date"}
    assert set(blocks[1]) == {
        "Final-Recipient",
        "Action",
        "Status",
        "Diagnostic-Code",
        "Last-Attempt-Date",
    }
    parts = parts_of(parsed)
    global_form = parsed["Content-Type"].params["report-type"] == "global-delivery-status"
    returned = {
        "headers": ["message/global-headers" if global_form else "text/rfc822-headers"],
        "full": ["message/global" if global_form else "message/rfc822"],
        "none": [],
    }[return_content]
    status = "message/global-delivery-status" if global_form else "message/delivery-status"
    assert [part.get_content_type() for part in parts] == ["text/plain", status, *returned]
    assert [set(part.keys()) for part in parts[:2]] == _PART_HEADERS
    for part in parts[2:]:
        assert set(part.keys()) <= {"Content-Type", "Content-Transfer-Encoding"}
