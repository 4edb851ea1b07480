"""The relay policy facade: the one call an MTA makes per message, and the admin operations.

`RelayPolicy.evaluate` takes a `RelayRequest` (what the MTA knows about a message) and returns a
`Decision` (accept, refuse or temporary failure, with the SMTP `Reply` to give).  The steps, in
order:

1. **Attribute the tenant**: an inbound connector matching the client IP or one of the TLS
   client certificate's names (`ConnectorTable.attribute`; names matching connectors of
   different tenants are ambiguous and attribute nothing), else the tenant whose accepted domain
   the sender's domain is (`DomainMatcher`).  Nobody:
   ``550 5.7.64 TenantAttribution; Relay Access Denied``.
2. **Check the sender**: an envelope sender that is not a valid path gets
   ``501 5.1.7 Bad sender address syntax``.  The null sender ``<>`` is accepted uncounted by default
   (bounces are legitimate relayed mail; ``null_sender="refuse"`` refuses it when no connector
   attributes it).  A sender with an address literal (``user@[192.0.2.1]``) has no domain to
   register, so it cannot be attributed by domain and is refused with 5.7.64.
3. **Accepted domain or not**: the sender's domain is *registered* when the matcher says the
   attributed tenant accepts it; everything else is *unregistered* relay.
4. **Count and decide**: the store applies the observation to the tenant's block state
   atomically (`StateStore.observe`): registered mail is accepted unless the tenant is
   SUSPENDED (``550 5.7.705``); unregistered mail is accepted while within the limits and
   refused with ``550 5.7.750`` once the tenant is blocked.  The crossing message itself is
   refused.
5. **Fail safe**: when the store fails, the decision is a temporary failure
   (``451 4.3.0``), never an exception and never a silent accept -- unless the operator chose
   ``fail_open=True``, which accepts uncounted and says so in the decision.

`RelayPolicy.evaluate_many` decides a batch of messages with the same steps and the same
decisions as `evaluate` one by one, counting the batch with one `StateStore.observe_many` call.

Everything the policy returns is a typed value; replies are rendered to text only at the edge
(the Postfix server, the aiosmtpd handler, the command line).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, Literal, cast

import attrs

from ._blockstate import (
    Alert,
    BlockMachine,
    BlockPolicy,
    Checklist,
    Effects,
    State,
    TenantState,
    Verdict,
)
from ._connectors import ConnectorTable, InboundConnector
from ._errors import DomainPolicyError, InvalidAddress, InvalidConfiguration, shown
from ._matcher import AcceptedDomain, DomainMatcher, DomainType
from ._names import NormalizedDomain, parse_address
from ._psl import PublicSuffixes, default_public_suffixes
from ._registry import EntryInfo, RegistryChange, RegistryView, canonical_entry_name
from ._registry_follow import DEFAULT_POLL_SECONDS, RegistryFollower
from ._replies import Reply, ReplyCatalog, ReplyCode
from ._stores import AuditRecord, MemoryStore, ObserveItem, StateStore
from ._stores.registry_base import RegistryStore

__all__ = [
    "ACCEPTED_REPLY",
    "Decision",
    "Outcome",
    "RelayPolicy",
    "RelayRequest",
    "TenantStatus",
]

log = logging.getLogger("domainpolicy.policy")

ACCEPTED_REPLY: Final = Reply(250, "2.1.0", "Sender OK")
"""The reply of an accepted decision (MTAs usually just carry on: Postfix ``DUNNO``)."""


class Outcome(enum.Enum):
    """What the MTA should do with the message."""

    ACCEPT = "accept"
    REFUSE = "refuse"
    """Permanent refusal (5xx)."""
    TEMPFAIL = "tempfail"
    """Temporary failure (4xx): the sending server should retry later."""


def _recipients(value: Iterable[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def _cert_names(value: Iterable[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


@attrs.frozen
class RelayRequest:
    """What an MTA knows about one relayed message.

    Attributes:
        sender: the envelope sender (``MAIL FROM``) as received; ``""`` or ``"<>"`` is the
            null sender.
        client_ip: the connecting client's IP address (text or `ipaddress` value), if known.
        tls_cert_name: a verified TLS client certificate name (CN/SAN), if any: the one name
            an MTA knows (Postfix's ``ccert_subject``), or the first of `tls_cert_names`.
        tls_cert_names: all the verified TLS client certificate's names (every
            ``subjectAltName`` DNS name, in certificate order), keyword only; a single name or
            any iterable of names is stored as a tuple (None: no names).  The policy attributes
            by the union of `tls_cert_name` and these (see `ConnectorTable.attribute`: names of
            different tenants are ambiguous and fall back to the client address; at most
            `ConnectorTable.MAX_CERT_NAMES` names are considered, `tls_cert_name` first).
        sasl_user: the authenticated SASL user name, if any (logged, not used to attribute).
        recipients: envelope recipients (``RCPT TO``), used as the weight when counting
            recipients.
        header_from: the ``From:`` header, if known (logged only).
        message_id: an id of the message for logs (Postfix ``instance`` or queue id).
    """

    sender: str
    client_ip: str | None = None
    tls_cert_name: str | None = None
    sasl_user: str | None = None
    recipients: tuple[str, ...] = attrs.field(default=(), converter=_recipients)
    header_from: str | None = None
    message_id: str | None = None
    tls_cert_names: tuple[str, ...] = attrs.field(default=(), converter=_cert_names, kw_only=True)


def _certificate_names(request: RelayRequest) -> str | tuple[str, ...] | None:
    """The certificate names the policy attributes *request* by: `RelayRequest.tls_cert_name`
    alone, or it (when given, and unless it already leads them) followed by
    `RelayRequest.tls_cert_names`, at most `ConnectorTable.MAX_CERT_NAMES` of them in all (so
    the explicit name is always considered and the attribution cache's key stays small); None
    when there is no name."""
    names = request.tls_cert_names
    single = request.tls_cert_name
    if not names:
        return single
    if single is not None and names[0] != single:
        names = (single, *names)
    return names[: ConnectorTable.MAX_CERT_NAMES]


@attrs.frozen
class Decision:
    """The policy's answer for one message.

    Attributes:
        outcome: accept, refuse or temporary failure.
        reply: the SMTP reply to give (`ACCEPTED_REPLY` when accepted).
        reason: a stable machine-readable reason: ``accepted_domain``, ``unregistered_allowed``,
            ``null_sender``, ``blocked``, ``suspended``, ``no_tenant``, ``bad_sender``,
            ``address_literal``, ``store_unavailable`` or ``store_unavailable_fail_open``.
        tenant: the tenant the message was attributed to, or None.
        sender_domain: the sender's normalised domain, or None (null sender, literal, invalid).
        registered: whether the sender domain is one of the tenant's accepted domains (None when
            there was no domain to check).
        counted: whether the message was counted in the tenant's window.
        effects: what the block-state machine produced (transitions, alerts).
    """

    outcome: Outcome
    reply: Reply
    reason: str
    tenant: str | None = None
    sender_domain: NormalizedDomain | None = None
    registered: bool | None = None
    counted: bool = False
    effects: Effects = attrs.field(factory=Effects)

    @property
    def accepted(self) -> bool:
        """True when the MTA should let the message through."""
        return self.outcome is Outcome.ACCEPT


@attrs.frozen
class TenantStatus:
    """Everything an operator wants to see about a tenant.

    Attributes:
        tenant: the tenant.
        state: its block state.
        total: relayed messages in the current window.
        unregistered: unregistered-domain messages in the current window.
        distinct_domains: distinct unregistered registrable domains in the window.
        probation_until: end of probation (epoch seconds), if any.
        checklist: the remediation checklist while blocked, else None.
        accepted_domains: the tenant's accepted domains as configured.
        history: the audit trail, oldest first.
        raw: the full `TenantState`.
        as_of: the time the counts are aged to (UTC epoch seconds): buckets that left the
            window by then are not counted, even if no message came since.
        registry_version: the registry version the domains and connectors are read from
            (None: the policy does not follow a registry).
        connectors: the tenant's registered inbound connectors (registry only).
        added: when and by whom each registered domain (canonical name) and connector
            (``connector:<name>``) was added (registry only).
    """

    tenant: str
    state: State
    total: int
    unregistered: int
    distinct_domains: int
    probation_until: float | None
    checklist: Checklist | None
    accepted_domains: tuple[AcceptedDomain, ...]
    history: tuple[AuditRecord, ...]
    raw: TenantState = attrs.field(repr=False, eq=False)
    as_of: float | None = None
    registry_version: int | None = None
    connectors: tuple[InboundConnector, ...] = ()
    added: Mapping[str, EntryInfo] = attrs.field(factory=dict, eq=False)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe summary (for ``--json`` output and APIs)."""
        return {
            "tenant": self.tenant,
            "state": self.state.value,
            "total": self.total,
            "unregistered": self.unregistered,
            "distinct_domains": self.distinct_domains,
            "probation_until": self.probation_until,
            "checklist": None
            if self.checklist is None
            else {"complete": self.checklist.complete, "missing": list(self.checklist.missing)},
            "accepted_domains": [d.domain for d in self.accepted_domains],
            "history": [r.to_dict() for r in self.history],
            "as_of": self.as_of,
            "registry_version": self.registry_version,
            "connectors": [c.name for c in self.connectors],
            "added": {
                name: {"version": i.version, "at": i.at, "by": i.actor}
                for name, i in self.added.items()
            },
        }


_HOT_CACHE_SIZE: Final = 65536
_monotonic: Final = time.monotonic


_Pending = tuple[str, NormalizedDomain, bool, str | None, int]
"""An observation still to count: ``(tenant, sender domain, registered, registrable, weight)``."""

_VERDICT_REPLY: Final = {
    Verdict.REFUSE_UNREGISTERED: (ReplyCode.BLOCKED_UNREGISTERED, "blocked"),
    Verdict.REFUSE_THRESHOLD: (ReplyCode.TENANT_SUSPENDED, "suspended"),
}


class RelayPolicy:
    """The relay policy: attribute, check, count, decide.  Thread-safe.

    Args:
        matcher: the compiled accepted domains of every tenant.
        connectors: inbound connector attribution (None: attribute by sender domain only).
        block_policy: thresholds of the block-state machine (default `BlockPolicy()`).
        store: where tenant state lives (default: a new `MemoryStore`).
        replies: reply texts with operator and tenant overrides (default `ReplyCatalog()`).
        clock: returns UTC epoch seconds; default: the store's clock (`StateStore.now`; for
            counting, `StateStore.observation_clock`, which for a Redis store with
            ``server_time`` is the local clock, since the server's ``TIME`` replaces it).
        null_sender: ``"accept"`` (default) lets the null sender through uncounted;
            ``"refuse"`` refuses it unless a connector attributes it.
        count: ``"messages"`` (default) counts each message once; ``"recipients"`` counts
            each envelope recipient.
        fail_open: when the store fails, accept (uncounted) instead of the default temporary
            failure.  Only by explicit choice: it lets a compromised tenant through while the
            store is down.
        public_suffixes: the Public Suffix List used to find registrable domains.
        on_alert: called with every `Alert` the machine raises (after the state is stored).

    Raises:
        InvalidConfiguration: an argument is of the wrong type or an option is unknown.
    """

    def __init__(
        self,
        matcher: DomainMatcher,
        connectors: ConnectorTable | None = None,
        block_policy: BlockPolicy | None = None,
        store: StateStore | None = None,
        *,
        replies: ReplyCatalog | None = None,
        clock: Callable[[], float] | None = None,
        null_sender: Literal["accept", "refuse"] = "accept",
        count: Literal["messages", "recipients"] = "messages",
        fail_open: bool = False,
        public_suffixes: PublicSuffixes | None = None,
        on_alert: Callable[[Alert], None] | None = None,
    ) -> None:
        problems = []
        typed: list[tuple[str, object, type, bool]] = [
            ("matcher", matcher, DomainMatcher, False),
            ("connectors", connectors, ConnectorTable, True),
            ("block_policy", block_policy, BlockPolicy, True),
            ("store", store, StateStore, True),
        ]
        for name, value, kind, optional in typed:
            if not (optional and value is None) and not isinstance(value, kind):
                extra = " or None" if optional else ""
                problems.append(f"{name}={shown(value)}: must be a {kind.__name__}{extra}")
        if null_sender not in ("accept", "refuse"):
            problems.append(f"null_sender={null_sender!r}: must be 'accept' or 'refuse'")
        if count not in ("messages", "recipients"):
            problems.append(f"count={count!r}: must be 'messages' or 'recipients'")
        if problems:
            raise InvalidConfiguration(problems, source="RelayPolicy")
        self._lock = threading.Lock()
        self._matcher = matcher
        self._connectors = connectors
        self.machine = BlockMachine(block_policy or BlockPolicy())
        self.store: StateStore = store if store is not None else MemoryStore()
        self.replies = replies or ReplyCatalog()
        self._clock = clock or self.store.now
        # The time of an observation: a store that takes it from its server (Redis) gets the
        # local clock, which it only validates, instead of a round trip for its own TIME.
        self._observe_clock = clock or self.store.observation_clock()
        self.null_sender = null_sender
        self.count = count
        self.fail_open = bool(fail_open)
        self._suffixes = public_suffixes or default_public_suffixes()
        self._on_alert = on_alert
        self._reply_cache: dict[tuple[ReplyCode, str | None], Reply] = {}
        # Hot-path caches, bounded and cleared when full (values are immutable):
        # registrable domain of a sender domain (a Public Suffix List walk costs microseconds),
        # and decisions whose effects are the machine's shared constants (nothing happened
        # besides counting), so the common accept and refuse paths allocate nothing.
        self._registrable: dict[str, str] = {}
        self._attributed: dict[tuple[str, str | tuple[str, ...] | None], str | None] = {}
        self._decisions: dict[tuple[object, ...], Decision] = {}
        # Following a store's registry (`from_registry`): the follower and when it is next due
        # (infinity when not following, so the hot path's check is one float comparison).
        self._follower: RegistryFollower | None = None
        self._next_poll = math.inf

    @classmethod
    def from_registry(
        cls,
        store: StateStore,
        *,
        poll_interval: float = DEFAULT_POLL_SECONDS,
        view: RegistryView | None = None,
        block_policy: BlockPolicy | None = None,
        **options: Any,
    ) -> RelayPolicy:
        """A policy that decides with the tenant registry of *store* and follows its changes.

        Every `evaluate` checks at most every *poll_interval* seconds whether the registry's
        version moved (one cheap read) and applies the new records incrementally
        (`DomainMatcher.with_changes`); a decision in flight finishes with the registry it
        started with.  When the store fails, decisions go on with the last registry (the
        staleness is logged and reported by `registry_stale_seconds`).  `register_domain`,
        `remove_domain`, `add_connector` and `remove_connector` then write the registry, so
        every process following it enforces the change within *poll_interval*.

        Args:
            store: a store keeping a registry (every store of domainpolicy does).
            poll_interval: seconds between version polls.
            view: start from this view (`RegistryView`, e.g. from a matcher snapshot) and catch
                up from its version, instead of reading the whole registry.
            block_policy: as for `RelayPolicy`.
            options: the keyword options of `RelayPolicy` (replies, clock, fail_open...).

        Raises:
            InvalidConfiguration: the store keeps no registry, or an option is invalid.
            StoreUnavailable: the registry cannot be read.
        """
        follower = RegistryFollower(store, interval=poll_interval, view=view)
        current = follower.view
        policy = cls(current.matcher, current.connector_table, block_policy, store, **options)
        policy._follower = follower
        policy._next_poll = follower.next_poll
        return policy

    @property
    def registry_view(self) -> RegistryView | None:
        """The registry view decisions are made with now (None: not following a registry); a
        process forked from this one can start from it (`from_registry`'s *view*)."""
        return None if self._follower is None else self._follower.view

    @property
    def registry_version(self) -> int | None:
        """The registry version decisions are made with (None: not following a registry)."""
        return None if self._follower is None else self._follower.version

    @property
    def registry_stale_seconds(self) -> float:
        """Seconds the registry has been stale (the store failing the polls); 0 when fresh."""
        return 0.0 if self._follower is None else self._follower.stale_seconds

    def sync_registry(self, *, force: bool = True) -> bool:
        """Poll the registry now (*force*) or if due; True when a change was applied.

        Never raises (a failing store keeps the current registry; see `from_registry`).
        """
        follower = self._follower
        if follower is None:
            return False
        view = follower.poll(force=force)
        self._next_poll = follower.next_poll
        if view is None:
            return False
        with self._lock:
            self._matcher = view.matcher
            self._connectors = view.connector_table
            self._attributed = {}
        return True

    def _registry_store(self) -> RegistryStore:
        if self._follower is None:
            raise InvalidConfiguration(
                ["this RelayPolicy does not follow a registry (make it with from_registry)"]
            )
        return self._follower.store

    # ------------------------------------------------------------------ configuration

    @property
    def matcher(self) -> DomainMatcher:
        """The accepted-domain matcher in force."""
        return self._matcher

    @property
    def connectors(self) -> ConnectorTable | None:
        """The connector table in force."""
        return self._connectors

    def connector_tenant(self, request: RelayRequest) -> str | None:
        """The tenant an inbound connector attributes *request* to, by client IP or TLS
        certificate, exactly as `evaluate` does; None when there are no connectors, no client
        IP, or no connector matches (a decision's tenant may also come from the sender's
        domain).  Cached like `evaluate`'s attribution."""
        if self._connectors is None or request.client_ip is None:
            return None
        names = _certificate_names(request) if request.tls_cert_names else request.tls_cert_name
        return self._attribute(request.client_ip, names)

    def reload(
        self,
        *,
        matcher: DomainMatcher | None = None,
        connectors: ConnectorTable | None = None,
        replies: ReplyCatalog | None = None,
    ) -> None:
        """Swap in new configuration atomically; calls in flight finish with the old one."""
        with self._lock:
            if matcher is not None:
                self._matcher = matcher
            if connectors is not None:
                self._connectors = connectors
                self._attributed = {}
            if replies is not None:
                self.replies = replies
                self._reply_cache = {}
                self._decisions = {}

    def reply(self, code: ReplyCode, tenant: str | None = None) -> Reply:
        """The reply for *code* as *tenant* sees it (cached; the catalogue is immutable)."""
        key = (code, tenant)
        found = self._reply_cache.get(key)
        if found is None:
            found = self._reply_cache[key] = self.replies.reply(code, tenant=tenant)
        return found

    # ------------------------------------------------------------------ the hot path

    def _refuse(self, code: ReplyCode, reason: str, tenant: str | None, **fields: Any) -> Decision:
        outcome = Outcome.TEMPFAIL if code.code < 500 else Outcome.REFUSE
        return Decision(outcome, self.reply(code, tenant), reason, tenant, **fields)

    def evaluate(self, request: RelayRequest) -> Decision:
        """Decide one relayed message.

        Never raises, whatever the request: every failure, including a failing store or a bug,
        becomes a decision (see the module documentation for the steps).
        """
        # `_prepare`, the store, `_finish`: the steps shared with `evaluate_many`, inline here
        # (no extra call on the hot path).
        if _monotonic() >= self._next_poll:
            self.sync_registry(force=False)
        try:
            prepared = self._prepare(request)
            if isinstance(prepared, Decision):
                return prepared
            tenant, domain, registered, registrable, weight = prepared
            try:
                _, effects = self.store.observe(
                    self.machine,
                    tenant,
                    self._observe_clock(),
                    registered=registered,
                    registrable=registrable,
                    weight=weight,
                )
            except DomainPolicyError as exc:
                return self._unavailable(tenant, domain, registered, exc)
            return self._finish(tenant, domain, registered, effects)
        except Exception:  # a bug must not take the MTA's policy down: tempfail and log it
            return self._internal_error(request)

    def _prepare(self, request: RelayRequest) -> Decision | _Pending:
        """Steps 1 to 3: the final decision when no counting is needed, else the observation
        to count: ``(tenant, sender domain, registered, registrable domain, weight)``."""
        tenant: str | None = None
        if self._connectors is not None and request.client_ip is not None:
            names = _certificate_names(request) if request.tls_cert_names else request.tls_cert_name
            tenant = self._attribute(request.client_ip, names)
        try:
            sender = parse_address(request.sender)
        except InvalidAddress:
            return self._refuse(ReplyCode.BAD_SENDER, "bad_sender", tenant)
        domain = sender.domain
        if domain is None:
            if sender.literal is not None:
                return self._refuse(ReplyCode.RELAY_DENIED, "address_literal", tenant)
            if tenant is None and self.null_sender == "refuse":
                return self._refuse(ReplyCode.RELAY_DENIED, "no_tenant", None)
            return Decision(Outcome.ACCEPT, ACCEPTED_REPLY, "null_sender", tenant)
        owner = self._matcher.owner_of_normalized(domain)
        if tenant is None:
            if owner is None:
                return self._refuse(ReplyCode.RELAY_DENIED, "no_tenant", None, sender_domain=domain)
            tenant = owner.tenant
        registered = owner is not None and owner.tenant == tenant
        registrable = None if registered else self._registrable_of(domain)
        weight = max(1, len(request.recipients)) if self.count == "recipients" else 1
        return tenant, domain, registered, registrable, weight

    def _unavailable(
        self, tenant: str, domain: NormalizedDomain, registered: bool, exc: Exception
    ) -> Decision:
        """Step 5: the decision for a message the store could not count."""
        log.error("policy store failed for tenant %r: %s", tenant, exc)
        if self.fail_open:
            return Decision(
                Outcome.ACCEPT,
                ACCEPTED_REPLY,
                "store_unavailable_fail_open",
                tenant,
                domain,
                registered,
            )
        return self._refuse(
            ReplyCode.STORE_UNAVAILABLE,
            "store_unavailable",
            tenant,
            sender_domain=domain,
            registered=registered,
        )

    def _finish(
        self, tenant: str, domain: NormalizedDomain, registered: bool, effects: Effects
    ) -> Decision:
        """Step 4: the decision for a counted message, from the machine's effects."""
        plain = not effects.transitions
        if effects.alerts:
            self._alert(effects)
            plain = False
        if plain:
            key = (effects.decision, tenant, domain, registered)
            found = self._decisions.get(key)
            if found is not None:
                return found
        verdict = effects.decision
        if verdict is None or verdict.accepted:
            reason = "accepted_domain" if registered else "unregistered_allowed"
            decision = Decision(
                Outcome.ACCEPT, ACCEPTED_REPLY, reason, tenant, domain, registered, True, effects
            )
        else:
            code, reason = _VERDICT_REPLY[verdict]
            decision = Decision(
                Outcome.REFUSE,
                self.reply(code, tenant),
                reason,
                tenant,
                domain,
                registered,
                True,
                effects,
            )
        if plain:
            if len(self._decisions) >= _HOT_CACHE_SIZE:
                self._decisions.clear()
            self._decisions[key] = decision
        return decision

    def evaluate_many(self, requests: Iterable[RelayRequest]) -> list[Decision]:
        """Decide a batch of relayed messages: the same decisions, in order, as calling
        `evaluate` for each in turn, with the counted ones sent to the store in one
        `StateStore.observe_many` (SQLite: one transaction; Redis: one pipelined round trip).

        The clock is read once per counted message, in order, as `evaluate` reads it; alerts
        (``on_alert``) are delivered in order after the batch is stored.  A store failure gives
        each affected message the temporary failure ``451 4.3.0`` (or, with ``fail_open``, an
        uncounted accept); with SQLite a failure affects the whole batch, which is then not
        counted at all.

        Never raises for anything in *requests*: like `evaluate`, every failure, including a
        bug, becomes a decision.  An exception raised by the iterable itself while it is being
        read propagates before anything is counted.
        """
        batch = list(requests)
        if _monotonic() >= self._next_poll:
            self.sync_registry(force=False)
        decisions: list[Decision | None] = []
        pending: list[tuple[int, _Pending]] = []
        items: list[ObserveItem] = []
        times: list[float] = []
        for request in batch:
            decision: Decision | None = None
            try:
                prepared = self._prepare(request)
                if isinstance(prepared, Decision):
                    decision = prepared
                else:
                    tenant, domain, registered, registrable, weight = prepared
                    try:
                        times.append(self._observe_clock())
                    except DomainPolicyError as exc:
                        decision = self._unavailable(tenant, domain, registered, exc)
                    else:
                        items.append((tenant, registered, registrable, weight))
                        pending.append((len(decisions), prepared))
            except Exception:
                decision = self._internal_error(request)
            decisions.append(decision)
        if items:
            results = self._observe_batch(items, times)
            for (index, (tenant, domain, registered, _, _)), result in zip(
                pending, results, strict=True
            ):
                try:
                    if isinstance(result, tuple):
                        decision = self._finish(tenant, domain, registered, result[1])
                    elif result is None:
                        decision = self._refuse(ReplyCode.STORE_UNAVAILABLE, "internal_error", None)
                    else:
                        decision = self._unavailable(tenant, domain, registered, result)
                except Exception:
                    decision = self._internal_error(batch[index])
                decisions[index] = decision
        return cast(list[Decision], decisions)

    def _observe_batch(
        self, items: list[ObserveItem], times: list[float]
    ) -> list[tuple[TenantState, Effects] | DomainPolicyError | None]:
        """`StateStore.observe_many`, never raising: a failure of the whole call is every
        item's (None: an unexpected error, logged)."""
        try:
            results = self.store.observe_many(self.machine, items, times)
        except DomainPolicyError as exc:
            return [exc] * len(items)
        except Exception:
            log.exception("unexpected error counting a batch of %d messages", len(items))
            return [None] * len(items)
        if len(results) != len(items):
            log.error(
                "%s.observe_many returned %d results for %d observations",
                type(self.store).__name__,
                len(results),
                len(items),
            )
            return [None] * len(items)
        return list(results)

    def _internal_error(self, request: RelayRequest) -> Decision:
        log.exception("unexpected error evaluating %r", request)
        return self._refuse(ReplyCode.STORE_UNAVAILABLE, "internal_error", None)

    def _attribute(self, client_ip: str, tls_cert_name: str | tuple[str, ...] | None) -> str | None:
        # A tuple of names is hashable (and bounded by ConnectorTable.MAX_CERT_NAMES) as long as
        # its items are; a careless caller's unhashable value is evaluated uncached.
        key = (client_ip, tls_cert_name)
        try:
            return self._attributed[key]
        except KeyError:
            pass
        except TypeError:  # an unhashable value from a careless caller: do not cache it
            key = None  # type: ignore[assignment]
        connectors = self._connectors
        assert connectors is not None
        try:
            tenant = connectors.attribute(client_ip, tls_cert_name)
        except InvalidAddress:
            log.warning("ignoring invalid client IP %r", client_ip)
            tenant = None
        if key is not None:
            if len(self._attributed) >= _HOT_CACHE_SIZE:
                self._attributed.clear()
            self._attributed[key] = tenant
        return tenant

    def _registrable_of(self, domain: NormalizedDomain) -> str:
        found = self._registrable.get(domain)
        if found is None:
            found = self._suffixes.registrable(domain) or domain
            if len(self._registrable) >= _HOT_CACHE_SIZE:
                self._registrable.clear()
            self._registrable[domain] = found
        return found

    def _alert(self, effects: Effects) -> None:
        for alert in effects.alerts:
            log.info("alert %s for tenant %r: %s", alert.kind.value, alert.tenant, alert.message)
            if self._on_alert is not None:
                try:
                    self._on_alert(alert)
                except Exception:
                    log.exception("alert callback failed")

    async def evaluate_async(self, request: RelayRequest) -> Decision:
        """`evaluate` for asyncio MTAs: the same logic, run in a worker thread so that store
        I/O never blocks the event loop.  Never raises, like `evaluate`.
        """
        return await asyncio.to_thread(self.evaluate, request)

    async def evaluate_many_async(self, requests: Iterable[RelayRequest]) -> list[Decision]:
        """`evaluate_many` for asyncio MTAs: the requests are read in the calling thread, then
        decided and counted in a worker thread.  Never raises for anything in *requests*, like
        `evaluate_many`.
        """
        return await asyncio.to_thread(self.evaluate_many, list(requests))

    # ------------------------------------------------------------------ admin operations

    def _apply(
        self,
        tenant: str,
        action: str,
        actor: str | None,
        detail: Mapping[str, Any],
        mutation: Callable[[TenantState, float], tuple[TenantState, Effects]],
    ) -> TenantState:
        state, effects = self.store.apply(
            tenant, mutation, self._clock(), action=action, actor=actor, detail=detail
        )
        if effects.alerts:
            self._alert(effects)
        return state

    @property
    def clock(self) -> Callable[[], float]:
        """The clock the policy stamps decisions and transitions with (default: the store's)."""
        return self._clock

    def status(
        self, tenant: str, *, history: int | None = 50, now: float | None = None
    ) -> TenantStatus:
        """The tenant's state, counts in the window aged to *now* (default: the clock),
        checklist, recent history (the newest *history* audit records; None: all of them; 0:
        none, without reading them) and, when following a registry, its registered domains and
        connectors with when and by whom they were added (the registry is polled first).

        Raises:
            StoreUnavailable: the store failed.
        """
        self.sync_registry(force=True)
        state = self.store.load(tenant)
        as_of = self._clock() if now is None else float(now)
        window = state.window.copy()
        policy = self.machine.policy
        window.advance(int(as_of // policy.bucket_seconds), policy.buckets)
        checklist = None if state.block is None else self.machine.checklist(state)
        follower = self._follower
        connectors: tuple[InboundConnector, ...] = ()
        added: dict[str, EntryInfo] = {}
        if follower is not None:
            view = follower.view
            connectors = tuple(c for c in view.connectors.values() if c.tenant == tenant)
            for entry in self._matcher.domains_of(tenant):
                info = view.info.get(("domain", entry.domain))
                if info is not None:
                    added[entry.domain] = info
            for connector in connectors:
                info = view.info.get(("connector", connector.name))
                if info is not None:
                    added[f"connector:{connector.name}"] = info
        return TenantStatus(
            tenant=tenant,
            state=state.state,
            total=window.total,
            unregistered=window.unregistered,
            distinct_domains=len(window.domains),
            probation_until=state.probation_until,
            checklist=checklist,
            accepted_domains=self._matcher.domains_of(tenant),
            history=() if history == 0 else tuple(self.store.history(tenant, limit=history)),
            raw=state,
            as_of=as_of,
            registry_version=None if follower is None else follower.version,
            connectors=connectors,
            added=added,
        )

    def register_domain(
        self,
        tenant: str,
        domain: str,
        *,
        by: str,
        match_subdomains: bool = False,
        domain_type: DomainType = DomainType.AUTHORITATIVE,
        reason: str = "",
    ) -> TenantState:
        """Register an accepted domain: the live matcher accepts it at once (copy-on-write swap)
        and the tenant's remediation checklist counts it as registered.

        A policy made with `from_registry` writes the store's registry (one audited record by
        *by*, with *reason*), so every process following it accepts the domain within its poll
        interval; then the checklist is ticked.  A policy with a static matcher changes only its
        own matcher: other processes learn of the domain from their configuration.

        Raises:
            InvalidConfiguration: the matcher refuses the domain (a public suffix, another
                tenant's domain, over the tenant limit...).
            InvalidTransition: the state machine refuses the event.
            StoreUnavailable: the store failed.
        """
        entry = AcceptedDomain(domain, tenant, domain_type, match_subdomains)
        if self._follower is not None:
            self._follower.store.registry_commit(
                [RegistryChange.add_domain(entry)], actor=by, reason=reason, now=self._clock()
            )
            self.sync_registry()
            return self._apply(
                tenant,
                "register_domain",
                by,
                {"domain": domain, "match_subdomains": match_subdomains, "registry": True},
                self._checklist_event(domain, self.machine.register_domain),
            )
        with self._lock:
            updated = self._matcher.with_changes(add=[entry])
            state = self._apply(
                tenant,
                "register_domain",
                by,
                {"domain": domain, "match_subdomains": match_subdomains},
                lambda s, now: self.machine.register_domain(s, now, domain),
            )
            self._matcher = updated
        return state

    def _checklist_event(
        self, domain: str, event: Callable[[TenantState, float, str], tuple[TenantState, Effects]]
    ) -> Callable[[TenantState, float], tuple[TenantState, Effects]]:
        """The checklist side of a domain change (a wildcard entry is no registrable domain of
        the checklist: recorded, nothing to tick)."""
        if domain.startswith("*."):
            return lambda s, now: (s, Effects())
        return lambda s, now: event(s, now, domain)

    def remove_domain(self, tenant: str, domain: str, *, by: str, reason: str = "") -> TenantState:
        """Remove an accepted domain from the live matcher and record it.

        *domain* may be spelled in any way `normalize_domain` accepts (``Partner.Example.``,
        ``bücher.example`` or its A-label): it is normalised before it is looked up.

        Raises:
            InvalidConfiguration: the domain is invalid or not one of the tenant's entries.
            InvalidTransition: the state machine refuses the event.
            StoreUnavailable: the store failed.
        """
        canonical = canonical_entry_name(domain)
        if self._follower is not None:
            try:
                self._follower.store.registry_commit(
                    [RegistryChange.remove_domain(AcceptedDomain(canonical, tenant))],
                    actor=by,
                    reason=reason,
                    now=self._clock(),
                )
            except InvalidConfiguration:
                # Not in the registry: ticked on the checklist only (by an older version, say)?
                block = self.store.load(tenant).block
                if block is None or canonical not in block.registered:
                    raise
            self.sync_registry()
            return self._apply(
                tenant,
                "remove_domain",
                by,
                {"domain": domain, "registry": True},
                self._checklist_event(canonical, self.machine.remove_domain),
            )
        with self._lock:
            entries = [e for e in self._matcher.domains_of(tenant) if e.domain == canonical]
            if not entries:
                # Registered earlier through the checklist only (e.g. by another process, the
                # CLI) but not in this process's configuration: record the removal all the same.
                block = self.store.load(tenant).block
                if block is None or canonical not in block.registered:
                    raise InvalidConfiguration(
                        [
                            f"domain {shown(domain)} is not an accepted domain of tenant "
                            f"{shown(tenant)}"
                        ]
                    )
                return self._apply(
                    tenant,
                    "remove_domain",
                    by,
                    {"domain": domain},
                    lambda s, now: self.machine.remove_domain(s, now, domain),
                )
            updated = self._matcher.with_changes(remove=entries)
            state = self._apply(
                tenant,
                "remove_domain",
                by,
                {"domain": domain},
                lambda s, now: self.machine.remove_domain(s, now, domain),
            )
            self._matcher = updated
        return state

    def declare_not_ours(
        self, tenant: str, domains: Iterable[str], *, by: str, note: str = ""
    ) -> TenantState:
        """Declare unregistered domains seen in the offending window as not the tenant's
        (forged by the spammer), completing that part of the checklist.

        Raises:
            InvalidEvent: a domain is invalid or not among the offending domains.
            InvalidTransition: the tenant is not blocked.
            StoreUnavailable: the store failed.
        """
        names = [domains] if isinstance(domains, str) else list(domains)
        return self._apply(
            tenant,
            "declare_not_ours",
            by,
            {"domains": names, "note": note},
            lambda s, now: self.machine.declare_not_ours(s, now, names, by=by),
        )

    def connector_created(
        self, connector: InboundConnector, *, when: float | None = None
    ) -> TenantState:
        """Record that an inbound connector was created (it must be reviewed if the tenant is
        blocked within the look-back window).

        Raises:
            InvalidTransition: the state machine refuses the event.
            StoreUnavailable: the store failed.
        """
        return self._apply(
            connector.tenant,
            "create_connector",
            None,
            {"connector": connector.name},
            lambda s, now: self.machine.create_connector(
                s, now if when is None else when, connector.name
            ),
        )

    def add_connector(
        self, connector: InboundConnector, *, by: str, reason: str = ""
    ) -> TenantState:
        """Add (or replace) an inbound connector in the store's registry, and put it on the
        tenant's remediation checklist: it must be reviewed if the tenant is blocked within the
        look-back window, at once if a block is in force.  Its ``created_at`` (else now) is its
        creation time.  Needs a policy made with `from_registry`.

        Raises:
            InvalidConfiguration: the policy follows no registry, or `ConnectorTable.compile`
                refuses the connector (a certificate name outside the tenant's domains, a range
                or name of another tenant...).
            InvalidTransition: the state machine refuses the event.
            StoreUnavailable: the store failed.
        """
        registry = self._registry_store()
        now = self._clock()
        registry.registry_commit(
            [RegistryChange.add_connector(connector)], actor=by, reason=reason, now=now
        )
        self.sync_registry()
        return self._record_connector(connector, by, now)

    def _record_connector(
        self, connector: InboundConnector, by: str | None, now: float
    ) -> TenantState:
        """The checklist side of a connector creation (a connector already listed is kept)."""
        created = connector.created_at
        when = now if created is None else created.timestamp()

        def event(state: TenantState, at: float) -> tuple[TenantState, Effects]:
            if any(name == connector.name for name, _ in state.connectors):
                return state, Effects()
            return self.machine.create_connector(state, when, connector.name)

        return self._apply(
            connector.tenant, "create_connector", by, {"connector": connector.name}, event
        )

    def remove_connector(self, name: str, *, by: str, reason: str = "") -> None:
        """Remove an inbound connector from the store's registry (review it on the checklist
        with `review_connector`).  Needs a policy made with `from_registry`.

        Raises:
            InvalidConfiguration: the policy follows no registry, or no such connector.
            StoreUnavailable: the store failed.
        """
        registry = self._registry_store()
        registry.registry_commit(
            [RegistryChange.remove_connector(name)], actor=by, reason=reason, now=self._clock()
        )
        self.sync_registry()

    def review_connector(self, tenant: str, connector: str, *, kept: bool, by: str) -> TenantState:
        """Record the review of an inbound connector (kept or removed).

        Raises:
            InvalidTransition: the state machine refuses the event.
            StoreUnavailable: the store failed.
        """
        return self._apply(
            tenant,
            "review_connector",
            by,
            {"connector": connector, "kept": kept},
            lambda s, now: self.machine.review_connector(s, now, connector, kept=kept, by=by),
        )

    def attest(self, tenant: str, *, by: str, note: str) -> TenantState:
        """Record that the tenant's on-premises server was locked down and verified.

        Raises:
            InvalidTransition: the tenant is not blocked.
            StoreUnavailable: the store failed.
        """
        return self._apply(
            tenant,
            "attest",
            by,
            {"note": note},
            lambda s, now: self.machine.attest(s, now, by=by, note=note),
        )

    def request_unblock(self, tenant: str, *, code: str, evidence: str, by: str) -> TenantState:
        """Ask support to lift the block, quoting the error code and the evidence.

        Raises:
            ChecklistIncomplete: remediation steps are missing (all of them listed).
            InvalidTransition: the code does not match the block, or the tenant is not blocked.
            StoreUnavailable: the store failed.
        """
        return self._apply(
            tenant,
            "request_unblock",
            by,
            {"code": code, "evidence": evidence},
            lambda s, now: self.machine.request_unblock(s, now, code=code, evidence=evidence),
        )

    def approve(self, tenant: str, *, by: str, reason: str) -> TenantState:
        """Support approves the pending unblock request: the tenant is ACTIVE on probation.

        Raises:
            InvalidTransition: no request is pending (or the checklist is no longer complete).
            StoreUnavailable: the store failed.
        """
        return self._apply(
            tenant,
            "approve",
            by,
            {"reason": reason},
            lambda s, now: self.machine.approve(s, now, by=by, reason=reason),
        )

    def deny(self, tenant: str, *, by: str, reason: str) -> TenantState:
        """Support denies the pending unblock request; the checklist is kept.

        Raises:
            InvalidTransition: no request is pending.
            StoreUnavailable: the store failed.
        """
        return self._apply(
            tenant,
            "deny",
            by,
            {"reason": reason},
            lambda s, now: self.machine.deny(s, now, by=by, reason=reason),
        )

    def block(self, tenant: str, *, by: str, reason: str) -> TenantState:
        """An operator blocks the tenant from sending from unregistered domains.

        Raises:
            InvalidTransition: the tenant is not ACTIVE.
            StoreUnavailable: the store failed.
        """
        return self._apply(
            tenant,
            "operator_block",
            by,
            {"reason": reason},
            lambda s, now: self.machine.operator_block(s, now, by=by, reason=reason),
        )

    def suspend(self, tenant: str, *, by: str, reason: str) -> TenantState:
        """An operator suspends all relay for the tenant (5.7.705).

        Raises:
            InvalidTransition: the tenant is already suspended.
            StoreUnavailable: the store failed.
        """
        return self._apply(
            tenant,
            "operator_suspend",
            by,
            {"reason": reason},
            lambda s, now: self.machine.operator_suspend(s, now, by=by, reason=reason),
        )
