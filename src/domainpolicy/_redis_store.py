"""`RedisStore`: tenant block state shared by a fleet of MTAs, in Redis (or Redis Cluster).

Key layout
----------
Every key of one tenant carries the tenant in a Redis Cluster hash tag, so all of them live in
one slot and one Lua script may touch them together::

    <prefix>{<tenant>}:state     hash: v (version), st (state), head, T, U, warned, pu, doc
    <prefix>{<tenant>}:bt        hash: bucket index -> relayed weight (t[k])
    <prefix>{<tenant>}:bu        hash: bucket index -> unregistered weight (u[k]; absent = 0)
    <prefix>{<tenant>}:dom       hash: registrable domain -> bucket last seen (last[d])
    <prefix>{<tenant>}:audit     list: audit records (JSON), oldest first
    <prefix>tenants              set: every tenant id seen (an admin index, not per slot)

``<prefix>`` defaults to ``dp:``.  ``<tenant>`` is the tenant id percent-encoded (UTF-8; every
byte outside ``A-Z a-z 0-9 - . _ ~ @ + = :`` becomes ``%XX``), so ``{``, ``}``, ``%`` and control
characters never reach the key: a hostile id cannot end the hash tag early, move another tenant's
keys into its slot, or collide with another id (the encoding is injective).  ``pu`` is the
probation deadline (absent: none), ``warned`` the bucket of the last warning (absent: none),
``doc`` the JSON of the rest of `TenantState.to_dict` (offences, block and checklist,
connectors); a tenant first seen by the hot path has no ``doc`` yet and reads as a fresh one.

The hot path: one Lua script
----------------------------
`RedisStore.observe` is one ``EVALSHA`` (loaded with redis-py ``register_script``; after a
``SCRIPT FLUSH`` or a fail-over redis-py loads it again).  The script takes ``now`` from the
server's ``TIME`` (or from the caller with ``server_time=False``), then mirrors the counting
model of ``domainpolicy._blockstate`` exactly: ``b = floor(now / S)``; if ``b > head`` it expires
the buckets and domains ``<= b - N`` and moves ``head``; it adds the weight to bucket ``head``
(and to ``u[head]`` and ``last[d]`` for unregistered mail, ``last`` capped at ``CAP`` names),
and decides with the limits in force (probation while ``now < pu``):

* **accept**, **refuse 5.7.750** or **refuse 5.7.705** with no change of state and no alert:
  the script applies the counts, bumps ``v`` and answers -- one round trip.  The store keeps a
  copy of each tenant's state with its version; when the script counted on top of the version
  the caller holds, it answers only the decision, time and new version, and the store applies
  the same observation to its copy (the state it returns); otherwise it also returns a snapshot;
* anything else -- the message that crosses a limit (block), a blocked tenant over the
  suspension threshold (suspend), or an ``approaching_limit`` alert: the script applies
  **nothing** and answers ``slow`` with the time it used and a consistent snapshot.  Python
  rebuilds the `TenantState`, runs the real `BlockMachine.observe` with that time and writes
  the whole state plus its audit record with a compare-and-set script on ``v``.  If another
  writer got in between (``v`` moved), the observation starts over with the hot-path script.

So the state machine lives in one place (Python), every count is applied exactly once, and the
block happens once, at the crossing message, whatever the number of MTAs: concurrent writers
that see the crossing all go to the slow path, one compare-and-set wins, the others retry and
find the tenant blocked.  Administrative events (`RedisStore.apply`) read a snapshot, run the
mutation in Python and write with the same compare-and-set (bounded retries).

Server time and clock skew
--------------------------
With ``server_time=True`` (the default) the hot path ignores the caller's ``now`` and uses the
master's ``TIME``, so the clocks of the MTAs do not matter: one clock moves every window.  The
audit record of a block carries that time.  Administrative events use the ``now`` their caller
passes (take it from `RedisStore.now`, the server's ``TIME``).  If the master's clock jumps
backwards (a fail-over to a replica whose clock is behind), observations are counted in the
newest bucket already seen, as the counting model specifies: nothing is lost, windows just last
longer (fails closed).  ``server_time=False`` uses the caller's ``now`` (deterministic tests).

Redis Cluster
-------------
Every script touches the keys of one tenant only, all in one slot (hash tag), so the scripts run
unchanged on Redis Cluster (pass a ``redis.RedisCluster`` client).  The ``tenants`` set is the
one key outside the tenant's slot: it is written with a separate command (before the first write
for a tenant in each process, and again when a script reports that it created the tenant), and
`RedisStore.tenants` (an admin operation: ``SMEMBERS`` plus an ``EXISTS`` per member) lists the
members that have a stored state.

Fail-over and what it can lose
------------------------------
Redis replicates asynchronously.  A master that dies before its replica received the latest
writes takes them with it: the counts of the last moments (typically milliseconds, up to the
replication lag) and, in the worst case, a block, a suspension or an admin event that had just
been acknowledged.  Counts that are lost only make the window more lenient by that amount; a
lost block is made again by the next message over the limit, because the counts that caused it
are still being sent.  A lost administrative event (an approval) must be repeated; its audit
record is lost with it.  ``WAIT 1 <ms>`` after admin events, or ``min-replicas-to-write``, narrow
the gap; persistence (AOF with ``appendfsync always``/``everysec``) covers restarts of a single
server, not fail-over.

Failures
--------
Every Redis error -- cannot connect, timed out (``socket_timeout`` and
``socket_connect_timeout`` default to 0.5 s, and redis-py's own retries are off so that a script
that may have run is never sent twice), a script error, corrupt data -- is raised as
`StoreUnavailable`; the policy answers such a message with a temporary failure.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final
from urllib.parse import quote

import attrs
import redis
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.retry import Retry

from ._blockstate import (
    STATE_SCHEMA_VERSION,
    BlockMachine,
    BlockPolicy,
    Effects,
    InvalidEvent,
    InvalidTenantState,
    State,
    TenantState,
    Verdict,
)
from ._errors import InvalidConfiguration, StoreUnavailable, shown
from ._stores import AuditRecord, Mutation, StateStore, audit_records

__all__ = ["DEFAULT_PREFIX", "DEFAULT_TIMEOUT", "RedisStore"]

DEFAULT_PREFIX: Final = "dp:"
"""Prefix of every key the store writes."""

DEFAULT_TIMEOUT: Final = 0.5
"""Default socket and connect timeout in seconds: an MTA never waits longer on Redis."""

_SAFE: Final = "-._~@+=:"
_MAX_WEIGHT: Final = 2**31 - 1
_MAX_NOW: Final = 1e12

# --------------------------------------------------------------------------- Lua

_OBSERVE_LUA: Final = r"""
-- KEYS: 1 state, 2 bt, 3 bu, 4 dom
-- ARGV: 1 now ('' = server TIME), 2 registered ('1'/'0'), 3 registrable, 4 weight,
--       5 S, 6 N, 7 CAP, 8 M, 9 D, 10 WM, 11 WD, 12 PM, 13 PD, 14 PWM, 15 PWD, 16 SM,
--       17 R ('' = none), 18 the version the caller holds ('' = none)
if redis.replicate_commands then pcall(redis.replicate_commands) end
local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
else
  now = tonumber(ARGV[1])
end
local registered = ARGV[2] == '1'
local d = ARGV[3]
local w = tonumber(ARGV[4])
local S, N, CAP = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local f = redis.call('HMGET', KEYS[1], 'v', 'st', 'head', 'T', 'U', 'warned', 'pu')
local v = tonumber(f[1]) or 0
local st = f[2] or 'active'
if st ~= 'active' and st ~= 'blocked' and st ~= 'unblock_requested' and st ~= 'suspended' then
  return redis.error_reply('corrupt tenant state ' .. tostring(st))
end
local head = tonumber(f[3]) or 0
local T = tonumber(f[4]) or 0
local U = tonumber(f[5]) or 0
local b = math.floor(now / S)
local newhead = head
local cutoff = nil
local xb, xd = {}, {}
local ndom = redis.call('HLEN', KEYS[4])
if b > head then
  -- time moved forward: find what expires (applied below, only on the hot path)
  newhead = b
  cutoff = b - N
  local bt = redis.call('HGETALL', KEYS[2])
  for i = 1, #bt, 2 do
    if tonumber(bt[i]) <= cutoff then
      T = T - tonumber(bt[i + 1])
      xb[#xb + 1] = bt[i]
    end
  end
  local bu = redis.call('HGETALL', KEYS[3])
  for i = 1, #bu, 2 do
    if tonumber(bu[i]) <= cutoff then U = U - tonumber(bu[i + 1]) end
  end
  if ndom > 0 then
    local dm = redis.call('HGETALL', KEYS[4])
    for i = 1, #dm, 2 do
      if tonumber(dm[i + 1]) <= cutoff then xd[#xd + 1] = dm[i] end
    end
    ndom = ndom - #xd
  end
end
T = T + w
local decision
local slow = false
local add = false
if registered then
  if st == 'suspended' then decision = '705' else decision = 'accept' end
else
  U = U + w
  local seen = false
  local k = redis.call('HGET', KEYS[4], d)
  if k and not (cutoff and tonumber(k) <= cutoff) then seen = true end
  add = seen or ndom < CAP
  local distinct = ndom
  if add and not seen then distinct = ndom + 1 end
  if st == 'active' then
    local o = 7  -- limits in force: normal (ARGV 8-11) or probation (ARGV 12-15)
    if f[7] and now < tonumber(f[7]) then o = 11 end
    local M, D = tonumber(ARGV[o + 1]), tonumber(ARGV[o + 2])
    local WM, WD = tonumber(ARGV[o + 3]), tonumber(ARGV[o + 4])
    if U > WM or distinct > WD then
      local R = tonumber(ARGV[17])
      if R == nil or U > R * T then
        if U > M or distinct > D then
          slow = true
        else
          local warned = tonumber(f[6])
          if warned == nil or warned <= newhead - N then slow = true end
        end
      end
    end
    decision = 'accept'
  elseif st == 'suspended' then
    decision = '705'
  else
    if U > tonumber(ARGV[16]) then slow = true end
    decision = '750'
  end
end
local nowstr = string.format('%.17g', now)
if slow then
  return {'slow', nowstr, redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2]),
          redis.call('HGETALL', KEYS[3]), redis.call('HGETALL', KEYS[4])}
end
for i = 1, #xb do
  redis.call('HDEL', KEYS[2], xb[i])
  redis.call('HDEL', KEYS[3], xb[i])
end
for i = 1, #xd do redis.call('HDEL', KEYS[4], xd[i]) end
local hk = string.format('%d', newhead)
redis.call('HINCRBY', KEYS[2], hk, w)
if not registered then
  redis.call('HINCRBY', KEYS[3], hk, w)
  if add then redis.call('HSET', KEYS[4], d, hk) end
end
redis.call('HSET', KEYS[1], 'v', string.format('%d', v + 1), 'st', st, 'head', hk,
           'T', string.format('%d', T), 'U', string.format('%d', U))
if tonumber(ARGV[18]) == v then
  -- the caller holds version v: it applies the same counts to its copy
  return {decision, nowstr, v + 1}
end
return {decision, nowstr, v + 1, redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2]),
        redis.call('HGETALL', KEYS[3]), redis.call('HGETALL', KEYS[4])}
"""

_SNAPSHOT_LUA: Final = r"""
-- KEYS: 1 state, 2 bt, 3 bu, 4 dom
return {redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2]),
        redis.call('HGETALL', KEYS[3]), redis.call('HGETALL', KEYS[4])}
"""

_COMMIT_LUA: Final = r"""
-- KEYS: 1 state, 2 bt, 3 bu, 4 dom, 5 audit
-- ARGV: 1 expected v, 2 st, 3 head, 4 T, 5 U, 6 warned ('' = none), 7 pu ('' = none), 8 doc,
--       9 nb, nb x (k, t, u), nd, nd x (d, k), na, na x record
local v = tonumber(redis.call('HGET', KEYS[1], 'v')) or 0
if v ~= tonumber(ARGV[1]) then return -1 end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
redis.call('HSET', KEYS[1], 'v', string.format('%d', v + 1), 'st', ARGV[2], 'head', ARGV[3],
           'T', ARGV[4], 'U', ARGV[5], 'doc', ARGV[8])
if ARGV[6] == '' then redis.call('HDEL', KEYS[1], 'warned')
else redis.call('HSET', KEYS[1], 'warned', ARGV[6]) end
if ARGV[7] == '' then redis.call('HDEL', KEYS[1], 'pu')
else redis.call('HSET', KEYS[1], 'pu', ARGV[7]) end
local i = 9
local nb = tonumber(ARGV[i]); i = i + 1
for _ = 1, nb do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  if ARGV[i + 2] ~= '0' then redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 2]) end
  i = i + 3
end
local nd = tonumber(ARGV[i]); i = i + 1
for _ = 1, nd do
  redis.call('HSET', KEYS[4], ARGV[i], ARGV[i + 1])
  i = i + 2
end
local na = tonumber(ARGV[i]); i = i + 1
for _ = 1, na do
  redis.call('RPUSH', KEYS[5], ARGV[i])
  i = i + 1
end
return v + 1
"""

_EFFECTS: Final[dict[str, Effects]] = {
    "accept": Effects(Verdict.ACCEPT),
    "750": Effects(Verdict.REFUSE_UNREGISTERED),
    "705": Effects(Verdict.REFUSE_THRESHOLD),
}

_Snapshot = tuple[int, TenantState]


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, str):
        return value
    raise TypeError(f"expected a Redis string, got {shown(value)}")


def _pairs(flat: object) -> dict[str, str]:
    if not isinstance(flat, list) or len(flat) % 2:
        raise TypeError(f"expected a flat list of field/value pairs, got {shown(flat)}")
    return {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat), 2)}


def _copy(state: TenantState) -> TenantState:
    return attrs.evolve(state, window=state.window.copy())


def _limit_args(policy: BlockPolicy) -> tuple[str, ...]:
    normal, probation = policy.limits(), policy.limits(probation=True)
    share = policy.min_unregistered_share
    return (
        str(policy.bucket_seconds),
        str(policy.buckets),
        str(policy.max_tracked_domains),
        str(normal.messages),
        str(normal.domains),
        str(normal.warn_messages),
        str(normal.warn_domains),
        str(probation.messages),
        str(probation.domains),
        str(probation.warn_messages),
        str(probation.warn_domains),
        str(normal.suspend_messages),
        "" if share is None else repr(float(share)),
    )


class _Keys:
    """The keys of one tenant (all in one Cluster slot)."""

    __slots__ = ("audit", "scripted", "state")

    def __init__(self, prefix: str, tenant: str) -> None:
        base = f"{prefix}{{{quote(tenant, safe=_SAFE)}}}:"
        self.state = base + "state"
        self.audit = base + "audit"
        self.scripted = [self.state, base + "bt", base + "bu", base + "dom"]


class RedisStore(StateStore):
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

    Raises:
        InvalidConfiguration: an option is invalid.
    """

    kind = "redis"

    def __init__(
        self,
        client: redis.Redis | None = None,
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
        self._client: redis.Redis = client
        self.prefix = prefix
        self.server_time = bool(server_time)
        self.max_attempts = max_attempts
        self._registry = prefix + "tenants"
        self._observe: Script = client.register_script(_OBSERVE_LUA)
        self._snapshot: Script = client.register_script(_SNAPSHOT_LUA)
        self._commit: Script = client.register_script(_COMMIT_LUA)
        self._keys: dict[str, _Keys] = {}
        self._known: set[str] = set()
        self._cache: dict[str, tuple[int, TenantState]] = {}
        self._limits: dict[BlockPolicy, tuple[str, ...]] = {}
        self._lock = threading.Lock()
        self._closed = False

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
        **redis_options: Any,
    ) -> RedisStore:
        """Open a store from ``redis://[user:password@]host:port/db``, ``rediss://...`` (TLS) or
        ``unix:///path/to/socket?db=N``; extra keyword arguments go to ``redis.Redis.from_url``.

        Raises:
            InvalidConfiguration: the URL or an option is invalid.
        """
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
        try:
            store = cls(
                client,
                prefix=prefix,
                server_time=server_time,
                socket_timeout=socket_timeout,
                connect_timeout=connect_timeout,
                max_attempts=max_attempts,
            )
        except BaseException:
            client.close()
            raise
        store._owns_client = True
        return store

    def __enter__(self) -> RedisStore:
        return self

    # ----------------------------------------------------------------- plumbing

    def _tenant_keys(self, tenant: str) -> _Keys:
        keys = self._keys.get(tenant)
        if keys is None:
            if not isinstance(tenant, str) or not tenant.strip() or len(tenant) > 4096:
                TenantState.new(tenant)  # raises the machine's own InvalidEvent
                raise InvalidEvent(f"invalid tenant {shown(tenant)}")  # pragma: no cover
            keys = _Keys(self.prefix, tenant)
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
        except redis.RedisError as exc:
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

    def _read(self, tenant: str, keys: _Keys) -> _Snapshot:
        try:
            reply = self._snapshot(keys=keys.scripted, args=[])
        except redis.RedisError as exc:
            raise self._fail(f"read of tenant {shown(tenant)}", exc) from exc
        if not isinstance(reply, list) or len(reply) != 4:
            raise StoreUnavailable(f"Redis store: unexpected snapshot reply {shown(reply)}")
        return self._parse(tenant, reply)

    def _write(
        self,
        tenant: str,
        keys: _Keys,
        version: int,
        state: TenantState,
        records: Sequence[AuditRecord],
    ) -> int | None:
        """Write *state* and *records* if the stored version is still *version*; return the new
        version, or None when another writer got in first."""
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
        try:
            result = self._commit(keys=[*keys.scripted, keys.audit], args=args)
        except redis.RedisError as exc:
            raise self._fail(f"write of tenant {shown(tenant)}", exc) from exc
        if not isinstance(result, int) or result == -1:
            return None
        if result == 1:
            self._register(tenant, force=True)
        self._remember(tenant, result, state)
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
        except redis.RedisError as exc:
            raise self._fail("TIME", exc) from exc
        return float(seconds) + int(micros) / 1000000

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
            limits = self._limits[machine.policy] = _limit_args(machine.policy)
        args = [
            "" if self.server_time else repr(float(now)),
            "1" if registered else "0",
            "" if registered else str(registrable),
            str(weight),
            *limits,
            "",
        ]
        self._register(tenant)
        for attempt in range(self.max_attempts):
            held = self._cache.get(tenant)
            args[-1] = "" if held is None else str(held[0])
            try:
                reply = self._observe(keys=keys.scripted, args=args)
            except redis.RedisError as exc:
                raise self._fail(f"observe for tenant {shown(tenant)}", exc) from exc
            if not isinstance(reply, list) or len(reply) not in (3, 6, 7):
                raise StoreUnavailable(f"Redis store: unexpected observe reply {shown(reply)}")
            try:
                outcome, at = _text(reply[0]), float(_text(reply[1]))
            except (TypeError, ValueError) as exc:
                raise StoreUnavailable(f"Redis store: bad observe reply {shown(reply)}") from exc
            if outcome != "slow":
                effects = _EFFECTS.get(outcome)
                if effects is None or not isinstance(reply[2], int):
                    raise StoreUnavailable(f"Redis store: bad observe reply {shown(reply)}")
                version = reply[2]
                if version == 1:
                    self._register(tenant, force=True)
                if len(reply) == 3:
                    counted = self._counted(
                        machine, tenant, version, at, effects, registered, registrable, weight
                    )
                    if counted is not None:
                        return counted, effects
                    version, state = self._read(tenant, keys)  # our copy moved on meanwhile
                else:
                    version, state = self._parse(tenant, reply[3:])
                self._remember(tenant, version, state)
                return state, effects
            if len(reply) != 6:
                raise StoreUnavailable(f"Redis store: unexpected observe reply {shown(reply)}")
            version, state = self._parse(tenant, reply[2:])
            before = state.state
            new, effects = machine.observe(
                state, at, registered=registered, registrable=registrable, weight=weight
            )
            records = audit_records(tenant, at, "observe", None, {}, before, new.state, effects)
            if self._write(tenant, keys, version, new, records) is not None:
                return new, effects
            self._backoff(attempt)
        raise StoreUnavailable(
            f"Redis store: observe for tenant {shown(tenant)} lost {self.max_attempts} "
            "compare-and-set races in a row"
        )

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
            if self._write(tenant, keys, version, new, records) is not None:
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
        except redis.RedisError as exc:
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
                pipe.exists(_Keys(self.prefix, member).state)
            present = pipe.execute()
        except redis.RedisError as exc:
            raise self._fail("tenants", exc) from exc
        except (TypeError, UnicodeDecodeError) as exc:
            raise StoreUnavailable(f"Redis store: corrupt tenant registry: {exc}") from exc
        return [m for m, here in zip(members, present, strict=True) if here]

    def close(self) -> None:
        """Close the connections of a client the store made; the store may not be used after."""
        if self._closed:
            return
        self._closed = True
        if self._owns_client:
            self._client.close()
