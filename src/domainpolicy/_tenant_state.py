"""What a tenant's block state is: the vocabulary (`State`, `Event`, `BlockCode`, `Verdict`,
`AlertKind`), the counters (`Window`), the values a block carries (`Evidence`, `Block`,
`Checklist`...), `TenantState` itself with what the machine returns (`Transition`, `Alert`,
`Effects`), the errors about them, and the state's dict codec (`TenantState.to_dict` /
`from_dict`, `STATE_SCHEMA_VERSION`).

Pure values: no I/O, no clock, no policy.  `domainpolicy._blockstate` (the transition table and
the machine) builds on this module; this module imports only `_errors` and `_names`.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from typing import Any, Final

import attrs

from ._errors import DomainPolicyError, InvalidTransition, shown
from ._names import normalize_domain

__all__ = [
    "STATE_SCHEMA_VERSION",
    "Alert",
    "AlertKind",
    "Attestation",
    "Block",
    "BlockCode",
    "Checklist",
    "ChecklistIncomplete",
    "ConnectorReview",
    "Denial",
    "Effects",
    "Event",
    "Evidence",
    "InvalidEvent",
    "InvalidTenantState",
    "State",
    "TenantState",
    "Transition",
    "UnblockRequest",
    "Verdict",
    "Window",
]


STATE_SCHEMA_VERSION: Final = 1
"""Version of the dict produced by `TenantState.to_dict`; `TenantState.from_dict` refuses others."""

_MAX_NOW: Final = 1e12  # about the year 33658: anything above is a unit error (milliseconds)
_MAX_TEXT: Final = 4096


# --------------------------------------------------------------------------- errors


class InvalidEvent(InvalidTransition, ValueError):
    """An event's arguments are malformed (bad ``now``, weight, domain, actor, text...).

    Raised before anything is touched; also a ``ValueError``.
    """


class ChecklistIncomplete(InvalidTransition):
    """An unblock request (or its approval) was refused: remediation steps are missing.

    ``missing`` lists every missing step, not only the first; ``checklist`` is the full
    `Checklist`.
    """

    def __init__(self, checklist: Checklist) -> None:
        self.checklist = checklist
        self.missing: tuple[str, ...] = checklist.missing
        body = "\n".join(f"  - {step}" for step in self.missing)
        count = len(self.missing)
        super().__init__(
            f"unblock refused for tenant {shown(checklist.tenant)}: "
            f"{count} remediation step{'s' if count != 1 else ''} missing\n{body}"
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.checklist,))


class InvalidTenantState(DomainPolicyError, ValueError):
    """A tenant-state dict (from a store) is malformed, inconsistent or of an unknown schema."""


# --------------------------------------------------------------------------- states and events


class State(enum.Enum):
    """Where a tenant stands.  Probation is not a state: it is `ACTIVE` with a deadline."""

    ACTIVE = "active"
    """Relay allowed; unregistered-domain volume is counted against the limits."""
    BLOCKED = "blocked"
    """Unregistered-domain relay refused with 5.7.750; mail from accepted domains still flows."""
    UNBLOCK_REQUESTED = "unblock_requested"
    """As before the request (5.7.750 or 5.7.705), waiting for support to approve or deny."""
    SUSPENDED = "suspended"
    """All relay refused with 5.7.705 (kept pushing at a multiple of the limit, or an operator)."""


class Event(enum.Enum):
    """The events the machine accepts; each `BlockMachine` method is one event."""

    OBSERVE = "observe"
    REGISTER_DOMAIN = "register_domain"
    REMOVE_DOMAIN = "remove_domain"
    DECLARE_NOT_OURS = "declare_not_ours"
    CREATE_CONNECTOR = "create_connector"
    REVIEW_CONNECTOR = "review_connector"
    ATTEST = "attest"
    REQUEST_UNBLOCK = "request_unblock"
    APPROVE = "approve"
    DENY = "deny"
    OPERATOR_BLOCK = "operator_block"
    OPERATOR_SUSPEND = "operator_suspend"


class BlockCode(enum.StrEnum):
    """Enhanced status codes of a block; the facade maps them onto SMTP replies."""

    UNREGISTERED = "5.7.750"
    """``550 5.7.750 Service unavailable. Client blocked from sending from unregistered domains``"""
    THRESHOLD = "5.7.705"
    """``550 5.7.705 Access denied, tenant has exceeded threshold``"""


class Verdict(enum.Enum):
    """The answer to one relay observation."""

    ACCEPT = "accept"
    REFUSE_UNREGISTERED = "refuse:5.7.750"
    REFUSE_THRESHOLD = "refuse:5.7.705"

    @property
    def accepted(self) -> bool:
        """True for `ACCEPT`."""
        return self is Verdict.ACCEPT

    @property
    def code(self) -> BlockCode | None:
        """The enhanced status code of a refusal, None for `ACCEPT`."""
        return _DECISION_CODES[self]


_DECISION_CODES: Final[dict[Verdict, BlockCode | None]] = {
    Verdict.ACCEPT: None,
    Verdict.REFUSE_UNREGISTERED: BlockCode.UNREGISTERED,
    Verdict.REFUSE_THRESHOLD: BlockCode.THRESHOLD,
}


class AlertKind(enum.StrEnum):
    """What an `Alert` is about."""

    APPROACHING_LIMIT = "approaching_limit"
    BLOCKED = "blocked"
    SUSPENDED = "suspended"
    UNBLOCK_REQUESTED = "unblock_requested"
    UNBLOCKED = "unblocked"


# --------------------------------------------------------------------------- the window


class Window:
    """The mutable counter accumulator of one tenant (see the module docstring for the model).

    Attributes:
        head: index of the newest bucket seen (``floor(now / bucket_seconds)``).
        head_total: relayed weight counted in bucket ``head``.
        head_unregistered: unregistered weight counted in bucket ``head``.
        older: ``{bucket: (total, unregistered)}`` for buckets before ``head`` still stored.
        older_total: sum of the totals in ``older``.
        older_unregistered: sum of the unregistered counts in ``older``.
        domains: ``{registrable domain: bucket last seen}``, at most ``max_tracked_domains``.
        warned: bucket of the last ``approaching_limit`` alert, or None.

    Equality compares the counters; instances are not hashable.
    """

    __slots__ = (
        "domains",
        "head",
        "head_total",
        "head_unregistered",
        "older",
        "older_total",
        "older_unregistered",
        "warned",
    )

    __hash__ = None  # type: ignore[assignment]

    def __init__(self, head: int = 0) -> None:
        self.head = head
        self.head_total = 0
        self.head_unregistered = 0
        self.older: dict[int, tuple[int, int]] = {}
        self.older_total = 0
        self.older_unregistered = 0
        self.domains: dict[str, int] = {}
        self.warned: int | None = None

    @property
    def total(self) -> int:
        """All relayed weight in the window (``T``)."""
        return self.older_total + self.head_total

    @property
    def unregistered(self) -> int:
        """Unregistered weight in the window (``U``)."""
        return self.older_unregistered + self.head_unregistered

    def advance(self, bucket: int, buckets: int) -> None:
        """Move ``head`` forward to *bucket* and expire every bucket ``<= bucket - buckets``.

        Does nothing unless *bucket* is newer than ``head`` (the window never moves back).
        """
        if bucket <= self.head:
            return
        older = self.older
        if self.head_total:
            older[self.head] = (self.head_total, self.head_unregistered)
            self.older_total += self.head_total
            self.older_unregistered += self.head_unregistered
            self.head_total = 0
            self.head_unregistered = 0
        self.head = bucket
        cutoff = bucket - buckets
        if older and min(older) <= cutoff:
            for key in [k for k in older if k <= cutoff]:
                total, unregistered = older.pop(key)
                self.older_total -= total
                self.older_unregistered -= unregistered
        domains = self.domains
        if domains:
            expired = [d for d, k in domains.items() if k <= cutoff]
            for domain in expired:
                del domains[domain]

    def copy(self) -> Window:
        """An independent copy."""
        other = Window(self.head)
        other.head_total = self.head_total
        other.head_unregistered = self.head_unregistered
        other.older = dict(self.older)
        other.older_total = self.older_total
        other.older_unregistered = self.older_unregistered
        other.domains = dict(self.domains)
        other.warned = self.warned
        return other

    def buckets_list(self) -> list[list[int]]:
        """Every non-empty bucket as ``[index, total, unregistered]``, oldest first."""
        rows = [[k, t, u] for k, (t, u) in sorted(self.older.items())]
        if self.head_total:
            rows.append([self.head, self.head_total, self.head_unregistered])
        return rows

    def _key(self) -> tuple[object, ...]:
        return (self.head, self.buckets_list(), sorted(self.domains.items()), self.warned)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Window):
            return NotImplemented
        return self._key() == other._key()

    def __repr__(self) -> str:
        return (
            f"Window(head={self.head}, total={self.total}, unregistered={self.unregistered}, "
            f"domains={len(self.domains)}, warned={self.warned})"
        )


# --------------------------------------------------------------------------- values


@attrs.frozen
class Evidence:
    """What the window showed at a moment: counts, the window's span and a sample of domains."""

    window_start: float
    window_end: float
    total: int
    unregistered: int
    distinct_domains: int
    sample: tuple[str, ...]


@attrs.frozen
class Attestation:
    """Someone attested that the on-premises server is secured."""

    by: str
    at: float
    note: str


@attrs.frozen
class ConnectorReview:
    """An inbound connector was reviewed: kept or removed."""

    connector: str
    kept: bool
    by: str
    at: float


@attrs.frozen
class UnblockRequest:
    """A pending unblock request: the code quoted and the tenant's evidence text."""

    code: BlockCode
    evidence: str
    at: float


@attrs.frozen
class Denial:
    """Support denied an unblock request."""

    by: str
    reason: str
    at: float


@attrs.frozen
class Block:
    """A block in force (BLOCKED, UNBLOCK_REQUESTED or SUSPENDED) and its remediation checklist.

    Attributes:
        code: 5.7.750 (blocked) or 5.7.705 (suspended).
        since: when the block (or the suspension that replaced it) started.
        reason: why, in words.
        actor: the operator who blocked, or None for the automatic block.
        evidence: the window when the block started.
        offending: unregistered registrable domains seen in the offending window (sorted).
        registered: those of them registered since (sorted).
        declared: those of them declared not ours (sorted).
        to_review: inbound connectors to review (sorted ids).
        reviews: reviews done (sorted by connector).
        attestation: the on-premises server attestation, if any.
        request: the pending unblock request, if any.
        last_denial: the last denial, if any.
    """

    code: BlockCode
    since: float
    reason: str
    actor: str | None
    evidence: Evidence
    offending: tuple[str, ...] = ()
    registered: tuple[str, ...] = ()
    declared: tuple[str, ...] = ()
    to_review: tuple[str, ...] = ()
    reviews: tuple[ConnectorReview, ...] = ()
    attestation: Attestation | None = None
    request: UnblockRequest | None = None
    last_denial: Denial | None = None


@attrs.frozen
class Checklist:
    """The remediation checklist of a blocked tenant; ``missing`` lists every open step."""

    tenant: str
    unresolved_domains: tuple[str, ...]
    unreviewed_connectors: tuple[str, ...]
    attested: bool

    @property
    def complete(self) -> bool:
        """True when nothing is missing."""
        return not self.missing

    @property
    def missing(self) -> tuple[str, ...]:
        """Every missing step, in words naming the domains and connectors concerned."""
        steps: list[str] = []
        if self.unresolved_domains:
            names = ", ".join(repr(d) for d in self.unresolved_domains)
            steps.append(f"register as accepted domains or declare not ours: {names}")
        if self.unreviewed_connectors:
            names = ", ".join(repr(c) for c in self.unreviewed_connectors)
            steps.append(f"review the inbound connectors: {names}")
        if not self.attested:
            steps.append("attest that the on-premises server is secured")
        return tuple(steps)


@attrs.frozen
class TenantState:
    """The state of one tenant: an attrs frozen value, JSON-serialisable with `to_dict`.

    The ``window`` is the one mutable part (see the module docstring): `BlockMachine.observe`
    updates it in place.  Create a tenant with ``TenantState.new("tenant-id")``.

    Attributes:
        tenant: the tenant's identifier (non-empty text).
        state: the `State`.
        window: the counters.
        offences: blocks so far (automatic or by an operator); drives probation escalation.
        probation_until: end of the current or last probation (epoch seconds), or None.
        block: the block in force; None exactly when ``state`` is ACTIVE.
        connectors: inbound connectors created within the look-back, as ``(id, created_at)``
            sorted by id.
    """

    tenant: str
    state: State = State.ACTIVE
    window: Window = attrs.field(factory=Window, hash=False)
    offences: int = 0
    probation_until: float | None = None
    block: Block | None = None
    connectors: tuple[tuple[str, float], ...] = ()

    @classmethod
    def new(cls, tenant: str) -> TenantState:
        """A fresh ACTIVE tenant with empty counters.

        Raises:
            InvalidEvent: *tenant* is not non-empty text.
        """
        return cls(tenant=_text(tenant, "tenant"))

    def on_probation(self, now: float) -> bool:
        """True if the probation deadline is still ahead at *now*."""
        return self.probation_until is not None and now < self.probation_until

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe deep snapshot (``schema`` = `STATE_SCHEMA_VERSION`); see `from_dict`."""
        w = self.window
        return {
            "schema": STATE_SCHEMA_VERSION,
            "tenant": self.tenant,
            "state": self.state.value,
            "offences": self.offences,
            "probation_until": self.probation_until,
            "window": {
                "head": w.head,
                "buckets": w.buckets_list(),
                "domains": [[d, k] for d, k in sorted(w.domains.items())],
                "warned": w.warned,
            },
            "connectors": [[c, at] for c, at in self.connectors],
            "block": None if self.block is None else _block_to_dict(self.block),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TenantState:
        """Rebuild a state from `to_dict` output (after a JSON round trip too).

        Raises:
            InvalidTenantState: *data* is not such a dict: unknown schema version, a missing or
                mistyped field (named by its path), or inconsistent content (for example a block
                on an ACTIVE tenant, negative counters, a bucket newer than ``head``).
        """
        try:
            return _state_from_dict(data)
        except InvalidTenantState:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise InvalidTenantState(f"malformed tenant state {shown(data)}: {exc!r}") from exc


@attrs.frozen
class Transition:
    """An audit record: the tenant moved from *source* to *target* because of *event*."""

    tenant: str
    source: State
    target: State
    event: Event
    reason: str
    at: float
    actor: str | None
    note: str | None
    evidence: Evidence


@attrs.frozen
class Alert:
    """Something an operator should hear about (see `AlertKind`)."""

    kind: AlertKind
    tenant: str
    at: float
    message: str
    evidence: Evidence


@attrs.frozen
class Effects:
    """What a call produced besides the new state.

    Attributes:
        decision: for an observation, accept or refuse(code); None for other events.
        transitions: audit records of state changes (empty when the state did not change).
        alerts: alerts raised.
    """

    decision: Verdict | None = None
    transitions: tuple[Transition, ...] = ()
    alerts: tuple[Alert, ...] = ()


# --------------------------------------------------------------------------- argument checks


def _bad(value: object, name: str, rule: str) -> InvalidEvent:
    return InvalidEvent(f"invalid {name} {shown(value)}: {rule}")


def _now(now: object) -> float:
    if type(now) not in (int, float) or not 0.0 <= now < _MAX_NOW:  # type: ignore[operator]
        raise _bad(now, "now", "must be UTC epoch seconds, a finite number in [0, 1e12)")
    return float(now)  # type: ignore[arg-type]


def _text(value: object, name: str, *, empty: bool = False) -> str:
    if not isinstance(value, str) or (not empty and not value.strip()) or len(value) > _MAX_TEXT:
        rule = "must be text" if empty else "must be non-empty text"
        raise _bad(value, name, f"{rule} of at most {_MAX_TEXT} characters")
    return str(value)


def _domain(value: object, name: str = "domain") -> str:
    try:
        return normalize_domain(value)  # type: ignore[arg-type]
    except DomainPolicyError as exc:
        raise _bad(value, name, f"must be a valid domain ({exc})") from exc


def _sorted_add(items: tuple[str, ...], item: str) -> tuple[str, ...]:
    return items if item in items else tuple(sorted((*items, item)))


_A, _B, _R, _S = State.ACTIVE, State.BLOCKED, State.UNBLOCK_REQUESTED, State.SUSPENDED


# --------------------------------------------------------------------------- serialisation


def _evidence_to_dict(e: Evidence) -> dict[str, Any]:
    return {
        "window_start": e.window_start,
        "window_end": e.window_end,
        "total": e.total,
        "unregistered": e.unregistered,
        "distinct_domains": e.distinct_domains,
        "sample": list(e.sample),
    }


def _block_to_dict(b: Block) -> dict[str, Any]:
    return {
        "code": b.code.value,
        "since": b.since,
        "reason": b.reason,
        "actor": b.actor,
        "evidence": _evidence_to_dict(b.evidence),
        "offending": list(b.offending),
        "registered": list(b.registered),
        "declared": list(b.declared),
        "to_review": list(b.to_review),
        "reviews": [[r.connector, r.kept, r.by, r.at] for r in b.reviews],
        "attestation": None
        if b.attestation is None
        else {"by": b.attestation.by, "at": b.attestation.at, "note": b.attestation.note},
        "request": None
        if b.request is None
        else {"code": b.request.code.value, "evidence": b.request.evidence, "at": b.request.at},
        "last_denial": None
        if b.last_denial is None
        else {"by": b.last_denial.by, "reason": b.last_denial.reason, "at": b.last_denial.at},
    }


class _Reader:
    """Typed access to a dict from a store; every failure names the path and the value."""

    def __init__(self, data: object, path: str) -> None:
        if not isinstance(data, Mapping):
            raise InvalidTenantState(f"{path}: expected an object, got {shown(data)}")
        self.data = data
        self.path = path

    def _fail(self, key: str, value: object, rule: str) -> InvalidTenantState:
        return InvalidTenantState(f"{self.path}.{key}: {shown(value)} {rule}")

    def get(self, key: str) -> object:
        if key not in self.data:
            raise InvalidTenantState(f"{self.path}: missing field {key!r}")
        return self.data[key]

    def int_(self, key: str, *, minimum: int | None = 0) -> int:
        return _int(self.get(key), f"{self.path}.{key}", minimum)

    def float_(self, key: str, *, optional: bool = False) -> float | None:
        value = self.get(key)
        if value is None and optional:
            return None
        return _float(value, f"{self.path}.{key}")

    def req_float(self, key: str) -> float:
        return _float(self.get(key), f"{self.path}.{key}")

    def str_(self, key: str, *, optional: bool = False) -> str | None:
        value = self.get(key)
        if value is None and optional:
            return None
        if not isinstance(value, str):
            raise self._fail(key, value, "is not text")
        return value

    def req_str(self, key: str) -> str:
        value = self.str_(key)
        assert value is not None
        return value

    def list_(self, key: str) -> list[Any]:
        value = self.get(key)
        if not isinstance(value, (list, tuple)):
            raise self._fail(key, value, "is not a list")
        return list(value)

    def obj(self, key: str) -> _Reader | None:
        value = self.get(key)
        return None if value is None else _Reader(value, f"{self.path}.{key}")

    def strings(self, key: str) -> tuple[str, ...]:
        values = self.list_(key)
        if not all(isinstance(v, str) and v for v in values) or values != sorted(set(values)):
            raise self._fail(key, values, "is not a sorted list of distinct non-empty texts")
        return tuple(values)


def _int(value: object, path: str, minimum: int | None = 0) -> int:
    if type(value) is not int or (minimum is not None and value < minimum):
        rule = "an integer" + (f" >= {minimum}" if minimum is not None else "")
        raise InvalidTenantState(f"{path}: {shown(value)} is not {rule}")
    return value


def _float(value: object, path: str) -> float:
    if type(value) not in (int, float) or not 0.0 <= value < _MAX_NOW:  # type: ignore[operator]
        raise InvalidTenantState(f"{path}: {shown(value)} is not epoch seconds in [0, 1e12)")
    return float(value)  # type: ignore[arg-type]


def _row(value: object, path: str, size: int) -> list[Any]:
    if not isinstance(value, (list, tuple)) or len(value) != size:
        raise InvalidTenantState(f"{path}: {shown(value)} is not a list of {size} items")
    return list(value)


def _enum(kind: type[enum.Enum], value: object, path: str) -> Any:
    try:
        return kind(value)
    except ValueError as exc:
        allowed = ", ".join(repr(m.value) for m in kind)
        raise InvalidTenantState(f"{path}: {shown(value)} is not one of {allowed}") from exc


def _window_from(r: _Reader) -> Window:
    head = r.int_("head")
    window = Window(head)
    previous = -1
    for i, raw in enumerate(r.list_("buckets")):
        path = f"{r.path}.buckets[{i}]"
        k, t, u = _row(raw, path, 3)
        k, t, u = _int(k, path + "[0]"), _int(t, path + "[1]", 1), _int(u, path + "[2]")
        if k <= previous or k > head or u > t:
            raise InvalidTenantState(
                f"{path}: {shown(raw)} breaks the rules: buckets strictly increasing, "
                f"none after head={head}, unregistered <= total"
            )
        previous = k
        if k == head:
            window.head_total, window.head_unregistered = t, u
        else:
            window.older[k] = (t, u)
            window.older_total += t
            window.older_unregistered += u
    previous_name = ""
    for i, raw in enumerate(r.list_("domains")):
        path = f"{r.path}.domains[{i}]"
        d, k = _row(raw, path, 2)
        if not isinstance(d, str) or not d or d <= previous_name:
            raise InvalidTenantState(f"{path}: {shown(d)} is not a domain in sorted order")
        if _int(k, path + "[1]") > head:
            raise InvalidTenantState(f"{path}: bucket {k!r} is after head={head}")
        previous_name = d
        window.domains[d] = k
    warned = r.get("warned")
    window.warned = None if warned is None else _int(warned, f"{r.path}.warned")
    if window.warned is not None and window.warned > head:
        raise InvalidTenantState(f"{r.path}.warned: {warned!r} is after head={head}")
    return window


def _evidence_from(r: _Reader) -> Evidence:
    sample = r.list_("sample")
    if not all(isinstance(s, str) for s in sample):
        raise InvalidTenantState(f"{r.path}.sample: {shown(sample)} is not a list of texts")
    return Evidence(
        window_start=_float_any(r.get("window_start"), f"{r.path}.window_start"),
        window_end=_float_any(r.get("window_end"), f"{r.path}.window_end"),
        total=r.int_("total"),
        unregistered=r.int_("unregistered"),
        distinct_domains=r.int_("distinct_domains"),
        sample=tuple(sample),
    )


def _float_any(value: object, path: str) -> float:
    """A finite float that may be negative (a window start near the epoch)."""
    if type(value) not in (int, float) or not math.isfinite(value):  # type: ignore[arg-type]
        raise InvalidTenantState(f"{path}: {shown(value)} is not a finite number")
    return float(value)  # type: ignore[arg-type]


def _block_from(r: _Reader) -> Block:
    offending = r.strings("offending")
    registered, declared = r.strings("registered"), r.strings("declared")
    for name, values in (("registered", registered), ("declared", declared)):
        stray = [d for d in values if d not in offending]
        if stray:
            raise InvalidTenantState(f"{r.path}.{name}: {stray!r} are not offending domains")
    reviews: list[ConnectorReview] = []
    for i, raw in enumerate(r.list_("reviews")):
        path = f"{r.path}.reviews[{i}]"
        connector, kept, by, at = _row(raw, path, 4)
        if not isinstance(connector, str) or type(kept) is not bool or not isinstance(by, str):
            raise InvalidTenantState(f"{path}: {shown(raw)} is not [connector, kept, by, at]")
        reviews.append(ConnectorReview(connector, kept, by, _float(at, path + "[3]")))
    if [rv.connector for rv in reviews] != sorted({rv.connector for rv in reviews}):
        raise InvalidTenantState(f"{r.path}.reviews: not sorted by distinct connector ids")
    attestation = request = denial = None
    if (a := r.obj("attestation")) is not None:
        attestation = Attestation(a.req_str("by"), a.req_float("at"), a.req_str("note"))
    if (q := r.obj("request")) is not None:
        request = UnblockRequest(
            _enum(BlockCode, q.get("code"), f"{q.path}.code"),
            q.req_str("evidence"),
            q.req_float("at"),
        )
    if (n := r.obj("last_denial")) is not None:
        denial = Denial(n.req_str("by"), n.req_str("reason"), n.req_float("at"))
    evidence = r.obj("evidence")
    if evidence is None:
        raise InvalidTenantState(f"{r.path}.evidence: missing")
    return Block(
        code=_enum(BlockCode, r.get("code"), f"{r.path}.code"),
        since=r.req_float("since"),
        reason=r.req_str("reason"),
        actor=r.str_("actor", optional=True),
        evidence=_evidence_from(evidence),
        offending=offending,
        registered=registered,
        declared=declared,
        to_review=r.strings("to_review"),
        reviews=tuple(reviews),
        attestation=attestation,
        request=request,
        last_denial=denial,
    )


def _state_from_dict(data: Mapping[str, Any]) -> TenantState:
    r = _Reader(data, "state")
    schema = r.get("schema")
    if schema != STATE_SCHEMA_VERSION or type(schema) is not int:
        raise InvalidTenantState(
            f"state.schema: {shown(schema)} is not a supported schema version "
            f"(this version reads {STATE_SCHEMA_VERSION})"
        )
    tenant = r.req_str("tenant")
    if not tenant.strip():
        raise InvalidTenantState(f"state.tenant: {tenant!r} is empty")
    state = _enum(State, r.get("state"), "state.state")
    window_reader = r.obj("window")
    if window_reader is None:
        raise InvalidTenantState("state.window: missing")
    connectors: list[tuple[str, float]] = []
    for i, raw in enumerate(r.list_("connectors")):
        path = f"state.connectors[{i}]"
        connector, at = _row(raw, path, 2)
        if not isinstance(connector, str) or not connector:
            raise InvalidTenantState(f"{path}: {shown(connector)} is not a connector id")
        connectors.append((connector, _float(at, path + "[1]")))
    if [c for c, _ in connectors] != sorted({c for c, _ in connectors}):
        raise InvalidTenantState("state.connectors: not sorted by distinct connector ids")
    block_reader = r.obj("block")
    block = None if block_reader is None else _block_from(block_reader)
    if (state is _A) != (block is None):
        raise InvalidTenantState(
            f"state.block: state {state.value!r} must have a block exactly when not active"
        )
    if block is not None:
        expected = {_B: BlockCode.UNREGISTERED, _S: BlockCode.THRESHOLD}.get(state)
        if (
            (expected is not None and block.code is not expected)
            or ((state is _R) != (block.request is not None))
            or (block.request is not None and block.request.code is not block.code)
        ):
            raise InvalidTenantState(
                f"state.block: code {block.code.value!r} and request {block.request!r} do not "
                f"fit state {state.value!r}"
            )
    return TenantState(
        tenant=tenant,
        state=state,
        window=_window_from(window_reader),
        offences=r.int_("offences"),
        probation_until=r.float_("probation_until", optional=True),
        block=block,
        connectors=tuple(connectors),
    )
