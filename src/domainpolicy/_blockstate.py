"""The tenant block-state machine: tolerated volume, block, remediation, unblock, probation.

A tenant may relay a moderate amount of mail from sender domains it has not registered (mailbox
forwarding, hybrid servers).  When that volume looks like a compromised on-premises server relaying
spam, the tenant is blocked from sending from unregistered domains (``550 5.7.750``) until it
remediates and support approves; a blocked tenant that keeps pushing is suspended outright
(``550 5.7.705``).  This module is the whole machine, in the style of ``h11/_state.py``: the
transition table (`TRANSITIONS`), the thresholds (`BlockPolicy`) and every transition
(`BlockMachine`).  What it works on lives one floor down, in ``domainpolicy._tenant_state`` (and
is re-exported here): the states and events, the per-tenant value (`TenantState`, with its dict
codec) and the effects each call returns (`Effects`: a `Verdict`, `Transition` audit records and
`Alert` values).

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

import math
from collections.abc import Iterable
from typing import Any, Final

import attrs

from domainpolicy._tenant_state import (
    _MAX_NOW,
    STATE_SCHEMA_VERSION,
    Alert,
    AlertKind,
    Attestation,
    Block,
    BlockCode,
    Checklist,
    ChecklistIncomplete,
    ConnectorReview,
    Denial,
    Effects,
    Event,
    Evidence,
    InvalidEvent,
    InvalidTenantState,
    State,
    TenantState,
    Transition,
    UnblockRequest,
    Verdict,
    Window,
    _bad,
    _domain,
    _now,
    _sorted_add,
    _text,
)

from ._errors import InvalidConfiguration, InvalidTransition, shown

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


_NOTHING: Final = Effects()
_ACCEPTED: Final = Effects(Verdict.ACCEPT)
_REFUSED_750: Final = Effects(Verdict.REFUSE_UNREGISTERED)
_REFUSED_705: Final = Effects(Verdict.REFUSE_THRESHOLD)

_Outcome = tuple[TenantState, Effects]


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
            offending = (
                f"the offending domains of the block are {', '.join(block.offending)}"
                if block.offending
                else "the block has no offending domains (it was not set by relayed mail)"
            )
            raise _bad(unknown, "domains", f"not among the offending domains; {offending}")
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
