"""The IDN shortcuts of the Unicode path: exactly what idna gives, and idna's errors otherwise."""

from __future__ import annotations

import contextlib
import string
from collections.abc import Iterator

import idna
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from domainpolicy import InvalidDomain, _names, normalize_domain
from domainpolicy._names import (
    _MAX_PATTERNS,
    _normalize_uncached,
    _plain_alabel,
    _plain_mapping,
    _punycode,
    _punycode_extended,
    clear_cache,
)
from domainpolicy.testing import domains, hostile_text, idn_labels
from threads import run_in_threads

# Real U-labels (several from RFC 3492 section 7.1, lower-cased) and their A-labels.
PLAIN_LABELS = [
    ("bücher", "xn--bcher-kva"),
    ("münchen", "xn--mnchen-3ya"),
    ("пример", "xn--e1afmkfd"),
    ("例え", "xn--r8jz45g"),
    ("straße", "xn--strae-oqa"),
    ("faß", "xn--fa-hia"),
    ("ñandú", "xn--and-6ma2c"),
    ("élan", "xn--lan-9la"),
    ("ıstanbul", "xn--stanbul-qfb"),
    ("ελληνικά", "xn--hxargifdar"),
    ("ドメイン", "xn--eckwd4c7c"),
    ("日本語", "xn--wgv71a119e"),
    ("größe2024", "xn--gre2024-1va0s"),
    ("bücher-und-zeitschriften", "xn--bcher-und-zeitschriften-cpc"),
    ("他们为什么不说中文", "xn--ihqwcrb4cv8a8dqg056pqjye"),
    ("他們爲什麽不說中文", "xn--ihqwctvzc91f659drss3x8bo0yb"),
    ("pročprostěnemluvíčesky", "xn--proprostnemluvesky-uyb24dma41a"),
    ("なぜみんな日本語を話してくれないのか", "xn--n8jok5ay5dzabd5bym9f0cm5685rrjetr6pdxa"),
    ("почемужеонинеговорятпорусски", "xn--b1abfaaepdrnnbgefbadotcwatmq2g4l"),
    (
        "porquénopuedensimplementehablarenespañol",
        "xn--porqunopuedensimplementehablarenespaol-fmd56a",
    ),
    ("tạisaohọkhôngthểchỉnóitiếngviệt", "xn--tisaohkhngthchnitingvit-kjcr8268qyxafd2f1b9g"),
    ("3年b組金八先生", "xn--3b-ww4c5e180e575a65lsy2b"),
    ("安室奈美恵-with-super-monkeys", "xn---with-super-monkeys-pc58ag80a8qai00g7n9n"),
    ("hello-another-way-それぞれの場所", "xn--hello-another-way--fc4qua05auwb3674vfr0b"),
    ("ひとつ屋根の下2", "xn--2-u9tlzr9756bt3uc0v"),
    ("majiでkoiする5秒前", "xn--majikoi5-783gue6qz075azm5e"),
    ("パフィーdeルンバ", "xn--de-jg4avhby1noc0d"),
    ("そのスピードで", "xn--d9juau41awczczp"),
]

# Labels the A-label shortcut must leave to idna: right-to-left, marks, context rules,
# characters idna's tables know but this Python's Unicode database does not, hyphen rules,
# too long once encoded, not NFC, not PVALID.
IDNA_ONLY_LABELS = [
    "עברית",  # Hebrew: Bidi Rule applies
    "كتاب",  # Arabic
    "ليهمابتكلموشعربي؟",  # Arabic with a disallowed question mark
    "यहलोगहिन्दीक्योंनहींबोलसकतेहैं",  # Devanagari: combining marks
    "l·l",  # CONTEXTO middle dot
    "a\u200db",  # CONTEXTJ zero-width joiner
    "\u0301a",  # leading combining mark
    "ab--ü",
    "-ü",
    "ü-",
    "세계의모든사람들이한국어를이해한다면얼마나좋을까",  # 24 code points, A-label over 63 octets
    "u\u0308ber",  # not NFC
    "ǆemal",  # not PVALID
    "a\u05c8",  # PVALID in idna's tables, unknown direction to this unicodedata
]


def _outcome(text: str) -> tuple[str, object, object, object]:
    try:
        return ("ok", _normalize_uncached(text), None, None)
    except InvalidDomain as exc:
        return ("error", exc.reason, exc.position, exc.detail)


@contextlib.contextmanager
def _old_code() -> Iterator[None]:
    """Run the Unicode path as it was before the shortcuts: idna for every mapping and label."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_names, "_plain_mapping", lambda text: None)
        patch.setattr(_names, "_alabel_for", lambda ulabel: idna.alabel(ulabel).decode("ascii"))
        patch.setattr(_names, "_ulabel_for", _names._ulabel_for.__wrapped__)
        yield


def _reference_outcome(text: str) -> tuple[str, object, object, object]:
    with _old_code():
        return _outcome(text)


def _idna_alabel(label: str) -> str | None:
    try:
        return idna.alabel(label).decode("ascii")
    except (idna.IDNAError, UnicodeError, ValueError):
        return None


@pytest.mark.parametrize(("label", "expected"), PLAIN_LABELS)
def test_plain_labels_take_the_shortcut_and_match_idna(label: str, expected: str) -> None:
    """Real U-labels get their known A-label from the shortcut, and idna agrees."""
    assert _plain_alabel(label) == expected
    assert idna.alabel(label).decode("ascii") == expected
    assert normalize_domain(f"{label}.example") == f"{expected}.example"


@pytest.mark.parametrize("label", IDNA_ONLY_LABELS)
def test_labels_that_are_not_plain_are_left_to_idna(label: str) -> None:
    """The shortcut declines every label whose checks it cannot settle; outcomes are unchanged."""
    assert _plain_alabel(label) is None
    text = f"{label}.example"
    assert _outcome(text) == _reference_outcome(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("bücher.de", "bücher.de"),
        ("Bücher.DE.", "bücher.de."),
        ("faß.de", "faß.de"),
        ("пример.рф", "пример.рф"),
        ("Übersee.de", None),  # U+00DC maps to U+00FC
        ("ｂücher.de", None),  # full-width letter
        ("a\u00adü.de", None),  # soft hyphen is ignored
        ("u\u0308.de", None),  # not NFC
        ("a_ü.de", None),  # STD3
        ("ü\U000e0001.de", None),  # disallowed
    ],
)
def test_plain_mapping_recognises_text_that_maps_to_itself(text: str, expected: str | None) -> None:
    """Only NFC text whose characters map to themselves (after folding A-Z) is shortcut."""
    assert _plain_mapping(text) == expected
    if expected is not None:
        assert idna.uts46_remap(text, std3_rules=True, transitional=False) == expected


@pytest.mark.parametrize("char", [chr(code) for code in range(128)])
def test_ascii_maps_in_unicode_text_as_it_does_alone(char: str) -> None:
    """Inside non-ASCII text UTS #46 maps each ASCII character as str.lower does, or refuses it."""
    text = f"{char}é"
    try:
        mapped: str | None = idna.uts46_remap(text, std3_rules=True, transitional=False)
    except idna.IDNAError:
        mapped = None
    if char in string.ascii_letters + string.digits + "-.":
        assert mapped == f"{char.lower()}é"
    else:
        assert mapped is None


def test_known_names_call_no_idna_function() -> None:
    """Once its characters are known, a plain IDN name is normalised without calling idna."""
    names = ["bücher-shop.de", "Münchner-Bücher.DE", "пример.рф", "日本語.jp", "faß.de"]
    expected = [_normalize_uncached(name) for name in names]  # learns the characters
    clear_cache()

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("idna must not be called for a plain name")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(idna, "uts46_remap", forbidden)
        patch.setattr(idna, "alabel", forbidden)
        assert [_normalize_uncached(name) for name in names] == expected


_ALPHABET = (
    list("abcxyz019-.")
    + list("ABCZ_ !~")
    + list("äöüßéñçåøÿıÄÖÜ\u00b7\u00ad\u00df")
    + list("примерфжЖЯ")
    + list("αβγλςΣ\u0375")
    + list("例え日本語中文ドメインテスト\u30fb")
    + list("한국어")
    + list("עברית\u05f3\u05f4")
    + list("كتاب\u0660\u0661\u06f1\u06f2")
    + list("हिन्दी\u094d")
    + ["\u0301", "\u0308", "\u0327", "\u200c", "\u200d"]
    + list("ｂＡ！。．｡")
    + ["\u212b", "\u212a", "\ufb00", "\u0130", "\u2488", "\u05c8", "\u0cf3", "\U00020000"]
    + ["\U0001f600", "\ud800", "\x00", "\t"]
)
_PIECES = ["bücher", "xn--", "xn--bcher-kva", "--", ".de", ".", "a" * 20, "ü" * 20, "u\u0308"]


@given(
    st.one_of(
        st.text(alphabet=st.sampled_from(_ALPHABET), max_size=70),
        st.lists(st.sampled_from(_ALPHABET + _PIECES), max_size=25).map("".join),
        domains(spellings=True),
        hostile_text(max_size=120),
    )
)
@example("ü" * 59 + ".de")
@example("ü" * 60 + ".de")
@example("세계의모든사람들이한국어를이해한다면얼마나좋을까.kr")
@example("a\u200db.de")
@example("Bücher.Example.")
@example("bu\u0308cher.de")
def test_shortcuts_give_the_outcome_of_the_old_code(text: str) -> None:
    """For any text the result, or the error's reason, position and detail, is unchanged."""
    assert _outcome(text) == _reference_outcome(text)


@given(st.text(alphabet=st.sampled_from(_ALPHABET), max_size=40))
def test_plain_mapping_is_what_idna_maps_to(text: str) -> None:
    """Whenever the mapping shortcut answers, idna.uts46_remap gives the same string."""
    mapped = _plain_mapping(text)
    if mapped is not None:
        assert idna.uts46_remap(text, std3_rules=True, transitional=False) == mapped


_SIMPLE = string.ascii_lowercase + string.digits + "-" + "äöüßéñçåøÿı" + "примерфжя" + "αβγλς"
_SIMPLE += "例え日本語ドメイン한국"


@given(
    st.one_of(
        st.text(alphabet=_SIMPLE, min_size=1, max_size=70),
        idn_labels(max_size=59),
    ).filter(lambda label: not label.isascii())
)
@example("ü" * 59)
@example("-ü")
@example("üb--c")
def test_plain_alabel_equals_idna_alabel(label: str) -> None:
    """For PVALID left-to-right letters the shortcut answers when idna accepts, identically."""
    assert _plain_alabel(label) == _idna_alabel(label)


def test_simple_alphabet_is_simple() -> None:
    """Every character the property above draws passes the per-character test."""
    assert all(_names._is_simple(char) for char in _SIMPLE)


@given(st.text(max_size=60), st.text(alphabet=st.characters(max_codepoint=127), max_size=60))
@example("", "")
@example("abc", "xyz")
@example("ü", "")
@example("a-ü-b", "--")
def test_punycode_pattern_memo_is_exact(label: str, ascii_text: str) -> None:
    """The memoised Punycode equals the codec's, also for another label of the same pattern."""
    assert _punycode(label) == label.encode("punycode")
    assert _punycode(label) == label.encode("punycode")  # now from the memo
    replacements = iter(ascii_text)
    other = "".join(next(replacements, "a") if char.isascii() else char for char in label)
    assert _punycode(other) == other.encode("punycode")


@given(st.text(max_size=60))
@example("")
@example("a-b")
@example("\U0010ffff" * 59)
def test_punycode_extended_part_equals_the_codecs(label: str) -> None:
    """Our RFC 3492 encoder gives the codec's extended part (what follows its last '-')."""
    assert _punycode_extended(label) == label.encode("punycode").rpartition(b"-")[2]


@pytest.mark.parametrize(
    ("label", "extended"),
    [
        ("ليهمابتكلموشعربي؟", "egbpdaj6bu4bxfgehfvwxn"),
        ("他们为什么不说中文", "ihqwcrb4cv8a8dqg056pqjye"),
        ("Pročprostěnemluvíčesky", "uyb24dma41a"),
        ("למההםפשוטלאמדבריםעברית", "4dbcagdahymbxekheh6e0a7fei0b"),
        ("यहलोगहिन्दीक्योंनहींबोलसकतेहैं", "i1baa7eci9glrd9b2ae1bj0hfcgg6iyaf8o0a1dig0cd"),
        ("なぜみんな日本語を話してくれないのか", "n8jok5ay5dzabd5bym9f0cm5685rrjetr6pdxa"),
        ("PorquénopuedensimplementehablarenEspañol", "fmd56a"),
        ("MajiでKoiする5秒前", "783gue6qz075azm5e"),
        ("-> $1.00 <-", ""),
    ],
)
def test_punycode_extended_part_of_rfc_3492_samples(label: str, extended: str) -> None:
    """RFC 3492 section 7.1 samples (digits lower-cased) give their published extended part."""
    assert _punycode_extended(label) == extended.encode("ascii")


def test_punycode_memo_stays_bounded() -> None:
    """However many distinct patterns are encoded, the memo holds at most _MAX_PATTERNS."""
    clear_cache()
    for i in range(3 * _MAX_PATTERNS):
        label = f"a{chr(0x4E00 + i)}b"
        assert _punycode(label) == label.encode("punycode")
        assert len(_names._extended_parts) <= _MAX_PATTERNS
    assert _names._extended_parts


def test_shortcuts_stay_exact_with_no_room_to_remember_characters() -> None:
    """When the character sets are full, characters are classified afresh, with the same results."""
    names = ["bücher-shop.de", "Münchner-Bücher.DE", "пример.рф", "日本語.jp", "עברית.il"]
    expected = [_reference_outcome(name) for name in names]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_names, "_MAX_KNOWN_CHARS", 0)
        patch.setattr(_names, "_identity_chars", set())
        patch.setattr(_names, "_simple_chars", set())
        clear_cache()
        assert [_outcome(name) for name in names] == expected
        assert not _names._identity_chars
        assert not _names._simple_chars


def test_clear_cache_empties_the_punycode_memo() -> None:
    """clear_cache forgets the Punycode patterns too."""
    _punycode("bücher")
    clear_cache()
    assert not _names._extended_parts


def test_threads_racing_on_cold_caches_agree_with_one_thread() -> None:
    """Threads normalising and clearing at once get the answers a single thread gets."""
    names = [f"{word}{i}.example" for i in range(200) for word in ("bücher", "пример", "例え")]
    expected = [normalize_domain(name) for name in names]
    results: list[list[str]] = []

    def work() -> None:
        got: list[str] = []
        for name in names:
            if len(got) % 50 == 0:
                clear_cache()
            got.append(_normalize_uncached(name))
        results.append(got)

    run_in_threads(*[work] * 4)
    assert results == [expected] * 4
