"""The tenant block-state machine: tolerated volume, block, remediation, unblock, probation.

A tenant may relay a moderate amount of mail from sender domains it has not registered (mailbox
forwarding, hybrid servers).  When that volume looks like a compromised on-premises server relaying
spam, the tenant is blocked from sending from unregistered domains (``550 5.7.750``) until it
remediates and support approves; a blocked tenant that keeps pushing is suspended outright
(``550 5.7.705``).  This module is the whole machine, in the style of ``h11/_state.py``: the
states, the events, the transition table (`TRANSITIONS`), the thresholds (`BlockPolicy`), the
per-tenant value (`TenantState`) and the effects each call returns (`Effects`: a `Verdict`,
`Transition` audit records and `Alert` values).

Sans-IO
-------
No I/O and no clock.  Every call takes ``now``: **UTC epoch seconds as a float** (``time.time()``
or, better, the store's clock such as Redis ``TIME``; ints are accepted, and so are fractions of a
second).  Everything is deterministic given the sequence of calls and their ``now`` values.
``now`` must be finite, ``>= 0`` and below ``1e12``; anything else is refused with `InvalidEvent`.

Every method of `BlockMachine` returns ``(new_state, effects)``.  An event the current state does
not allow raises `InvalidTransition` (`ChecklistIncomplete` for an unblock request or approval
with steps missing, `InvalidEvent` for malformed arguments) and changes nothing.

Immutability and the one exception
----------------------------------
`TenantState` is an attrs frozen value: its fields are never reassigned, transitions return a new
object.  Its ``window`` (a `Window`) is the one mutable part: a counter accumulator that
`BlockMachine.observe` updates **in place**, so that the accept path allocates nothing and returns
the very same state object (an attrs ``evolve`` costs about 4 us, a frozen constructor about 1.5 us,
an in-place update of two slots about 0.2 us on the reference machine; the 300k observations/s
target leaves about 3 us per call).  The contract is therefore: ``observe`` *consumes* the state
it is given (keep only the state it returns); every other method leaves its input untouched and
gives the new state its own copy of the window.  ``to_dict`` is a deep, JSON-safe snapshot.

The counting model (mirror this exactly in the Redis Lua script)
----------------------------------------------------------------
Parameters, all integers precomputed by `BlockPolicy` (see `BlockPolicy.limits`): ``S`` =
``bucket_seconds``, ``N`` = ``window_seconds / bucket_seconds`` (buckets per window), ``CAP`` =
``max_tracked_domains``, and for the limits in force (normal, or probation while
``now < probation_until``): ``M`` (messages), ``D`` (distinct domains), ``WM``/``WD`` (warning
thresholds, ``floor(limit * warn_fraction)``), ``SM`` (suspension threshold,
``floor(message_limit * suspend_factor)``) and ``R`` (``min_unregistered_share`` or none).

Per tenant the window holds: ``head`` (integer index of the newest bucket seen, initially 0),
per-bucket integer counters ``t[k]`` (all relayed weight) and ``u[k]`` (unregistered weight) for
the live buckets ``head - N < k <= head``, their sums ``T`` and ``U``, a map ``last[d] = k`` from
each distinct unregistered registrable domain to the bucket it was last seen in (at most ``CAP``
entries), and ``warned`` (bucket of the last warning alert, or none).  The Python representation
keeps ``t[head]``/``u[head]`` in two attributes and the older buckets in a dict; the observable
values are the same.  An observation ``(now, registered, d, w)`` with weight ``w >= 1`` does::

    b = floor(now / S)                       # IEEE double division; Lua: math.floor(now / S)
    if b > head:                             # time moved forward: expire, never resurrect
        for each stored bucket k with k <= b - N: T -= t[k]; U -= u[k]; delete t[k], u[k]
        for each domain d with last[d] <= b - N: delete last[d]
        head = b
    # else: b <= head (same bucket, or the clock went backwards): count in bucket head
    t[head] += w; T += w
    if registered:
        decision = refuse 5.7.705 if state == SUSPENDED else accept
    else:
        u[head] += w; U += w
        if d in last or len(last) < CAP: last[d] = head   # a full record refuses new names
        if state == ACTIVE:
            gate = (R is none) or (U > R * T)              # IEEE double multiply
            if gate and (U > M or len(last) > D):
                state = BLOCKED; decision = refuse 5.7.750  # the crossing message is refused
            else:
                if gate and (U > WM or len(last) > WD) and (warned is none or warned <= head - N):
                    warned = head; alert approaching_limit
                decision = accept
        elif state == SUSPENDED:
            decision = refuse 5.7.705
        elif U > SM:                                      # BLOCKED or UNBLOCK_REQUESTED
            state = SUSPENDED; decision = refuse 5.7.705  # a pending request is dropped
        else:
            decision = refuse 5.7.750

Refused attempts are counted too (that is what the suspension threshold measures).  Only the hot
path above needs to be atomic in Redis; the transition itself (building the audit record, the
checklist) can be finished by Python after the script reports that it flipped the state.

Time going backwards (clock skew between MTAs): the window never moves back.  An observation
whose bucket is older than ``head`` is counted in bucket ``head`` -- never dropped, never put in
an expired bucket, never able to resurrect or double-expire one -- so counts stay exact sums of
the observed weights and never go negative; such an observation simply stays in the window up to
one skew longer (fails closed).  A single far-future ``now`` does move ``head`` forward and pins
the window there until real time catches up: later observations all count in that bucket, which is
stricter, never looser.  Take ``now`` from one clock (the store's) to avoid both.  Probation and
the connector look-back compare the raw ``now``.

Approval starts a fresh window (the counts that caused the block would otherwise re-block at
once); a block or suspension keeps the window (it is the suspension evidence).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from typing import Any, Final

import attrs

from ._errors import DomainPolicyError, InvalidConfiguration, InvalidTransition, shown
from ._names import normalize_domain

__all__ = [
    "STATE_SCHEMA_VERSION",
    "TRANSITIONS",
    "Alert",
    "AlertKind",
    "Attestation",
    "Block",
    "BlockCode",
    "BlockMachine",
    "BlockPolicy",
    "Checklist",
    "ChecklistIncomplete",
    "ConnectorReview",
    "Denial",
    "Edge",
    "Effects",
    "Event",
    "Evidence",
    "InvalidEvent",
    "InvalidTenantState",
    "Limits",
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


@attrs.frozen
class Edge:
    """One row of the transition table: *event* in *source* may lead to *target* ``when`` ..."""

    source: State
    event: Event
    target: State
    when: str = ""


_A, _B, _R, _S = State.ACTIVE, State.BLOCKED, State.UNBLOCK_REQUESTED, State.SUSPENDED
_E = Event


def _admin_loops(state: State) -> tuple[Edge, ...]:
    events = [_E.REGISTER_DOMAIN, _E.REMOVE_DOMAIN, _E.CREATE_CONNECTOR, _E.REVIEW_CONNECTOR]
    if state is not _A:
        events += [_E.DECLARE_NOT_OURS, _E.ATTEST]
    return tuple(Edge(state, event, state) for event in events)


TRANSITIONS: Final[tuple[Edge, ...]] = (
    Edge(_A, _E.OBSERVE, _A, "within the limits"),
    Edge(_A, _E.OBSERVE, _B, "unregistered messages or distinct domains over the limit"),
    *_admin_loops(_A),
    Edge(_A, _E.OPERATOR_BLOCK, _B),
    Edge(_A, _E.OPERATOR_SUSPEND, _S),
    Edge(_B, _E.OBSERVE, _B, "within the suspension threshold"),
    Edge(_B, _E.OBSERVE, _S, "unregistered messages over suspend_factor x limit"),
    *_admin_loops(_B),
    Edge(_B, _E.REQUEST_UNBLOCK, _R, "quotes 5.7.750 and the checklist is complete"),
    Edge(_B, _E.OPERATOR_SUSPEND, _S),
    Edge(_R, _E.OBSERVE, _R, "within the suspension threshold"),
    Edge(_R, _E.OBSERVE, _S, "unregistered messages over suspend_factor x limit"),
    *_admin_loops(_R),
    Edge(_R, _E.APPROVE, _A, "the checklist is still complete; probation starts"),
    Edge(_R, _E.DENY, _B, "the request quoted 5.7.750"),
    Edge(_R, _E.DENY, _S, "the request quoted 5.7.705"),
    Edge(_R, _E.OPERATOR_SUSPEND, _S),
    Edge(_S, _E.OBSERVE, _S),
    *_admin_loops(_S),
    Edge(_S, _E.REQUEST_UNBLOCK, _R, "quotes 5.7.705 and the checklist is complete"),
)
"""The transition table: every (state, event, target) the machine can take.  A pair that is not
here raises `InvalidTransition`; the machine checks every move it makes against this table, and
the diagram in ``docs/state-machine.md`` is generated from it."""

_EDGES: Final = frozenset((e.source, e.event, e.target) for e in TRANSITIONS)
_ALLOWED: Final = frozenset((e.source, e.event) for e in TRANSITIONS)


def _check_allowed(state: TenantState, event: Event) -> None:
    if (state.state, event) not in _ALLOWED:
        allowed = sorted({e.event.value for e in TRANSITIONS if e.source is state.state})
        raise InvalidTransition(
            f"event {event.value!r} is not allowed for tenant {shown(state.tenant)} in state "
            f"{state.state.value!r} (allowed there: {', '.join(allowed)})"
        )


# --------------------------------------------------------------------------- the policy


def _reason(text: str) -> dict[str, str]:
    return {"reason": text}


@attrs.frozen
class Limits:
    """The integer thresholds in force (normal or probation), as the Lua script receives them."""

    messages: int
    domains: int
    warn_messages: int
    warn_domains: int
    suspend_messages: int


@attrs.frozen
class BlockPolicy:
    """Thresholds of the block-state machine, validated on construction.

    Every default carries its reason in the field metadata (``attrs.fields(BlockPolicy)``); the
    table in ``docs/state-machine.md`` is generated from it.  All durations are seconds.

    Raises:
        InvalidConfiguration: on construction, listing every invalid field (with its repr) and
            the rule it broke.
    """

    window_seconds: int = attrs.field(
        default=3600,
        metadata=_reason(
            "One hour, the unit of Exchange Online's outbound limits: long enough to smooth the "
            "bursts of a busy hybrid server, short enough that a compromise is stopped within it."
        ),
    )
    bucket_seconds: int = attrs.field(
        default=60,
        metadata=_reason(
            "60 buckets per hour: O(60) integers per tenant, and the window is exact to one "
            "minute (an observation leaves the window between 59 and 60 minutes later)."
        ),
    )
    message_limit: int = attrs.field(
        default=500,
        metadata=_reason(
            "Unregistered weight (messages or recipients) per window.  Forwarding for a few "
            "hundred mailboxes or a hybrid server with an unlisted domain stays well under 8 a "
            "minute; a compromised server relaying spam sends thousands to tens of thousands an "
            "hour, so 500 stops it within minutes while tolerating legitimate relay."
        ),
    )
    domain_limit: int = attrs.field(
        default=50,
        metadata=_reason(
            "Distinct unregistered registrable domains per window.  Spam runs forge many sender "
            "domains at low volume each (which the message limit alone misses); a legitimate "
            "tenant relays for a handful.  Forwarding without SRS passes original senders "
            "through: such tenants should use SRS or raise this."
        ),
    )
    min_unregistered_share: float | None = attrs.field(
        default=None,
        metadata=_reason(
            "Off: a compromised server behind a tenant with much legitimate mail must still be "
            "caught.  Set it (e.g. 0.5) for very large tenants whose forwarding volume is high in "
            "absolute terms but a small share of their mail."
        ),
    )
    warn_fraction: float = attrs.field(
        default=0.8,
        metadata=_reason(
            "Alert at 80% of a limit: enough headroom for an operator to look before the block, "
            "late enough not to page for ordinary peaks.  At most one alert per window."
        ),
    )
    suspend_factor: float = attrs.field(
        default=3.0,
        metadata=_reason(
            "A blocked tenant whose unregistered attempts in the window exceed 3x the message "
            "limit ignores its 550 refusals: the server is under an attacker's control, so all "
            "relay is refused (5.7.705)."
        ),
    )
    probation_fraction: float = attrs.field(
        default=0.5,
        metadata=_reason(
            "On probation the limits are halved: a re-compromise of a server just cleaned is "
            "caught twice as fast, while a remediated tenant still has room for normal relay."
        ),
    )
    probation_seconds: int = attrs.field(
        default=7 * 86400,
        metadata=_reason(
            "Seven days: covers a full weekly cycle of the tenant's traffic (and the weekend, "
            "when compromised servers are least watched) after the first unblock."
        ),
    )
    probation_escalation: float = attrs.field(
        default=2.0,
        metadata=_reason(
            "Each further offence doubles probation (7, 14, 28 days ...): repeat offenders are "
            "watched longer."
        ),
    )
    max_probation_seconds: int = attrs.field(
        default=90 * 86400,
        metadata=_reason(
            "Escalation stops at 90 days, one quarter; beyond that, operators decide."
        ),
    )
    connector_lookback_seconds: int = attrs.field(
        default=30 * 86400,
        metadata=_reason(
            "30 days: attackers create inbound connectors to relay spam, often days or weeks "
            "before the volume is noticed; every connector created in that time before the block "
            "(and after it) must be reviewed."
        ),
    )
    max_tracked_domains: int = attrs.field(
        default=200,
        metadata=_reason(
            "Bound on the distinct-domain record (memory per tenant).  Four times the domain "
            "limit: the count is exact up to the limit, and the checklist lists enough of a "
            "forged-domain spray to act on (must exceed domain_limit)."
        ),
    )
    sample_size: int = attrs.field(
        default=10,
        metadata=_reason(
            "Unregistered domains quoted in evidence and alerts: enough to recognise."
        ),
    )

    def __attrs_post_init__(self) -> None:
        problems: list[str] = []
        ints = {
            "window_seconds": self.window_seconds,
            "bucket_seconds": self.bucket_seconds,
            "message_limit": self.message_limit,
            "domain_limit": self.domain_limit,
            "probation_seconds": self.probation_seconds,
            "max_probation_seconds": self.max_probation_seconds,
            "connector_lookback_seconds": self.connector_lookback_seconds,
            "max_tracked_domains": self.max_tracked_domains,
            "sample_size": self.sample_size,
        }
        good: dict[str, int] = {}
        for name, value in ints.items():
            if type(value) is not int or value < 1:
                problems.append(f"{name}={shown(value)}: must be an integer >= 1")
            else:
                good[name] = value
        floats = {
            "warn_fraction": (self.warn_fraction, 0.0, 1.0, "in (0, 1]"),
            "probation_fraction": (self.probation_fraction, 0.0, 1.0, "in (0, 1]"),
        }
        for name, (number, low, high, rule) in floats.items():
            if not _is_real(number) or not low < number <= high:
                problems.append(f"{name}={shown(number)}: must be a number {rule}")
        share = self.min_unregistered_share
        if share is not None and (not _is_real(share) or not 0.0 <= share < 1.0):
            problems.append(f"min_unregistered_share={shown(share)}: must be None or in [0, 1)")
        for name, factor, low_open in (
            ("suspend_factor", self.suspend_factor, True),
            ("probation_escalation", self.probation_escalation, False),
        ):
            low_ok = _is_real(factor) and (factor > 1.0 if low_open else factor >= 1.0)
            if not low_ok or not factor <= 1000.0:
                rule = "in (1, 1000]" if low_open else "in [1, 1000]"
                problems.append(f"{name}={shown(factor)}: must be a number {rule}")
        if "window_seconds" in good and "bucket_seconds" in good:
            window, bucket = good["window_seconds"], good["bucket_seconds"]
            if window % bucket:
                problems.append(
                    f"window_seconds={window!r}: must be a multiple of bucket_seconds={bucket!r}"
                )
            elif not 1 <= window // bucket <= 10_000:
                problems.append(
                    f"window_seconds={window!r}: window_seconds / bucket_seconds must be between "
                    f"1 and 10000 buckets, got {window // bucket}"
                )
        tracked, domain_limit = good.get("max_tracked_domains"), good.get("domain_limit")
        if tracked is not None and domain_limit is not None and tracked <= domain_limit:
            problems.append(
                f"max_tracked_domains={tracked!r}: must be greater than "
                f"domain_limit={domain_limit!r} so the domain count is exact"
            )
        longest, shortest = good.get("max_probation_seconds"), good.get("probation_seconds")
        if longest is not None and shortest is not None and longest < shortest:
            problems.append(
                f"max_probation_seconds={longest!r}: must be at least "
                f"probation_seconds={shortest!r}"
            )
        if problems:
            raise InvalidConfiguration(problems, source="BlockPolicy")

    @property
    def buckets(self) -> int:
        """Buckets per window (``window_seconds // bucket_seconds``)."""
        return self.window_seconds // self.bucket_seconds

    def limits(self, *, probation: bool = False) -> Limits:
        """The integer thresholds in force, normal or on probation.

        ``messages``/``domains`` are the limits (block when exceeded), the probation ones being
        ``max(1, floor(limit * probation_fraction))``; ``warn_*`` are
        ``floor(limit * warn_fraction)``; ``suspend_messages`` is
        ``floor(message_limit * suspend_factor)`` (the normal limit, also on probation).
        """
        messages, domains = self.message_limit, self.domain_limit
        if probation:
            messages = max(1, math.floor(messages * self.probation_fraction))
            domains = max(1, math.floor(domains * self.probation_fraction))
        return Limits(
            messages=messages,
            domains=domains,
            warn_messages=math.floor(messages * self.warn_fraction),
            warn_domains=math.floor(domains * self.warn_fraction),
            suspend_messages=math.floor(self.message_limit * self.suspend_factor),
        )

    def probation_for(self, offences: int) -> int:
        """Probation in seconds after the approval of the *offences*-th block (1 for the first).

        ``min(max_probation_seconds, probation_seconds * probation_escalation ** (offences-1))``.
        """
        factor = self.probation_escalation ** max(0, min(offences - 1, 64))
        return int(min(float(self.max_probation_seconds), self.probation_seconds * factor))


def _is_real(value: object) -> bool:
    return type(value) in (int, float) and math.isfinite(value)  # type: ignore[arg-type]


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


_NOTHING: Final = Effects()
_ACCEPTED: Final = Effects(Verdict.ACCEPT)
_REFUSED_750: Final = Effects(Verdict.REFUSE_UNREGISTERED)
_REFUSED_705: Final = Effects(Verdict.REFUSE_THRESHOLD)

_Outcome = tuple[TenantState, Effects]


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


# --------------------------------------------------------------------------- the machine


@attrs.frozen(eq=False)
class BlockMachine:
    """Applies events to `TenantState` values under one `BlockPolicy`.  Stateless and sharable.

    Every method takes the tenant's state and ``now`` (UTC epoch seconds, float) and returns
    ``(new_state, effects)``.  Only `observe` mutates its input (the window, in place).
    """

    policy: BlockPolicy = attrs.field(factory=BlockPolicy)
    _bucket: float = attrs.field(init=False, repr=False)
    _buckets: int = attrs.field(init=False, repr=False)
    _cap: int = attrs.field(init=False, repr=False)
    _share: float | None = attrs.field(init=False, repr=False)
    _normal: tuple[int, int, int, int] = attrs.field(init=False, repr=False)
    _probation: tuple[int, int, int, int] = attrs.field(init=False, repr=False)
    _suspend: int = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        policy = self.policy
        if not isinstance(policy, BlockPolicy):
            raise InvalidConfiguration([f"policy={shown(policy)}: must be a BlockPolicy"])
        normal, probation = policy.limits(), policy.limits(probation=True)
        values = {
            "_bucket": float(policy.bucket_seconds),
            "_buckets": policy.buckets,
            "_cap": policy.max_tracked_domains,
            "_share": policy.min_unregistered_share,
            "_normal": (normal.messages, normal.domains, normal.warn_messages, normal.warn_domains),
            "_probation": (
                probation.messages,
                probation.domains,
                probation.warn_messages,
                probation.warn_domains,
            ),
            "_suspend": normal.suspend_messages,
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)

    # ----------------------------------------------------------------- the hot path

    def observe(
        self,
        state: TenantState,
        now: float,
        *,
        registered: bool,
        registrable: str | None = None,
        weight: int = 1,
    ) -> _Outcome:
        """Count one relayed message and decide: accept, or refuse with 5.7.750 / 5.7.705.

        Implements the counting model of the module docstring exactly.  Consumes *state*: the
        window is updated in place and the same object is returned unless the state changes.

        Args:
            state: the tenant's state (keep only the returned one).
            now: UTC epoch seconds.
            registered: the sender domain is one of the tenant's accepted domains.
            registrable: for unregistered mail, the registrable domain of the sender domain
                (already normalised, e.g. from `registrable_domain`, or the domain itself when it
                is a public suffix); ignored for registered mail.
            weight: messages or recipients this observation stands for (an int >= 1).

        Returns:
            ``(state, effects)`` with ``effects.decision`` set; when the message crosses a limit
            it is itself refused and ``effects`` carries the `Transition` and the alert.

        Raises:
            InvalidEvent: *now* is not valid epoch seconds, *weight* is not an int >= 1, or
                unregistered mail comes without its registrable domain.  Nothing is counted.
        """
        try:
            if not 0.0 <= now < _MAX_NOW or weight.__class__ is not int or weight < 1:
                raise self._bad_observation(now, weight)
            bucket = int(now / self._bucket)
        except TypeError as exc:
            raise self._bad_observation(now, weight) from exc
        window = state.window
        if registered:
            if bucket > window.head:
                window.advance(bucket, self._buckets)
            window.head_total += weight
            if state.state is _S:
                return state, _REFUSED_705
            return state, _ACCEPTED
        if registrable.__class__ is not str or not registrable:
            raise _bad(registrable, "registrable", "unregistered mail needs its registrable domain")
        if bucket > window.head:
            window.advance(bucket, self._buckets)
        window.head_total += weight
        window.head_unregistered += weight
        domains = window.domains
        if registrable in domains or len(domains) < self._cap:
            domains[registrable] = window.head
        current = state.state
        unregistered = window.older_unregistered + window.head_unregistered
        if current is _A:
            until = state.probation_until
            messages, distinct_limit, warn_messages, warn_domains = (
                self._probation if until is not None and now < until else self._normal
            )
            distinct = len(domains)
            if unregistered > warn_messages or distinct > warn_domains:
                share = self._share
                if share is None or unregistered > share * (window.older_total + window.head_total):
                    if unregistered > messages or distinct > distinct_limit:
                        return self._auto_block(state, now, unregistered, distinct)
                    warned = window.warned
                    if warned is None or warned <= window.head - self._buckets:
                        window.warned = window.head
                        return state, self._warning(state, now)
            return state, _ACCEPTED
        if current is _S:
            return state, _REFUSED_705
        if unregistered > self._suspend:
            return self._auto_suspend(state, now, unregistered)
        return state, _REFUSED_750

    @staticmethod
    def _bad_observation(now: object, weight: object) -> InvalidEvent:
        try:
            _now(now)
        except InvalidEvent as exc:
            return exc
        return _bad(weight, "weight", "must be an int >= 1 (messages or recipients)")

    # ----------------------------------------------------------------- effects helpers

    def evidence(self, state: TenantState, now: float | None = None) -> Evidence:
        """The window of *state* as `Evidence` (counts, span, a sorted sample of domains).

        With *now*, the window is described as it stands at *now*: buckets that have expired
        since the last observation are left out (on a copy; *state* is not changed).
        """
        window = state.window
        size = self.policy.bucket_seconds
        if now is not None:
            bucket = int(now / self._bucket)
            if bucket > window.head:
                window = window.copy()
                window.advance(bucket, self._buckets)
        return Evidence(
            window_start=float((window.head - self._buckets + 1) * size),
            window_end=float((window.head + 1) * size),
            total=window.total,
            unregistered=window.unregistered,
            distinct_domains=len(window.domains),
            sample=tuple(sorted(window.domains)[: self.policy.sample_size]),
        )

    def _warning(self, state: TenantState, now: float) -> Effects:
        evidence = self.evidence(state, now)
        limits = self.policy.limits(probation=state.on_probation(now))
        alert = Alert(
            AlertKind.APPROACHING_LIMIT,
            state.tenant,
            now,
            f"{evidence.unregistered} unregistered messages (limit {limits.messages}) from "
            f"{evidence.distinct_domains} domains (limit {limits.domains}) in the window",
            evidence,
        )
        return Effects(Verdict.ACCEPT, (), (alert,))

    def _move(
        self,
        state: TenantState,
        event: Event,
        target: State,
        now: float,
        reason: str,
        *,
        actor: str | None = None,
        note: str | None = None,
        decision: Verdict | None = None,
        alert: AlertKind | None = None,
        window: Window | None = None,
        **changes: Any,
    ) -> _Outcome:
        """Build the new state, checked against `TRANSITIONS`, with its audit record and alert."""
        if (state.state, event, target) not in _EDGES:  # pragma: no cover - a bug, not input
            raise InvalidTransition(
                f"internal error: {state.state.value!r} -{event.value}-> {target.value!r} "
                "is not in the transition table"
            )
        new = attrs.evolve(
            state, state=target, window=state.window if window is None else window, **changes
        )
        evidence = self.evidence(new, now)
        record = Transition(
            state.tenant, state.state, target, event, reason, now, actor, note, evidence
        )
        alerts = () if alert is None else (Alert(alert, state.tenant, now, reason, evidence),)
        return new, Effects(decision, (record,), alerts)

    def _new_block(
        self, state: TenantState, now: float, code: BlockCode, reason: str, actor: str | None
    ) -> Block:
        lookback = now - self.policy.connector_lookback_seconds
        return Block(
            code=code,
            since=now,
            reason=reason,
            actor=actor,
            evidence=self.evidence(state, now),
            offending=tuple(sorted(state.window.domains)),
            to_review=tuple(sorted({c for c, at in state.connectors if at >= lookback})),
        )

    def _auto_block(
        self, state: TenantState, now: float, unregistered: int, distinct: int
    ) -> _Outcome:
        on_probation = state.on_probation(now)
        limits = self.policy.limits(probation=on_probation)
        which = "probation " if on_probation else ""
        reason = (
            f"{unregistered} unregistered messages (limit {limits.messages}) from {distinct} "
            f"domains (limit {limits.domains}) in the {which}window: blocked with 5.7.750"
        )
        block = self._new_block(state, now, BlockCode.UNREGISTERED, reason, None)
        return self._move(
            state,
            Event.OBSERVE,
            _B,
            now,
            reason,
            decision=Verdict.REFUSE_UNREGISTERED,
            alert=AlertKind.BLOCKED,
            block=block,
            offences=state.offences + 1,
        )

    def _auto_suspend(self, state: TenantState, now: float, unregistered: int) -> _Outcome:
        assert state.block is not None
        reason = (
            f"{unregistered} unregistered attempts while blocked (suspension threshold "
            f"{self._suspend}): suspended with 5.7.705"
        )
        block = attrs.evolve(
            state.block, code=BlockCode.THRESHOLD, since=now, reason=reason, request=None
        )
        return self._move(
            state,
            Event.OBSERVE,
            _S,
            now,
            reason,
            decision=Verdict.REFUSE_THRESHOLD,
            alert=AlertKind.SUSPENDED,
            block=block,
        )

    # ----------------------------------------------------------------- domains

    def register_domain(self, state: TenantState, now: float, domain: str) -> _Outcome:
        """An accepted domain was registered.

        While a block is in force this resolves the checklist entry for that exact domain (the
        registrable domain the block listed); otherwise it changes nothing.

        Raises:
            InvalidEvent: *now* or *domain* is invalid.
        """
        now, name = _now(now), _domain(domain)
        _check_allowed(state, Event.REGISTER_DOMAIN)
        block = state.block
        if block is None or name not in block.offending or name in block.registered:
            return state, _NOTHING
        return self._same(
            state, block=attrs.evolve(block, registered=_sorted_add(block.registered, name))
        )

    def remove_domain(self, state: TenantState, now: float, domain: str) -> _Outcome:
        """An accepted domain was removed; reopens its checklist entry if a block is in force.

        Raises:
            InvalidEvent: *now* or *domain* is invalid.
        """
        now, name = _now(now), _domain(domain)
        _check_allowed(state, Event.REMOVE_DOMAIN)
        block = state.block
        if block is None or name not in block.registered:
            return state, _NOTHING
        registered = tuple(d for d in block.registered if d != name)
        return self._same(state, block=attrs.evolve(block, registered=registered))

    def declare_not_ours(
        self, state: TenantState, now: float, domains: Iterable[str], *, by: str
    ) -> _Outcome:
        """The tenant declares offending domains not its own (forged by the spammer).

        Raises:
            InvalidEvent: *now*, *by* or a domain is invalid, or a domain is not among the
                offending domains of the block (all such domains are named).
            InvalidTransition: no block is in force (ACTIVE).
        """
        now, by = _now(now), _text(by, "by")
        if isinstance(domains, str):
            raise _bad(domains, "domains", "must be an iterable of domains, not one string")
        names = sorted({_domain(d) for d in domains})
        _check_allowed(state, Event.DECLARE_NOT_OURS)
        assert state.block is not None
        block = state.block
        unknown = [d for d in names if d not in block.offending]
        if unknown:
            raise _bad(
                unknown,
                "domains",
                f"not among the offending domains of the block {block.offending!r}",
            )
        declared = tuple(sorted(set(block.declared) | set(names)))
        if declared == block.declared:
            return state, _NOTHING
        return self._same(state, block=attrs.evolve(block, declared=declared))

    # ----------------------------------------------------------------- connectors

    def create_connector(self, state: TenantState, now: float, connector: str) -> _Outcome:
        """An inbound connector was created; it must be reviewed if a block comes within the
        look-back, and at once if a block is in force.

        Raises:
            InvalidEvent: *now* or *connector* is invalid, or the id is already known.
        """
        now, connector = _now(now), _text(connector, "connector")
        _check_allowed(state, Event.CREATE_CONNECTOR)
        lookback = now - self.policy.connector_lookback_seconds
        kept = [(c, at) for c, at in state.connectors if at >= lookback]
        if any(c == connector for c, _ in kept):
            raise _bad(connector, "connector", "a connector with this id was already created")
        connectors = tuple(sorted((*kept, (connector, now))))
        block = state.block
        if block is not None:
            block = attrs.evolve(block, to_review=_sorted_add(block.to_review, connector))
        return self._same(state, connectors=connectors, block=block)

    def review_connector(
        self, state: TenantState, now: float, connector: str, *, kept: bool, by: str
    ) -> _Outcome:
        """An inbound connector was reviewed and kept or removed (a later review replaces it).

        Raises:
            InvalidEvent: *now*, *by* or *kept* is invalid, or *connector* is neither a recent
                connector nor one the block asks to review.
        """
        now, connector, by = _now(now), _text(connector, "connector"), _text(by, "by")
        if type(kept) is not bool:
            raise _bad(kept, "kept", "must be True (kept) or False (removed)")
        _check_allowed(state, Event.REVIEW_CONNECTOR)
        block = state.block
        known = {c for c, _ in state.connectors}
        if connector not in known and (block is None or connector not in block.to_review):
            raise _bad(connector, "connector", "is not a connector created within the look-back")
        connectors = state.connectors
        if not kept:
            connectors = tuple(item for item in connectors if item[0] != connector)
        if block is not None and connector in block.to_review:
            review = ConnectorReview(connector, kept, by, now)
            reviews = (*(r for r in block.reviews if r.connector != connector), review)
            block = attrs.evolve(block, reviews=tuple(sorted(reviews, key=lambda r: r.connector)))
        return self._same(state, connectors=connectors, block=block)

    # ----------------------------------------------------------------- remediation

    def attest(self, state: TenantState, now: float, *, by: str, note: str) -> _Outcome:
        """Someone attests that the on-premises server is secured (replaces an earlier one).

        Raises:
            InvalidEvent: *now*, *by* or *note* is invalid.
            InvalidTransition: no block is in force (ACTIVE).
        """
        now, by, note = _now(now), _text(by, "by"), _text(note, "note")
        _check_allowed(state, Event.ATTEST)
        assert state.block is not None
        attestation = Attestation(by, now, note)
        return self._same(state, block=attrs.evolve(state.block, attestation=attestation))

    def checklist(self, state: TenantState) -> Checklist:
        """The remediation checklist of *state* (empty and complete for an ACTIVE tenant)."""
        block = state.block
        if block is None:
            return Checklist(state.tenant, (), (), True)
        resolved = set(block.registered) | set(block.declared)
        reviewed = {r.connector for r in block.reviews}
        return Checklist(
            state.tenant,
            tuple(d for d in block.offending if d not in resolved),
            tuple(c for c in block.to_review if c not in reviewed),
            block.attestation is not None,
        )

    def request_unblock(
        self, state: TenantState, now: float, *, code: str, evidence: str
    ) -> _Outcome:
        """The tenant asks support to lift the block, quoting its code and giving evidence.

        Raises:
            InvalidEvent: *now* or *evidence* is invalid.
            InvalidTransition: no block is in force, a request is already pending, or *code*
                is not the code of the current block.
            ChecklistIncomplete: remediation steps are missing (all of them are listed).
        """
        now, evidence = _now(now), _text(evidence, "evidence")
        _check_allowed(state, Event.REQUEST_UNBLOCK)
        block = state.block
        assert block is not None
        if code != block.code.value:
            raise InvalidTransition(
                f"unblock request for tenant {shown(state.tenant)} quotes {shown(code)}, "
                f"but the block in force is {block.code.value!r}"
            )
        checklist = self.checklist(state)
        if not checklist.complete:
            raise ChecklistIncomplete(checklist)
        request = UnblockRequest(block.code, evidence, now)
        return self._move(
            state,
            Event.REQUEST_UNBLOCK,
            _R,
            now,
            f"unblock requested quoting {block.code.value}",
            note=evidence,
            alert=AlertKind.UNBLOCK_REQUESTED,
            window=state.window.copy(),
            block=attrs.evolve(block, request=request),
        )

    def approve(self, state: TenantState, now: float, *, by: str, reason: str) -> _Outcome:
        """Support approves the pending request: ACTIVE on probation, with a fresh window.

        Probation lasts `BlockPolicy.probation_for` ``(offences)`` seconds from *now*.

        Raises:
            InvalidEvent: *now*, *by* or *reason* is invalid.
            InvalidTransition: no unblock request is pending.
            ChecklistIncomplete: the checklist is no longer complete (a domain was removed or a
                connector created since the request).
        """
        now, by, reason = _now(now), _text(by, "by"), _text(reason, "reason")
        _check_allowed(state, Event.APPROVE)
        checklist = self.checklist(state)
        if not checklist.complete:
            raise ChecklistIncomplete(checklist)
        until = now + self.policy.probation_for(state.offences)
        fresh = Window(max(state.window.head, int(now / self._bucket)))
        return self._move(
            state,
            Event.APPROVE,
            _A,
            now,
            f"unblock approved: {reason}",
            actor=by,
            note=reason,
            alert=AlertKind.UNBLOCKED,
            window=fresh,
            block=None,
            probation_until=until,
        )

    def deny(self, state: TenantState, now: float, *, by: str, reason: str) -> _Outcome:
        """Support denies the pending request: back to BLOCKED (or SUSPENDED for a 5.7.705
        request), checklist kept.

        Raises:
            InvalidEvent: *now*, *by* or *reason* is invalid.
            InvalidTransition: no unblock request is pending.
        """
        now, by, reason = _now(now), _text(by, "by"), _text(reason, "reason")
        _check_allowed(state, Event.DENY)
        block = state.block
        assert block is not None
        target = _S if block.code is BlockCode.THRESHOLD else _B
        return self._move(
            state,
            Event.DENY,
            target,
            now,
            f"unblock denied: {reason}",
            actor=by,
            note=reason,
            window=state.window.copy(),
            block=attrs.evolve(block, request=None, last_denial=Denial(by, reason, now)),
        )

    # ----------------------------------------------------------------- operators

    def operator_block(self, state: TenantState, now: float, *, by: str, reason: str) -> _Outcome:
        """An operator blocks an ACTIVE tenant (5.7.750), as if it had crossed the limit.

        Raises:
            InvalidEvent: *now*, *by* or *reason* is invalid.
            InvalidTransition: the tenant is not ACTIVE.
        """
        now, by, reason = _now(now), _text(by, "by"), _text(reason, "reason")
        _check_allowed(state, Event.OPERATOR_BLOCK)
        text = f"blocked by operator: {reason}"
        return self._move(
            state,
            Event.OPERATOR_BLOCK,
            _B,
            now,
            text,
            actor=by,
            note=reason,
            alert=AlertKind.BLOCKED,
            window=state.window.copy(),
            block=self._new_block(state, now, BlockCode.UNREGISTERED, text, by),
            offences=state.offences + 1,
        )

    def operator_suspend(self, state: TenantState, now: float, *, by: str, reason: str) -> _Outcome:
        """An operator suspends the tenant (5.7.705); a pending request is dropped.

        Raises:
            InvalidEvent: *now*, *by* or *reason* is invalid.
            InvalidTransition: the tenant is already SUSPENDED.
        """
        now, by, reason = _now(now), _text(by, "by"), _text(reason, "reason")
        _check_allowed(state, Event.OPERATOR_SUSPEND)
        text = f"suspended by operator: {reason}"
        offences = state.offences
        if state.block is None:
            block = self._new_block(state, now, BlockCode.THRESHOLD, text, by)
            offences += 1
        else:
            block = attrs.evolve(
                state.block,
                code=BlockCode.THRESHOLD,
                since=now,
                reason=text,
                actor=by,
                request=None,
            )
        return self._move(
            state,
            Event.OPERATOR_SUSPEND,
            _S,
            now,
            text,
            actor=by,
            note=reason,
            alert=AlertKind.SUSPENDED,
            window=state.window.copy(),
            block=block,
            offences=offences,
        )

    def _same(self, state: TenantState, **changes: Any) -> _Outcome:
        """A self-loop that changes bookkeeping only: a new state, no transition record."""
        return attrs.evolve(state, window=state.window.copy(), **changes), _NOTHING


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
