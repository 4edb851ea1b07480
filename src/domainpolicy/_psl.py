"""Registrable domains and public suffixes, on top of ``publicsuffixlist``.

The list object is expensive to build (tens of milliseconds), so it is built once, lazily, under
a lock, and shared: ``publicsuffixlist.PublicSuffixList`` is read-only and thread-safe after
construction.  Queries are normalised with `normalize_domain` first, so U-labels, upper case and
trailing dots all give the same answer in A-label form.
"""

from __future__ import annotations

import os
import threading

import attrs
from publicsuffixlist import PublicSuffixList as _PSL

from ._errors import InvalidConfiguration
from ._names import NormalizedDomain, normalize_domain

__all__ = ["PublicSuffixes", "default_public_suffixes", "is_public_suffix", "registrable_domain"]


@attrs.frozen(eq=False)
class PublicSuffixes:
    """A loaded Public Suffix List: the bundled one, or one read from a file.

    Includes the private section (``github.io`` is a public suffix) unless ``only_icann``.
    """

    _psl: _PSL = attrs.field(repr=False, alias="_psl")
    source: str = "bundled"

    @classmethod
    def bundled(cls, *, only_icann: bool = False) -> PublicSuffixes:
        """The list shipped with the installed ``publicsuffixlist`` package."""
        return cls(_psl=_PSL(only_icann=only_icann), source="bundled")

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, only_icann: bool = False) -> PublicSuffixes:
        """Load a Public Suffix List file (the ``public_suffix_list.dat`` format).

        Raises:
            InvalidConfiguration: the file cannot be read or holds no rules.
        """
        name = os.fspath(path)
        try:
            with open(name, encoding="utf-8") as handle:
                lines = handle.read().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidConfiguration(
                [f"cannot read public suffix list {name!r}: {exc}"], source=name
            ) from exc
        if not any(line.strip() and not line.lstrip().startswith("//") for line in lines):
            raise InvalidConfiguration([f"public suffix list {name!r} has no rules"], source=name)
        return cls(_psl=_PSL(lines, only_icann=only_icann), source=name)

    def is_public(self, domain: str) -> bool:
        """True if *domain* is itself a public suffix (``com``, ``co.uk``, ``github.io``).

        Raises:
            InvalidDomain: *domain* is not a valid domain.
        """
        return bool(self._psl.is_public(normalize_domain(domain, allow_single_label=True)))

    def registrable(self, domain: str) -> NormalizedDomain | None:
        """The registrable domain (public suffix plus one label), or None for a public suffix.

        Raises:
            InvalidDomain: *domain* is not a valid domain.
        """
        found = self._psl.privatesuffix(normalize_domain(domain, allow_single_label=True))
        return None if found is None else NormalizedDomain(found)

    def public_suffix(self, domain: str) -> NormalizedDomain:
        """The public suffix of *domain* (unknown top-level domains count as public suffixes).

        Raises:
            InvalidDomain: *domain* is not a valid domain.
        """
        key = normalize_domain(domain, allow_single_label=True)
        # accept_unknown=True: every valid name has a public suffix (at worst its last label).
        return NormalizedDomain(self._psl.publicsuffix(key) or key.rpartition(".")[2])


_lock = threading.Lock()
_default: PublicSuffixes | None = None


def default_public_suffixes() -> PublicSuffixes:
    """The process-wide bundled list, built on first use and shared (thread-safe)."""
    global _default  # noqa: PLW0603 - a lazily built process-wide singleton
    found = _default
    if found is None:
        with _lock:
            if _default is None:
                _default = PublicSuffixes.bundled()
            found = _default
    return found


def registrable_domain(
    domain: str, *, suffixes: PublicSuffixes | None = None
) -> NormalizedDomain | None:
    """Return the registrable domain of *domain* (``a.b.example.co.uk`` -> ``example.co.uk``).

    Returns None when *domain* is itself a public suffix.  *suffixes* selects a custom list
    (see `PublicSuffixes.from_file`); by default the bundled list is used.

    Raises:
        InvalidDomain: *domain* is not a valid domain.
    """
    return (suffixes or default_public_suffixes()).registrable(domain)


def is_public_suffix(domain: str, *, suffixes: PublicSuffixes | None = None) -> bool:
    """True if *domain* is a public suffix such as ``com``, ``co.uk`` or ``github.io``.

    Raises:
        InvalidDomain: *domain* is not a valid domain.
    """
    return (suffixes or default_public_suffixes()).is_public(domain)
