"""The alert outbox: the row a store writes for each (alert, sink) in the same atomic write as the
transition that raised the alert, and the pure helpers the stores share to build and move rows.

Imports only the pure core (`domainpolicy._blockstate`, `domainpolicy._errors`);
`domainpolicy._stores.base` and every backend import it.

The model
---------
* A store with an alert route (`StateStore.route_alerts`) turns every `Alert` of a write into
  one `OutboxRow` per sink the route names, and writes them with the state and the audit
  records (SQLite: the same transaction; Redis: the same commit script; memory: under the same
  lock).  A crash after the write loses nothing: the rows wait for a delivery worker.
* ``alert_id`` is the idempotency key: one id per alert (per transition), the same for every
  sink and every attempt.  A row's ``id`` is ``<alert_id>.<sink>``.
* A worker `claims <StateStore.claim_alerts>` due rows with a lease (a claim counts one attempt);
  it then `acks <StateStore.ack_alert>` a delivered row or `fails <StateStore.fail_alert>` it
  with the time of the next attempt or as dead (the dead letter).  A row whose lease ran out
  (its worker died) is claimable again.  `StateStore.retry_alert` makes a dead row due again.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import attrs

from domainpolicy._blockstate import Alert, BlockMachine, InvalidEvent, Limits, TenantState
from domainpolicy._errors import shown

__all__ = [
    "ALERT_SCHEMA",
    "ALERT_SCHEMA_VERSION",
    "DEAD",
    "DELIVERED",
    "PENDING",
    "STATUSES",
    "AlertRoute",
    "OutboxRow",
    "alert_payload",
    "check_claim",
    "outbox_rows",
    "reminder_id",
    "transition_rows",
]

ALERT_SCHEMA: Final = "domainpolicy.alert"
"""The ``schema`` field of an alert payload (and of a webhook body)."""
ALERT_SCHEMA_VERSION: Final = 1
"""The ``version`` field of an alert payload; a change that removes or retypes a field bumps it."""

PENDING: Final = "pending"
DELIVERED: Final = "delivered"
DEAD: Final = "dead"
STATUSES: Final = (PENDING, DELIVERED, DEAD)

AlertRoute = Callable[[Alert], Sequence[str]]
"""Which sinks an alert goes to: ``alert -> sink names`` (none: no row is written)."""

_CHECKLIST: Final = BlockMachine()


@attrs.frozen
class OutboxRow:
    """One alert waiting for (or done with) one sink.

    Attributes:
        id: ``<alert_id>.<sink>``, unique in the store.
        alert_id: the idempotency key of the alert (stable across sinks and attempts).
        sink: the sink's name.
        tenant: the tenant.
        kind: the `AlertKind` value (``blocked``...), or ``reminder``.
        created: when the alert was raised (UTC epoch seconds).
        payload: the alert's facts (`alert_payload`), JSON-safe.
        status: ``pending``, ``delivered`` or ``dead``.
        attempts: delivery attempts so far (a claim counts one).
        due: when the row may next be claimed.
        last_error: why the last attempt failed, or None.
        lease_until: end of the current claim's lease (0: not claimed).
        owner: the worker holding the lease, or None.
    """

    id: str
    alert_id: str
    sink: str
    tenant: str
    kind: str
    created: float
    payload: Mapping[str, Any] = attrs.field(eq=False, repr=False)
    status: str = PENDING
    attempts: int = 0
    due: float = 0.0
    last_error: str | None = None
    lease_until: float = 0.0
    owner: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (see `from_dict`)."""
        return {
            "id": self.id,
            "alert_id": self.alert_id,
            "sink": self.sink,
            "tenant": self.tenant,
            "kind": self.kind,
            "created": self.created,
            "payload": dict(self.payload),
            "status": self.status,
            "attempts": self.attempts,
            "due": self.due,
            "last_error": self.last_error,
            "lease_until": self.lease_until,
            "owner": self.owner,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OutboxRow:
        """Rebuild a row from `to_dict` output.

        Raises:
            ValueError: *data* is not such a dict (the stores report it as `StoreUnavailable`).
        """
        try:
            return cls(
                id=str(data["id"]),
                alert_id=str(data["alert_id"]),
                sink=str(data["sink"]),
                tenant=str(data["tenant"]),
                kind=str(data["kind"]),
                created=float(data["created"]),
                payload=dict(data["payload"]),
                status=str(data["status"]),
                attempts=int(data["attempts"]),
                due=float(data["due"]),
                last_error=None if data.get("last_error") is None else str(data["last_error"]),
                lease_until=float(data.get("lease_until") or 0.0),
                owner=None if data.get("owner") is None else str(data["owner"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"corrupt outbox row {shown(data)}: {exc!r}") from exc


def alert_payload(
    alert_id: str,
    kind: str,
    state: TenantState,
    at: float,
    message: str,
    *,
    limits: Limits | None,
    reminder: int = 0,
) -> dict[str, Any]:
    """The facts of an alert as a JSON-safe dict (schema `ALERT_SCHEMA`, version
    `ALERT_SCHEMA_VERSION`): what happened, the evidence, the offending domains, the limits
    (when known), the block and its remaining checklist.  *state* is the state after the
    transition."""
    block = state.block
    checklist = _CHECKLIST.checklist(state)
    evidence = None
    if block is not None:
        e = block.evidence
        evidence = {
            "window_start": e.window_start,
            "window_end": e.window_end,
            "total": e.total,
            "unregistered": e.unregistered,
            "distinct_domains": e.distinct_domains,
            "sample": list(e.sample),
        }
    return {
        "schema": ALERT_SCHEMA,
        "version": ALERT_SCHEMA_VERSION,
        "id": alert_id,
        "kind": kind,
        "tenant": state.tenant,
        "at": at,
        "message": message,
        "reminder": reminder,
        "state": state.state.value,
        "block": None
        if block is None
        else {
            "code": block.code.value,
            "since": block.since,
            "reason": block.reason,
            "actor": block.actor,
            "offending_domains": list(block.offending),
            "registered": list(block.registered),
            "declared_not_ours": list(block.declared),
        },
        "evidence": evidence,
        "limits": None
        if limits is None
        else {
            "messages": limits.messages,
            "domains": limits.domains,
            "warn_messages": limits.warn_messages,
            "warn_domains": limits.warn_domains,
            "suspend_messages": limits.suspend_messages,
        },
        "checklist": {
            "complete": checklist.complete,
            "missing": list(checklist.missing),
            "unresolved_domains": list(checklist.unresolved_domains),
            "unreviewed_connectors": list(checklist.unreviewed_connectors),
            "attested": checklist.attested,
        },
    }


def outbox_rows(
    route: AlertRoute | None,
    alerts: Sequence[Alert],
    state: TenantState,
    *,
    limits: Limits | None = None,
) -> list[OutboxRow]:
    """The rows to write with a transition: one per alert and sink named by *route* (none
    without a route).  Each alert gets a fresh id (`uuid.uuid4`)."""
    if route is None or not alerts:
        return []
    rows: list[OutboxRow] = []
    for alert in alerts:
        sinks = route(alert)
        if not sinks:
            continue
        alert_id = uuid.uuid4().hex
        payload = alert_payload(
            alert_id, alert.kind.value, state, alert.at, alert.message, limits=limits
        )
        rows.extend(
            OutboxRow(
                id=f"{alert_id}.{sink}",
                alert_id=alert_id,
                sink=sink,
                tenant=alert.tenant,
                kind=alert.kind.value,
                created=alert.at,
                payload=payload,
                due=alert.at,
            )
            for sink in sinks
        )
    return rows


def transition_rows(
    route: AlertRoute | None,
    machine: BlockMachine | None,
    state: TenantState,
    alerts: Sequence[Alert],
    now: float,
) -> list[OutboxRow]:
    """`outbox_rows` for the alerts of one write, with the limits of *machine* in force for
    *state* at *now* (none without a machine: administrative events)."""
    if route is None or not alerts:
        return []
    limits = None if machine is None else machine.policy.limits(probation=state.on_probation(now))
    return outbox_rows(route, alerts, state, limits=limits)


def reminder_id(tenant: str, since: float, number: int) -> str:
    """The alert id of reminder *number* of the block of *tenant* that started at *since*: the
    same in every process, so N workers enqueueing it write one row."""
    digest = hashlib.sha256(f"reminder\0{tenant}\0{since!r}\0{number}".encode()).hexdigest()
    return digest[:32]


def check_claim(sinks: Sequence[str], now: float, lease: float, limit: int) -> None:
    """Check the arguments of `StateStore.claim_alerts`.

    Raises:
        InvalidEvent: *now*, *lease* or *limit* is out of range, or *sinks* is not text.
    """
    if isinstance(sinks, str) or not all(isinstance(s, str) and s for s in sinks):
        raise InvalidEvent(f"invalid sinks {shown(sinks)}: must be a list of sink names")
    if type(now) not in (int, float) or not 0 <= now < 1e12:
        raise InvalidEvent(f"invalid now {shown(now)}: must be UTC epoch seconds")
    if type(lease) not in (int, float) or not 0 < lease <= 86400:
        raise InvalidEvent(f"invalid lease {shown(lease)}: must be seconds in (0, 86400]")
    if type(limit) is not int or limit < 1:
        raise InvalidEvent(f"invalid limit {shown(limit)}: must be an integer >= 1")
