"""Console accounts: the small contract the web console keeps its users and its login-attempt
counters in (`AccountStore`), the `Account` value, and one implementation per store that has
them (`MemoryAccounts`, `SQLiteAccounts`, `RedisAccounts`), found for a state store by
`accounts_for`.

Accounts live next to the tenant state but apart from it: the SQLite implementation uses its
own tables (``console_account``, ``console_failure``) in the state store's file, created if
missing (a domainpolicy without the console ignores them), so no state-store schema changes.
In Redis (and Redis Cluster) the accounts are one hash, ``<prefix>console:accounts`` (a handful
of operators: one slot is plenty), and each login-attempt counter a sorted set of attempt
times, ``<prefix>console:failures:<key>``, trimmed to the window and expiring with it, updated
by one script so that concurrent consoles count every attempt.

Imports the standard library, `domainpolicy._errors` and the memory and SQLite backends (to
recognise them; redis-py only inside the Redis implementation, when a Redis store is used);
nothing in the stores imports this module.
"""

from __future__ import annotations

import abc
import json
import sqlite3
import threading
import uuid
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any, Final

import attrs

from domainpolicy._errors import InvalidConfiguration, StoreUnavailable
from domainpolicy._stores.base import StateStore
from domainpolicy._stores.memory import MemoryStore
from domainpolicy._stores.sqlite import SQLiteStore

__all__ = [
    "ROLES",
    "SUPPORT",
    "TENANT_ADMIN",
    "Account",
    "AccountStore",
    "MemoryAccounts",
    "RedisAccounts",
    "SQLiteAccounts",
    "accounts_for",
]

SUPPORT: Final = "support"
"""The support desk: every tenant, the unblock queue, approve, deny, block, suspend."""
TENANT_ADMIN: Final = "tenant-admin"
"""The administrator of one tenant: that tenant's pages and checklist only."""
ROLES: Final = (SUPPORT, TENANT_ADMIN)


def _check_role(instance: Account, attribute: object, value: str) -> None:
    if value not in ROLES:
        raise ValueError(f"role {value!r}: must be one of {', '.join(ROLES)}")


@attrs.frozen
class Account:
    """A console user.

    Attributes:
        name: the login name (also the actor written in the audit trail).
        role: `SUPPORT` or `TENANT_ADMIN`.
        tenant: the one tenant of a tenant admin; None for support.
        password_hash: the encoded memory-hard hash of the password (never the password).
    """

    name: str
    role: str = attrs.field(validator=_check_role)
    tenant: str | None
    password_hash: str = attrs.field(repr=False)

    def __attrs_post_init__(self) -> None:
        if (self.role == TENANT_ADMIN) != (self.tenant is not None):
            raise ValueError("a tenant admin has exactly one tenant; support has none")


class AccountStore(abc.ABC):
    """Where console accounts and failed-login counters live.

    Every method raises `StoreUnavailable` when the storage fails.
    """

    @abc.abstractmethod
    def get(self, name: str) -> Account | None:
        """The account called *name*, or None."""

    @abc.abstractmethod
    def put(self, account: Account) -> None:
        """Create or replace the account of that name."""

    @abc.abstractmethod
    def list(self) -> list[Account]:
        """Every account, by name."""

    @abc.abstractmethod
    def record_failure(self, key: str, now: float, window: float) -> int:
        """Count a failed login under *key* (``account:NAME`` or ``address:IP``) at *now*, forget
        those older than *window* seconds, and return how many are left in the window."""

    @abc.abstractmethod
    def failures(self, key: str, now: float, window: float) -> int:
        """Failed logins under *key* in the last *window* seconds."""

    @abc.abstractmethod
    def clear_failures(self, key: str) -> None:
        """Forget the failed logins under *key* (after a successful login)."""


class MemoryAccounts(AccountStore):
    """Accounts in memory (tests, a `MemoryStore`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._accounts: dict[str, Account] = {}
        self._failures: dict[str, list[float]] = {}

    def get(self, name: str) -> Account | None:
        with self._lock:
            return self._accounts.get(name)

    def put(self, account: Account) -> None:
        with self._lock:
            self._accounts[account.name] = account

    def list(self) -> list[Account]:
        with self._lock:
            return [self._accounts[k] for k in sorted(self._accounts)]

    def record_failure(self, key: str, now: float, window: float) -> int:
        with self._lock:
            kept = [t for t in self._failures.get(key, []) if t > now - window]
            kept.append(now)
            self._failures[key] = kept
            return len(kept)

    def failures(self, key: str, now: float, window: float) -> int:
        with self._lock:
            return sum(1 for t in self._failures.get(key, []) if t > now - window)

    def clear_failures(self, key: str) -> None:
        with self._lock:
            self._failures.pop(key, None)


_TABLES: Final = (
    """CREATE TABLE IF NOT EXISTS console_account (
           name TEXT PRIMARY KEY,
           role TEXT NOT NULL,
           tenant TEXT,
           password_hash TEXT NOT NULL
       )""",
    """CREATE TABLE IF NOT EXISTS console_failure (
           key TEXT NOT NULL,
           at REAL NOT NULL
       )""",
    "CREATE INDEX IF NOT EXISTS console_failure_key ON console_failure (key, at)",
)


class SQLiteAccounts(AccountStore):
    """Accounts in a SQLite file (the state store's), one short connection per call.

    Args:
        path: the database file.
        timeout: seconds to wait for the write lock before `StoreUnavailable`.
    """

    def __init__(self, path: str, *, timeout: float = 5.0) -> None:
        self.path = path
        self.timeout = timeout
        with self._transaction() as db:
            for statement in _TABLES:
                db.execute(statement)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        try:
            db = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open SQLite store {self.path!r}: {exc}") from exc
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                with suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"SQLite store {self.path!r}: {exc}") from exc
        finally:
            db.close()

    @staticmethod
    def _account(row: tuple[str, str, str | None, str]) -> Account:
        return Account(row[0], row[1], row[2], row[3])

    def get(self, name: str) -> Account | None:
        with self._transaction() as db:
            row = db.execute(
                "SELECT name, role, tenant, password_hash FROM console_account WHERE name = ?",
                (name,),
            ).fetchone()
        return None if row is None else self._account(row)

    def put(self, account: Account) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO console_account VALUES (?, ?, ?, ?)",
                (account.name, account.role, account.tenant, account.password_hash),
            )

    def list(self) -> list[Account]:
        with self._transaction() as db:
            rows = db.execute(
                "SELECT name, role, tenant, password_hash FROM console_account ORDER BY name"
            ).fetchall()
        return [self._account(r) for r in rows]

    def record_failure(self, key: str, now: float, window: float) -> int:
        with self._transaction() as db:
            db.execute("DELETE FROM console_failure WHERE key = ? AND at <= ?", (key, now - window))
            db.execute("INSERT INTO console_failure VALUES (?, ?)", (key, now))
            (count,) = db.execute(
                "SELECT COUNT(*) FROM console_failure WHERE key = ?", (key,)
            ).fetchone()
        return int(count)

    def failures(self, key: str, now: float, window: float) -> int:
        with self._transaction() as db:
            (count,) = db.execute(
                "SELECT COUNT(*) FROM console_failure WHERE key = ? AND at > ?",
                (key, now - window),
            ).fetchone()
        return int(count)

    def clear_failures(self, key: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM console_failure WHERE key = ?", (key,))


_RECORD_FAILURE_LUA: Final = """
-- KEYS: 1 the counter; ARGV: 1 drop attempts at or before, 2 now, 3 member, 4 window ms
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return redis.call('ZCARD', KEYS[1])
"""


class RedisAccounts(AccountStore):
    """Accounts in a `RedisStore`'s Redis (or Redis Cluster), beside the tenant state (see the
    module docstring for the keys).

    Args:
        store: the Redis store (its client and key prefix are used).
    """

    def __init__(self, store: StateStore) -> None:
        self._client: Any = store._client  # type: ignore[attr-defined]  # a RedisStore
        self._fail: Any = store._fail  # type: ignore[attr-defined]
        prefix = str(store.prefix)  # type: ignore[attr-defined]
        self._accounts = prefix + "console:accounts"
        self._failures = prefix + "console:failures:"
        self._record = self._client.register_script(_RECORD_FAILURE_LUA)

    @contextmanager
    def _calling(self, what: str) -> Iterator[None]:
        import redis
        from redis.exceptions import RedisClusterException

        try:
            yield
        except (redis.RedisError, RedisClusterException) as exc:
            raise self._fail(f"console {what}", exc) from exc

    @staticmethod
    def _text(value: object) -> str:
        return value.decode() if isinstance(value, bytes) else str(value)

    def _account(self, name: str, raw: object) -> Account:
        data = json.loads(self._text(raw))
        return Account(name, data["role"], data["tenant"], data["password_hash"])

    def get(self, name: str) -> Account | None:
        with self._calling("account read"):
            raw = self._client.hget(self._accounts, name)
        return None if raw is None else self._account(name, raw)

    def put(self, account: Account) -> None:
        data = {
            "role": account.role,
            "tenant": account.tenant,
            "password_hash": account.password_hash,
        }
        with self._calling("account write"):
            self._client.hset(self._accounts, account.name, json.dumps(data))

    def list(self) -> list[Account]:
        with self._calling("account list"):
            rows = self._client.hgetall(self._accounts)
        accounts = [self._account(self._text(k), v) for k, v in rows.items()]
        return sorted(accounts, key=lambda a: a.name)

    def record_failure(self, key: str, now: float, window: float) -> int:
        member = f"{now!r}:{uuid.uuid4().hex}"
        args = [repr(now - window), repr(now), member, max(1, int(window * 1000))]
        with self._calling("login failure"):
            count = self._record(keys=[self._failures + key], args=args)
        return int(count)

    def failures(self, key: str, now: float, window: float) -> int:
        with self._calling("login failures read"):
            count = self._client.zcount(self._failures + key, f"({now - window!r}", "+inf")
        return int(count)

    def clear_failures(self, key: str) -> None:
        with self._calling("login failures clear"):
            self._client.delete(self._failures + key)


_MEMORY: weakref.WeakKeyDictionary[MemoryStore, MemoryAccounts] = weakref.WeakKeyDictionary()
_MEMORY_LOCK = threading.Lock()


def accounts_for(store: StateStore) -> AccountStore:
    """The accounts kept with *store*: in memory for a `MemoryStore` (one per store), in the
    same file for a `SQLiteStore`, in the same Redis (or Redis Cluster) for a `RedisStore`.

    Raises:
        InvalidConfiguration: the store keeps no accounts (another kind of store).
        StoreUnavailable: the SQLite file cannot be opened.
    """
    if isinstance(store, MemoryStore):
        with _MEMORY_LOCK:
            found = _MEMORY.get(store)
            if found is None:
                found = _MEMORY[store] = MemoryAccounts()
            return found
    if isinstance(store, SQLiteStore):
        return SQLiteAccounts(store.path, timeout=store.timeout)
    if getattr(store, "kind", None) == "redis" and hasattr(store, "_client"):
        return RedisAccounts(store)
    raise InvalidConfiguration(
        [
            f"the console keeps its accounts in a memory, SQLite or Redis store, not a "
            f"{getattr(store, 'kind', type(store).__name__)} store"
        ]
    )
