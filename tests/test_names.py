"""Domain normalisation: example tables, properties and agreement between the two paths."""

from __future__ import annotations

import contextlib
import pickle
from functools import partial

import idna
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from domainpolicy import (
    MAX_INPUT_CHARS,
    DomainPolicyError,
    InvalidDomain,
    domain_to_unicode,
    normalize_domain,
)
from domainpolicy._names import _ascii_path, _normalize_uncached, _unicode_path
from domainpolicy.testing import domains, hostile_text
from threads import run_in_threads

VALID = [
    ("example.com", "example.com"),
    ("Example.COM", "example.com"),
    ("example.com.", "example.com"),
    ("Bücher.Example.", "xn--bcher-kva.example"),
    ("faß.de", "xn--fa-hia.de"),
    ("ex。ample．com｡", "ex.ample.com"),
    ("XN--BCHER-KVA.example", "xn--bcher-kva.example"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("test.пример.рф", "test.xn--e1afmkfd.xn--p1ai"),
    ("ドメイン.テスト", "xn--eckwd4c7c.xn--zckzah"),
    ("ＥＸＡＭＰＬＥ．ＣＯＭ", "example.com"),
    ("a\u00adb.com", "ab.com"),
    ("a" * 63 + ".com", "a" * 63 + ".com"),
    ("1.2.3.example", "1.2.3.example"),
    ("123.com", "123.com"),
    ("x1.a1", "x1.a1"),
    ("a-b.c-d.example", "a-b.c-d.example"),
    ("sub.xn--fa-hia.de", "sub.xn--fa-hia.de"),
    (".".join(["a" * 63] * 3) + "." + "b" * 61, ".".join(["a" * 63] * 3) + "." + "b" * 61),
]

INVALID = [
    ("", "empty"),
    (".", "empty"),
    ("example..com", "empty_label"),
    (".example.com", "empty_label"),
    ("example.com..", "empty_label"),
    ("-abc.example", "bad_hyphen"),
    ("abc-.example", "bad_hyphen"),
    ("ab--cd.example", "reserved_hyphens"),
    ("a" * 64 + ".com", "label_too_long"),
    (".".join(["a" * 63] * 4) + ".com", "too_long"),
    (".".join(["a" * 63] * 3) + "." + "b" * 62, "too_long"),
    ("a_b.example", "disallowed_codepoint"),
    ("a b.example", "disallowed_codepoint"),
    ("exa!mple.com", "disallowed_codepoint"),
    ("exa\x00mple.com", "disallowed_codepoint"),
    ("example.com\r\n", "disallowed_codepoint"),
    ("⒈com", "disallowed_codepoint"),
    ("1.2.3.4", "numeric_tld"),
    ("example.123", "numeric_tld"),
    ("xn--0ca24w.example", "bad_alabel"),
    ("xn--a.example", "bad_alabel"),
    ("xn--abc.example", "bad_alabel"),
    ("xn--ls8h.xn--.com", "bad_alabel"),
    ("XN--BCHER-KVA-.example", "bad_hyphen"),
    ("xn--bcher-kvA.example", None),  # valid: A-labels are case-insensitive
    ("localhost", "single_label"),
    ("\u0660" * 2000, "input_too_long"),
    ("a" * (MAX_INPUT_CHARS + 1), "input_too_long"),
    ("\u200d.example", "context_rule"),
    ("\u0301a.example", "leading_combining_mark"),
    ("a\ud800.example", "disallowed_codepoint"),
    ("ü" * 60 + ".com", "label_too_long"),
]


@pytest.mark.parametrize(("text", "expected"), VALID)
def test_valid_domains_normalise_to_canonical_a_labels(text: str, expected: str) -> None:
    """Every spelling of a valid domain gives the canonical lower-case A-label form."""
    assert normalize_domain(text) == expected


@pytest.mark.parametrize(("text", "reason"), INVALID)
def test_invalid_domains_raise_with_a_stable_reason(text: str, reason: str | None) -> None:
    """Each broken rule raises InvalidDomain carrying its reason code and the offending value."""
    if reason is None:
        assert normalize_domain(text) == text.lower()
        return
    with pytest.raises(InvalidDomain) as info:
        normalize_domain(text)
    assert info.value.reason == reason
    assert info.value.value == text
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, DomainPolicyError)
    assert f"[{reason}]" in str(info.value)


def test_error_message_carries_position_and_repr() -> None:
    """The message shows the repr of the input and the position of the offending character."""
    with pytest.raises(InvalidDomain) as info:
        normalize_domain("a_b.example")
    assert info.value.position == 1
    assert "'a_b.example'" in str(info.value)
    assert "position 1" in str(info.value)


def test_error_message_truncates_huge_input() -> None:
    """A huge offending input is shown truncated, not echoed whole."""
    with pytest.raises(InvalidDomain) as info:
        normalize_domain("x" * 100_000)
    assert len(str(info.value)) < 400


def test_errors_pickle() -> None:
    """Errors survive pickling (multiprocessing, logging handlers)."""
    with pytest.raises(InvalidDomain) as info:
        normalize_domain("a_b.example")
    copy = pickle.loads(pickle.dumps(info.value))
    assert (copy.reason, copy.position, str(copy)) == ("disallowed_codepoint", 1, str(info.value))


@pytest.mark.parametrize("value", [None, 3, b"example.com", ["example.com"]])
def test_non_text_is_refused_with_invalid_domain(value: object) -> None:
    """A value that is not str raises InvalidDomain(reason='not_text'), not TypeError."""
    with pytest.raises(InvalidDomain) as info:
        normalize_domain(value)  # type: ignore[arg-type]
    assert info.value.reason == "not_text"


def test_single_label_allowed_on_request() -> None:
    """Single-label names are refused by default and accepted when the caller asks."""
    assert normalize_domain("LocalHost.", allow_single_label=True) == "localhost"
    assert normalize_domain("рф", allow_single_label=True) == "xn--p1ai"


def test_str_subclass_result_is_plain_str() -> None:
    """A str subclass as input gives a plain str key."""

    class Sub(str):
        pass

    assert type(normalize_domain(Sub("Example.com"))) is str


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("xn--bcher-kva.example", "bücher.example"),
        ("Bücher.Example.", "bücher.example"),
        ("example.com", "example.com"),
        ("test.xn--e1afmkfd.xn--p1ai", "test.пример.рф"),
    ],
)
def test_domain_to_unicode_shows_u_labels(text: str, expected: str) -> None:
    """domain_to_unicode gives the display form with U-labels."""
    assert domain_to_unicode(text) == expected


@given(domains(spellings=True))
def test_idempotent(text: str) -> None:
    """Normalising a normalised domain changes nothing."""
    once = normalize_domain(text)
    assert normalize_domain(once) == once


@given(domains(spellings=True))
def test_unicode_round_trip(text: str) -> None:
    """The display form normalises back to the same key."""
    key = normalize_domain(text)
    assert normalize_domain(domain_to_unicode(key)) == key


def _outcome(function: object, text: str) -> tuple[str, object, object]:
    try:
        return ("ok", function(text), None)  # type: ignore[operator]
    except InvalidDomain as exc:
        return ("error", exc.reason, exc.position)


_ASCII_PIECES = st.sampled_from(
    [
        "a",
        "b",
        "z",
        "0",
        "9",
        "-",
        "--",
        ".",
        "..",
        "xn--",
        "XN--",
        "A",
        "Z",
        "_",
        " ",
        "!",
        "xn--bcher-kva",
        "xn--0ca24w",
        "xn--a",
        "example",
        "com",
        "\x00",
        "\t",
        "~",
        "123",
    ]
)


@given(
    st.one_of(
        st.lists(_ASCII_PIECES, max_size=12).map("".join),
        st.text(alphabet=st.characters(max_codepoint=127)),
    )
)
@example("a" * 64 + ".com")
@example(".".join(["a" * 63] * 4))
@example("1.2.3.4")
@example("ab--cd.com")
@example("a_b..com")
@example("..._")
def test_ascii_fast_path_agrees_with_idna_path(text: str) -> None:
    """For every ASCII input the fast path and the UTS #46 path agree, errors included."""
    assert _outcome(_ascii_path, text) == _outcome(_unicode_path, text)


@given(hostile_text())
def test_arbitrary_text_raises_only_domainpolicy_errors(text: str) -> None:
    """No text makes normalize_domain raise anything but InvalidDomain."""
    try:
        result = normalize_domain(text)
    except InvalidDomain:
        return
    assert result.isascii()
    assert result == result.lower()
    assert len(result) <= 253


def _idna_reference(text: str) -> str | None:
    try:
        encoded = idna.encode(text, uts46=True, std3_rules=True).decode("ascii")
    except (idna.IDNAError, UnicodeError, ValueError):
        return None
    return encoded[:-1] if encoded.endswith(".") else encoded


@given(st.one_of(domains(spellings=True), hostile_text(max_size=120)))
def test_agrees_with_idna_library_on_valid_names(text: str) -> None:
    """Whenever we accept a name, idna.encode(uts46=True, std3_rules=True) gives the same key."""
    try:
        ours = normalize_domain(text)
    except InvalidDomain:
        return
    assert _idna_reference(text) == ours


@given(domains(spellings=True))
def test_accepts_what_idna_accepts(text: str) -> None:
    """Valid names that idna accepts are accepted too, with the same result."""
    reference = _idna_reference(text)
    assert reference is not None
    assert normalize_domain(text) == reference


@pytest.mark.parametrize(
    "text",
    [
        "\u0660" * 100_000,
        "a." * 50_000,
        "xn--" * 25_000,
        "\u0301" * 100_000,
        "\u3002" * 100_000,
        ("\u00ad" * 1000 + "a.") * 100,
    ],
)
def test_long_hostile_input_is_refused_before_any_work(
    text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Input over the cap is refused up front: idna is never reached, so the cost is O(1)."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("idna must not be called for over-long input")

    monkeypatch.setattr(idna, "uts46_remap", forbidden)
    monkeypatch.setattr(idna, "alabel", forbidden)
    monkeypatch.setattr(idna, "ulabel", forbidden)
    with pytest.raises(InvalidDomain) as info:
        normalize_domain(text)
    assert info.value.reason == "input_too_long"


@given(hostile_text(max_size=MAX_INPUT_CHARS))
def test_idna_only_ever_sees_bounded_input(text: str) -> None:
    """idna gets at most the capped input to map and single labels of at most 63 characters.

    idna's own algorithms are quadratic in the worst case (CVE-2024-3651, CVE-2026-45409), so
    bounding what reaches them is what makes normalisation linear in the input length.
    """
    seen: list[tuple[str, int]] = []
    real = (idna.uts46_remap, idna.alabel, idna.ulabel)

    def remap(s: str, *args: object, **kwargs: object) -> str:
        seen.append(("remap", len(s)))
        return real[0](s, *args, **kwargs)  # type: ignore[arg-type]

    def alabel(s: str) -> bytes:
        seen.append(("label", len(s)))
        return real[1](s)

    def ulabel(s: str | bytes) -> str:
        seen.append(("label", len(s)))
        return real[2](s)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(idna, "uts46_remap", remap)
        patch.setattr(idna, "alabel", alabel)
        patch.setattr(idna, "ulabel", ulabel)
        with contextlib.suppress(InvalidDomain):
            _normalize_uncached(text)
    for kind, size in seen:
        assert size <= (MAX_INPUT_CHARS if kind == "remap" else 63), (kind, size)


# --------------------------------------------------------------------------- bounded caches


def test_name_cache_stays_bounded_and_answers_stay_right() -> None:
    """Past its bound the whole-name cache drops its oldest quarter and answers stay right."""
    from domainpolicy import _names

    _names.clear_cache()
    try:
        total = _names._CACHE_SIZE + _names._CACHE_SIZE // 2
        for number in range(total):
            assert normalize_domain(f"Host{number}.Example.") == f"host{number}.example"
            assert len(_names._results) <= _names._CACHE_SIZE
        assert "Host0.Example." not in _names._results  # among the oldest: evicted
        assert f"Host{total - 1}.Example." in _names._results
        assert normalize_domain("Host0.Example.") == "host0.example"  # recomputed
    finally:
        _names.clear_cache()


def test_address_cache_stays_bounded() -> None:
    """The whole-address cache is bounded the same way."""
    from domainpolicy import _names, parse_address

    _names.clear_cache()
    try:
        for number in range(_names._CACHE_SIZE + 100):
            assert parse_address(f"<u{number}@example.com>").local_part == f"u{number}"
            assert len(_names._addresses) <= _names._CACHE_SIZE
    finally:
        _names.clear_cache()


def test_threads_filling_the_cache_past_its_bound_agree() -> None:
    """Threads missing the cache at once all get the right answer, and the cache stays within
    its bound plus one entry per thread."""

    from domainpolicy import _names

    _names.clear_cache()
    threads = 4
    per_thread = _names._CACHE_SIZE // 2
    wrong: list[str] = []

    def work(offset: int) -> None:
        for number in range(offset, offset + per_thread):
            if normalize_domain(f"T{number}.example") != f"t{number}.example":
                wrong.append(f"T{number}.example")

    try:
        run_in_threads(*(partial(work, index * per_thread) for index in range(threads)))
        assert wrong == []
        assert len(_names._results) <= _names._CACHE_SIZE + threads
    finally:
        _names.clear_cache()
