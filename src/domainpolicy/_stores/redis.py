"""`RedisStore`: tenant block state shared by a fleet of MTAs, in Redis (or Redis Cluster).

The store lives here; what it is made of lives beside it, each imported only by this module
(and each other): `redis_schema` (the key layout and the Lua scripts, with how the hot path
decides), `_resp` (the rounds of a batch packed by hand) and `cluster` (cluster URLs and a
round split by node, with what a fail-over can lose).  It imports the store contract
(`domainpolicy._stores.base`), never the package's ``__init__``.

Batches
-------
`RedisStore.observe_many` pipelines the hot-path scripts of a batch (one round trip when nothing
changes state).  A script of a batch carries the round's token and its rank ``k`` among the
tenant's items of the round and applies nothing (``deferred``) unless the tenant's ``k`` earlier
items of the round were applied, so the items after a slow one are sent again after it has been
written: the results are those of `observe` called for each item in turn.

Server time and clock skew
--------------------------
With ``server_time=True`` (the default) the hot path ignores the caller's ``now`` and uses the
master's ``TIME``, so the clocks of the MTAs do not matter: one clock moves every window.  The
audit record of a block carries that time.  Administrative events use the ``now`` their caller
passes (take it from `RedisStore.now`, the server's ``TIME``).  If the master's clock jumps
backwards (a fail-over to a replica whose clock is behind), observations are counted in the
newest bucket already seen, as the counting model specifies: nothing is lost, windows just last
longer (fails closed).  ``server_time=False`` uses the caller's ``now`` (deterministic tests).

Waiting for replicas
--------------------
``wait_replicas=N`` (URL query ``?wait_replicas=N&wait_timeout_ms=T``) makes every write that
changes a tenant's state through the compare-and-set commit -- an administrative event
(`RedisStore.apply`) and the slow path of an observation (a block, a suspension, a warning) --
send ``WAIT N T`` on the same connection, to the node that holds the tenant's slot, right after
the commit script.  When fewer than *N* replicas acknowledged the write within *T* ms:

* an administrative event raises `StoreUnavailable` (the caller retries or checks): the event
  *is* stored on the primary, but it may be lost by a fail-over;
* a transition of an observation is kept (the primary has it, the decision stands), logged on
  ``domainpolicy.store`` and counted in `RedisStore.replication_shortfalls`.

The guarantee: an admin event for which `apply` returned, and a transition not counted as a
shortfall, had reached *N* replicas' memory.  A fail-over that promotes one of them keeps it.
It says nothing of the counts of the hot path (they are not waited for: that would put a round
trip of replication on every message), nor of a promotion of a replica that had not
acknowledged (with several replicas), nor of a replica restarted without persistence.
``min-replicas-to-write`` on the server is the other half: a primary that lost its replicas
refuses writes.  The tenant registry's commit is not waited for.

Failures
--------
Every Redis error (and redis-py's ``RedisClusterException``) -- cannot connect, timed out
(``socket_timeout`` and ``socket_connect_timeout`` default to 0.5 s, and redis-py's own retries
are off so that a script that may have run is never sent twice), a script error, corrupt data --
is raised as
`StoreUnavailable`; the policy answers such a message with a temporary failure.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final, cast

import attrs
import redis
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.exceptions import (
    NoScriptError,
)
from redis.retry import Retry

from domainpolicy._blockstate import (
    STATE_SCHEMA_VERSION,
    BlockMachine,
    BlockPolicy,
    Effects,
    InvalidEvent,
    InvalidTenantState,
    State,
    TenantState,
)
from domainpolicy._errors import InvalidConfiguration, StoreUnavailable, shown
from domainpolicy._stores._resp import ERRORS, LAST, MORE, Prepared, Wire, commit_and_wait
from domainpolicy._stores.base import (
    AuditRecord,
    Mutation,
    ObserveItem,
    ObserveResult,
    StateStore,
    audit_records,
    batch_times,
)
from domainpolicy._stores.cluster import CLUSTER_SCHEMES, NOT_RUN, cluster_round, cluster_url
from domainpolicy._stores.outbox import OutboxRow, transition_rows
from domainpolicy._stores.redis_outbox import RedisOutbox, outbox_args, outbox_keys
from domainpolicy._stores.redis_schema import (
    COMMIT_LUA,
    EFFECTS,
    OBSERVE_LUA,
    SNAPSHOT_LUA,
    Keys,
    limit_args,
)
from domainpolicy._stores.registry_redis import RegistryRedis

__all__ = ["DEFAULT_PREFIX", "DEFAULT_TIMEOUT", "DEFAULT_WAIT_TIMEOUT_MS", "RedisStore"]

DEFAULT_PREFIX: Final = "dp:"
"""Prefix of every key the store writes."""

DEFAULT_TIMEOUT: Final = 0.5
"""Default socket and connect timeout in seconds: an MTA never waits longer on Redis."""

DEFAULT_WAIT_TIMEOUT_MS: Final = 100
"""Default ``wait_timeout_ms``: how long ``WAIT`` waits for the replicas."""

_WAIT_OPTIONS: Final = ("wait_replicas", "wait_timeout_ms")

_log = logging.getLogger("domainpolicy.store")

_MAX_WEIGHT: Final = 2**31 - 1
_MAX_NOW: Final = 1e12

_Snapshot = tuple[int, TenantState]


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, str):
        return value
    raise TypeError(f"expected a Redis string, got {shown(value)}")


def _deferred(reply: object) -> bool:
    """True for the batch script's ``deferred`` answer (it applied nothing)."""
    return isinstance(reply, list) and len(reply) == 1 and reply[0] in (b"deferred", "deferred")


def _pairs(flat: object) -> dict[str, str]:
    if not isinstance(flat, list) or len(flat) % 2:
        raise TypeError(f"expected a flat list of field/value pairs, got {shown(flat)}")
    return {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat), 2)}


def _wait_query(url: str) -> tuple[str, dict[str, Any]]:
    """*url* without its ``wait_replicas`` and ``wait_timeout_ms`` query options, and those
    options (whole numbers as ``int``, anything else as given, for the store to refuse)."""
    base, mark, query = url.partition("?")
    if not mark:
        return url, {}
    kept: list[str] = []
    found: dict[str, Any] = {}
    for pair in query.split("&"):
        name, _, value = pair.partition("=")
        if name in _WAIT_OPTIONS:
            found[name] = int(value) if value.isdigit() and value.isascii() else value
        else:
            kept.append(pair)
    return (f"{base}?{'&'.join(kept)}" if kept else base), found


def _copy(state: TenantState) -> TenantState:
    return attrs.evolve(state, window=state.window.copy())


class RedisStore(RegistryRedis, StateStore):
    """Tenant state in Redis, shared by every MTA of a fleet (see the module docstring).

    Args:
        client: a ``redis.Redis`` (or ``redis.RedisCluster``) client to use; the store does not
            close a client it was given.  When None, a client is made from *host*, *port*,
            *db*, *password* with the timeouts below (and closed by `close`).
        host: server host (without *client*).
        port: server port (without *client*).
        db: database number (without *client*).
        password: server password (without *client*).
        prefix: prefix of every key (must not contain ``{`` or ``}``).
        server_time: take ``now`` for observations from the server's ``TIME`` (default) rather
            than from the caller.
        socket_timeout: seconds to wait for a reply (without *client*).
        connect_timeout: seconds to wait for a connection (without *client*).
        max_attempts: compare-and-set attempts before a contended write gives up with
            `StoreUnavailable`.
        wait_replicas: after a commit that changes a tenant's state, ``WAIT`` for this many
            replicas (0: do not wait; see "Waiting for replicas" in the module docstring).
        wait_timeout_ms: how long ``WAIT`` waits, in milliseconds (1 to 60,000, and below the
            socket timeout).

    Raises:
        InvalidConfiguration: an option is invalid.
    """

    kind = "redis"

    def __init__(
        self,
        client: redis.Redis | redis.RedisCluster | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 6379,
        db: int = 0,
        password: str | None = None,
        prefix: str = DEFAULT_PREFIX,
        server_time: bool = True,
        socket_timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = DEFAULT_TIMEOUT,
        max_attempts: int = 100,
        wait_replicas: int = 0,
        wait_timeout_ms: int = DEFAULT_WAIT_TIMEOUT_MS,
    ) -> None:
        problems = []
        if not isinstance(prefix, str) or "{" in prefix or "}" in prefix:
            problems.append(f"prefix={shown(prefix)}: must be text without '{{' or '}}'")
        for name, value in (
            ("socket_timeout", socket_timeout),
            ("connect_timeout", connect_timeout),
        ):
            if type(value) not in (int, float) or not 0 < value <= 60:
                problems.append(f"{name}={shown(value)}: must be seconds in (0, 60]")
        if type(max_attempts) is not int or max_attempts < 1:
            problems.append(f"max_attempts={shown(max_attempts)}: must be an integer >= 1")
        if type(wait_replicas) is not int or not 0 <= wait_replicas <= 100:
            problems.append(
                f"wait_replicas={shown(wait_replicas)}: must be a number of replicas in [0, 100]"
            )
        if type(wait_timeout_ms) is not int or not 1 <= wait_timeout_ms <= 60_000:
            problems.append(
                f"wait_timeout_ms={shown(wait_timeout_ms)}: must be milliseconds in [1, 60000]"
            )
        elif (
            type(wait_replicas) is int
            and wait_replicas > 0
            and type(socket_timeout) in (int, float)
            and wait_timeout_ms >= socket_timeout * 1000
        ):
            problems.append(
                f"wait_timeout_ms={wait_timeout_ms}: must be below socket_timeout "
                f"({socket_timeout} s), or the reply of WAIT times out"
            )
        if problems:
            raise InvalidConfiguration(problems, source="RedisStore")
        self._owns_client = client is None
        if client is None:
            client = redis.Redis(
                host=host,
                port=port,
                db=db,
                password=password,
                socket_timeout=socket_timeout,
                socket_connect_timeout=connect_timeout,
                retry=Retry(NoBackoff(), 0),
            )
        self._client: redis.Redis | redis.RedisCluster = client
        self._cluster = isinstance(client, redis.RedisCluster)
        self.prefix = prefix
        self.server_time = bool(server_time)
        self.max_attempts = max_attempts
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self.replication_shortfalls = 0
        """Transitions of observations stored on the primary that fewer than `wait_replicas`
        replicas acknowledged in time (logged on ``domainpolicy.store``)."""
        self._registry = prefix + "tenants"
        self._observe: Script = client.register_script(OBSERVE_LUA)
        self._snapshot: Script = client.register_script(SNAPSHOT_LUA)
        self._commit: Script = client.register_script(COMMIT_LUA)
        self._registry_keys_init()  # the tenant registry: see registry_redis
        self._keys: dict[str, Keys] = {}
        self._known: set[str] = set()
        self._cache: dict[str, tuple[int, TenantState]] = {}
        self._limits: dict[BlockPolicy, tuple[str, ...]] = {}
        self._lock = threading.Lock()
        self._closed = False
        # observe_many: unique round tokens (this process and store, then a counter)
        self._token_base = f"{os.getpid():x}.{os.urandom(6).hex()}."
        self._rounds = itertools.count()
        # observe_many's rounds packed by hand on a plain redis.Redis and on Redis Cluster (per
        # node), else redis-py's pipeline
        self._wire = (
            Wire.of_cluster(client) if isinstance(client, redis.RedisCluster) else Wire.of(client)
        )

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        server_time: bool = True,
        socket_timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = DEFAULT_TIMEOUT,
        max_attempts: int = 100,
        wait_replicas: int = 0,
        wait_timeout_ms: int = DEFAULT_WAIT_TIMEOUT_MS,
        **redis_options: Any,
    ) -> RedisStore:
        """Open a store from ``redis://[user:password@]host:port/db``, ``rediss://...`` (TLS) or
        ``unix:///path/to/socket?db=N``; extra keyword arguments go to ``redis.Redis.from_url``.
        A ``redis+cluster://`` or ``rediss+cluster://`` URL opens a Redis Cluster
        (`from_cluster_url`).  The query options ``wait_replicas`` and ``wait_timeout_ms`` are the
        store's (they replace the keyword arguments), the others redis-py's.

        Raises:
            InvalidConfiguration: the URL or an option is invalid.
            StoreUnavailable: a cluster URL whose nodes cannot be reached.
        """
        if url.startswith(CLUSTER_SCHEMES):
            return cls.from_cluster_url(
                url,
                prefix=prefix,
                server_time=server_time,
                socket_timeout=socket_timeout,
                connect_timeout=connect_timeout,
                max_attempts=max_attempts,
                wait_replicas=wait_replicas,
                wait_timeout_ms=wait_timeout_ms,
                **redis_options,
            )
        url, waiting = _wait_query(url)
        waiting = {"wait_replicas": wait_replicas, "wait_timeout_ms": wait_timeout_ms, **waiting}
        try:
            client = redis.Redis.from_url(
                url,
                socket_timeout=socket_timeout,
                socket_connect_timeout=connect_timeout,
                retry=Retry(NoBackoff(), 0),
                **redis_options,
            )
        except (ValueError, TypeError) as exc:
            raise InvalidConfiguration([f"store url {url!r}: {exc}"], source="RedisStore") from exc
        return cls._owning(
            client,
            prefix=prefix,
            server_time=server_time,
            socket_timeout=socket_timeout,
            connect_timeout=connect_timeout,
            max_attempts=max_attempts,
            **waiting,
        )

    @classmethod
    def from_cluster_url(
        cls,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        server_time: bool = True,
        socket_timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = DEFAULT_TIMEOUT,
        max_attempts: int = 100,
        wait_replicas: int = 0,
        wait_timeout_ms: int = DEFAULT_WAIT_TIMEOUT_MS,
        **redis_options: Any,
    ) -> RedisStore:
        """Open a store on a Redis Cluster from
        ``redis+cluster://[user:password@]host:port[,host:port...][/0][?option=value&...]``
        (``rediss+cluster://`` for TLS).  Every ``host:port`` (port 6379 when left out) is a
        startup node: the client asks the first one that answers for the cluster's slot table.
        The query options are those of ``redis://`` URLs (with the store's ``wait_replicas`` and
        ``wait_timeout_ms``); extra keyword arguments go to
        ``redis.RedisCluster``.  A cluster has only database 0: any other database is refused.
        The timeouts and the no-retry policy are those of `from_url`: a script that may have
        run is never sent again.

        Unlike `from_url`, this connects at once (the client needs the slot table).

        Raises:
            InvalidConfiguration: the URL or an option is invalid, or the nodes are not in
                cluster mode.
            StoreUnavailable: no startup node can be reached.
        """
        url, waiting = _wait_query(url)
        waiting = {"wait_replicas": wait_replicas, "wait_timeout_ms": wait_timeout_ms, **waiting}
        first, others = cluster_url(url)
        try:
            client = redis.RedisCluster(
                url=first,
                startup_nodes=others,
                retry=Retry(NoBackoff(), 0),
                socket_timeout=socket_timeout,
                socket_connect_timeout=connect_timeout,
                **redis_options,
            )
        except (ValueError, TypeError) as exc:
            raise InvalidConfiguration([f"store url {url!r}: {exc}"], source="RedisStore") from exc
        except ERRORS as exc:
            if "cluster mode is not enabled" in str(exc).lower():
                raise InvalidConfiguration(
                    [f"store url {url!r}: the server is not in cluster mode: use redis://"],
                    source="RedisStore",
                ) from exc
            raise StoreUnavailable(
                f"Redis store unreachable: cannot open the cluster of {url!r}: {exc}"
            ) from exc
        return cls._owning(
            client,
            prefix=prefix,
            server_time=server_time,
            socket_timeout=socket_timeout,
            connect_timeout=connect_timeout,
            max_attempts=max_attempts,
            **waiting,
        )

    @classmethod
    def _owning(cls, client: redis.Redis | redis.RedisCluster, **options: Any) -> RedisStore:
        """A store on *client* that closes it when the store is closed (and at once if the store
        cannot be made)."""
        try:
            store = cls(client, **options)
        except BaseException:
            client.close()
            raise
        store._owns_client = True
        return store

    def __enter__(self) -> RedisStore:
        return self

    # ----------------------------------------------------------------- plumbing

    def _tenant_keys(self, tenant: str) -> Keys:
        keys = self._keys.get(tenant)
        if keys is None:
            if not isinstance(tenant, str) or not tenant.strip() or len(tenant) > 4096:
                TenantState.new(tenant)  # raises the machine's own InvalidEvent
                raise InvalidEvent(f"invalid tenant {shown(tenant)}")  # pragma: no cover
            keys = Keys(self.prefix, tenant)
            with self._lock:
                if len(self._keys) > 100_000:
                    self._keys.clear()
                self._keys[tenant] = keys
        return keys

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailable("Redis store is closed")

    def _fail(self, what: str, exc: Exception) -> StoreUnavailable:
        if isinstance(exc, redis.TimeoutError):
            kind = "timed out"
        elif isinstance(exc, redis.ConnectionError):
            kind = "unreachable"
        else:
            kind = "failed"
        return StoreUnavailable(f"Redis store {kind} during {what}: {exc}")

    def _register(self, tenant: str, *, force: bool = False) -> None:
        """Add *tenant* to the registry (a separate key: not in the tenant's Cluster slot)."""
        if tenant in self._known and not force:
            return
        try:
            self._client.sadd(self._registry, tenant)
        except ERRORS as exc:
            raise self._fail("tenant registration", exc) from exc
        self._known.add(tenant)

    def _parse(self, tenant: str, reply: Sequence[object]) -> _Snapshot:
        """``(version, state)`` from a snapshot ``[state hash, bt, bu, dom]``.

        Raises:
            StoreUnavailable: the stored data is corrupt.
        """
        try:
            fields = _pairs(reply[0])
            totals = {int(k): int(t) for k, t in _pairs(reply[1]).items()}
            unregistered = {int(k): int(u) for k, u in _pairs(reply[2]).items()}
            domains = _pairs(reply[3])
            version = int(fields.get("v", "0"))
            doc_text = fields.get("doc")
            if doc_text is None:
                doc: dict[str, Any] = {
                    "schema": STATE_SCHEMA_VERSION,
                    "tenant": tenant,
                    "offences": 0,
                    "connectors": [],
                    "block": None,
                }
            else:
                doc = json.loads(doc_text)
                if not isinstance(doc, dict):
                    raise TypeError(f"doc is not an object: {shown(doc)}")
            if doc.get("tenant") != tenant:
                raise ValueError(f"keys of tenant {tenant!r} hold tenant {doc.get('tenant')!r}")
            if set(unregistered) - set(totals):
                raise ValueError("unregistered counts for buckets without a total")
            total, unreg = int(fields.get("T", "0")), int(fields.get("U", "0"))
            if total != sum(totals.values()) or unreg != sum(unregistered.values()):
                raise ValueError(f"window sums T={total} U={unreg} do not match the buckets")
            warned = fields.get("warned")
            pu = fields.get("pu")
            doc["state"] = fields.get("st", State.ACTIVE.value)
            doc["probation_until"] = None if pu is None else float(pu)
            doc["window"] = {
                "head": int(fields.get("head", "0")),
                "buckets": [[k, totals[k], unregistered.get(k, 0)] for k in sorted(totals)],
                "domains": [[d, int(k)] for d, k in sorted(domains.items())],
                "warned": None if warned is None else int(warned),
            }
            return version, TenantState.from_dict(doc)
        except (TypeError, ValueError, KeyError, IndexError, InvalidTenantState) as exc:
            raise StoreUnavailable(
                f"Redis store holds a corrupt state for tenant {shown(tenant)}: {exc}"
            ) from exc

    def _read(self, tenant: str, keys: Keys) -> _Snapshot:
        try:
            reply = self._snapshot(keys=keys.scripted, args=[])
        except ERRORS as exc:
            raise self._fail(f"read of tenant {shown(tenant)}", exc) from exc
        if not isinstance(reply, list) or len(reply) != 4:
            raise StoreUnavailable(f"Redis store: unexpected snapshot reply {shown(reply)}")
        return self._parse(tenant, reply)

    def _write(
        self,
        tenant: str,
        keys: Keys,
        version: int,
        state: TenantState,
        records: Sequence[AuditRecord],
        rows: Sequence[OutboxRow] = (),
        *,
        strict: bool,
    ) -> int | None:
        """Write *state*, *records* and the alert outbox *rows* if the stored version is still
        *version*; return the new version, or None when another writer got in first.

        With `wait_replicas`, the write is followed by ``WAIT``; when too few replicas
        acknowledged, a *strict* write (an administrative event) raises `StoreUnavailable`
        after it is stored, another one is logged and counted.

        Raises:
            StoreUnavailable: Redis failed, or (*strict*) too few replicas acknowledged."""
        data = state.to_dict()
        window = data.pop("window")
        st = data.pop("state")
        until = data.pop("probation_until")
        args: list[str | int] = [
            version,
            st,
            window["head"],
            state.window.total,
            state.window.unregistered,
            "" if window["warned"] is None else window["warned"],
            "" if until is None else repr(float(until)),
            json.dumps(data, separators=(",", ":"), sort_keys=True),
            len(window["buckets"]),
        ]
        for k, t, u in window["buckets"]:
            args += [k, t, u]
        args.append(len(window["domains"]))
        for d, k in window["domains"]:
            args += [d, k]
        args.append(len(records))
        args += [json.dumps(r.to_dict(), separators=(",", ":")) for r in records]
        written = [*keys.scripted, keys.audit]
        if rows:
            written += outbox_keys(self.prefix, tenant)[:2]
            args += outbox_args(rows)
        try:
            if self.wait_replicas:
                result, acknowledged = commit_and_wait(
                    self._client, self._wire, keys, (self._commit.sha, COMMIT_LUA), written,
                    args, (self.wait_replicas, self.wait_timeout_ms),
                )  # fmt: skip
            else:
                result, acknowledged = self._commit(keys=written, args=args), None
        except ERRORS as exc:
            raise self._fail(f"write of tenant {shown(tenant)}", exc) from exc
        if not isinstance(result, int) or result == -1:
            return None
        if result == 1:
            self._register(tenant, force=True)
        if rows:
            self._alert_outbox().indexed([tenant])
        self._remember(tenant, result, state)
        if acknowledged is not None and acknowledged < self.wait_replicas:
            shortfall = (
                f"the write of tenant {shown(tenant)} is stored on the primary but "
                f"{acknowledged} of {self.wait_replicas} replicas acknowledged it within "
                f"{self.wait_timeout_ms} ms: a fail-over may lose it"
            )
            if strict:
                raise StoreUnavailable(f"Redis store: {shortfall}")
            self.replication_shortfalls += 1
            _log.warning("Redis store: %s", shortfall)
        return result

    def _remember(self, tenant: str, version: int, state: TenantState) -> None:
        """Keep our own copy of *state* at *version* (the hot path then returns no snapshot)."""
        with self._lock:
            if len(self._cache) >= 10_000:
                self._cache.clear()
            self._cache[tenant] = (version, _copy(state))

    def _counted(
        self,
        machine: BlockMachine,
        tenant: str,
        version: int,
        at: float,
        effects: Effects,
        registered: bool,
        registrable: str | None,
        weight: int,
    ) -> TenantState | None:
        """The new state when the script counted on top of the version we hold: the same
        observation applied to our copy (None if we do not hold the version before)."""
        with self._lock:
            cached = self._cache.get(tenant)
            if cached is None or cached[0] != version - 1:
                return None
            state, local = machine.observe(
                cached[1], at, registered=registered, registrable=registrable, weight=weight
            )
            if local != effects:  # pragma: no cover - the script and the machine disagree
                del self._cache[tenant]
                return None
            self._cache[tenant] = (version, state)
            return _copy(state)

    def _backoff(self, attempt: int) -> None:
        if attempt >= 3:
            time.sleep(random.uniform(0, min(0.01, 0.0005 * attempt)))

    # ----------------------------------------------------------------- the contract

    def now(self) -> float:
        """The server's clock (``TIME``) in UTC epoch seconds.

        Raises:
            StoreUnavailable: the server cannot be reached.
        """
        self._check_open()
        try:
            seconds, micros = self._client.time()
        except ERRORS as exc:
            raise self._fail("TIME", exc) from exc
        return float(seconds) + int(micros) / 1000000

    def _observe_args(
        self,
        machine: BlockMachine,
        tenant: str,
        now: float,
        registered: bool,
        registrable: str | None,
        weight: int,
    ) -> tuple[Keys, list[str]]:
        """The keys and script arguments of one observation (the held version left blank).

        Raises:
            InvalidEvent: the arguments are malformed.
        """
        try:
            valid = (
                0.0 <= now < _MAX_NOW
                and weight.__class__ is int
                and 1 <= weight <= _MAX_WEIGHT
                and (registered or (registrable.__class__ is str and bool(registrable)))
            )
        except TypeError:
            valid = False
        if not valid:
            machine.observe(
                TenantState.new(tenant),
                now,
                registered=registered,
                registrable=registrable,
                weight=weight,
            )
            raise InvalidEvent(f"invalid weight {shown(weight)}: must be below 2**31 here")
        keys = self._tenant_keys(tenant)
        limits = self._limits.get(machine.policy)
        if limits is None:
            limits = self._limits[machine.policy] = limit_args(machine.policy)
        args = [
            "" if self.server_time else repr(float(now)),
            "1" if registered else "0",
            "" if registered else str(registrable),
            str(weight),
            *limits,
            "",
        ]
        return keys, args

    def _settle(
        self,
        machine: BlockMachine,
        tenant: str,
        keys: Keys,
        reply: object,
        registered: bool,
        registrable: str | None,
        weight: int,
    ) -> tuple[tuple[TenantState, Effects] | None, bool]:
        """Turn the hot-path script's reply into ``(state, effects)``, running the slow path
        (the machine in Python, then compare-and-set) when the script answered ``slow``.

        Returns:
            ``(outcome, created)``: *outcome* is None when the compare-and-set lost to another
            writer (observe again); *created* is True when the script created the tenant (it
            must be added to the registry).

        Raises:
            StoreUnavailable: Redis failed, or the reply or the stored state is corrupt.
        """
        if not isinstance(reply, list) or len(reply) not in (3, 6, 7):
            raise StoreUnavailable(f"Redis store: unexpected observe reply {shown(reply)}")
        try:
            outcome, at = _text(reply[0]), float(_text(reply[1]))
        except (TypeError, ValueError) as exc:
            raise StoreUnavailable(f"Redis store: bad observe reply {shown(reply)}") from exc
        if outcome != "slow":
            effects = EFFECTS.get(outcome)
            if effects is None or not isinstance(reply[2], int):
                raise StoreUnavailable(f"Redis store: bad observe reply {shown(reply)}")
            version = reply[2]
            if len(reply) == 3:
                counted = self._counted(
                    machine, tenant, version, at, effects, registered, registrable, weight
                )
                if counted is not None:
                    return (counted, effects), version == 1
                version, state = self._read(tenant, keys)  # our copy moved on meanwhile
            else:
                version, state = self._parse(tenant, reply[3:])
            self._remember(tenant, version, state)
            return (state, effects), reply[2] == 1
        if len(reply) != 6:
            raise StoreUnavailable(f"Redis store: unexpected observe reply {shown(reply)}")
        version, state = self._parse(tenant, reply[2:])
        before = state.state
        new, effects = machine.observe(
            state, at, registered=registered, registrable=registrable, weight=weight
        )
        records = audit_records(tenant, at, "observe", None, {}, before, new.state, effects)
        rows = transition_rows(self.alert_route, machine, new, effects.alerts, at)
        if self._write(tenant, keys, version, new, records, rows, strict=False) is not None:
            return (new, effects), False  # _write registers a tenant it creates
        return None, False

    def observation_clock(self) -> Callable[[], float]:
        """`time.time` with ``server_time=True`` (the script reads the server's ``TIME`` and
        only validates the caller's *now*), else `now` (the server's ``TIME``)."""
        return time.time if self.server_time else self.now

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
        """Count one relayed message atomically (one Lua script; see the module docstring).

        With ``server_time=True`` the server's ``TIME`` replaces *now* (which must still be
        valid).  *weight* must be below 2**31 in this store.

        Raises:
            StoreUnavailable: Redis failed or timed out; the message may or may not have been
                counted if the failure came after the script was sent.
            InvalidEvent: the arguments are malformed; nothing was counted.
        """
        self._check_open()
        keys, args = self._observe_args(machine, tenant, now, registered, registrable, weight)
        self._register(tenant)
        wire = None if self._cluster else self._wire
        packed = b""
        if wire is not None:
            # packed once per call: the keys and the limits come packed from their caches
            packed = wire.item(keys, args, wire.limits(machine.policy))
        for attempt in range(self.max_attempts):
            held = self._cache.get(tenant)
            try:
                if wire is not None:
                    reply = self._one(wire, packed, held)
                else:
                    args[-1] = "" if held is None else str(held[0])
                    reply = self._observe(keys=keys.scripted, args=args)
            except ERRORS as exc:
                raise self._fail(f"observe for tenant {shown(tenant)}", exc) from exc
            outcome, created = self._settle(
                machine, tenant, keys, reply, registered, registrable, weight
            )
            if created:
                self._register(tenant, force=True)
            if outcome is not None:
                return outcome
            self._backoff(attempt)
        raise StoreUnavailable(
            f"Redis store: observe for tenant {shown(tenant)} lost {self.max_attempts} "
            "compare-and-set races in a row"
        )

    def _one(self, wire: Wire, packed: bytes, held: tuple[int, TenantState] | None) -> object:
        """The hot-path script of one observation packed by `Wire` (the same command as a
        batch's item, without a round token) and sent on the client's pool; the script loaded
        again if the server lost it.

        Raises:
            redis.RedisError: the round trip failed, or the script failed.
        """
        version = b"" if held is None else b"%d" % held[0]
        # keys and fixed arguments, held version, no round token, k = 0, no item follows
        tail = b"%b$%d\r\n%b\r\n$0\r\n\r\n%b%b" % (packed, len(version), version, LAST, LAST)
        (reply,) = wire.round(wire.head(self._observe.sha) + tail, 1)
        if isinstance(reply, NoScriptError):  # the script cache was flushed: load it again
            self._observe.sha = self._client.script_load(OBSERVE_LUA)
            (reply,) = wire.round(wire.head(self._observe.sha) + tail, 1)
        if isinstance(reply, Exception):
            raise reply
        return reply

    def observe_many(
        self,
        machine: BlockMachine,
        items: Iterable[ObserveItem],
        now: float | Sequence[float],
    ) -> list[ObserveResult]:
        """`StateStore.observe_many` with the hot-path scripts of the batch pipelined: one round
        trip for the whole batch when nothing changes state.

        The batch is sent in *rounds*, each one ``EVALSHA`` per pending item in one write
        (packed by the store on a plain ``redis.Redis`` and, per node, on Redis Cluster, else
        redis-py's non-transactional pipeline; see the module docstring), the replies processed
        in order.  Every script of a round carries the round's token and its rank ``k`` among
        that tenant's items in the round; the script applies item ``k > 0`` only if the tenant's
        ``k`` earlier items of the round were all applied (a counter under the token in
        ``<prefix>{<tenant>}:seq``), and otherwise answers ``deferred`` and applies nothing.  So
        when an item takes the slow path (it would block, suspend or warn: the script applies
        nothing and Python runs the machine and a compare-and-set), or fails, or met a flushed
        script cache, the tenant's later items of the round are not counted against the state
        before it: they go to the next round, after the slow item has been written.  Other MTAs
        may interleave their observations anywhere, exactly as between calls to `observe`.

        The results (decisions, effects, audit records, final states) are those of calling
        `observe` for each item in turn.  Each item is validated as `observe` validates it
        (an `InvalidEvent` result, never sent).  A Redis failure during a round gives every
        item of that round the `StoreUnavailable`; like `observe`, an item whose script was
        sent may or may not have been counted, and is never counted twice.

        Raises:
            InvalidEvent: *now* is a sequence whose length is not the number of items.
        """
        batch = list(items)
        times = batch_times(now, len(batch))
        results: list[ObserveResult | None] = [None] * len(batch)
        if self._closed:
            closed = StoreUnavailable("Redis store is closed")
            return [closed] * len(batch)
        prepared: dict[int, Prepared] = {}
        wire = self._wire
        limits = b"" if wire is None else wire.limits(machine.policy)
        for index, ((tenant, registered, registrable, weight), at) in enumerate(
            zip(batch, times, strict=True)
        ):
            try:
                keys, args = self._observe_args(
                    machine, tenant, at, registered, registrable, weight
                )
            except InvalidEvent as exc:
                results[index] = exc
            else:
                packed = b"" if wire is None else wire.item(keys, args, limits)
                prepared[index] = (keys, args, packed)
        unknown = sorted({batch[i][0] for i in prepared} - self._known)
        if unknown:
            try:
                self._client.sadd(self._registry, *unknown)
            except ERRORS as exc:
                failed = self._fail("tenant registration", exc)
                for index in [i for i in prepared if batch[i][0] in unknown]:
                    results[index] = failed
                    del prepared[index]
            else:
                self._known.update(unknown)
        pending = list(prepared)
        attempts: dict[int, int] = {}
        reloads = 0
        while pending:
            replies = self._round(batch, prepared, pending)
            if isinstance(replies, StoreUnavailable):
                for index in pending:
                    results[index] = replies
                break
            retry: list[int] = []
            waiting: set[str] = set()  # tenants with an item left for the next round
            created: dict[str, list[int]] = {}
            for index, reply in zip(pending, replies, strict=True):
                tenant, registered, registrable, weight = batch[index]
                if _deferred(reply):
                    retry.append(index)
                    waiting.add(tenant)
                    continue
                if isinstance(reply, NoScriptError) or (
                    self._cluster and isinstance(reply, NOT_RUN)
                ):  # the script cache was flushed, or the slot moved: not run
                    if reloads >= 3:
                        results[index] = self._fail(f"observe for tenant {shown(tenant)}", reply)
                        continue
                    retry.append(index)
                    waiting.add(tenant)
                    continue
                if tenant in waiting:  # pragma: no cover - the script's guard makes this impossible
                    results[index] = StoreUnavailable(
                        f"Redis store: batch order broken for tenant {shown(tenant)}"
                    )
                    continue
                if isinstance(reply, StoreUnavailable):  # its node failed (Cluster)
                    results[index] = reply
                    continue
                if isinstance(reply, Exception):
                    results[index] = self._fail(f"observe for tenant {shown(tenant)}", reply)
                    continue
                keys = prepared[index][0]
                try:
                    outcome, new = self._settle(
                        machine, tenant, keys, reply, registered, registrable, weight
                    )
                except StoreUnavailable as exc:
                    results[index] = exc
                    continue
                if new:
                    created.setdefault(tenant, []).append(index)
                if outcome is not None:
                    results[index] = outcome
                    continue
                attempts[index] = tries = attempts.get(index, 0) + 1
                if tries >= self.max_attempts:
                    results[index] = StoreUnavailable(
                        f"Redis store: observe for tenant {shown(tenant)} lost "
                        f"{self.max_attempts} compare-and-set races in a row"
                    )
                    continue
                self._backoff(tries - 1)
                retry.append(index)
                waiting.add(tenant)
            if any(isinstance(r, NoScriptError) for r in replies):
                reloads += 1
                try:
                    self._observe.sha = self._client.script_load(OBSERVE_LUA)
                except ERRORS as exc:
                    failed = self._fail("script load", exc)
                    for index in retry:
                        results[index] = failed
                    retry = []
            elif isinstance(self._client, redis.RedisCluster) and any(
                isinstance(r, NOT_RUN) for r in replies
            ):
                reloads += 1  # the slot table is stale, or a slot is migrating: refresh it
                time.sleep(0.01 * reloads)
                try:
                    self._client.nodes_manager.initialize()
                except ERRORS as exc:
                    failed = self._fail("cluster slot table refresh", exc)
                    for index in retry:
                        results[index] = failed
                    retry = []
            if created:
                try:
                    self._client.sadd(self._registry, *created)
                except ERRORS as exc:
                    failed = self._fail("tenant registration", exc)
                    for indexes in created.values():
                        for index in indexes:
                            results[index] = failed
                else:
                    self._known.update(created)
            pending = retry
        return cast(list[ObserveResult], results)

    def _round(
        self,
        batch: Sequence[ObserveItem],
        prepared: Mapping[int, Prepared],
        pending: Sequence[int],
    ) -> list[object] | StoreUnavailable:
        """Send one round of a batch: an ``EVALSHA`` per pending item, pipelined; return the
        replies in order (an exception object for an item whose script failed), or the
        `StoreUnavailable` of a failed round trip.

        On a plain ``redis.Redis`` the round is packed by `Wire` and sent in one write, on Redis
        Cluster packed and split by node (`_cluster_round`; a node's failure is the
        `StoreUnavailable` in place of each of its items' replies); on any other client (a
        subclass) it goes through redis-py's pipeline.  All send the same commands and return
        the same replies."""
        token = f"{self._token_base}{next(self._rounds)}"
        total: dict[str, int] = {}
        for index in pending:
            tenant = batch[index][0]
            total[tenant] = total.get(tenant, 0) + 1
        wire = self._wire
        if wire is None:
            return self._pipelined(batch, prepared, pending, token, total)
        rank: dict[str, int] = {}
        cache = self._cache
        head = wire.head(self._observe.sha)
        packed_token = wire.bulk(token)
        commands: list[bytes] = []
        for index in pending:
            tenant = batch[index][0]
            k = rank.get(tenant, 0)
            rank[tenant] = k + 1
            held = cache.get(tenant)
            version = b"" if held is None else b"%d" % (held[0] + k)
            rank_k = b"%d" % k
            # head, keys and fixed arguments, held version, token, k, more items follow
            commands.append(
                b"%b%b$%d\r\n%b\r\n%b$%d\r\n%b\r\n%b"
                % (
                    head,
                    prepared[index][2],
                    len(version),
                    version,
                    packed_token,
                    len(rank_k),
                    rank_k,
                    MORE if k + 1 < total[tenant] else LAST,
                )
            )
        if isinstance(self._client, redis.RedisCluster):
            return cluster_round(self._client, wire, prepared, pending, commands, self._fail)
        try:
            return wire.round(b"".join(commands), len(commands))
        except ERRORS as exc:
            return self._fail(f"observe batch of {len(pending)}", exc)

    def _pipelined(
        self,
        batch: Sequence[ObserveItem],
        prepared: Mapping[int, Prepared],
        pending: Sequence[int],
        token: str,
        total: Mapping[str, int],
    ) -> list[object] | StoreUnavailable:
        """`_round` through redis-py's pipeline (other clients: subclasses, fakes)."""
        rank: dict[str, int] = {}
        sha = self._observe.sha
        try:
            with self._client.pipeline(transaction=False) as pipe:
                for index in pending:
                    tenant = batch[index][0]
                    keys, args, _ = prepared[index]
                    k = rank.get(tenant, 0)
                    rank[tenant] = k + 1
                    held = self._cache.get(tenant)
                    args[-1] = "" if held is None else str(held[0] + k)
                    pipe.evalsha(
                        sha,
                        5,
                        *keys.batched,
                        *args,
                        token,
                        str(k),
                        "1" if k + 1 < total[tenant] else "0",
                    )
                replies: list[object] = pipe.execute(raise_on_error=False)
        except ERRORS as exc:
            return self._fail(f"observe batch of {len(pending)}", exc)
        return replies

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
        """Run an administrative event with compare-and-set on the tenant's version.

        The mutation may run more than once (on a conflict); it must be a pure function of the
        state and *now*, as every `BlockMachine` method is.

        Raises:
            StoreUnavailable: Redis failed, or the write lost every compare-and-set attempt.
            InvalidTransition: the machine refused the event; nothing changed.
        """
        self._check_open()
        keys = self._tenant_keys(tenant)
        for attempt in range(self.max_attempts):
            version, state = self._read(tenant, keys)
            new, effects = mutation(state, now)
            records = audit_records(
                tenant, now, action, actor, detail or {}, state.state, new.state, effects
            )
            self._register(tenant)
            rows = transition_rows(self.alert_route, None, new, effects.alerts, now)
            if self._write(tenant, keys, version, new, records, rows, strict=True) is not None:
                return new, effects
            self._backoff(attempt)
        raise StoreUnavailable(
            f"Redis store: {action} for tenant {shown(tenant)} lost {self.max_attempts} "
            "compare-and-set races in a row"
        )

    def load(self, tenant: str) -> TenantState:
        """The tenant's current state, read atomically.

        Raises:
            StoreUnavailable: Redis failed or holds a corrupt state.
        """
        self._check_open()
        return self._read(tenant, self._tenant_keys(tenant))[1]

    def history(self, tenant: str, *, limit: int | None = None) -> list[AuditRecord]:
        """The tenant's audit trail, oldest first (the newest *limit* records if given).

        Raises:
            StoreUnavailable: Redis failed or holds a corrupt record.
        """
        self._check_open()
        keys = self._tenant_keys(tenant)
        try:
            rows = self._client.lrange(keys.audit, -int(limit) if limit else 0, -1)
        except ERRORS as exc:
            raise self._fail(f"history of tenant {shown(tenant)}", exc) from exc
        try:
            return [AuditRecord.from_dict(json.loads(_text(row))) for row in rows]
        except (TypeError, ValueError, AttributeError) as exc:
            raise StoreUnavailable(f"Redis store: corrupt audit record: {exc}") from exc

    def tenants(self) -> list[str]:
        """Every tenant with a stored state, sorted.  An admin operation: it reads the registry
        set (``<prefix>tenants``) and checks each member's state key.

        Raises:
            StoreUnavailable: Redis failed.
        """
        self._check_open()
        try:
            members = sorted(_text(m) for m in self._client.smembers(self._registry))
            pipe = self._client.pipeline(transaction=False)
            for member in members:
                pipe.exists(Keys(self.prefix, member).state)
            present = pipe.execute()
        except ERRORS as exc:
            raise self._fail("tenants", exc) from exc
        except (TypeError, UnicodeDecodeError) as exc:
            raise StoreUnavailable(f"Redis store: corrupt tenant registry: {exc}") from exc
        return [m for m, here in zip(members, present, strict=True) if here]

    # -- the alert outbox (see `domainpolicy._stores.redis_outbox`) ---------------------

    def _alert_outbox(self) -> RedisOutbox:
        outbox: RedisOutbox | None = getattr(self, "_outbox", None)
        if outbox is None:
            outbox = self._outbox = RedisOutbox(self._client, self.prefix, self._registry)
        return outbox

    def enqueue_alerts(self, rows: Sequence[OutboxRow]) -> int:
        self._check_open()
        return self._alert_outbox().enqueue(rows)

    def claim_alerts(
        self, sinks: Sequence[str], now: float, *, lease: float, owner: str, limit: int = 100
    ) -> list[OutboxRow]:
        self._check_open()
        return self._alert_outbox().claim(sinks, now, lease, owner, limit)

    def ack_alert(self, row_id: str, now: float) -> bool:
        self._check_open()
        return self._alert_outbox().ack(row_id, now)

    def fail_alert(
        self, row_id: str, owner: str, now: float, *, error: str, retry_at: float | None
    ) -> bool:
        self._check_open()
        return self._alert_outbox().fail(row_id, owner, now, error, retry_at)

    def retry_alert(self, row_id: str, now: float) -> bool:
        self._check_open()
        return self._alert_outbox().retry(row_id, now)

    def alert_rows(self, *, status: str | None = None, limit: int = 100) -> list[OutboxRow]:
        self._check_open()
        return self._alert_outbox().rows(status, limit)

    def close(self) -> None:
        """Close the connections of a client the store made; the store may not be used after."""
        if self._closed:
            return
        self._closed = True
        if self._owns_client:
            self._client.close()
