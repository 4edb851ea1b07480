"""Domain and SMTP address normalisation: the canonical keys every other part of domainpolicy uses.

Design
------
``normalize_domain`` turns any spelling of a domain (U-labels, mixed case, a trailing dot,
ideographic full stops, upper-case A-labels) into one canonical A-label string, or raises
``InvalidDomain`` with a stable ``reason`` code.

There are two paths, and both end in the same label checker (``_finish``) so they cannot disagree:

* the **ASCII path** (``_ascii_path``): for pure-ASCII input, ``str.lower`` is exactly what UTS #46
  mapping does to ASCII letters, and every ASCII character other than letters, digits, ``-`` and
  ``.`` is disallowed under the STD3 rules.  ``idna`` is only consulted for labels that start with
  ``xn--`` (to validate the A-label).  A further shortcut accepts the common case (short LDH names
  with a letter at the end and no ``--``, with or without one trailing dot) after a handful of
  C-level string operations.
* the **Unicode path** (``_unicode_path``): UTS #46 nontransitional mapping with STD3 rules
  (``idna.uts46_remap``), then IDNA 2008 validation and Punycode per label (``idna.alabel``),
  each per-label result cached.

The Unicode path first tries two exact shortcuts, since idna's pure-Python per-character work
costs tens of microseconds a name.  ``_plain_mapping``: UTS #46 maps each code point on its own,
then applies NFC, so NFC text whose characters (ASCII ``A-Z`` folded to ``a-z`` first) each map
to themselves maps to itself.  ``_plain_alabel``: an NFC U-label of PVALID characters that are
neither marks nor of bidi class R, AL, AN or unknown, with no ``-`` at either end and no ``--``
at positions 3-4, passes every check of ``idna.check_label`` (the Bidi Rule is not applied), so
its A-label is ``xn--`` + Punycode, whose extended part depends only on the label with its ASCII
characters replaced by NUL and is memoised per such pattern (a miss runs RFC 3492 section 6.3
written out, a few times faster than the standard library's codec and compared with it by a
property test).  Anything else, and any A-label over 63 octets, goes to idna as above, so every
error comes from there unchanged.  The facts about characters are kept in sets of at most
``_MAX_KNOWN_CHARS`` each, the patterns in a dict cleared at ``_MAX_PATTERNS`` entries; plain
``set``/``dict`` operations, atomic under the GIL, so a race can only repeat some work.

Linear time: input longer than ``MAX_INPUT_CHARS`` is refused before any work, no label longer
than 63 octets (59 code points for a U-label, whose A-label is at least four octets longer) is
ever handed to ``idna``, and every loop here visits each character a bounded number of times.

Rules beyond IDNA 2008 that we enforce on both paths: at most 253 octets in the whole name (one
trailing dot removed first), a top-level label that is not all digits (``1.2.3.4`` is an IP
address, not a domain; RFC 3696 section 2), and single-label names only on request.
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
import re
import string
import threading
import unicodedata
from collections.abc import Callable
from typing import Final, NewType, TypeVar

import attrs
import idna
from idna import idnadata

from ._errors import InvalidAddress, InvalidDomain

__all__ = [
    "MAX_INPUT_CHARS",
    "Address",
    "NormalizedDomain",
    "domain_to_unicode",
    "normalize_domain",
    "parse_address",
]

NormalizedDomain = NewType("NormalizedDomain", str)
"""A domain in canonical form: lower-case A-labels joined by dots, no trailing dot."""

MAX_INPUT_CHARS: Final = 1024
"""Longest input (in code points) examined at all; longer text is refused as ``input_too_long``.

No valid domain is longer than 254 characters once mapped; the headroom allows for characters
UTS #46 deletes (soft hyphens and the like).  idna >= 3.17 applies the same 1024 cap.
"""

_MAX_NAME_OCTETS: Final = 253
_MAX_LABEL_OCTETS: Final = 63
# Punycode output for n code points is at least n octets, plus the 4-octet ``xn--`` prefix.
_MAX_ULABEL_CHARS: Final = _MAX_LABEL_OCTETS - 4
_CACHE_SIZE: Final = 65536
_LABEL_CACHE_SIZE: Final = 8192

_LDH: Final = "abcdefghijklmnopqrstuvwxyz0123456789-"
_LDH_DOT: Final = _LDH + "."
_ASCII_ALLOWED: Final = frozenset(_LDH_DOT + "ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _domain_error(
    text: object, reason: str, detail: str, position: int | None = None
) -> InvalidDomain:
    return InvalidDomain(text, reason, detail, position)


# --------------------------------------------------------------------------- idna wrappers


def _reason_for_idna(exc: Exception) -> str:
    """Map an idna exception onto one of our stable reason codes."""
    message = str(exc)
    if isinstance(exc, idna.IDNABidiError):
        return "bidi_rule"
    if isinstance(exc, idna.InvalidCodepointContext):
        return "context_rule"
    if isinstance(exc, idna.InvalidCodepoint):
        return "disallowed_codepoint"
    lowered = message.lower()
    for needle, reason in (
        ("too long", "label_too_long"),
        ("hyphens in 3rd and 4th", "reserved_hyphens"),
        ("start or end with a hyphen", "bad_hyphen"),
        ("combining", "leading_combining_mark"),
        ("normalization form c", "not_nfc"),
        ("empty", "empty_label"),
        ("a-label", "bad_alabel"),
        ("punycode", "bad_alabel"),
    ):
        if needle in lowered:
            return reason
    return "invalid_idna"


@functools.lru_cache(maxsize=_LABEL_CACHE_SIZE)
def _alabel_for(ulabel: str) -> str:
    """Return the A-label of a (mapped, non-ASCII) U-label; raises idna errors."""
    alabel = _plain_alabel(ulabel)
    if alabel is None:
        alabel = idna.alabel(ulabel).decode("ascii")
    return alabel


@functools.lru_cache(maxsize=_LABEL_CACHE_SIZE)
def _ulabel_for(alabel: str) -> str:
    """Validate a lower-case ``xn--`` label and return its U-label; raises ``ValueError``.

    RFC 5891 section 5.4: the Punycode must decode, the result must be a valid U-label that is not
    pure ASCII, and encoding it again must give back exactly the same A-label.
    """
    ulabel = idna.ulabel(alabel)
    if ulabel.isascii():
        raise ValueError(f"A-label {alabel!r} decodes to the ASCII label {ulabel!r}")
    if _alabel_for(ulabel) != alabel:
        raise ValueError(f"A-label {alabel!r} is not the canonical encoding of {ulabel!r}")
    return ulabel


# --------------------------------------------------------------------------- IDN shortcuts

_MAX_KNOWN_CHARS: Final = 1 << 15
_MAX_PATTERNS: Final = 4096
_ASCII_UPPER: Final = frozenset(string.ascii_uppercase)
_FOLD_ASCII: Final = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
_ASCII_OCTETS_TO_NUL: Final = bytes(128) + bytes(range(128, 256))
_PUNYCODE_DIGITS: Final = b"abcdefghijklmnopqrstuvwxyz0123456789"
_PVALID: Final = idnadata.codepoint_classes["PVALID"]
# Bidi classes that make idna apply the Bidi Rule, and "" (unknown), which it refuses.
_RTL_OR_UNKNOWN: Final = frozenset({"R", "AL", "AN", ""})

_identity_chars: set[str] = set()
"""Characters ``idna.uts46_remap(c, std3_rules=True)`` is known to return unchanged."""
_simple_chars: set[str] = set()
"""Characters known to be PVALID, not marks, and neither RTL, AN nor of unknown direction."""
_extended_parts: dict[bytes, bytes] = {}
"""Punycode extended parts by pattern (UTF-8 of the label, its ASCII characters made NUL)."""


def _all_pass(chars: set[str], known: set[str], test: Callable[[str], bool]) -> bool:
    """True when each of *chars* is in *known* or passes *test*; those that pass are added to
    *known* while it holds fewer than ``_MAX_KNOWN_CHARS`` (beyond that they are tested again
    each time: the answer stays exact, the memory bounded)."""
    for char in chars - known:
        if not test(char):
            return False
        if len(known) < _MAX_KNOWN_CHARS:
            known.add(char)
    return True


def _maps_to_itself(char: str) -> bool:
    """True when UTS #46 (STD3 rules, nontransitional) maps *char* to itself."""
    try:
        return idna.uts46_remap(char, std3_rules=True, transitional=False) == char
    except (idna.IDNAError, UnicodeError, ValueError, IndexError):
        return False


def _plain_mapping(text: str) -> str | None:
    """Return ``idna.uts46_remap(text, std3_rules=True)`` when that is plainly *text* with ASCII
    folded to lower case, or None (then call idna: it may map, refuse or normalise).

    Exact: idna maps each character independently (STD3 checked per character) and returns
    the NFC form of the concatenation.  ``A-Z`` map to ``a-z``; a character for which
    ``idna.uts46_remap(c) == c`` is kept (status V or D, passing STD3) or replaced by something
    canonically equivalent, which NFC cannot tell apart (in text, ASCII is looked up in the
    same table: all of it is V except ``A-Z``).  So the result is NFC of the folded text: the
    folded text itself when that is already NFC.
    """
    if len(text) > MAX_INPUT_CHARS:  # idna refuses it as too long
        return None
    chars = set(text)
    if not chars <= _identity_chars:
        if not chars.isdisjoint(_ASCII_UPPER):
            text = text.translate(_FOLD_ASCII)
            chars = set(text)
        if not _all_pass(chars, _identity_chars, _maps_to_itself):
            return None
    return text if unicodedata.is_normalized("NFC", text) else None


def _is_simple(char: str) -> bool:
    """True when *char* alone can never make ``idna.check_label`` fail or apply the Bidi Rule:
    PVALID, not a mark (so never a leading combiner) and not RTL, AN or of unknown direction."""
    return (
        idna.intranges_contain(ord(char), _PVALID)
        and unicodedata.category(char)[0] != "M"
        and unicodedata.bidirectional(char) not in _RTL_OR_UNKNOWN
    )


def _punycode_extended(label: str) -> bytes:
    """The extended part of ``label.encode("punycode")``: RFC 3492 section 6.3, written out.

    The same deltas, digits and bias adaptation as the standard library's codec (a property
    test compares the two on arbitrary text), in one loop instead of its several passes.
    """
    codes = [ord(char) for char in label]
    basic = h = len(label.encode("ascii", "ignore"))
    out = bytearray()
    n = 128
    delta = 0
    bias = 72
    for m in sorted({code for code in codes if code >= 128}):
        delta += (m - n) * (h + 1)
        n = m
        for code in codes:
            if code < n:
                delta += 1
            elif code == n:
                q = delta
                k = 36
                while True:
                    t = k - bias
                    t = 1 if t < 1 else 26 if t > 26 else t
                    if q < t:
                        break
                    out.append(_PUNYCODE_DIGITS[t + (q - t) % (36 - t)])
                    q = (q - t) // (36 - t)
                    k += 36
                out.append(_PUNYCODE_DIGITS[q])
                h += 1
                # adapt(delta, h, first time): the new bias.
                delta = delta // 700 if h == basic + 1 else delta // 2
                delta += delta // h
                k = 0
                while delta > 455:
                    delta //= 35
                    k += 36
                bias = k + 36 * delta // (delta + 38)
                delta = 0
        delta += 1
        n += 1
    return bytes(out)


def _punycode(label: str) -> bytes:
    """``label.encode("punycode")``, with the extended part memoised per pattern.

    RFC 3492: the output is the basic (ASCII) code points in order, ``-`` if there are any,
    then the extended part.  The extended part is computed from comparisons between code
    points in which one side is always non-ASCII, and from the number of ASCII code points;
    since every ASCII code point is below every other one, replacing each by NUL (the
    *pattern*) changes neither, so labels of one pattern share their extended part.

    The memo key is the pattern's UTF-8 form, made with two C-level steps: in UTF-8 the
    octets 0x00-0x7F are exactly the ASCII characters (no other character's encoding contains
    one), so mapping each of them to 0x00 gives the UTF-8 of the pattern.
    """
    key = label.encode("utf-8", "surrogatepass").translate(_ASCII_OCTETS_TO_NUL)
    extended = _extended_parts.get(key)
    if extended is None:
        extended = _punycode_extended(label)
        if len(_extended_parts) >= _MAX_PATTERNS:
            _extended_parts.clear()
        _extended_parts[key] = extended
    basic = label.encode("ascii", "ignore")
    return basic + b"-" + extended if basic else extended


def _plain_alabel(label: str) -> str | None:
    """Return ``idna.alabel(label).decode("ascii")`` for a plainly valid U-label, or None.

    Exact: for a non-ASCII label of at most 59 code points, all of them simple
    (`_is_simple`), in NFC, not starting or ending with ``-`` and without ``--`` in positions
    3-4, every check of ``idna.check_label`` passes and ``idna.check_bidi`` returns early (no
    R, AL or AN), so ``idna.alabel`` returns ``b"xn--" + label.encode("punycode")`` unless that
    is over 63 octets, in which case we return None and idna raises its own error.
    """
    if len(label) > _MAX_ULABEL_CHARS or label.isascii():
        return None
    chars = set(label)
    if not chars <= _simple_chars and not _all_pass(chars, _simple_chars, _is_simple):
        return None
    if (
        label[0] == "-"
        or label[-1] == "-"
        or label[2:4] == "--"
        or not unicodedata.is_normalized("NFC", label)
    ):
        return None
    alabel = b"xn--" + _punycode(label)
    if len(alabel) > _MAX_LABEL_OCTETS:
        return None
    return alabel.decode("ascii")


# --------------------------------------------------------------------------- the shared checker


def _finish(text: str, mapped: str, aligned: bool) -> str:
    """Check the labels of a mapped, lower-case name and return its canonical A-label form.

    *mapped* is the output of UTS #46 mapping (or ``str.lower`` on ASCII input, which is the same
    thing).  *aligned* says whether offsets in *mapped* are offsets in *text* (so errors can
    carry a position).
    """
    if mapped.endswith("."):
        mapped = mapped[:-1]
    if not mapped:
        raise _domain_error(text, "empty", "a domain needs at least one label")
    out: list[str] = []
    offset = 0
    for label in mapped.split("."):
        where = offset if aligned else None
        if not label:
            raise _domain_error(text, "empty_label", "labels may not be empty", where)
        if label.isascii():
            if len(label) > _MAX_LABEL_OCTETS:
                raise _domain_error(
                    text,
                    "label_too_long",
                    f"label of {len(label)} octets exceeds {_MAX_LABEL_OCTETS}",
                    where,
                )
            if label[0] == "-" or label[-1] == "-":
                raise _domain_error(
                    text, "bad_hyphen", "labels may not start or end with '-'", where
                )
            if label[2:4] == "--":
                if not label.startswith("xn--"):
                    raise _domain_error(
                        text,
                        "reserved_hyphens",
                        "'--' in the 3rd and 4th positions is reserved for A-labels (xn--)",
                        where,
                    )
                try:
                    _ulabel_for(label)
                except (ValueError, UnicodeError, IndexError, OverflowError) as exc:
                    raise _domain_error(
                        text, "bad_alabel", f"{label!r} is not a valid A-label: {exc}", where
                    ) from exc
            out.append(label)
        else:
            if len(label) > _MAX_ULABEL_CHARS:
                raise _domain_error(
                    text,
                    "label_too_long",
                    f"label of {len(label)} code points encodes to more than "
                    f"{_MAX_LABEL_OCTETS} octets",
                    where,
                )
            try:
                alabel = _alabel_for(label)
            except (ValueError, UnicodeError, IndexError, OverflowError) as exc:
                raise _domain_error(
                    text, _reason_for_idna(exc), f"label {label!r}: {exc}", where
                ) from exc
            if len(alabel) > _MAX_LABEL_OCTETS:
                raise _domain_error(
                    text,
                    "label_too_long",
                    f"label {label!r} encodes to {len(alabel)} octets, more than "
                    f"{_MAX_LABEL_OCTETS}",
                    where,
                )
            out.append(alabel)
        offset += len(label) + 1
    if out[-1].isdigit():
        raise _domain_error(
            text,
            "numeric_tld",
            f"the top-level label {out[-1]!r} is all digits (an IP address is not a domain)",
            offset - len(out[-1]) - 1 if aligned else None,
        )
    result = ".".join(out)
    if len(result) > _MAX_NAME_OCTETS:
        raise _domain_error(
            text,
            "too_long",
            f"name of {len(result)} octets exceeds {_MAX_NAME_OCTETS}",
        )
    return result


# --------------------------------------------------------------------------- the two paths


def _plain_key(mapped: str) -> str | None:
    """Lower-case ASCII *mapped* with one trailing dot removed, when that is plainly a valid
    name that normalises to itself (the common case, decided with a few C-level string
    operations); else None.

    Every condition implies `_finish` returns the name unchanged (it removes one trailing dot,
    then checks): LDH characters only, no empty labels, no label starting or ending with '-',
    no '--' anywhere (so no xn-- and no reserved hyphens), total <= 63 octets (so each label is
    too), at least two labels, and a letter last (so the TLD is not all digits).
    """
    if mapped[-1:] == ".":
        mapped = mapped[:-1]
    plain = (
        len(mapped) <= _MAX_LABEL_OCTETS
        and not mapped.strip(_LDH_DOT)
        and "." in mapped
        and mapped[0] not in ".-"
        and mapped[-1] > "9"
        and ".." not in mapped
        and "-." not in mapped
        and ".-" not in mapped
        and "--" not in mapped
    )
    return mapped if plain else None


def _ascii_path(text: str) -> str:
    """Normalise pure-ASCII *text* without calling idna (except to validate ``xn--`` labels)."""
    mapped = text.lower()
    key = _plain_key(mapped)
    if key is not None:
        return key
    if mapped.strip(_LDH_DOT):
        # Same answer as UTS #46 with STD3 rules: the first disallowed character, by position.
        for position, char in enumerate(text):
            if char not in _ASCII_ALLOWED:
                raise _domain_error(
                    text,
                    "disallowed_codepoint",
                    f"code point U+{ord(char):04X} is not allowed in a host name",
                    position,
                )
    return _finish(text, mapped, aligned=True)


_POSITION_RE: Final = re.compile(r"position (\d+)")


def _unicode_path(text: str) -> str:
    """Normalise any *text* through UTS #46 mapping and IDNA 2008 validation."""
    mapped = _plain_mapping(text)
    if mapped is None:
        mapped = _uts46_map(text)
    return _finish(text, mapped, aligned=text.isascii())


def _uts46_map(text: str) -> str:
    """``idna.uts46_remap`` with STD3 rules, its errors turned into `InvalidDomain`."""
    try:
        return idna.uts46_remap(text, std3_rules=True, transitional=False)
    except (idna.IDNAError, UnicodeError, ValueError, IndexError) as exc:
        found = _POSITION_RE.search(str(exc))
        position = int(found.group(1)) - 1 if found else None
        char = text[position] if position is not None and 0 <= position < len(text) else None
        what = f"code point U+{ord(char):04X}" if char is not None else "a code point"
        raise _domain_error(
            text,
            "disallowed_codepoint",
            f"{what} is not allowed in a host name (UTS #46 with STD3 rules)",
            position,
        ) from exc


def _check_input(text: object, error: type[InvalidDomain] | type[InvalidAddress]) -> str:
    if not isinstance(text, str):
        raise error(text, "not_text", f"expected str, got {type(text).__name__}")
    if len(text) > MAX_INPUT_CHARS:
        raise error(
            text,
            "input_too_long",
            f"{len(text)} characters is longer than the {MAX_INPUT_CHARS} examined",
        )
    return str(text)


def _normalize_uncached(text: str) -> str:
    if text.isascii():
        return _ascii_path(text)
    # Three C-level searches, each free when the character is absent, are several times
    # faster than str.translate with a dict on non-ASCII text, and give the same string.
    return _unicode_path(text.replace("\u3002", ".").replace("\uff0e", ".").replace("\uff61", "."))


_V = TypeVar("_V")
_results: dict[str, NormalizedDomain] = {}
_results_get = _results.get
_results_lock = threading.Lock()


def _remember(cache: dict[str, _V], lock: threading.Lock, key: str, value: _V) -> None:
    """Put *key* in a bounded cache, first evicting its oldest quarter if it is full.

    Dicts keep insertion order, so eviction is FIFO, O(1) amortised, and the hit path stays a
    single dict lookup.  Only eviction takes *lock* (one evicting thread at a time; taking it
    on every miss cost more than the insertion): a single ``dict`` store is atomic, and a
    store that races an eviction can at worst leave the cache a few entries over its bound
    until the next one.
    """
    if len(cache) >= _CACHE_SIZE:
        with lock:
            if len(cache) >= _CACHE_SIZE:
                try:
                    oldest = list(itertools.islice(cache, _CACHE_SIZE // 4))
                except RuntimeError:  # pragma: no cover - changed meanwhile (no-GIL builds)
                    oldest = []
                for old in oldest:
                    cache.pop(old, None)
    cache[key] = value


def _normalize_miss(text: object) -> NormalizedDomain:
    """Validate, normalise and remember *text* (the path taken when the cache misses)."""
    checked = _check_input(text, InvalidDomain)
    result: NormalizedDomain = _normalize_uncached(checked)  # type: ignore[assignment]
    _remember(_results, _results_lock, checked, result)
    return result


def clear_cache() -> None:
    """Forget every cached result (names, addresses, the per-label IDNA caches and the
    Punycode patterns); what is known about single characters is kept."""
    with _results_lock:
        _results.clear()
    with _addresses_lock:
        _addresses.clear()
    _alabel_for.cache_clear()
    _ulabel_for.cache_clear()
    _extended_parts.clear()


def normalize_domain(text: str, *, allow_single_label: bool = False) -> NormalizedDomain:
    """Return the canonical A-label form of a domain name, the key used everywhere.

    UTS #46 nontransitional mapping with STD3 rules and IDNA 2008 validation (``faß.de`` gives
    ``xn--fa-hia.de``), lower case, one trailing dot removed, U+3002, U+FF0E and U+FF61 accepted
    as dots, labels of 1 to 63 octets, names of at most 253 octets, no empty labels, ``xn--``
    labels checked to be genuine A-labels, a top-level label that is not all digits.

    Results are cached: a bounded map of whole names (FIFO eviction, 65536 entries) in front
    of bounded LRU caches of per-label IDNA conversions.  Thread-safe.

    Args:
        text: the domain as received, in any Unicode or ASCII spelling.
        allow_single_label: accept names of one label such as ``localhost``.

    Raises:
        InvalidDomain: *text* is not a valid domain; ``reason`` names the rule broken
            (see `InvalidDomain` for the codes) and ``position`` the offending offset when known.
    """
    try:
        result = _results_get(text)
    except TypeError:  # unhashable: not a str; _normalize_miss says so
        result = None
    if result is None:
        result = _normalize_miss(text)
    if "." not in result and not allow_single_label:
        raise _domain_error(
            text, "single_label", f"{result!r} has a single label; a dot-separated name is required"
        )
    return result


def domain_to_unicode(domain: str, *, allow_single_label: bool = False) -> str:
    """Return a domain for display: normalised, with every A-label shown as its U-label.

    Raises:
        InvalidDomain: *domain* is not a valid domain (as for `normalize_domain`).
    """
    normalized = normalize_domain(domain, allow_single_label=allow_single_label)
    if "xn--" not in normalized:
        return normalized
    return ".".join(
        _ulabel_for(label) if label.startswith("xn--") else label for label in normalized.split(".")
    )


# --------------------------------------------------------------------------- addresses

_MAX_LOCAL_OCTETS: Final = 64
_MAX_PATH_OCTETS: Final = 256
# RFC 5321 atext; RFC 6531 adds every non-ASCII character (UTF8-non-ascii).
_ATEXT: Final = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~"
)


def _is_atext(char: str) -> bool:
    return char in _ATEXT or (ord(char) > 127 and _is_utf8_char(char))


def _is_utf8_char(char: str) -> bool:
    """A non-ASCII character that may appear in SMTPUTF8 text: no surrogates, no controls, and
    no U+FFFD REPLACEMENT CHARACTER, the mark decoders leave where the octets were not UTF-8 (an
    MTA that decodes with replacement, as the Postfix policy parser does, passes it on)."""
    return (
        not (0xD800 <= ord(char) <= 0xDFFF)
        and char != "\ufffd"
        and unicodedata.category(char) not in ("Cc", "Cs")
    )


def _is_qtext(char: str) -> bool:
    code = ord(char)
    return (32 <= code <= 126 and char not in '"\\') or (code > 127 and _is_utf8_char(char))


def _octets(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


@attrs.frozen
class Address:
    """An SMTP mailbox or the null reverse-path, as parsed by `parse_address`.

    Attributes:
        local_part: exactly as given (case kept, RFC 5321 section 2.4), quotes included for a
            quoted local part; empty for the null path.
        domain: the normalised domain, or ``None`` for the null path and for address literals.
        literal: the address literal in canonical bracketed form (``[192.0.2.1]``,
            ``[IPv6:2001:db8::1]``), or ``None``.
        original: the text as received (not part of equality).
    """

    local_part: str
    domain: NormalizedDomain | None
    literal: str | None = None
    original: str = attrs.field(default="", eq=False, repr=False)

    @property
    def is_null(self) -> bool:
        """True for the null reverse-path ``<>`` (bounces and other automatic mail)."""
        return self.domain is None and self.literal is None

    @property
    def mailbox(self) -> str:
        """``local@domain`` (A-label domain) or ``local@[literal]``; empty for the null path."""
        if self.is_null:
            return ""
        return f"{self.local_part}@{self.domain if self.domain is not None else self.literal}"

    @property
    def path(self) -> str:
        """The RFC 5321 path form with angle brackets, e.g. ``<user@example.com>`` or ``<>``."""
        return f"<{self.mailbox}>"

    @property
    def needs_smtputf8(self) -> bool:
        """True when the local part is not ASCII (the domain is always A-labels here)."""
        return not self.local_part.isascii()

    def __str__(self) -> str:
        return self.mailbox


def _address_error(
    text: str, reason: str, detail: str, position: int | None = None
) -> InvalidAddress:
    return InvalidAddress(text, reason, detail, position)


def _not_allowed(char: str, where: str) -> str:
    if char == "\ufffd":
        return f"U+FFFD is not allowed in {where} (the mark of octets that were not UTF-8)"
    return f"U+{ord(char):04X} is not allowed in {where}"


def _scan_local_part(text: str, start: int, end: int) -> int:
    """Return the index of the '@' that ends the local part in ``text[start:end]``."""
    if start < end and text[start] == '"':
        i = start + 1
        while i < end:
            char = text[i]
            if char == "\\":
                if i + 1 >= end or not (32 <= ord(text[i + 1]) <= 126):
                    raise _address_error(
                        text,
                        "bad_quoted_string",
                        "backslash must quote a printable ASCII character",
                        i,
                    )
                i += 2
            elif char == '"':
                break
            elif _is_qtext(char):
                i += 1
            else:
                raise _address_error(
                    text, "bad_quoted_string", _not_allowed(char, "a quoted local part"), i
                )
        else:
            raise _address_error(text, "bad_quoted_string", "unterminated quoted local part", start)
        i += 1
        if i >= end or text[i] != "@":
            raise _address_error(text, "missing_at", "expected '@' after the quoted local part", i)
        return i
    i = start
    previous = "."
    while i < end:
        char = text[i]
        if char == "@":
            break
        if char == ".":
            if previous == ".":
                raise _address_error(
                    text,
                    "bad_local_part",
                    "a dot-string local part may not have empty atoms (leading, trailing or '..')",
                    i,
                )
        elif not _is_atext(char):
            raise _address_error(text, "bad_local_part", _not_allowed(char, "a local part"), i)
        previous = char
        i += 1
    if i >= end:
        raise _address_error(text, "missing_at", "no '@' separates local part and domain")
    if i == start:
        raise _address_error(text, "bad_local_part", "the local part is empty", i)
    if previous == ".":
        raise _address_error(text, "bad_local_part", "the local part may not end with '.'", i - 1)
    return i


def _parse_literal(text: str, inner: str, position: int) -> str:
    if inner.lower().startswith("ipv6:"):
        try:
            return f"[IPv6:{ipaddress.IPv6Address(inner[5:]).compressed}]"
        except ValueError as exc:
            raise _address_error(
                text, "bad_literal", f"bad IPv6 address literal: {exc}", position
            ) from exc
    if inner[:1].isdigit():
        try:
            return f"[{ipaddress.IPv4Address(inner)}]"
        except ValueError as exc:
            raise _address_error(
                text, "bad_literal", f"bad IPv4 address literal: {exc}", position
            ) from exc
    tag, colon, content = inner.partition(":")
    if (
        colon
        and tag
        and all(c.isascii() and (c.isalnum() or c == "-") for c in tag)
        and tag[-1] != "-"
        and content
        and all(33 <= ord(c) <= 126 and c not in "[\\]" for c in content)
    ):
        return f"[{inner}]"
    raise _address_error(
        text,
        "bad_literal",
        "expected [IPv4], [IPv6:...] or [tag:content] address literal",
        position,
    )


# A plain ``local@domain`` or ``<local@domain>``: ASCII dot-atom local part, no route, no quotes,
# no literal.  Everything it accepts the full parser accepts with the same result (a property
# test checks); everything else takes the full parser.
_PLAIN_ADDRESS: Final = re.compile(
    r"(<?)([A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*)"
    r"@([A-Za-z0-9.-]+)(>?)"
).fullmatch
_addresses: dict[str, Address] = {}
_addresses_lock = threading.Lock()


def _parse_plain(text: str) -> Address | None:
    """The fast path of `parse_address` for plain ASCII addresses, or None to take the slow one."""
    found = _PLAIN_ADDRESS(text)
    if found is None:
        return None
    open_bracket, local_part, domain_text, close_bracket = found.groups()
    if open_bracket != close_bracket or len(local_part) > _MAX_LOCAL_OCTETS:
        return None
    if len(text) + (0 if open_bracket else 2) > _MAX_PATH_OCTETS:
        return None
    try:
        domain = normalize_domain(domain_text)
    except InvalidDomain:
        return None
    return Address(local_part=local_part, domain=domain, original=text)


def parse_address(text: str, *, allow_null: bool = True) -> Address:
    """Parse an SMTP path or bare mailbox the way MTAs pass them.

    Accepts ``user@example.com``, ``<user@example.com>``, source routes
    (``<@a.example,@b.example:user@example.com>``, ignored per RFC 5321 section 4.1.2), quoted
    local parts (``"a@b"@example.com``), SMTPUTF8 local parts and domains, address literals
    (``user@[192.0.2.1]``, ``user@[IPv6:2001:db8::1]``) and surrounding whitespace.  The null
    reverse-path is ``<>``; an empty string means the same (Postfix passes ``sender=`` empty).
    The local part is kept exactly as given; the domain is normalised with `normalize_domain`.
    Limits (RFC 5321 section 4.5.3.1): local part 64 octets, path 256 octets.  Results are
    cached (bounded, thread-safe): MTAs see the same senders again and again.

    Args:
        text: the address as received.
        allow_null: accept the null path; pass False for recipients.

    Raises:
        InvalidAddress: *text* is not a valid path; ``reason`` names the rule broken.  When the
            domain is at fault the reason is ``bad_domain`` and ``__cause__`` is the
            `InvalidDomain`.
    """
    try:
        found = _addresses.get(text)
    except TypeError:  # unhashable: not a str; the full parser says so
        found = None
    if found is not None and (allow_null or not found.is_null):
        return found
    if type(text) is str and text.isascii():
        plain = _parse_plain(text)
        if plain is not None:
            _remember_address(text, plain)
            return plain
    address = _parse_address(text, allow_null=allow_null)
    _remember_address(address.original, address)
    return address


def _remember_address(text: str, address: Address) -> None:
    _remember(_addresses, _addresses_lock, text, address)


def _parse_address(text: str, *, allow_null: bool = True) -> Address:
    """The full RFC 5321 path parser behind `parse_address` (no cache, no fast path)."""
    original = _check_input(text, InvalidAddress)
    text = original.strip()
    if text in ("", "<>"):
        if not allow_null:
            raise _address_error(original, "null_path", "the null path <> is not allowed here")
        return Address(local_part="", domain=None, original=original)
    if text.startswith("<"):
        if not text.endswith(">") or len(text) < 2:
            raise _address_error(text, "unbalanced_brackets", "'<' without a closing '>'", 0)
        path = text
        inner = text[1:-1]
        base = 1
    else:
        if text.endswith(">"):
            raise _address_error(
                text, "unbalanced_brackets", "'>' without an opening '<'", len(text) - 1
            )
        path = f"<{text}>"
        inner = text
        base = 0
    if _octets(path) > _MAX_PATH_OCTETS:
        raise _address_error(
            text, "path_too_long", f"path of {_octets(path)} octets exceeds {_MAX_PATH_OCTETS}"
        )
    start = 0
    if inner.startswith("@"):
        colon = inner.find(":")
        if colon < 0 or not base:
            raise _address_error(
                text, "bad_source_route", "a source route must be '<@domain,...:mailbox>'", base
            )
        for hop in inner[:colon].split(","):
            if not hop.startswith("@"):
                raise _address_error(text, "bad_source_route", f"route hop {hop!r} lacks '@'", base)
            try:
                normalize_domain(hop[1:])
            except InvalidDomain as exc:
                raise _address_error(
                    text, "bad_source_route", f"route hop {hop!r}: {exc.detail}", base
                ) from exc
        start = colon + 1
    at = _scan_local_part(text, base + start, base + len(inner)) - base
    local_part = inner[start:at]
    if _octets(local_part) > _MAX_LOCAL_OCTETS:
        raise _address_error(
            text,
            "local_part_too_long",
            f"local part of {_octets(local_part)} octets exceeds {_MAX_LOCAL_OCTETS}",
            base + start,
        )
    domain_text = inner[at + 1 :]
    if domain_text.startswith("["):
        if not domain_text.endswith("]"):
            raise _address_error(text, "bad_literal", "'[' without a closing ']'", base + at + 1)
        literal = _parse_literal(text, domain_text[1:-1], base + at + 1)
        return Address(local_part=local_part, domain=None, literal=literal, original=original)
    try:
        domain = normalize_domain(domain_text)
    except InvalidDomain as exc:
        position = base + at + 1 + exc.position if exc.position is not None else base + at + 1
        raise _address_error(text, "bad_domain", exc.detail, position) from exc
    return Address(local_part=local_part, domain=domain, original=original)
