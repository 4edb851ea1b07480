"""State stores: where tenant block state and the audit trail live.

One interface (`StateStore`), three implementations: `MemoryStore` (tests, one process),
`SQLiteStore` (the embedded default: one file, several processes on one host) and `RedisStore`
(a fleet of MTAs sharing state; in ``domainpolicy._redis_store``).  Every store passes the same
conformance suite (``tests/test_store_conformance.py``).

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
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from typing import Any, Final, cast

import attrs

from ._blockstate import (
    BlockMachine,
    Effects,
    InvalidEvent,
    InvalidTenantState,
    State,
    TenantState,
    Transition,
)
from ._errors import InvalidConfiguration, StoreUnavailable, shown

__all__ = [
    "AuditRecord",
    "MemoryStore",
    "Mutation",
    "ObserveItem",
    "ObserveResult",
    "SQLiteStore",
    "StateStore",
    "open_store",
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

    def close(self) -> None:  # noqa: B027 - optional for stores that hold nothing
        """Release connections.  The store may not be used afterwards."""

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --------------------------------------------------------------------------- memory


class MemoryStore(StateStore):
    """State in this process's memory: for tests and single-process embedding.

    Thread-safe (one lock); lost when the process exits.
    """

    kind = "memory"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._states: dict[str, TenantState] = {}
        self._audit: dict[str, list[AuditRecord]] = {}

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


# --------------------------------------------------------------------------- SQLite

SQLITE_SCHEMA_VERSION: Final = 1

_MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    # version 0 -> 1
    (
        """CREATE TABLE tenant_state (
               tenant TEXT PRIMARY KEY,
               version INTEGER NOT NULL,
               state TEXT NOT NULL,
               updated_at REAL NOT NULL
           )""",
        """CREATE TABLE audit (
               id INTEGER PRIMARY KEY AUTOINCREMENT,
               tenant TEXT NOT NULL,
               at REAL NOT NULL,
               record TEXT NOT NULL
           )""",
        "CREATE INDEX audit_by_tenant ON audit (tenant, id)",
    ),
)


class _CorruptState(StoreUnavailable):
    """One tenant's stored state is corrupt (the store itself still works)."""


class SQLiteStore(StateStore):
    """State in one SQLite file: the embedded default, safe for several processes on one host.

    WAL journal, ``BEGIN IMMEDIATE`` write transactions (so concurrent writers queue on the
    file's write lock instead of failing), a busy timeout, one connection per thread, the schema
    versioned in ``PRAGMA user_version`` and migrated on open.  Each transaction commits the
    state and its audit records together, so a crash between steps leaves either all of an
    event or none of it.

    Args:
        path: the database file (created if missing).
        timeout: seconds to wait for the write lock before `StoreUnavailable`.
        synchronous: SQLite's ``synchronous`` pragma.  ``NORMAL`` (default): in WAL mode every
            committed transaction survives a crash of the process; an operating-system crash or
            power loss can roll back the last transactions (counts, and a block that happened
            just then).  ``FULL``: every commit is also fsynced, durable across power loss, about
            eight times slower (2k against 17k decisions/s on the reference machine).

    Raises:
        StoreUnavailable: the file cannot be opened or migrated.
        InvalidConfiguration: *path* is ``:memory:``, *synchronous* is not ``FULL`` or
            ``NORMAL``, or the file's schema is newer than this domainpolicy understands.
    """

    kind = "sqlite"

    def __init__(
        self, path: str | os.PathLike[str], *, timeout: float = 5.0, synchronous: str = "NORMAL"
    ) -> None:
        if synchronous not in ("FULL", "NORMAL"):
            raise InvalidConfiguration([f"synchronous={synchronous!r}: must be FULL or NORMAL"])
        self.path = os.fspath(path)
        if self.path == ":memory:" or self.path.startswith("file:"):
            # One connection per thread: an in-memory database would be a different, empty
            # database in every thread.
            raise InvalidConfiguration(
                [f"SQLite path {self.path!r}: use a file (or MemoryStore for state in memory)"]
            )
        self.timeout = float(timeout)
        self.synchronous = synchronous
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        self._closed = False
        with self._transaction() as db:
            self._migrate(db)

    # -- connections ------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._closed:
            raise StoreUnavailable(f"SQLite store {self.path!r} is closed")
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            try:
                db = sqlite3.connect(
                    self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False
                )
                db.execute("PRAGMA journal_mode=WAL")
                db.execute(f"PRAGMA synchronous={self.synchronous}")
                db.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"cannot open SQLite store {self.path!r}: {exc}") from exc
            self._local.db = db
            self._local.cache = {}
            with self._all_lock:
                self._all.append(db)
        return db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._connection()
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"SQLite store {self.path!r}: {exc}") from exc
        try:
            yield db
        except BaseException:
            self._local.cache = {}
            with suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        try:
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._local.cache = {}
            with suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise StoreUnavailable(f"SQLite store {self.path!r}: commit failed: {exc}") from exc

    def _migrate(self, db: sqlite3.Connection) -> None:
        try:
            (version,) = db.execute("PRAGMA user_version").fetchone()
            if version > SQLITE_SCHEMA_VERSION:
                raise InvalidConfiguration(
                    [
                        f"SQLite store {self.path!r} has schema version {version}; this "
                        f"domainpolicy understands up to {SQLITE_SCHEMA_VERSION}"
                    ]
                )
            for step in _MIGRATIONS[version:]:
                for statement in step:
                    db.execute(statement)
            db.execute(f"PRAGMA user_version={SQLITE_SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot migrate SQLite store {self.path!r}: {exc}") from exc

    # -- state ------------------------------------------------------------------

    def _read(self, db: sqlite3.Connection, tenant: str) -> tuple[int, TenantState]:
        cache: dict[str, tuple[int, TenantState]] = self._local.cache
        try:
            row = db.execute(
                "SELECT version FROM tenant_state WHERE tenant = ?", (tenant,)
            ).fetchone()
            if row is None:
                return 0, TenantState.new(tenant)
            version = int(row[0])
            cached = cache.get(tenant)
            if cached is not None and cached[0] == version:
                return cached
            (text,) = db.execute(
                "SELECT state FROM tenant_state WHERE tenant = ?", (tenant,)
            ).fetchone()
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"SQLite store {self.path!r}: {exc}") from exc
        try:
            state = TenantState.from_dict(json.loads(text))
        except (ValueError, InvalidTenantState) as exc:
            raise _CorruptState(
                f"SQLite store {self.path!r} holds a corrupt state for tenant {tenant!r}: {exc}"
            ) from exc
        return version, state

    def _write(
        self,
        db: sqlite3.Connection,
        tenant: str,
        version: int,
        state: TenantState,
        now: float,
        records: Sequence[AuditRecord],
    ) -> None:
        text = json.dumps(state.to_dict(), separators=(",", ":"))
        try:
            if version == 0:
                db.execute(
                    "INSERT INTO tenant_state (tenant, version, state, updated_at) "
                    "VALUES (?, 1, ?, ?)",
                    (tenant, text, now),
                )
            else:
                db.execute(
                    "UPDATE tenant_state SET version = ?, state = ?, updated_at = ? "
                    "WHERE tenant = ?",
                    (version + 1, text, now, tenant),
                )
            if records:
                db.executemany(
                    "INSERT INTO audit (tenant, at, record) VALUES (?, ?, ?)",
                    [
                        (r.tenant, r.at, json.dumps(r.to_dict(), separators=(",", ":")))
                        for r in records
                    ],
                )
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"SQLite store {self.path!r}: {exc}") from exc
        self._local.cache[tenant] = (version + 1, state)

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
        with self._transaction() as db:
            version, state = self._read(db, tenant)
            new, effects, records = observe_and_audit(
                machine, state, now, registered=registered, registrable=registrable, weight=weight
            )
            self._write(db, tenant, version, new, now, records)
            return new, effects

    def observe_many(
        self,
        machine: BlockMachine,
        items: Iterable[ObserveItem],
        now: float | Sequence[float],
    ) -> list[ObserveResult]:
        """`StateStore.observe_many` in **one** write transaction (one commit for the batch).

        Each tenant of the batch is read once and written once, with the audit records of its
        observations in order.  When the store fails (locked past its timeout, the commit
        fails...) the transaction rolls back and every item gets that `StoreUnavailable`:
        nothing of the batch is counted.  An item with malformed arguments gets its
        `InvalidEvent`, and an item of a tenant whose stored state is corrupt its
        `StoreUnavailable`, as `observe` would raise them; the rest of the batch is applied.

        Raises:
            InvalidEvent: *now* is a sequence whose length is not the number of items.
        """
        batch = list(items)
        times = batch_times(now, len(batch))
        results: list[ObserveResult | None] = [None] * len(batch)
        try:
            with self._transaction() as db:
                # tenant -> [version read, state, audit records of the batch]
                working: dict[str, tuple[int, TenantState, list[AuditRecord]]] = {}
                last_at: dict[str, float] = {}
                for index, ((tenant, registered, registrable, weight), at) in enumerate(
                    zip(batch, times, strict=True)
                ):
                    try:
                        entry = working.get(tenant)
                        if entry is None:
                            entry = (*self._read(db, tenant), [])
                        new, effects, records = observe_and_audit(
                            machine,
                            entry[1],
                            at,
                            registered=registered,
                            registrable=registrable,
                            weight=weight,
                        )
                    except (InvalidEvent, _CorruptState) as exc:
                        results[index] = exc
                        continue
                    if records:
                        entry[2].extend(records)
                    working[tenant] = (entry[0], new, entry[2])
                    last_at[tenant] = at
                    results[index] = (new, effects)
                for tenant, (version, state, records) in working.items():
                    self._write(db, tenant, version, state, last_at[tenant], records)
        except StoreUnavailable as exc:
            # Rolled back: what was decided before the failure is void, except the items that
            # `observe` would have refused whatever the store (malformed arguments).
            return [r if isinstance(r, InvalidEvent) else exc for r in results]
        return cast(list[ObserveResult], results)

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
        with self._transaction() as db:
            version, state = self._read(db, tenant)
            new, effects, records = apply_and_audit(
                state, mutation, now, action=action, actor=actor, detail=detail
            )
            self._write(db, tenant, version, new, now, records)
            return new, effects

    def load(self, tenant: str) -> TenantState:
        db = self._connection()
        self._local.cache.pop(tenant, None)
        try:
            db.execute("BEGIN")
            try:
                _, state = self._read(db, tenant)
            finally:
                db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"SQLite store {self.path!r}: {exc}") from exc
        return TenantState.from_dict(state.to_dict())

    def history(self, tenant: str, *, limit: int | None = None) -> list[AuditRecord]:
        db = self._connection()
        try:
            if limit:
                rows = db.execute(
                    "SELECT record FROM (SELECT id, record FROM audit WHERE tenant = ? "
                    "ORDER BY id DESC LIMIT ?) ORDER BY id",
                    (tenant, int(limit)),
                ).fetchall()
            else:
                rows = db.execute(
                    "SELECT record FROM audit WHERE tenant = ? ORDER BY id", (tenant,)
                ).fetchall()
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"SQLite store {self.path!r}: {exc}") from exc
        try:
            return [AuditRecord.from_dict(json.loads(text)) for (text,) in rows]
        except ValueError as exc:
            raise StoreUnavailable(f"SQLite store {self.path!r}: corrupt audit: {exc}") from exc

    def tenants(self) -> list[str]:
        db = self._connection()
        try:
            rows = db.execute("SELECT tenant FROM tenant_state ORDER BY tenant").fetchall()
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"SQLite store {self.path!r}: {exc}") from exc
        return [tenant for (tenant,) in rows]

    def close(self) -> None:
        self._closed = True
        with self._all_lock:
            for db in self._all:
                with suppress(sqlite3.Error):
                    db.close()
            self._all.clear()


# --------------------------------------------------------------------------- URLs


def open_store(url: str, **options: Any) -> StateStore:
    """Open a store from a URL: ``memory:``, ``sqlite:///absolute/path.db``,
    ``sqlite:relative/path.db``, ``redis://host:port/db`` (``rediss://`` for TLS), or a Redis
    Cluster: ``redis+cluster://host:port[,host:port...]/0`` (``rediss+cluster://`` for TLS).

    Raises:
        InvalidConfiguration: the URL's scheme is unknown, or Redis support is not installed.
        StoreUnavailable: the store cannot be opened.
    """
    if url in ("memory:", "memory://"):
        return MemoryStore()
    if url.startswith("sqlite:"):
        path = url[len("sqlite:") :]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise InvalidConfiguration([f"store url {url!r}: no SQLite file path"])
        return SQLiteStore(path, **options)
    if url.startswith(
        ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")
    ):
        try:
            from ._redis_store import RedisStore
        except ImportError as exc:
            raise InvalidConfiguration(
                [f"store url {url!r} needs the redis extra: pip install 'domainpolicy[redis]'"]
            ) from exc
        return RedisStore.from_url(url, **options)
    raise InvalidConfiguration(
        [
            f"store url {url!r}: expected memory:, sqlite:PATH, redis://HOST:PORT/DB or "
            "redis+cluster://HOST:PORT[,HOST:PORT...]/0"
        ]
    )
