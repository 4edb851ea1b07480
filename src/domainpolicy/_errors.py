"""The exception hierarchy: every error domainpolicy raises on purpose derives from one base.

Each concept has one ``Invalid*`` error that also subclasses the builtin that fits, so callers
who only know the standard library (``except ValueError``) still catch it.  Errors carry a stable,
machine-readable ``reason`` code, the offending value (shown as a truncated ``repr``) and, where
known, the position of the offending character.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = [
    "DomainPolicyError",
    "InvalidAddress",
    "InvalidConfiguration",
    "InvalidDomain",
    "InvalidReply",
    "InvalidSnapshot",
    "InvalidTransition",
    "StoreUnavailable",
]

_SHOWN_MAX = 80
_SHOWN_INT_BITS = 256
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")


def shown(value: object, limit: int = _SHOWN_MAX) -> str:
    """Return ``repr(value)``, truncated to about *limit* characters for error messages.

    It never raises and takes time linear in the size of *value*: an integer of more than 256
    bits is described by its size (its decimal ``repr`` is quadratic, and refused over 4,300
    digits), and a ``repr`` that fails is described by the type.
    """
    if isinstance(value, str | bytes | bytearray) and len(value) > limit:
        unit = "characters" if isinstance(value, str) else "bytes"
        return f"{value[:limit]!r}... ({len(value)} {unit})"
    if isinstance(value, int) and value.bit_length() > _SHOWN_INT_BITS:
        return f"<{'negative ' if value < 0 else ''}integer of {value.bit_length()} bits>"
    try:
        text = repr(value)
    except Exception:  # a huge integer inside a container, a deep one, a broken __repr__
        return f"<{type(value).__name__} that cannot be shown>"
    if len(text) > limit + 2:
        return f"{text[:limit]}... ({len(text)} characters of repr)"
    return text


def shown_key(key: object) -> str:
    """A key of a configuration path: bare (``contoso``) when it is a short TOML bare key,
    else `shown`, so that a path never holds a line break or a huge key."""
    if isinstance(key, str) and _BARE_KEY.fullmatch(key):
        return key
    return shown(key, 40)


class DomainPolicyError(Exception):
    """Base class of every error raised on purpose by domainpolicy."""


class _ValueProblem(DomainPolicyError, ValueError):
    """An error about one offending input value, with a reason code and optional position."""

    kind = "value"

    def __init__(
        self, value: object, reason: str, detail: str, position: int | None = None
    ) -> None:
        self.value = value
        self.reason = reason
        self.detail = detail
        self.position = position
        where = f" at position {position}" if position is not None else ""
        super().__init__(f"invalid {self.kind} {shown(value)}{where}: {detail} [{reason}]")

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.value, self.reason, self.detail, self.position))


class InvalidDomain(_ValueProblem):
    """A string is not a valid domain name; ``reason`` says which rule it broke.

    Reason codes: ``not_text``, ``empty``, ``input_too_long``, ``too_long``, ``empty_label``,
    ``label_too_long``, ``disallowed_codepoint``, ``bad_hyphen``, ``reserved_hyphens``,
    ``bad_alabel``, ``bidi_rule``, ``context_rule``, ``leading_combining_mark``, ``not_nfc``,
    ``numeric_tld``, ``single_label``, ``invalid_idna``.
    """

    kind = "domain"


class InvalidAddress(_ValueProblem):
    """A string is not a valid SMTP path or mailbox; ``reason`` says which rule it broke.

    Reason codes: ``not_text``, ``empty``, ``input_too_long``, ``path_too_long``,
    ``local_part_too_long``, ``missing_at``, ``bad_local_part``, ``bad_quoted_string``,
    ``unbalanced_brackets``, ``bad_source_route``, ``bad_literal``, ``bad_domain``,
    ``trailing_text``.  When the domain is at fault, ``__cause__`` is the ``InvalidDomain``.
    """

    kind = "address"


class InvalidConfiguration(DomainPolicyError, ValueError):
    """Configuration was refused; ``problems`` lists every problem found, not only the first."""

    def __init__(self, problems: Iterable[str], *, source: str | None = None) -> None:
        self.problems: tuple[str, ...] = tuple(problems)
        self.source = source
        head = f"invalid configuration{f' in {source}' if source else ''}"
        count = len(self.problems)
        body = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{head}: {count} problem{'s' if count != 1 else ''}\n{body}")

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_configuration, (self.problems, self.source))


def _rebuild_configuration(problems: tuple[str, ...], source: str | None) -> InvalidConfiguration:
    return InvalidConfiguration(problems, source=source)


class InvalidTransition(DomainPolicyError, RuntimeError):
    """An event is not allowed in the tenant's current state; the state is left unchanged."""


class InvalidReply(DomainPolicyError, ValueError):
    """An SMTP reply (code, enhanced status code or text) breaks RFC 5321 / RFC 3463."""


class InvalidSnapshot(DomainPolicyError, ValueError):
    """A matcher snapshot file is corrupt, truncated, of unknown version or fails its checksum."""


class StoreUnavailable(DomainPolicyError, OSError):
    """The policy state store could not be reached or timed out; callers answer with a 4xx."""
