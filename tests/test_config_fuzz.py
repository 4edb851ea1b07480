"""Fuzz targets for configuration files: only InvalidConfiguration ever escapes `load_config`.

Three generators: valid TOML written in every style TOML allows (the shape check must never
refuse it), configuration-shaped TOML whose values and keys are hostile, and raw bytes (random,
or the bundled example mutated).  Run long with ``HYPOTHESIS_PROFILE=fuzz pytest -m fuzz``.
"""

from __future__ import annotations

import math
import tempfile
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from domainpolicy import InvalidConfiguration
from domainpolicy._blockstate import BlockPolicy
from domainpolicy._config import _toml_shape_problem, load_config

EXAMPLE = (Path(__file__).resolve().parents[1] / "examples" / "tenants.toml").read_bytes()

# --------------------------------------------------------------------------- a TOML writer

_BARE = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _basic(text: str) -> str:
    """A TOML basic string: quotes, backslashes and controls escaped."""
    return '"' + "".join(_escape(c) for c in text) + '"'


def _escape(char: str) -> str:
    if char in _ESCAPES:
        return _ESCAPES[char]
    if ord(char) < 0x20 or ord(char) == 0x7F:
        return f"\\u{ord(char):04X}"
    return char


def _multiline_basic(text: str) -> str:
    """A TOML multi-line basic string (a newline right after the delimiter is trimmed)."""
    body = "".join("\n" if c == "\n" else _escape(c) for c in text)
    return '"""\n' + body + '"""'


def _literal(text: str) -> str | None:
    """A TOML literal string, or None when *text* cannot be one."""
    if "'" in text or any((ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F for c in text):
        return None
    return "'" + text + "'"


def _multiline_literal(text: str) -> str | None:
    """A TOML multi-line literal string, or None when *text* cannot be one."""
    if "'''" in text or text.endswith("'") or "\r" in text:
        return None
    if any((ord(c) < 0x20 and c not in "\t\n") or ord(c) == 0x7F for c in text):
        return None
    return "'''\n" + text + "'''"


def _key(key: str) -> str:
    return key if key and set(key) <= _BARE else _basic(key)


Style = Callable[[list[str]], str]


class _Writer:
    """Writes a value tree as TOML, choosing a style for each string and table with *pick*."""

    def __init__(self, pick: Callable[[int], int]) -> None:
        self.pick = pick
        self.lines: list[str] = []

    def string(self, text: str) -> str:
        forms = [_basic(text), _multiline_basic(text), _literal(text), _multiline_literal(text)]
        usable = [form for form in forms if form is not None]
        return usable[self.pick(len(usable))]

    def value(self, value: object) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int):
            return [str(value), f"{value:+d}"][self.pick(2)]
        if isinstance(value, float):
            if math.isinf(value):
                return "inf" if value > 0 else "-inf"
            return repr(value)
        if isinstance(value, str):
            return self.string(value)
        if isinstance(value, list):
            items = [self.value(item) for item in value]
            if self.pick(2):  # multi-line, with comments and a trailing comma
                return "[\n" + "".join(f"  {item}, # ] [ {{\n" for item in items) + "]"
            return "[" + ", ".join(items) + "]"
        assert isinstance(value, dict)
        return "{" + ", ".join(f"{_key(k)} = {self.value(v)}" for k, v in value.items()) + "}"

    def table(self, table: dict[str, Any], path: list[str]) -> None:
        """Key/values of *table* in the current section; sub-tables inline, as dotted keys or
        as sections of their own (written after the key/values)."""
        sections: list[tuple[str, dict[str, Any]]] = []
        for key, value in table.items():
            if isinstance(value, dict) and value and self.pick(3) == 0 and path is not None:
                sections.append((key, value))
            elif isinstance(value, dict) and value and self.pick(2):
                self.dotted([key], value)
            else:
                comment = " # [[ ' \" . ]" if self.pick(2) else ""
                self.lines.append(f"{_key(key)} = {self.value(value)}{comment}")
        for key, value in sections:
            self.lines.append("[" + ".".join(_key(k) for k in [*path, key]) + "]")
            self.table(value, [*path, key])

    def dotted(self, prefix: list[str], table: dict[str, Any]) -> None:
        for key, value in table.items():
            if isinstance(value, dict) and value and self.pick(2):
                self.dotted([*prefix, key], value)
            else:
                dotted = " . ".join(_key(k) for k in [*prefix, key])
                self.lines.append(f"{dotted} = {self.value(value)}")


def toml_text(data: dict[str, Any], pick: Callable[[int], int]) -> str:
    """*data* written as TOML, in styles chosen by *pick*."""
    writer = _Writer(pick)
    writer.table(data, [])
    return "\n".join(writer.lines) + "\n"


# --------------------------------------------------------------------------- values

_HOSTILE_TEXT = st.one_of(
    st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=30),
    st.sampled_from(
        [
            "[[[[",
            "]]",
            "{",
            "}",
            '"""',
            "'''",
            "''",
            '"',
            "\\",
            "#",
            "a.b.c",
            "=",
            "\n",
            "\r\n",
            "\x00",
            "\u2028",
            "\x85",
        ]
    ),
    st.integers(100, 3000).map(lambda n: "x" * n),
)
_KEYS = st.text(alphabet="abcxyz_-0123", min_size=1, max_size=8) | _HOSTILE_TEXT
_INT64 = st.integers(-(2**63), 2**63 - 1)
_SCALARS = st.one_of(
    _HOSTILE_TEXT,
    _INT64,
    st.floats(allow_nan=False),
    st.booleans(),
    st.sampled_from([0, 1, -1, 2**63 - 1, -(2**63), 1.0, 0.0]),
)


def _trees(depth: int) -> st.SearchStrategy[Any]:
    return st.recursive(
        _SCALARS,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS, inner, max_size=4),
        max_leaves=depth,
    )


_VALUES = _trees(12)
_JUNK = _trees(3)  # a wrong value where the schema wants another
_DOMAINS = st.one_of(
    st.sampled_from(["contoso.example", "a.example", "co.uk", "bücher.example", "*.x.example"]),
    _HOSTILE_TEXT,
)
_DOMAIN_ENTRIES = st.one_of(
    _DOMAINS,
    st.fixed_dictionaries(
        {"domain": _DOMAINS | _SCALARS},
        optional={
            "match_subdomains": st.booleans() | _SCALARS,
            "type": st.sampled_from(["authoritative", "internal_relay", "bogus"]) | _SCALARS,
            "extra": _JUNK,
        },
    ),
    _JUNK,
)
_POLICY_KEYS = [field.name for field in attrs.fields(BlockPolicy)]
_CONFIGS = st.fixed_dictionaries(
    {},
    optional={
        "store": st.fixed_dictionaries({}, optional={"url": _HOSTILE_TEXT | _SCALARS}) | _JUNK,
        "policy": st.dictionaries(st.sampled_from(_POLICY_KEYS) | _KEYS, _SCALARS) | _JUNK,
        "relay": st.dictionaries(
            st.sampled_from(["null_sender", "count", "fail_open"]) | _KEYS,
            st.sampled_from(["accept", "refuse", "messages", "recipients", True, 1]) | _JUNK,
        ),
        "replies": st.fixed_dictionaries(
            {},
            optional={
                "server_name": _DOMAINS | _SCALARS,
                "texts": st.dictionaries(
                    st.sampled_from(["BAD_SENDER", "5.7.750", "NO_SUCH"]) | _KEYS,
                    st.sampled_from(["{default}", "{default}\nmore"]) | _JUNK,
                ),
                "tenants": st.dictionaries(_KEYS, _JUNK, max_size=2),
            },
        ),
        "tenants": st.dictionaries(
            _KEYS,
            st.fixed_dictionaries(
                {},
                optional={
                    "domains": st.lists(_DOMAIN_ENTRIES, max_size=4) | _JUNK,
                    "domains_file": st.sampled_from(["d.tsv", "missing.tsv", "", "a\x00b"]),
                    "other": _JUNK,
                },
            )
            | _JUNK,
            max_size=3,
        ),
        "connectors": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "name": _KEYS | _SCALARS,
                    "tenant": _KEYS | _SCALARS,
                    "sender_ip_ranges": st.lists(
                        st.sampled_from(["10.0.0.0/8", "10.0.0.1/8", "::/0"]) | _SCALARS,
                        max_size=3,
                    )
                    | _JUNK,
                    "tls_cert_names": st.lists(_DOMAINS | _SCALARS, max_size=3) | _JUNK,
                    "created_at": st.sampled_from(["2026-01-01", "x"]) | _SCALARS,
                    "enabled": _SCALARS,
                },
            ),
            max_size=2,
        )
        | _JUNK,
        "postfix": st.dictionaries(
            st.sampled_from(["pinned_certificates"]) | _KEYS,
            st.dictionaries(st.sampled_from(["AA:BB", "zz"]) | _KEYS, _DOMAINS | _SCALARS) | _JUNK,
        ),
        "domains_file": st.sampled_from(["d.tsv", "missing.tsv", "", "a\x00b"]) | _SCALARS,
        "unknown": _JUNK,
    },
)
_DOMAINS_FILES = st.lists(
    st.sampled_from(
        [b"a.example\tt\n", b"b.example\tt\tsubdomains,bogus\n", b"\xff\n", b"x" * 5000 + b"\n"]
    )
    | st.binary(max_size=40),
    max_size=5,
).map(b"".join)


# --------------------------------------------------------------------------- the properties


def load(content: bytes, domains_file: bytes = b"") -> InvalidConfiguration | None:
    """load_config on a file of *content* (next to a domains file ``d.tsv``): None if it loads,
    else the InvalidConfiguration; any other exception propagates."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "c.toml"
        path.write_bytes(content)
        (Path(folder) / "d.tsv").write_bytes(domains_file)
        try:
            load_config(path)
        except InvalidConfiguration as exc:
            event(f"InvalidConfiguration, {min(len(exc.problems), 5)}+ problems")
            return exc
    event("loaded")
    return None


def assert_short_one_line_problems(error: InvalidConfiguration | None) -> None:
    """At most 101 problems (100 and how many more), each one line of at most ~1,000
    characters."""
    if error is None:
        return
    assert 1 <= len(error.problems) <= 101
    for problem in error.problems:
        assert len(problem) <= 1000 + len("... (1000000 characters)")
        assert len(problem.splitlines()) == 1, problem
    assert len(str(error)) <= 150_000


@st.composite
def toml_documents(
    draw: st.DrawFn, tables: st.SearchStrategy[dict[str, Any]] | None = None
) -> tuple[str, dict[str, Any]]:
    """A table (by default of any values) and the TOML that writes it, in styles hypothesis
    picks."""
    table = draw(tables if tables is not None else st.dictionaries(_KEYS, _VALUES, max_size=6))
    text = toml_text(table, lambda n: draw(st.integers(0, n - 1)))
    return text, table


@pytest.mark.fuzz
@given(toml_documents())
def test_fuzz_shape_check_never_refuses_valid_toml(document: tuple[str, Any]) -> None:
    """TOML in any style (strings of all four kinds holding brackets, quotes and '#', comments,
    dotted keys, inline tables, multi-line arrays) parses as written and passes the shape
    check."""
    text, table = document
    assert tomllib.loads(text) == table
    assert _toml_shape_problem(text) is None


@pytest.mark.fuzz
@given(toml_documents(_CONFIGS).map(lambda d: d[0]), _DOMAINS_FILES)
def test_fuzz_structured_configuration_raises_only_invalid_configuration(
    text: str, domains_file: bytes
) -> None:
    """Configuration-shaped TOML with hostile keys and values, and a hostile domains file, give
    a configuration or one InvalidConfiguration, never another exception."""
    assert_short_one_line_problems(load(text.encode("utf-8"), domains_file))


@st.composite
def mutated_example(draw: st.DrawFn) -> bytes:
    """The bundled example with a few random insertions, deletions and duplications."""
    data = bytearray(EXAMPLE)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["insert", "delete", "repeat"]))
        if kind == "insert":
            data[at:at] = draw(
                st.binary(max_size=8)
                | st.sampled_from([b"[" * 600, b"{a=" * 300, b".a" * 100, b'"', b"'''", b"\xff"])
            )
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 40))]
        else:
            data[at:at] = data[at : at + draw(st.integers(1, 40))] * draw(st.integers(2, 50))
    return bytes(data)


@pytest.mark.fuzz
@given(st.binary(max_size=2000) | mutated_example())
def test_fuzz_raw_bytes_raise_only_invalid_configuration(content: bytes) -> None:
    """Random bytes, and the bundled example mutated, give a configuration or one
    InvalidConfiguration, never another exception."""
    assert_short_one_line_problems(load(content))
