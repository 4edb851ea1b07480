"""An independent RFC 5321 / RFC 2034 reply-grammar checker, used on every reply we render."""

from __future__ import annotations

import re

import pytest

_LINE = re.compile(rb"([2-5][0-5][0-9])(?:([ -])([\t\x20-\x7e]+))?\Z")
_ENHANCED = re.compile(rb"([245])\.(?:0|[1-9][0-9]{0,2})\.(?:0|[1-9][0-9]{0,2})(?: |\Z)")


def assert_valid_reply(data: bytes | str) -> list[bytes]:
    """Fail unless *data* is exactly one well-formed SMTP reply with enhanced status codes.

    RFC 5321 section 4.2 Reply-line grammar, textstring of HT and %d32-126, at most 512 octets per
    line with CRLF, the same code on every line, '-' on all but the last line; RFC 2034: every
    line's text starts with an enhanced status code of the reply's class.  *str* input is the
    CRLF-joined form without a final CRLF.
    """
    raw = data.encode("ascii") if isinstance(data, str) else data
    if isinstance(data, str):
        raw += b"\r\n"
    assert raw.endswith(b"\r\n"), raw
    lines = raw[:-2].split(b"\r\n")
    codes = set()
    for number, line in enumerate(lines):
        assert b"\r" not in line, line
        assert b"\n" not in line, line
        assert len(line) + 2 <= 512, (len(line), line[:60])
        match = _LINE.match(line)
        assert match is not None, line
        codes.add(match.group(1))
        last = number == len(lines) - 1
        assert match.group(2) == (b" " if last else b"-"), line
        enhanced = _ENHANCED.match(match.group(3) or b"")
        assert enhanced is not None, line
        assert enhanced.group(1) == match.group(1)[:1], line
    assert len(codes) == 1, codes
    return lines


def test_checker_accepts_a_multiline_reply() -> None:
    """The checker accepts a correct two-line reply."""
    assert len(assert_valid_reply(b"550-5.7.1 first\r\n550 5.7.1 second\r\n")) == 2


@pytest.mark.parametrize(
    "bad",
    [
        b"550 5.7.1 text",  # no CRLF
        b"550 5.7.1 a\nb\r\n",  # bare LF
        b"550-5.7.1 a\r\n451 4.7.1 b\r\n",  # mixed codes
        b"550-5.7.1 a\r\n",  # continuation without a last line
        b"550 5.7.1 a\r\n550 5.7.1 b\r\n",  # two replies
        b"550 4.7.1 class mismatch\r\n",
        b"550 text without status\r\n",
        b"550 5.7.1 caf\xc3\xa9\r\n",
        b"550 5.7.1 " + b"x" * 501 + b"\r\n",
        b"650 5.7.1 x\r\n",
    ],
)
def test_checker_rejects_malformed_replies(bad: bytes) -> None:
    """The checker itself catches every kind of grammar violation we care about."""
    with pytest.raises(AssertionError):
        assert_valid_reply(bad)
