"""Hypothesis strategies for domainpolicy's values, for our tests and for yours.

Needs the ``hypothesis`` extra (``pip install domainpolicy[hypothesis]``)::

    from hypothesis import given
    from domainpolicy.testing import addresses, domains, hostile_text

    @given(domains())
    def test_my_mta_accepts_every_valid_domain(domain): ...

Every value `domains` and `addresses` generate is valid by construction: `normalize_domain` and
`parse_address` accept it.  `hostile_text` generates the input an attacker would send.
"""

from __future__ import annotations

try:
    from hypothesis import strategies as st
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "domainpolicy.testing needs hypothesis: pip install 'domainpolicy[hypothesis]'"
    ) from exc

__all__ = [
    "addresses",
    "ascii_labels",
    "domains",
    "hostile_text",
    "idn_labels",
    "local_parts",
    "replies",
    "reply_texts",
]

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_LDH_INNER = _LETTERS + "0123456789-"
# Lower-case letters that are PVALID in IDNA 2008, left-to-right, and need no context rule.
_IDN_LETTERS = (
    "àáâãäåæçèéêëìíîïñòóôõöøùúûüýÿßāăąćčďđēėęěğīįıķłńňōőœřśşšťūůűųźżžпримерфоыйжкдвгбясьхцюэ"
)
_JAPANESE = "ドメインテスト日本語例会社東京メール"
_ATEXT_SPECIALS = "!#$%&'*+-/=?^_`{|}~"


@st.composite
def ascii_labels(draw: st.DrawFn, *, max_size: int = 20) -> str:
    """An LDH label: starts and ends with a letter or digit, never '--' in positions 3-4."""
    size = draw(st.integers(min_value=1, max_value=max_size))
    first = draw(st.sampled_from(_LETTERS + "0123456789"))
    if size == 1:
        return first
    middle = draw(st.text(alphabet=_LDH_INNER, min_size=size - 2, max_size=size - 2))
    last = draw(st.sampled_from(_LETTERS + "0123456789"))
    label = first + middle + last
    if label[2:4] == "--":
        label = label[:2] + "a" + label[3:]
    return label


@st.composite
def idn_labels(draw: st.DrawFn, *, max_size: int = 12) -> str:
    """A lower-case U-label of letters from one script (Latin/Cyrillic or Japanese)."""
    alphabet = draw(st.sampled_from([_IDN_LETTERS + _LETTERS, _JAPANESE]))
    label = draw(st.text(alphabet=alphabet, min_size=1, max_size=max_size))
    if label.isascii():
        label += draw(st.sampled_from(_IDN_LETTERS if alphabet != _JAPANESE else _JAPANESE))
    return label


@st.composite
def domains(
    draw: st.DrawFn,
    *,
    idn: bool = True,
    min_labels: int = 2,
    max_labels: int = 4,
    spellings: bool = False,
) -> str:
    """A valid domain name, in U-label form where *idn* is True and chosen.

    With *spellings*, the same domain may come back in another spelling that normalises to the
    same key: upper case, a trailing dot, ideographic full stops.
    """
    count = draw(st.integers(min_value=min_labels, max_value=max_labels))
    label = idn_labels() | ascii_labels() if idn else ascii_labels()
    labels = [draw(label) for _ in range(count - 1)]
    tld = draw(st.sampled_from(["com", "net", "org", "example", "co.uk", "jp", "de", "xn--p1ai"]))
    labels.append(tld)
    name = ".".join(labels)
    if spellings:
        if draw(st.booleans()):
            name = name.upper()
        if draw(st.booleans()):
            name += "."
        if draw(st.booleans()):
            name = name.replace(".", draw(st.sampled_from(["\u3002", "\uff0e", "\uff61"])), 1)
    return name


@st.composite
def local_parts(draw: st.DrawFn, *, utf8: bool = True) -> str:
    """A dot-atom or quoted local part of at most 64 octets."""
    alphabet = _LETTERS + _LETTERS.upper() + "0123456789" + _ATEXT_SPECIALS
    if utf8:
        alphabet += "éüßñ日本"
    atoms = draw(
        st.lists(st.text(alphabet=alphabet, min_size=1, max_size=10), min_size=1, max_size=3)
    )
    if draw(st.integers(0, 4)) == 0:
        inner = draw(st.text(alphabet=alphabet + " @.,:;<>()[]", min_size=0, max_size=20))
        inner = inner.replace("\\", "\\\\").replace('"', '\\"')
        candidate = f'"{inner}"'
    else:
        candidate = ".".join(atoms)
    while len(candidate.encode("utf-8")) > 64:
        candidate = candidate[:-2] + candidate[-1]
    return candidate


@st.composite
def addresses(draw: st.DrawFn, *, utf8: bool = True, forms: bool = True) -> str:
    """A valid SMTP address; with *forms*, bracketed, source-routed or padded as MTAs send them."""
    local = draw(local_parts(utf8=utf8))
    domain = draw(domains(idn=utf8, max_labels=3))
    mailbox = f"{local}@{domain}"
    if not forms:
        return mailbox
    form = draw(st.sampled_from(["bare", "angle", "route", "padded"]))
    if form == "angle":
        return f"<{mailbox}>"
    if form == "route":
        return f"<@{draw(domains(idn=False, max_labels=2))}:{mailbox}>"
    if form == "padded":
        return f"  <{mailbox}>\t"
    return mailbox


_NASTY = [
    "\u0660" * 2000,  # Arabic-Indic digit zero: bidi and context rules
    "\u200d" * 50,  # zero width joiner (CONTEXTJ)
    "\u0301" * 50,  # combining acute accent
    "xn--" * 40,
    "xn--",
    "xn--a",
    "a" * 64,
    "." * 300,
    "\u3002" * 10,
    "\r\n",
    "\x00",
    "\ud800",
    "\U0010ffff",
    "\ufeff",
    "\u00ad" * 100,
    "ß",
    "@",
    '"',
    "<",
    ">",
    "[",
    "]",
    "\\",
    "ＡＢＣ",
    "\u202e",
]


def hostile_text(*, max_size: int = 4000) -> st.SearchStrategy[str]:
    """Text an attacker would send: long runs, control characters, lone surrogates, bidi marks,
    bogus A-labels and mixtures of them with otherwise valid names."""
    fragment = st.one_of(
        st.sampled_from(_NASTY),
        st.text(max_size=30),
        domains(spellings=True),
        st.text(alphabet=st.characters(codec="utf-8"), max_size=20),
    )
    return st.lists(fragment, max_size=8).map("".join).filter(
        lambda s: len(s) <= max_size
    ) | st.text(max_size=200)


# --- replies (issue 5) ---

from domainpolicy._replies import Reply  # noqa: E402

_REPLY_NASTY = [
    "\r\n",
    "\r",
    "\n",
    "\x00",
    "\r\n250 OK\r\n",
    "\r\n.\r\n",
    "\t",
    "\x7f",
    "\x85",
    "\u2028",
    "\ud800",
    "日本語",
    "é",
    " " * 600,
    "x" * 600,
    "550-",
    "5.7.750 ",
]


def reply_texts(*, max_size: int = 1500) -> st.SearchStrategy[str]:
    """Text a caller might put in an SMTP reply: printable words, long words, CR/LF injection
    attempts, NUL and other controls, non-ASCII and fake reply prefixes."""
    fragment = st.one_of(
        st.sampled_from(_REPLY_NASTY),
        st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
        st.text(max_size=20),
    )
    return st.lists(fragment, max_size=12).map("".join).filter(lambda s: len(s) <= max_size)


@st.composite
def replies(draw: st.DrawFn) -> Reply:
    """A valid `domainpolicy.Reply` with random code, status and (possibly long) text lines."""
    first = draw(st.sampled_from("245"))
    code = int(first + str(draw(st.integers(0, 5))) + str(draw(st.integers(0, 9))))
    number = st.integers(0, 999).map(str)
    status = f"{first}.{draw(number)}.{draw(number)}"
    printable = st.text(
        alphabet=st.characters(min_codepoint=32, max_codepoint=126) | st.just("\t"), max_size=700
    )
    return Reply(code, status, draw(st.lists(printable, min_size=1, max_size=4)))


# --------------------------------------------------------------------------- matcher (issue 3)

_MATCHER_ROOTS = ["example.com", "contoso.co.uk", "bücher.de", "xn--mnchen-3ya.de", "fabrikam.jp"]
_MATCHER_LABELS = ["a", "b", "mail", "sales", "ü", "日本"]


@st.composite
def accepted_domain_sets(draw: st.DrawFn, *, max_size: int = 12) -> list[object]:
    """A conflict-free list of ``AcceptedDomain`` entries that `DomainMatcher.compile` accepts.

    Names are drawn from a small pool so entries nest (``a.example.com`` under ``example.com``)
    and overlap; exact, ``match_subdomains`` and wildcard forms, U-label and A-label spellings,
    and three tenants are mixed.  (Typed ``list[object]`` to keep this module importable without
    the matcher; the elements are ``AcceptedDomain``.)
    """
    from domainpolicy._matcher import AcceptedDomain, DomainType
    from domainpolicy._names import normalize_domain

    count = draw(st.integers(min_value=0, max_value=max_size))
    taken: set[tuple[str, str]] = set()
    out: list[object] = []
    for _ in range(count):
        subs = draw(st.lists(st.sampled_from(_MATCHER_LABELS), max_size=2))
        base = ".".join([*subs, draw(st.sampled_from(_MATCHER_ROOTS))])
        form = draw(st.sampled_from(["exact", "subdomains", "wildcard"]))
        key = normalize_domain(base)
        slots = {"exact": ["apex"], "subdomains": ["apex", "below"], "wildcard": ["below"]}[form]
        if any((key, slot) in taken for slot in slots):
            continue
        taken.update((key, slot) for slot in slots)
        spelled = base.upper() if draw(st.booleans()) else base
        out.append(
            AcceptedDomain(
                domain=f"*.{spelled}" if form == "wildcard" else spelled,
                tenant=draw(st.sampled_from(["t1", "t2", "t3"])),
                domain_type=draw(st.sampled_from(list(DomainType))),
                match_subdomains=form == "subdomains",
            )
        )
    return out


@st.composite
def matcher_queries(draw: st.DrawFn) -> str:
    """A query for a matcher built from `accepted_domain_sets`: names in and around its pool
    (subdomains, parents, near misses such as ``evilexample.com``) and arbitrary domains."""
    kind = draw(st.integers(min_value=0, max_value=3))
    if kind == 0:
        return draw(domains(spellings=True))
    labels = draw(st.lists(st.sampled_from([*_MATCHER_LABELS, "x", "evil"]), max_size=3))
    root = draw(st.sampled_from([*_MATCHER_ROOTS, "com", "co.uk", "de"]))
    name = ".".join([*labels, root])
    if kind == 2:
        name = "evil" + name
    if draw(st.booleans()):
        name = name.upper()
    if draw(st.booleans()):
        name += "."
    return name
