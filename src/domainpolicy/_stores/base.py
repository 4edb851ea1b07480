"""The state-store contract: what every store must implement (`StateStore`), the audit record,
and the helpers the stores share to run the block machine and write its audit trail.

This module imports only the pure core (`domainpolicy._blockstate`, `domainpolicy._errors`);
every backend (`memory`, `sqlite`, `redis`) imports it, and nothing here imports a backend.
Every store passes the same conformance suite (``tests/test_store_conformance.py``).

The contract
------------
* `StateStore.observe` applies one relay observation to a tenant **atomically**: read the state,
  run `BlockMachine.observe`, write the state and any audit records, as one transaction.  Under
  concurrent writers (threads, processes, MTAs) no count is lost, and the block happens once, at
  the message that crosses the limit.
* `StateStore.observe_many` applies a batch of observations in order, with the same results as
  calling `observe` for each in turn; stores batch the work (SQLite: one transaction; Redis: one
  pipelined round trip), and a failure is reported per observation instead of raised.
* `StateStore.apply` runs an administrative event (register a domain, approve an unblock...) the
  same way, and writes its audit record in the same transaction.  An event the machine refuses
  (`InvalidTransition`) changes nothing and writes nothing.
* Any failure of the store itself (unreachable, timed out, locked past its timeout, corrupt) is
  raised as `StoreUnavailable` -- never as a driver exception -- so the policy can answer with a
  temporary failure instead of accepting silently or losing a block.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs

from domainpolicy._blockstate import (
    BlockMachine,
    Effects,
    InvalidEvent,
    State,
    TenantState,
    Transition,
)
from domainpolicy._errors import StoreUnavailable, shown
from domainpolicy._stores.outbox import AlertRoute, OutboxRow

__all__ = [
    "AuditRecord",
    "Mutation",
    "ObserveItem",
    "ObserveResult",
    "StateStore",
    "apply_and_audit",
    "audit_records",
    "batch_times",
    "observe_and_audit",
]

Mutation = Callable[[TenantState, float], tuple[TenantState, Effects]]
"""An administrative event bound to its arguments: ``(state, now) -> (new_state, effects)``."""

ObserveItem = tuple[str, bool, str | None, int]
"""One observation of a batch (`StateStore.observe_many`): ``(tenant, registered, registrable,
weight)``, the arguments of `StateStore.observe` in that order."""

ObserveResult = tuple[TenantState, Effects] | StoreUnavailable | InvalidEvent
"""The outcome of one observation of a batch: what `StateStore.observe` would have returned
(``(state, effects)``), or the error it would have raised (`StoreUnavailable`, `InvalidEvent`)."""


def batch_times(now: float | Sequence[float], count: int) -> Sequence[float]:
    """The time of each of *count* observations: *now* itself when it is one number (or anything
    but a sequence: `observe` then reports it as invalid), else the sequence, which must have
    one time per observation.

    Raises:
        InvalidEvent: *now* is a sequence of another length.
    """
    if isinstance(now, Sequence) and not isinstance(now, str | bytes):
        if len(now) != count:
            raise InvalidEvent(
                f"observe_many: {len(now)} times for {count} observations (one per observation, "
                "or one number for all)"
            )
        return now
    return [now] * count  # type: ignore[list-item]


def _jsonable(value: object) -> Any:
    if attrs.has(type(value)):
        return {k: _jsonable(v) for k, v in attrs.asdict(value, recurse=False).items()}  # type: ignore[arg-type]
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, State):
        return value.value
    if hasattr(value, "value") and isinstance(value.value, str):  # other enums
        return value.value
    return value


@attrs.frozen
class AuditRecord:
    """One entry of a tenant's audit trail: who did what, when, and the state before and after.

    Attributes:
        tenant: the tenant.
        at: when (UTC epoch seconds).
        action: the event (``observe``, ``register_domain``, ``approve``...).
        actor: who (an operator or the tenant's admin), or None for automatic changes.
        before: the tenant's state before (``active``, ``blocked``...).
        after: the state after.
        detail: JSON-safe details: arguments, transition reasons, evidence, alerts.
    """

    tenant: str
    at: float
    action: str
    actor: str | None
    before: str
    after: str
    detail: Mapping[str, Any] = attrs.field(factory=dict, eq=False)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (see `from_dict`)."""
        return {
            "tenant": self.tenant,
            "at": self.at,
            "action": self.action,
            "actor": self.actor,
            "before": self.before,
            "after": self.after,
            "detail": dict(self.detail),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AuditRecord:
        """Rebuild a record from `to_dict` output.

        Raises:
            StoreUnavailable: the stored record is malformed (the store is corrupt).
        """
        try:
            return cls(
                tenant=str(data["tenant"]),
                at=float(data["at"]),
                action=str(data["action"]),
                actor=None if data["actor"] is None else str(data["actor"]),
                before=str(data["before"]),
                after=str(data["after"]),
                detail=dict(data.get("detail") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreUnavailable(f"corrupt audit record {shown(data)}: {exc!r}") from exc


def audit_records(
    tenant: str,
    now: float,
    action: str,
    actor: str | None,
    detail: Mapping[str, Any],
    before: State,
    after: State,
    effects: Effects,
) -> list[AuditRecord]:
    """The audit records an event leaves: one for an administrative action (always) or for an
    observation that changed the state, with its transitions and alerts in ``detail``."""
    if action == "observe" and not effects.transitions:
        return []
    extra: dict[str, Any] = dict(detail)
    if effects.transitions:
        extra["transitions"] = [_transition_dict(t) for t in effects.transitions]
    if effects.alerts:
        extra["alerts"] = [
            {"kind": a.kind.value, "message": a.message, "at": a.at} for a in effects.alerts
        ]
    return [
        AuditRecord(
            tenant=tenant,
            at=now,
            action=action,
            actor=actor,
            before=before.value,
            after=after.value,
            detail=extra,
        )
    ]


def observe_and_audit(
    machine: BlockMachine,
    state: TenantState,
    now: float,
    *,
    registered: bool,
    registrable: str | None,
    weight: int,
) -> tuple[TenantState, Effects, list[AuditRecord]]:
    """Apply one observation to *state* (consumed, see `BlockMachine.observe`); return the new
    state, the effects and the audit records to store with it (none unless the state changed)."""
    before = state.state
    new, effects = machine.observe(
        state, now, registered=registered, registrable=registrable, weight=weight
    )
    records = audit_records(state.tenant, now, "observe", None, {}, before, new.state, effects)
    return new, effects, records


def apply_and_audit(
    state: TenantState,
    mutation: Mutation,
    now: float,
    *,
    action: str,
    actor: str | None,
    detail: Mapping[str, Any] | None,
) -> tuple[TenantState, Effects, list[AuditRecord]]:
    """Run an administrative event on *state*; return the new state, the effects and its audit
    record.  Raises what the machine raises (`InvalidTransition`) with nothing changed."""
    new, effects = mutation(state, now)
    records = audit_records(
        state.tenant, now, action, actor, detail or {}, state.state, new.state, effects
    )
    return new, effects, records


def _transition_dict(transition: Transition) -> dict[str, Any]:
    return {
        "event": transition.event.value,
        "from": transition.source.value,
        "to": transition.target.value,
        "reason": transition.reason,
        "actor": transition.actor,
        "note": transition.note,
        "evidence": _jsonable(transition.evidence),
    }


class StateStore(abc.ABC):
    """Persists `TenantState` per tenant and applies events to it atomically.

    Implementations raise `StoreUnavailable` for every failure of the store itself.
    """

    #: A short name for logs and metrics (``memory``, ``sqlite``, ``redis``).
    kind: str = "abstract"

    def now(self) -> float:
        """The store's clock in UTC epoch seconds (Redis: the server's ``TIME``)."""
        return time.time()

    def observation_clock(self) -> Callable[[], float]:
        """The clock to read for the *now* of `observe` when the caller has none of its own.

        `now` by default (plain `time.time` when the store does not override `now`).  A store
        that replaces the observation's time with its own (`RedisStore` with ``server_time``)
        returns the local clock instead, so that no round trip is spent on a time it ignores.
        """
        now = self.now
        if getattr(now, "__func__", None) is StateStore.now:
            return time.time
        return now

    @abc.abstractmethod
    def observe(
        self,
        machine: BlockMachine,
        tenant: str,
        now: float,
        *,
        registered: bool,
        registrable: str | None,
        weight: int = 1,
    ) -> tuple[TenantState, Effects]:
        """Count one relayed message for *tenant* and return the new state and the effects.

        Raises:
            StoreUnavailable: the store failed; nothing was counted.
            InvalidEvent: the observation's arguments are malformed; nothing was counted.
        """

    def observe_many(
        self,
        machine: BlockMachine,
        items: Iterable[ObserveItem],
        now: float | Sequence[float],
    ) -> list[ObserveResult]:
        """Count a batch of relayed messages, in order, as if `observe` were called for each.

        Each item is ``(tenant, registered, registrable, weight)`` (`ObserveItem`); *now* is one
        time for the whole batch or a sequence with one time per item.  The result has one entry
        per item, in order: ``(state, effects)`` as `observe` would have returned it at that
        point, or the `StoreUnavailable` / `InvalidEvent` it would have raised.  A failed item
        does not stop the others, and items of different tenants never affect each other.

        Decisions, effects (transitions, alerts, their times and evidence), audit records and
        the final stored states are exactly those of calling `observe` for each item in turn.
        As with `observe`, a returned state may be the store's working copy of the tenant
        (memory, SQLite), which later observations of that tenant -- including later items of
        the same batch -- update in place: read it at once or ignore it.  Stores batch the
        work: SQLite applies the whole batch in one transaction (so a store failure fails every
        item of the batch, and none is counted), Redis sends it in one pipelined round trip.
        This default implementation calls `observe` for each item.

        Raises:
            InvalidEvent: *now* is a sequence whose length is not the number of items; nothing
                was counted.  Every other failure is reported per item, never raised.
        """
        batch = list(items)
        times = batch_times(now, len(batch))
        results: list[ObserveResult] = []
        append = results.append
        observe = self.observe
        for (tenant, registered, registrable, weight), at in zip(batch, times, strict=True):
            try:
                append(
                    observe(
                        machine,
                        tenant,
                        at,
                        registered=registered,
                        registrable=registrable,
                        weight=weight,
                    )
                )
            except (StoreUnavailable, InvalidEvent) as exc:
                append(exc)
        return results

    @abc.abstractmethod
    def apply(
        self,
        tenant: str,
        mutation: Mutation,
        now: float,
        *,
        action: str,
        actor: str | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> tuple[TenantState, Effects]:
        """Run an administrative event atomically and record it in the audit trail.

        Raises:
            StoreUnavailable: the store failed; nothing changed.
            InvalidTransition: the machine refused the event; nothing changed.
        """

    @abc.abstractmethod
    def load(self, tenant: str) -> TenantState:
        """The tenant's current state (a fresh ACTIVE state for a tenant never seen).

        Raises:
            StoreUnavailable: the store failed or holds a corrupt state.
        """

    @abc.abstractmethod
    def history(self, tenant: str, *, limit: int | None = None) -> list[AuditRecord]:
        """The tenant's audit trail, oldest first (the newest *limit* records if given).

        Raises:
            StoreUnavailable: the store failed.
        """

    @abc.abstractmethod
    def tenants(self) -> list[str]:
        """Every tenant with stored state, sorted.

        Raises:
            StoreUnavailable: the store failed.
        """

    # -- the alert outbox (see `domainpolicy._stores.outbox`) ---------------------------

    #: The route of alerts to sinks; None (the default) writes no outbox rows.
    alert_route: AlertRoute | None = None

    def route_alerts(self, route: AlertRoute | None) -> None:
        """From now on, write one outbox row per alert and sink named by *route* in the same
        atomic write as the transition that raised the alert (None: write no rows)."""
        self.alert_route = route

    def _no_outbox(self) -> StoreUnavailable:
        return StoreUnavailable(f"the {self.kind} store keeps no alert outbox")

    def enqueue_alerts(self, rows: Sequence[OutboxRow]) -> int:
        """Add *rows* (reminders, samples) unless a row of the same id exists; return how many
        were added.  Atomic per row; a row already there is left as it is.

        Raises:
            StoreUnavailable: the store failed (or keeps no outbox).
        """
        raise self._no_outbox()

    def claim_alerts(
        self, sinks: Sequence[str], now: float, *, lease: float, owner: str, limit: int = 100
    ) -> list[OutboxRow]:
        """Claim up to *limit* pending rows of *sinks* due at *now* and not leased by another
        worker; each claimed row counts one more attempt and is leased to *owner* until
        ``now + lease``.  Two workers never hold the same row at once.

        Raises:
            StoreUnavailable: the store failed (or keeps no outbox).
            InvalidEvent: *now*, *lease*, *limit* or *sinks* is malformed.
        """
        raise self._no_outbox()

    def ack_alert(self, row_id: str, now: float) -> bool:
        """Mark a row delivered; False when no pending row has that id.

        Raises:
            StoreUnavailable: the store failed (or keeps no outbox).
        """
        raise self._no_outbox()

    def fail_alert(
        self, row_id: str, owner: str, now: float, *, error: str, retry_at: float | None
    ) -> bool:
        """Record a failed attempt of the row *owner* holds: due again at *retry_at*, or dead
        (the dead letter) when *retry_at* is None.  False when *owner* no longer holds it.

        Raises:
            StoreUnavailable: the store failed (or keeps no outbox).
        """
        raise self._no_outbox()

    def retry_alert(self, row_id: str, now: float) -> bool:
        """Make a dead row pending again, due at *now*, with its attempts reset; False when
        no dead row has that id.

        Raises:
            StoreUnavailable: the store failed (or keeps no outbox).
        """
        raise self._no_outbox()

    def alert_rows(self, *, status: str | None = None, limit: int = 100) -> list[OutboxRow]:
        """Outbox rows (of one status, or all), oldest first, at most *limit*.

        Raises:
            StoreUnavailable: the store failed (or keeps no outbox).
        """
        raise self._no_outbox()

    def close(self) -> None:  # noqa: B027 - optional for stores that hold nothing
        """Release connections.  The store may not be used afterwards."""

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
