"""`MemoryStore`: tenant state in this process's memory (tests, single-process embedding).

Imports only the store contract (`domainpolicy._stores.base`) and the pure core.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from domainpolicy._blockstate import (
    BlockMachine,
    Effects,
    InvalidEvent,
    TenantState,
)
from domainpolicy._registry import RegistryRecord
from domainpolicy._stores.base import (
    AuditRecord,
    Mutation,
    ObserveItem,
    ObserveResult,
    StateStore,
    apply_and_audit,
    audit_records,
    batch_times,
)
from domainpolicy._stores.outbox import (
    DEAD,
    DELIVERED,
    PENDING,
    OutboxRow,
    check_claim,
    transition_rows,
)
from domainpolicy._stores.registry_base import RegistryStore

__all__ = ["MemoryStore"]


class MemoryStore(RegistryStore, StateStore):
    """State (and the tenant registry) in this process's memory: for tests and single-process
    embedding.

    Thread-safe (one lock); lost when the process exits.
    """

    kind = "memory"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._states: dict[str, TenantState] = {}
        self._audit: dict[str, list[AuditRecord]] = {}
        self._outbox: dict[str, OutboxRow] = {}
        self._registry_log: list[RegistryRecord] = []
        self._registry_init()

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
        with self._lock:
            state = self._states.get(tenant)
            if state is None:
                state = TenantState.new(tenant)
            # observe() validates its arguments before counting anything; at worst a refused
            # observation has moved the window's head forward, which expires nothing the next
            # observation at that time would not have expired too.  (`observe_and_audit`,
            # inline: an observation that changes no state leaves no audit record.)
            before = state.state
            new, effects = machine.observe(
                state, now, registered=registered, registrable=registrable, weight=weight
            )
            self._states[tenant] = new
            if effects.transitions:
                self._audit.setdefault(tenant, []).extend(
                    audit_records(tenant, now, "observe", None, {}, before, new.state, effects)
                )
            if effects.alerts and self.alert_route is not None:
                self._put(transition_rows(self.alert_route, machine, new, effects.alerts, now))
            return new, effects

    def observe_many(
        self,
        machine: BlockMachine,
        items: Iterable[ObserveItem],
        now: float | Sequence[float],
    ) -> list[ObserveResult]:
        """`StateStore.observe_many` under one acquisition of the store's lock.

        Raises:
            InvalidEvent: *now* is a sequence whose length is not the number of items.
        """
        batch = list(items)
        times = batch_times(now, len(batch))
        results: list[ObserveResult] = []
        append = results.append
        states = self._states
        with self._lock:
            for (tenant, registered, registrable, weight), at in zip(batch, times, strict=True):
                try:
                    state = states.get(tenant)
                    if state is None:
                        state = TenantState.new(tenant)
                    before = state.state
                    new, effects = machine.observe(
                        state, at, registered=registered, registrable=registrable, weight=weight
                    )
                except InvalidEvent as exc:
                    append(exc)
                    continue
                states[tenant] = new
                if effects.transitions:
                    self._audit.setdefault(tenant, []).extend(
                        audit_records(tenant, at, "observe", None, {}, before, new.state, effects)
                    )
                if effects.alerts and self.alert_route is not None:
                    self._put(transition_rows(self.alert_route, machine, new, effects.alerts, at))
                append((new, effects))
        return results

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
        with self._lock:
            state = self._states.get(tenant) or TenantState.new(tenant)
            new, effects, records = apply_and_audit(
                state, mutation, now, action=action, actor=actor, detail=detail
            )
            self._states[tenant] = new
            self._audit.setdefault(tenant, []).extend(records)
            if effects.alerts and self.alert_route is not None:
                self._put(transition_rows(self.alert_route, None, new, effects.alerts, now))
            return new, effects

    def load(self, tenant: str) -> TenantState:
        with self._lock:
            state = self._states.get(tenant)
            if state is None:
                return TenantState.new(tenant)
            return TenantState.from_dict(state.to_dict())

    def history(self, tenant: str, *, limit: int | None = None) -> list[AuditRecord]:
        with self._lock:
            records = list(self._audit.get(tenant, ()))
        return records[-limit:] if limit else records

    def tenants(self) -> list[str]:
        with self._lock:
            return sorted(self._states)

    # -- the alert outbox -------------------------------------------------------------

    def _put(self, rows: Sequence[OutboxRow]) -> int:
        added = 0
        for row in rows:
            if row.id not in self._outbox:
                self._outbox[row.id] = row
                added += 1
        return added

    def enqueue_alerts(self, rows: Sequence[OutboxRow]) -> int:
        with self._lock:
            return self._put(rows)

    def claim_alerts(
        self, sinks: Sequence[str], now: float, *, lease: float, owner: str, limit: int = 100
    ) -> list[OutboxRow]:
        check_claim(sinks, now, lease, limit)
        wanted = set(sinks)
        claimed: list[OutboxRow] = []
        with self._lock:
            due = sorted(
                (
                    r
                    for r in self._outbox.values()
                    if r.status == PENDING
                    and r.sink in wanted
                    and r.due <= now
                    and r.lease_until <= now
                ),
                key=lambda r: (r.due, r.id),
            )
            for old in due[:limit]:
                row = attrs.evolve(
                    old, attempts=old.attempts + 1, lease_until=now + lease, owner=owner
                )
                self._outbox[row.id] = row
                claimed.append(row)
        return claimed

    def ack_alert(self, row_id: str, now: float) -> bool:
        with self._lock:
            row = self._outbox.get(row_id)
            if row is None or row.status != PENDING:
                return False
            self._outbox[row_id] = attrs.evolve(
                row, status=DELIVERED, lease_until=0.0, owner=None, due=now
            )
            return True

    def fail_alert(
        self, row_id: str, owner: str, now: float, *, error: str, retry_at: float | None
    ) -> bool:
        with self._lock:
            row = self._outbox.get(row_id)
            if row is None or row.status != PENDING or row.owner != owner:
                return False
            self._outbox[row_id] = attrs.evolve(
                row,
                status=DEAD if retry_at is None else PENDING,
                due=now if retry_at is None else retry_at,
                last_error=error,
                lease_until=0.0,
                owner=None,
            )
            return True

    def retry_alert(self, row_id: str, now: float) -> bool:
        with self._lock:
            row = self._outbox.get(row_id)
            if row is None or row.status != DEAD:
                return False
            self._outbox[row_id] = attrs.evolve(row, status=PENDING, attempts=0, due=now)
            return True

    def alert_rows(self, *, status: str | None = None, limit: int = 100) -> list[OutboxRow]:
        with self._lock:
            rows = [r for r in self._outbox.values() if status is None or r.status == status]
        rows.sort(key=lambda r: (r.created, r.id))
        return rows[:limit]

    # -- registry ---------------------------------------------------------------

    def _registry_version(self) -> int:
        return len(self._registry_log)

    def _registry_records(self, since: int) -> list[RegistryRecord]:
        with self._lock:
            return self._registry_log[max(since, 0) :]

    def _registry_stamp(self, version: int) -> tuple[float, str, str] | None:
        with self._lock:
            if not 0 < version <= len(self._registry_log):
                return None
            record = self._registry_log[version - 1]
        return record.at, record.actor, record.reason

    def _registry_append(self, expected: int, record: RegistryRecord) -> bool:
        with self._lock:
            if len(self._registry_log) != expected:
                return False
            self._registry_log.append(record)
            return True
