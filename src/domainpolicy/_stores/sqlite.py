"""`SQLiteStore`: tenant state and the audit trail in one SQLite file, shared by the processes
of one host (WAL; one ``BEGIN IMMEDIATE`` transaction per observation, batch or admin event).

Imports only the store contract (`domainpolicy._stores.base`) and the pure core.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from typing import Any, Final, cast

import attrs

from domainpolicy._blockstate import (
    BlockMachine,
    Effects,
    InvalidEvent,
    InvalidTenantState,
    TenantState,
)
from domainpolicy._errors import InvalidConfiguration, StoreUnavailable
from domainpolicy._registry import RegistryRecord
from domainpolicy._stores.base import (
    AuditRecord,
    Mutation,
    ObserveItem,
    ObserveResult,
    StateStore,
    apply_and_audit,
    batch_times,
    observe_and_audit,
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

__all__ = ["SQLITE_SCHEMA_VERSION", "SQLiteStore"]

SQLITE_SCHEMA_VERSION: Final = 3

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
    # version 1 -> 2: the tenant registry's change log (one row per committed mutation; the
    # registry's version is the newest row's, read with one primary-key max()).
    (
        """CREATE TABLE registry_log (
               version INTEGER PRIMARY KEY,
               at REAL NOT NULL,
               actor TEXT NOT NULL,
               reason TEXT NOT NULL,
               record TEXT NOT NULL
           )""",
    ),
    # version 2 -> 3: the head bucket's counters beside the state, written alone by an
    # observation that changes nothing else (NULL: the state's JSON holds them).
    (
        "ALTER TABLE tenant_state ADD COLUMN head_total INTEGER",
        "ALTER TABLE tenant_state ADD COLUMN head_unregistered INTEGER",
    ),
)


_OUTBOX: Final[tuple[str, ...]] = (
    # The alert outbox.  Created if missing on open rather than by a numbered migration: a
    # domainpolicy that does not know it ignores the table, so the schema version stays.
    """CREATE TABLE IF NOT EXISTS alert_outbox (
           id TEXT PRIMARY KEY,
           tenant TEXT NOT NULL,
           created REAL NOT NULL,
           status TEXT NOT NULL,
           sink TEXT NOT NULL,
           due REAL NOT NULL,
           lease_until REAL NOT NULL DEFAULT 0,
           row TEXT NOT NULL
       )""",
    "CREATE INDEX IF NOT EXISTS alert_outbox_due ON alert_outbox (status, due)",
)


class _CorruptState(StoreUnavailable):
    """One tenant's stored state is corrupt (the store itself still works)."""


class SQLiteStore(RegistryStore, StateStore):
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
        self._registry_init()
        with self._transaction() as db:
            self._migrate(db)
            self._create_outbox(db)

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
            text, head_total, head_unregistered = db.execute(
                "SELECT state, head_total, head_unregistered FROM tenant_state WHERE tenant = ?",
                (tenant,),
            ).fetchone()
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"SQLite store {self.path!r}: {exc}") from exc
        try:
            state = TenantState.from_dict(json.loads(text))
            if head_total is not None:
                # the counters of the head bucket, written after the JSON by `_count`
                if not (
                    head_total.__class__ is int
                    and head_unregistered.__class__ is int
                    and 0 <= head_unregistered <= head_total
                ):
                    raise InvalidTenantState(f"head counters {head_total!r}, {head_unregistered!r}")
                state.window.head_total = head_total
                state.window.head_unregistered = head_unregistered
        except (ValueError, InvalidTenantState) as exc:
            raise _CorruptState(
                f"SQLite store {self.path!r} holds a corrupt state for tenant {tenant!r}: {exc}"
            ) from exc
        return version, state

    def _version(self, db: sqlite3.Connection, tenant: str) -> int:
        """The stored version of *tenant* (0: none)."""
        try:
            row = db.execute(
                "SELECT version FROM tenant_state WHERE tenant = ?", (tenant,)
            ).fetchone()
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"SQLite store {self.path!r}: {exc}") from exc
        return 0 if row is None else int(row[0])

    def _count(
        self, db: sqlite3.Connection, tenant: str, version: int, state: TenantState, now: float
    ) -> bool:
        """Write an observation that changed only the head bucket's counters: the two counters
        and the version, not the state's JSON (`_read` puts them back into it).  False (nothing
        written) when the stored version is no longer *version*."""
        window = state.window
        try:
            written = db.execute(
                "UPDATE tenant_state SET version = ?, head_total = ?, head_unregistered = ?, "
                "updated_at = ? WHERE tenant = ? AND version = ?",
                (version + 1, window.head_total, window.head_unregistered, now, tenant, version),
            ).rowcount
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"SQLite store {self.path!r}: {exc}") from exc
        if written != 1:
            return False
        self._local.cache[tenant] = (version + 1, state)
        return True

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
                    "UPDATE tenant_state SET version = ?, state = ?, updated_at = ?, "
                    "head_total = NULL, head_unregistered = NULL WHERE tenant = ?",
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
            cached = self._local.cache.get(tenant)
            if cached is not None:
                # count on our copy first: the write checks that no other writer moved the
                # version meanwhile (we hold the write lock from here to the commit)
                outcome = self._observe_on(
                    db,
                    machine,
                    tenant,
                    cached[0],
                    cached[1],
                    now,
                    registered,
                    registrable,
                    weight,
                    True,
                )
                if outcome is not None:
                    return outcome
                self._local.cache.pop(tenant, None)
            version, state = self._read(db, tenant)
            outcome = self._observe_on(
                db, machine, tenant, version, state, now, registered, registrable, weight, False
            )
            assert outcome is not None
            return outcome

    def _observe_on(
        self,
        db: sqlite3.Connection,
        machine: BlockMachine,
        tenant: str,
        version: int,
        state: TenantState,
        now: float,
        registered: bool,
        registrable: str | None,
        weight: int,
        guarded: bool,
    ) -> tuple[TenantState, Effects] | None:
        """`observe` on *state* read at *version*, written; None (nothing written) when
        *guarded* and the stored version is no longer *version* (*state* is then spoilt)."""
        window = state.window
        head, warned = window.head, window.warned
        seen = window.domains.get(registrable) if registrable.__class__ is str else None
        new, effects, records = observe_and_audit(
            machine, state, now, registered=registered, registrable=registrable, weight=weight
        )
        if (
            version
            and new is state
            and not records
            and not effects.alerts
            and window.head == head
            and window.warned == warned
            and (registrable.__class__ is not str or window.domains.get(registrable) == seen)
        ):
            # only the head bucket's counters moved: write those, not the whole state
            return (new, effects) if self._count(db, tenant, version, new, now) else None
        if guarded and self._version(db, tenant) != version:
            return None
        self._write(db, tenant, version, new, now, records)
        if effects.alerts and self.alert_route is not None:
            self._put(db, transition_rows(self.alert_route, machine, new, effects.alerts, now))
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
                rows: list[OutboxRow] = []
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
                    if effects.alerts and self.alert_route is not None:
                        rows.extend(
                            transition_rows(self.alert_route, machine, new, effects.alerts, at)
                        )
                    working[tenant] = (entry[0], new, entry[2])
                    last_at[tenant] = at
                    results[index] = (new, effects)
                for tenant, (version, state, records) in working.items():
                    self._write(db, tenant, version, state, last_at[tenant], records)
                if rows:
                    self._put(db, rows)
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
            if effects.alerts and self.alert_route is not None:
                self._put(db, transition_rows(self.alert_route, None, new, effects.alerts, now))
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

    # -- registry ---------------------------------------------------------------

    def _registry_version(self) -> int:
        db = self._connection()
        try:
            (version,) = db.execute("SELECT max(version) FROM registry_log").fetchone()
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"SQLite store {self.path!r}: {exc}") from exc
        return int(version or 0)

    def _registry_records(self, since: int) -> list[RegistryRecord]:
        db = self._connection()
        try:
            rows = db.execute(
                "SELECT record FROM registry_log WHERE version > ? ORDER BY version", (since,)
            ).fetchall()
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"SQLite store {self.path!r}: {exc}") from exc
        try:
            return [RegistryRecord.from_dict(json.loads(text)) for (text,) in rows]
        except (ValueError, InvalidConfiguration) as exc:
            raise StoreUnavailable(f"SQLite store {self.path!r}: corrupt registry: {exc}") from exc

    def _registry_stamp(self, version: int) -> tuple[float, str, str] | None:
        db = self._connection()
        try:
            row = db.execute(
                "SELECT at, actor, reason FROM registry_log WHERE version = ?", (version,)
            ).fetchone()
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"SQLite store {self.path!r}: {exc}") from exc
        return None if row is None else (float(row[0]), str(row[1]), str(row[2]))

    def _registry_append(self, expected: int, record: RegistryRecord) -> bool:
        text = json.dumps(record.to_dict(), separators=(",", ":"), ensure_ascii=False)
        with self._transaction() as db:
            try:
                (version,) = db.execute("SELECT max(version) FROM registry_log").fetchone()
                if int(version or 0) != expected:
                    return False
                db.execute(
                    "INSERT INTO registry_log (version, at, actor, reason, record) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (record.version, record.at, record.actor, record.reason, text),
                )
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"SQLite store {self.path!r}: {exc}") from exc
        return True

    def close(self) -> None:
        self._closed = True
        with self._all_lock:
            for db in self._all:
                with suppress(sqlite3.Error):
                    db.close()
            self._all.clear()

    # -- the alert outbox -------------------------------------------------------------

    def _create_outbox(self, db: sqlite3.Connection) -> None:
        try:
            for statement in _OUTBOX:
                db.execute(statement)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot create the outbox of {self.path!r}: {exc}") from exc

    def _put(self, db: sqlite3.Connection, rows: Sequence[OutboxRow]) -> int:
        try:
            before = db.total_changes
            db.executemany(
                "INSERT OR IGNORE INTO alert_outbox "
                "(id, tenant, created, status, sink, due, lease_until, row) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        r.id,
                        r.tenant,
                        r.created,
                        r.status,
                        r.sink,
                        r.due,
                        r.lease_until,
                        json.dumps(r.to_dict(), separators=(",", ":")),
                    )
                    for r in rows
                ],
            )
            return db.total_changes - before
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"SQLite store {self.path!r}: {exc}") from exc

    def _row(self, text: str) -> OutboxRow:
        try:
            return OutboxRow.from_dict(json.loads(text))
        except ValueError as exc:
            raise StoreUnavailable(f"SQLite store {self.path!r}: corrupt outbox: {exc}") from exc

    def _update(self, db: sqlite3.Connection, row: OutboxRow) -> None:
        db.execute(
            "UPDATE alert_outbox SET status = ?, due = ?, lease_until = ?, row = ? WHERE id = ?",
            (
                row.status,
                row.due,
                row.lease_until,
                json.dumps(row.to_dict(), separators=(",", ":")),
                row.id,
            ),
        )

    def _one(self, db: sqlite3.Connection, row_id: str) -> OutboxRow | None:
        found = db.execute("SELECT row FROM alert_outbox WHERE id = ?", (row_id,)).fetchone()
        return None if found is None else self._row(found[0])

    def enqueue_alerts(self, rows: Sequence[OutboxRow]) -> int:
        with self._transaction() as db:
            return self._put(db, rows)

    def claim_alerts(
        self, sinks: Sequence[str], now: float, *, lease: float, owner: str, limit: int = 100
    ) -> list[OutboxRow]:
        check_claim(sinks, now, lease, limit)
        if not sinks:
            return []
        marks = ", ".join("?" * len(sinks))
        claimed: list[OutboxRow] = []
        with self._transaction() as db:
            try:
                found = db.execute(
                    f"SELECT row FROM alert_outbox WHERE status = ? AND due <= ? "
                    f"AND lease_until <= ? AND sink IN ({marks}) ORDER BY due, id LIMIT ?",
                    (PENDING, now, now, *sinks, limit),
                ).fetchall()
                for (text,) in found:
                    old = self._row(text)
                    row = attrs.evolve(
                        old, attempts=old.attempts + 1, lease_until=now + lease, owner=owner
                    )
                    self._update(db, row)
                    claimed.append(row)
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"SQLite store {self.path!r}: {exc}") from exc
        return claimed

    def ack_alert(self, row_id: str, now: float) -> bool:
        with self._transaction() as db:
            try:
                row = self._one(db, row_id)
                if row is None or row.status != PENDING:
                    return False
                self._update(
                    db, attrs.evolve(row, status=DELIVERED, lease_until=0.0, owner=None, due=now)
                )
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"SQLite store {self.path!r}: {exc}") from exc
        return True

    def fail_alert(
        self, row_id: str, owner: str, now: float, *, error: str, retry_at: float | None
    ) -> bool:
        with self._transaction() as db:
            try:
                row = self._one(db, row_id)
                if row is None or row.status != PENDING or row.owner != owner:
                    return False
                self._update(
                    db,
                    attrs.evolve(
                        row,
                        status=DEAD if retry_at is None else PENDING,
                        due=now if retry_at is None else retry_at,
                        last_error=error,
                        lease_until=0.0,
                        owner=None,
                    ),
                )
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"SQLite store {self.path!r}: {exc}") from exc
        return True

    def retry_alert(self, row_id: str, now: float) -> bool:
        with self._transaction() as db:
            try:
                row = self._one(db, row_id)
                if row is None or row.status != DEAD:
                    return False
                self._update(db, attrs.evolve(row, status=PENDING, attempts=0, due=now))
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"SQLite store {self.path!r}: {exc}") from exc
        return True

    def alert_rows(self, *, status: str | None = None, limit: int = 100) -> list[OutboxRow]:
        db = self._connection()
        try:
            if status is None:
                found = db.execute(
                    "SELECT row FROM alert_outbox ORDER BY created, id LIMIT ?", (int(limit),)
                ).fetchall()
            else:
                found = db.execute(
                    "SELECT row FROM alert_outbox WHERE status = ? ORDER BY created, id LIMIT ?",
                    (status, int(limit)),
                ).fetchall()
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"SQLite store {self.path!r}: {exc}") from exc
        return [self._row(text) for (text,) in found]
