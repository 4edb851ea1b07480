"""Tests for SMTP replies: validation, rendering, wrapping, parsing and the reply catalogue."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domainpolicy import (
    POSTFIX_REJECT_RESERVE,
    InvalidConfiguration,
    InvalidDomain,
    InvalidReply,
    Reply,
    ReplyCatalog,
    ReplyCode,
    sanitize_reply_text,
)
from domainpolicy.testing import replies, reply_texts
from test_replies_grammar import assert_valid_reply

GOLDEN = Path(__file__).parent / "golden" / "replies.txt"
REGEN = os.environ.get("DOMAINPOLICY_REGEN_GOLDEN") == "1"

EXPECTED = {
    ReplyCode.BLOCKED_UNREGISTERED: "550 5.7.750 Service unavailable. Client blocked from sending "
    "from unregistered domains",
    ReplyCode.TENANT_SUSPENDED: "550 5.7.705 Access denied, tenant has exceeded threshold",
    ReplyCode.RELAY_DENIED: "550 5.7.64 TenantAttribution; Relay Access Denied",
    ReplyCode.IP_REJECTED: "550 5.7.708 Access denied, traffic not accepted from this IP",
    ReplyCode.TEMP_RESTRICTED: "451 4.7.500 Access denied, please try again later",
    ReplyCode.STORE_UNAVAILABLE: "451 4.3.0 Temporary policy failure, please try again later",
    ReplyCode.BAD_SENDER: "501 5.1.7 Bad sender address syntax",
}


# --------------------------------------------------------------------------- catalogue defaults


@pytest.mark.parametrize("code", list(ReplyCode))
def test_default_replies_are_exact(code: ReplyCode) -> None:
    """Every catalogue code renders its documented default reply and passes the grammar check."""
    reply = code.reply()
    assert str(reply) == EXPECTED[code]
    assert (reply.code, reply.status) == (code.code, code.status)
    assert_valid_reply(reply.to_bytes())


def test_golden_replies() -> None:
    """The rendered default replies (with and without server name) match the golden file."""
    rendered = "".join(
        f"{code.name}\n{code.reply()}\n{code.reply(server_name='MX1.example.net')}\n"
        for code in ReplyCode
    )
    if REGEN:
        GOLDEN.write_text(rendered, encoding="ascii")
    assert GOLDEN.read_text(encoding="ascii") == rendered


def test_server_name_is_appended_in_brackets_keeping_case() -> None:
    """The server name goes at the end in brackets, as Exchange does, capitalisation kept."""
    reply = ReplyCode.BLOCKED_UNREGISTERED.reply(server_name="BN8NAM11FT010.eop.example.com.")
    assert str(reply).endswith("unregistered domains [BN8NAM11FT010.eop.example.com]")


def test_idn_server_name_is_shown_as_alabels() -> None:
    """A non-ASCII server name is shown in its ASCII (A-label) form."""
    assert str(ReplyCode.BAD_SENDER.reply(server_name="mx.bücher.de")).endswith(
        "[mx.xn--bcher-kva.de]"
    )


@pytest.mark.parametrize("name", ["mx1\r\n250 OK", "mx 1", "", "a..b", "-x.example"])
def test_bad_server_name_raises_invalid_reply(name: str) -> None:
    """A server name that is not a host name is refused, with the InvalidDomain as the cause."""
    with pytest.raises(InvalidReply, match="server name") as info:
        ReplyCode.TENANT_SUSPENDED.reply(server_name=name)
    assert isinstance(info.value.__cause__, InvalidDomain)


@pytest.mark.parametrize(
    ("key", "member"),
    [
        ("BLOCKED_UNREGISTERED", ReplyCode.BLOCKED_UNREGISTERED),
        ("temp_restricted", ReplyCode.TEMP_RESTRICTED),
        ("5.7.64", ReplyCode.RELAY_DENIED),
        (" 4.3.0 ", ReplyCode.STORE_UNAVAILABLE),
    ],
)
def test_lookup_by_name_or_status(key: str, member: ReplyCode) -> None:
    """Codes are found by member name in any case or by enhanced status code."""
    assert ReplyCode.lookup(key) is member


def test_lookup_unknown_raises() -> None:
    """An unknown code name is refused with the list of known names."""
    with pytest.raises(InvalidReply, match=r"'5\.7\.999'.*BLOCKED_UNREGISTERED"):
        ReplyCode.lookup("5.7.999")


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("code", [600, 199, 560, 5500, 55, True, "550", 550.0, None])
def test_invalid_reply_codes_are_refused(code: object) -> None:
    """Codes outside [2-5][0-5][0-9], and non-int codes, raise InvalidReply naming the value."""
    with pytest.raises(InvalidReply, match="reply code"):
        Reply(code, "5.7.1", "x")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "status", ["5.07.1", "5.7.01", "5.1000.1", "5.1.1000", "3.1.1", "5.7", "5.7.1.", "", 571]
)
def test_invalid_enhanced_codes_are_refused(status: object) -> None:
    """Malformed RFC 3463 codes (leading zeros, 4 digits, bad class) raise InvalidReply."""
    with pytest.raises(InvalidReply, match="enhanced status code"):
        Reply(550, status, "x")  # type: ignore[arg-type]


@pytest.mark.parametrize(("code", "status"), [(550, "4.7.1"), (451, "5.7.1"), (354, "2.0.0")])
def test_class_must_agree_with_code(code: int, status: str) -> None:
    """The enhanced code class must equal the reply code's first digit; 3xx cannot have one."""
    with pytest.raises(InvalidReply, match="class"):
        Reply(code, status, "x")


@pytest.mark.parametrize(
    "text", ["a\r\n250 OK", "a\nb", "a\rb", "nul\x00", "del\x7f", "café", "\x85"]
)
def test_control_and_non_ascii_text_is_refused(text: str) -> None:
    """The constructor refuses CR, LF, NUL, other controls and non-ASCII, naming the position."""
    with pytest.raises(InvalidReply, match=r"U\+[0-9A-F]{4} at position"):
        Reply(550, "5.7.1", text)


@pytest.mark.parametrize("text", [[], b"bytes", 5, ["ok", 5]])
def test_text_of_wrong_type_is_refused(text: object) -> None:
    """Text must be a str or an iterable of str with at least one line."""
    with pytest.raises(InvalidReply):
        Reply(550, "5.7.1", text)


# --------------------------------------------------------------------------- rendering


def test_multiline_reply_repeats_code_and_status() -> None:
    """Every line carries the code and the enhanced status code; only the last uses a space."""
    reply = Reply(550, "5.7.750", ["first", "", "last"])
    assert reply.lines() == ("550-5.7.750 first", "550-5.7.750", "550 5.7.750 last")
    assert str(reply) == "550-5.7.750 first\r\n550-5.7.750\r\n550 5.7.750 last"
    assert reply.to_bytes() == b"550-5.7.750 first\r\n550-5.7.750\r\n550 5.7.750 last\r\n"
    assert_valid_reply(reply.to_bytes())


def test_long_text_wraps_at_word_boundaries() -> None:
    """Text too long for one 512-octet line is split at spaces, never inside a word."""
    words = [f"word{i:03d}" for i in range(150)]
    reply = Reply(550, "5.7.750", " ".join(words))
    assert len(reply.text) > 1
    assert " ".join(reply.text).split() == words
    for line in reply.to_bytes().split(b"\r\n")[:-1]:
        assert len(line) + 2 <= 512
    assert max(len(line) for line in reply.lines()) > 490  # lines are filled, not split early


def test_a_word_longer_than_a_line_is_cut() -> None:
    """A single word longer than the room on a line is cut into pieces that fit."""
    reply = Reply(550, "5.7.750", "x" * 1200)
    assert "".join(reply.text) == "x" * 1200
    assert [len(line) for line in reply.lines()] == [510, 510, 12 + 1200 - 2 * 498]
    assert_valid_reply(reply.to_bytes())


def test_wrapping_is_idempotent() -> None:
    """Making a reply from already wrapped lines leaves them unchanged."""
    reply = Reply(550, "5.7.750", "a " * 700)
    assert Reply(550, "5.7.750", reply.text) == reply


def test_transience_flags() -> None:
    """4xx replies are transient and 5xx permanent."""
    assert ReplyCode.TEMP_RESTRICTED.reply().is_transient
    assert not ReplyCode.TEMP_RESTRICTED.reply().is_permanent
    assert ReplyCode.BLOCKED_UNREGISTERED.reply().is_permanent


def test_safe_folds_injection_into_one_line() -> None:
    """Reply.safe turns CR/LF injection and non-ASCII into harmless characters on one line."""
    reply = Reply.safe(550, "5.7.1", "blocked\r\n250 2.0.0 OK\x00 café 日本")
    assert reply.text == ("blocked  250 2.0.0 OK  cafe ??",)
    assert_valid_reply(reply.to_bytes())


def test_sanitize_keeps_tabs_and_strips_ends() -> None:
    """HT is allowed inside text; leading and trailing blanks are removed."""
    assert sanitize_reply_text("  a\tb \u2028c\t ") == "a\tb  c"


def test_sanitize_refuses_non_text() -> None:
    """sanitize_reply_text raises InvalidReply for non-str input."""
    with pytest.raises(InvalidReply, match="not a str"):
        sanitize_reply_text(b"x")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- single line


def test_single_line_joins_and_fits_postfix_reserve() -> None:
    """single_line gives one line that still fits after Postfix inserts the recipient text."""
    reply = Reply(550, "5.7.750", ["first line", "w " * 400])
    one = reply.single_line(reserve=POSTFIX_REJECT_RESERVE)
    assert len(one.text) == 1
    assert one.text[0].startswith("first line. w w")
    assert one.text[0].endswith("...")
    assert len(one.lines()[0]) + POSTFIX_REJECT_RESERVE + 2 <= 512
    rcpt = "<" + "r" * 64 + "@" + "d" * 180 + ".example>"
    postfix_line = f"550 5.7.750 {rcpt}: Recipient address rejected: {one.text[0]}\r\n"
    assert len(postfix_line.encode()) <= 512


def test_single_line_leaves_short_replies_alone() -> None:
    """A reply that already fits is only joined, not truncated."""
    assert str(Reply(451, "4.3.0", ["a", "b"]).single_line()) == "451 4.3.0 a. b"
    assert str(Reply(451, "4.3.0", ["a.", "b"]).single_line()) == "451 4.3.0 a. b"
    assert str(Reply(451, "4.3.0", ["a:", "b"]).single_line()) == "451 4.3.0 a: b"


@pytest.mark.parametrize("reserve", [-1, 600, True, 1.5])
def test_single_line_bad_reserve(reserve: object) -> None:
    """A negative, non-int or too large reserve raises InvalidReply."""
    with pytest.raises(InvalidReply, match="reserve"):
        Reply(550, "5.7.1", "x").single_line(reserve=reserve)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- parsing


def test_parse_accepts_remote_style_replies() -> None:
    """Replies whose continuation lines lack the status code parse, keeping the text."""
    reply = Reply.parse(b"550-5.7.1 first\r\n550-second\r\n550 5.7.1 third\r\n")
    assert reply == Reply(550, "5.7.1", ["first", "second", "third"])


def test_parse_of_code_only_line_needs_status() -> None:
    """A reply without an enhanced status code cannot become a Reply."""
    with pytest.raises(InvalidReply, match="enhanced status code"):
        Reply.parse("250")


@pytest.mark.parametrize(
    "bad",
    [
        "550-5.7.1 a\r\n451 4.7.1 b",
        "550-5.7.1 a",
        "550 5.7.1 a\r\n550 5.7.1 b",
        "550 5.7.1 a\nb",
        "550 5.7.1 " + "x" * 501,
        "550 4.7.1 mismatch",
        "5505.7.1",
        "",
        b"550 5.7.1 caf\xc3\xa9",
    ],
)
def test_parse_rejects_malformed(bad: str | bytes) -> None:
    """Malformed replies (mixed codes, bad continuation, bare LF, >512 octets...) are refused."""
    with pytest.raises(InvalidReply):
        Reply.parse(bad)


def test_parse_refuses_non_text() -> None:
    """Only str and bytes can be parsed."""
    with pytest.raises(InvalidReply, match="not str or bytes"):
        Reply.parse(550)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- catalogue


def test_catalog_overrides_per_code_and_per_tenant() -> None:
    """Tenant overrides beat code overrides, which beat defaults; {default} is substituted."""
    catalog = (
        ReplyCatalog(server_name="mx1.example.net")
        .with_text(ReplyCode.TENANT_SUSPENDED, "Blocked; see https://status.example.net")
        .with_text(
            ReplyCode.BLOCKED_UNREGISTERED,
            "{default}. Help: https://support.example.net/t/42",
            tenant="tenant-42",
        )
    )
    code = ReplyCode.BLOCKED_UNREGISTERED
    assert str(catalog.reply(code, tenant="tenant-42")) == (
        "550 5.7.750 Service unavailable. Client blocked from sending from unregistered domains."
        " Help: https://support.example.net/t/42 [mx1.example.net]"
    )
    assert str(catalog.reply(code, tenant="other")) == EXPECTED[code] + " [mx1.example.net]"
    assert str(
        catalog.reply(ReplyCode.TENANT_SUSPENDED, tenant="tenant-42", server_name="mx2.example")
    ) == ("550 5.7.705 Blocked; see https://status.example.net [mx2.example]")
    for member in ReplyCode:
        assert_valid_reply(catalog.reply(member, tenant="tenant-42").to_bytes())


def test_catalog_multiline_override() -> None:
    """A newline in override text starts another line of a multi-line reply."""
    catalog = ReplyCatalog().with_text(ReplyCode.RELAY_DENIED, "{default}\nAsk your admin")
    assert catalog.reply(ReplyCode.RELAY_DENIED).lines() == (
        "550-5.7.64 TenantAttribution; Relay Access Denied",
        "550 5.7.64 Ask your admin",
    )


@pytest.mark.parametrize("text", ["evil\r\n250 OK", "tab\tok\x00", "ünïcode"])
def test_catalog_refuses_bad_override_text(text: str) -> None:
    """Operator text with controls or non-ASCII is refused when registered, naming the code."""
    with pytest.raises(InvalidReply, match="override text for BAD_SENDER"):
        ReplyCatalog().with_text(ReplyCode.BAD_SENDER, text)


def test_catalog_refuses_bad_arguments() -> None:
    """Unknown codes, non-str tenants and bad server names raise InvalidReply."""
    with pytest.raises(InvalidReply):
        ReplyCatalog().with_text("5.7.750", "x")  # type: ignore[arg-type]
    with pytest.raises(InvalidReply):
        ReplyCatalog().with_text(ReplyCode.BAD_SENDER, "x", tenant=42)  # type: ignore[arg-type]
    with pytest.raises(InvalidReply):
        ReplyCatalog().reply("5.7.750")  # type: ignore[arg-type]
    with pytest.raises(InvalidReply):
        ReplyCatalog(server_name="bad name")


def test_catalog_equality_and_immutability() -> None:
    """Catalogues compare and hash by content; with_text returns a new catalogue."""
    base = ReplyCatalog()
    changed = base.with_text(ReplyCode.BAD_SENDER, "x")
    assert base != changed
    assert changed == ReplyCatalog().with_text(ReplyCode.BAD_SENDER, "x")
    assert hash(changed) == hash(ReplyCatalog().with_text(ReplyCode.BAD_SENDER, "x"))
    assert str(base.reply(ReplyCode.BAD_SENDER)) == EXPECTED[ReplyCode.BAD_SENDER]


def test_catalog_from_mapping() -> None:
    """Configuration tables name codes by member name or status, globally and per tenant."""
    catalog = ReplyCatalog.from_mapping(
        {
            "server_name": "mx1.example.net",
            "texts": {"BLOCKED_UNREGISTERED": "{default}. See https://help.example.net"},
            "tenants": {"t1": {"5.7.750": "{default}. Call 555 0100"}},
        }
    )
    assert str(catalog.reply(ReplyCode.BLOCKED_UNREGISTERED)).endswith(
        "domains. See https://help.example.net [mx1.example.net]"
    )
    assert "Call 555 0100" in str(catalog.reply(ReplyCode.BLOCKED_UNREGISTERED, tenant="t1"))


def test_catalog_from_mapping_lists_every_problem() -> None:
    """All configuration problems are reported together in InvalidConfiguration."""
    with pytest.raises(InvalidConfiguration) as info:
        ReplyCatalog.from_mapping(
            {
                "server_name": "bad name",
                "texts": {"5.7.999": "x", "BAD_SENDER": "a\r\nb"},
                "tenants": {"t": "not a table"},
                "extra": 1,
            },
            source="replies.toml",
        )
    assert len(info.value.problems) == 5
    assert info.value.source == "replies.toml"
    with pytest.raises(InvalidConfiguration):
        ReplyCatalog.from_mapping([])  # type: ignore[arg-type]
    with pytest.raises(InvalidConfiguration):
        ReplyCatalog.from_mapping({"tenants": []})


# --------------------------------------------------------------------------- properties

_codes = st.sampled_from([250, 451, 452, 550, 554, 501, 421])


@given(_codes, reply_texts())
def test_safe_never_breaks_the_grammar(code: int, text: str) -> None:
    """Any caller text made safe gives exactly one grammatical reply that parses back."""
    reply = Reply.safe(code, f"{str(code)[0]}.7.750", text)
    assert_valid_reply(reply.to_bytes())
    assert Reply.parse(str(reply)) == reply
    assert Reply.parse(reply.to_bytes()) == reply


@given(_codes, st.lists(reply_texts(), min_size=1, max_size=3))
def test_constructor_refuses_or_renders_valid(code: int, lines: list[str]) -> None:
    """The strict constructor either raises InvalidReply or renders a grammatical reply."""
    try:
        reply = Reply(code, f"{str(code)[0]}.1.0", lines)
    except InvalidReply:
        return
    assert_valid_reply(reply.to_bytes())
    assert len(reply.lines()) >= len(lines)


@given(replies())
def test_parse_is_the_inverse_of_rendering(reply: Reply) -> None:
    """Reply.parse(str(r)) == r and Reply.parse(r.to_bytes()) == r for every valid reply."""
    assert_valid_reply(reply.to_bytes())
    assert Reply.parse(str(reply)) == reply
    assert Reply.parse(reply.to_bytes()) == reply


@given(replies(), st.integers(0, 400), st.sampled_from(["mx1.example.net", "a.b"]))
def test_single_line_and_server_name_keep_limits(reply: Reply, reserve: int, server: str) -> None:
    """single_line and with_server keep every line within 512 octets."""
    one = reply.with_server(server).single_line(reserve=reserve)
    assert len(one.text) == 1
    assert len(one.to_bytes()) + reserve <= 512
    assert_valid_reply(one.to_bytes())
