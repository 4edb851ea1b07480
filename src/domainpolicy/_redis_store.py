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
    <prefix>{<tenant>}:seq       hash: observe_many round token -> items applied (60 s TTL)
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

Batches
-------
`RedisStore.observe_many` pipelines the hot-path scripts of a batch (one round trip when nothing
changes state).  A script of a batch carries the round's token and its rank ``k`` among the
tenant's items of the round and applies nothing (``deferred``) unless the tenant's ``k`` earlier
items of the round were applied, so the items after a slow one are sent again after it has been
written: the results are those of `observe` called for each item in turn.

On a plain ``redis.Redis`` client a round does not go through redis-py's pipeline: redis-py
packs commands in pure Python, argument by argument, and for the 29 arguments of each
``EVALSHA`` that was most of the client's time.  The store packs the round itself -- the command
head (script SHA, ``numkeys``), a tenant's keys and a policy's 13 limit arguments are packed once
and cached, an item's own arguments once per batch -- into the same bytes redis-py would send,
writes it with one ``send_packed_command`` on a connection of the client's pool and reads the
replies with that connection's ``read_response`` (redis-py's parser: RESP2 or RESP3,
``decode_responses``, error replies; a hand-written RESP parser on the raw socket measured only
a few per cent faster, the replies being read while the server still runs the later scripts).
A round is never sent again: a connection that fails or times out is closed and the round's
items get `StoreUnavailable` (redis-py's pipeline would retry if the client's ``retry`` allowed
it; the store's own clients have retries off).  On a ``redis.RedisCluster`` the round is packed
the same way and split by node (see Redis Cluster below).  Any other client (a subclass or a
fake of ``redis.Redis``, a pool with client-side caching) keeps redis-py's pipeline; both send
the same commands and get the same results.

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
Open it with ``redis+cluster://host:port[,host:port...]/0`` (``rediss+cluster://`` for TLS;
`RedisStore.from_cluster_url`, `open_store`), or pass a ``redis.RedisCluster`` client.  Every
script touches the keys of one tenant only, all in one slot (hash tag), so the scripts run
unchanged; ``SCRIPT LOAD`` after a ``NOSCRIPT`` goes to every primary.  The ``tenants`` set is
the one key outside the tenant's slot: it is written with a separate command (before the first
write for a tenant in each process, and again when a script reports that it created the
tenant), and `RedisStore.tenants` (an admin operation: ``SMEMBERS`` plus an ``EXISTS`` per
member) lists the members that have a stored state.

`RedisStore.observe_many` does not use redis-py's cluster pipeline: redis-py refuses ``EVALSHA``
in it ("Calling pipelined function evalsha is blocked when running redis in cluster mode", so
every batched item would be a temporary failure), and it sends again, one by one, every command
of a node whose connection failed or timed out -- a script that may have run would be counted
twice.  The store
splits a round by the primary that serves each tenant's slot (from the client's slot table),
writes each node's share on a connection of that node's pool, all nodes before reading any
reply, and never sends a command again: a node that fails or times out gives its items
`StoreUnavailable`, the other nodes' items are answered.  A ``MOVED``, ``ASK``, ``TRYAGAIN`` or
``CLUSTERDOWN`` reply means the script did not run: the store refreshes the slot table and sends
the tenant's items again in the next round (three times at most, then `StoreUnavailable`).  The
order of a tenant's items is kept: they all go to the one node of its slot.

With ``server_time=True`` a tenant's window follows the ``TIME`` of the primary holding its slot;
`RedisStore.now` reads the client's default node.  Keep the nodes' clocks in sync (NTP), as
for the MTAs themselves.  The cluster client connects when the store is opened (it needs the
slot table): an unreachable cluster is a `StoreUnavailable` from `open_store`.  Redis Cluster has
one database: a cluster URL naming another one is an `InvalidConfiguration`.  A
``redis.RedisCluster`` client given to the store should have retries off
(``retry=Retry(NoBackoff(), 0)``, as the store's own clients), or a timed-out single ``observe``
may be sent twice.

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
Every Redis error (and redis-py's ``RedisClusterException``) -- cannot connect, timed out
(``socket_timeout`` and ``socket_connect_timeout`` default to 0.5 s, and redis-py's own retries
are off so that a script that may have run is never sent twice), a script error, corrupt data --
is raised as
`StoreUnavailable`; the policy answers such a message with a temporary failure.
"""

from __future__ import annotations

import inspect
import itertools
import json
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final, cast
from urllib.parse import parse_qs, quote, urlsplit

import attrs
import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode
from redis.commands.core import Script
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    RedisClusterException,
    TryAgainError,
)
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
from ._stores import (
    AuditRecord,
    Mutation,
    ObserveItem,
    ObserveResult,
    StateStore,
    audit_records,
    batch_times,
)

__all__ = ["DEFAULT_PREFIX", "DEFAULT_TIMEOUT", "RedisStore"]

DEFAULT_PREFIX: Final = "dp:"
"""Prefix of every key the store writes."""

DEFAULT_TIMEOUT: Final = 0.5
"""Default socket and connect timeout in seconds: an MTA never waits longer on Redis."""

_ERRORS: Final = (redis.RedisError, RedisClusterException)
"""What redis-py raises: ``RedisClusterException`` (no slot covered, no node reachable while the
cluster client refreshes its topology) is not a ``RedisError``."""

_NOT_RUN: Final = (MovedError, AskError, TryAgainError, ClusterDownError)
"""Cluster error replies to a script that did not run: its slot moved, is migrating, or the
cluster is down.  A batch sends the script again (bounded) after refreshing the slot table."""

_CLUSTER_SCHEMES: Final = ("redis+cluster://", "rediss+cluster://")

_SAFE: Final = "-._~@+=:"
_MAX_WEIGHT: Final = 2**31 - 1
_MAX_NOW: Final = 1e12

# --------------------------------------------------------------------------- Lua

_OBSERVE_LUA: Final = r"""
-- KEYS: 1 state, 2 bt, 3 bu, 4 dom, [5 seq: batches only]
-- ARGV: 1 now ('' = server TIME), 2 registered ('1'/'0'), 3 registrable, 4 weight,
--       5 S, 6 N, 7 CAP, 8 M, 9 D, 10 WM, 11 WD, 12 PM, 13 PD, 14 PWM, 15 PWD, 16 SM,
--       17 R ('' = none), 18 the version the caller holds ('' = none),
--       batches only: 19 the round's token, 20 k = this tenant's earlier items in the round,
--       21 '1' when more items of this tenant follow in the round
if redis.replicate_commands then pcall(redis.replicate_commands) end
local token = ARGV[19] or ''
local k = tonumber(ARGV[20]) or 0
if token ~= '' and k > 0 and tonumber(redis.call('HGET', KEYS[5], token)) ~= k then
  -- an earlier item of this tenant in this round was not applied (slow, error): apply nothing
  return {'deferred'}
end
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
if token ~= '' then
  -- count this tenant's applied items of the round (the next one checks it)
  if ARGV[21] == '1' then
    redis.call('HSET', KEYS[5], token, string.format('%d', k + 1))
    redis.call('PEXPIRE', KEYS[5], 60000)
  elseif k > 0 then
    redis.call('HDEL', KEYS[5], token)
  end
end
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


def _deferred(reply: object) -> bool:
    """True for the batch script's ``deferred`` answer (it applied nothing)."""
    return isinstance(reply, list) and len(reply) == 1 and reply[0] in (b"deferred", "deferred")


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


def _cluster_url(url: str) -> tuple[str, list[ClusterNode]]:
    """Split ``redis+cluster://[userinfo@]host:port[,host:port...][/0][?query]`` into a
    ``redis://`` URL of the first node (with the userinfo, path and query, for
    ``redis.RedisCluster(url=...)``) and the other startup nodes.

    Raises:
        InvalidConfiguration: no scheme of a cluster, a bad host or port, a database other
            than 0.
    """
    if not url.startswith(_CLUSTER_SCHEMES):
        raise InvalidConfiguration(
            [f"store url {url!r}: a Redis Cluster URL starts with redis+cluster:// or "
             "rediss+cluster://"],
            source="RedisStore",
        )  # fmt: skip
    scheme = url[: url.index("+cluster://")]
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    problems: list[str] = []
    nodes: list[ClusterNode] = []
    for host_port in hosts.split(","):
        try:
            split = urlsplit(f"//{host_port}")
            host, port = split.hostname, split.port
        except ValueError as exc:
            problems.append(f"node {host_port!r}: {exc}")
            continue
        if not host or split.username is not None or split.path:
            problems.append(f"node {host_port!r}: expected host:port")
            continue
        node: Any = ClusterNode  # untyped
        nodes.append(node(host, port or 6379))
    databases = parse_qs(parts.query).get("db", [])
    if parts.path not in ("", "/"):
        databases.insert(0, parts.path[1:])
    for database in databases:
        if database != "0":
            problems.append(
                f"database {database!r}: Redis Cluster has only database 0 "
                "(end the URL with /0 or no path)"
            )
    if problems:
        raise InvalidConfiguration(
            [f"store url {url!r}: {problem}" for problem in problems], source="RedisStore"
        )
    query = f"?{parts.query}" if parts.query else ""
    first = f"{scheme}://{userinfo}{at}{hosts.split(',')[0]}{parts.path}{query}"
    return first, nodes[1:]


class _Keys:
    """The keys of one tenant (all in one Cluster slot)."""

    __slots__ = ("audit", "batched", "scripted", "slot", "state", "wire")

    def __init__(self, prefix: str, tenant: str) -> None:
        base = f"{prefix}{{{quote(tenant, safe=_SAFE)}}}:"
        self.state = base + "state"
        self.audit = base + "audit"
        self.scripted = [self.state, base + "bt", base + "bu", base + "dom"]
        self.batched = [*self.scripted, base + "seq"]
        self.wire: bytes | None = None  # `batched` packed by `_Wire.item`
        self.slot = -1  # the Cluster slot (-1: not computed yet)


_Prepared = tuple[_Keys, list[str], bytes]
"""An item of `RedisStore.observe_many`: keys, script arguments (the held version left blank),
and the arguments that do not change between rounds packed by `_Wire.item` (``b""`` without)."""

_MORE: Final = b"$1\r\n1\r\n"
_LAST: Final = b"$1\r\n0\r\n"


def _bulk(data: bytes) -> bytes:
    """*data* as one RESP bulk string."""
    return b"$%d\r\n%b\r\n" % (len(data), data)


class _Wire:
    """The rounds of `RedisStore.observe_many` packed and sent by hand on a plain ``redis.Redis``.

    redis-py packs a pipeline in pure Python, argument by argument (the encoder, a length prefix
    and a join per argument): for the 29 arguments of each ``EVALSHA`` of a round that is most of
    the client's time.  Here what does not change is packed once -- the command head with the
    script's SHA and ``numkeys`` (per SHA), a tenant's five keys (per tenant), the 13 limit
    arguments (per `BlockPolicy`) -- an item's own arguments once per batch, and a round is one
    ``%``-format per item, sent with one ``send_packed_command`` on a connection of the client's
    pool.  The replies are read with the connection's own ``read_response``, so decoding
    (``decode_responses``), RESP2/RESP3, push messages and error replies are redis-py's.  The bytes
    on the wire are those redis-py would send for the same ``evalsha`` call.

    Only for a client whose type is exactly ``redis.Redis`` on a ``redis.ConnectionPool`` without
    client-side caching or an ``EVALSHA`` response callback (`of`), and for a
    ``redis.RedisCluster`` (`of_cluster`: each node's share of a round is written on a connection
    of that node's pool); anything else -- a subclass or a fake of ``redis.Redis`` -- keeps
    redis-py's pipeline.
    """

    __slots__ = ("_encoding", "_errors", "_heads", "_limits", "_name", "pool")

    def __init__(
        self,
        encoding: str,
        errors: str,
        name: tuple[str, ...],
        pool: redis.ConnectionPool | None,
    ) -> None:
        self.pool = pool
        self._encoding = encoding
        self._errors = errors
        self._name = name  # redis-py < 5.3 wants a command name for get_connection
        self._heads: dict[str, bytes] = {}
        self._limits: dict[BlockPolicy, bytes] = {}

    @staticmethod
    def _connection_name(get_connection: Callable[..., object]) -> tuple[str, ...] | None:
        """The arguments *get_connection* (a pool's) needs (None: an unknown signature)."""
        try:
            parameter = inspect.signature(get_connection).parameters.get("command_name")
        except (TypeError, ValueError):  # pragma: no cover - no signature
            return None
        needs_name = parameter is not None and parameter.default is inspect.Parameter.empty
        return ("EVALSHA",) if needs_name else ()

    @classmethod
    def of(cls, client: object) -> _Wire | None:
        """A packer for *client*, or None when it is not a plain ``redis.Redis`` (see above)."""
        if type(client) is not redis.Redis:
            return None
        pool = client.connection_pool
        if (
            not isinstance(pool, redis.ConnectionPool)
            or getattr(pool, "cache", None) is not None
            or "EVALSHA" in client.response_callbacks
        ):
            return None
        name = cls._connection_name(pool.get_connection)
        if name is None:  # pragma: no cover - a pool without a signature
            return None
        encoder = pool.get_encoder()
        return cls(encoder.encoding, encoder.encoding_errors, name, pool)

    @classmethod
    def of_cluster(cls, client: redis.RedisCluster) -> _Wire:
        """A packer for the rounds of a Redis Cluster client: no pool of its own, `send` is
        given the pool of each node."""
        encoder = client.encoder
        name = cls._connection_name(redis.ConnectionPool.get_connection)
        return cls(encoder.encoding, encoder.encoding_errors, name or (), None)

    def bulk(self, text: str) -> bytes:
        """*text* encoded as the client encodes arguments, as one RESP bulk string."""
        return _bulk(text.encode(self._encoding, self._errors))

    def limits(self, policy: BlockPolicy) -> bytes:
        """The 13 limit arguments of *policy*, packed (cached)."""
        packed = self._limits.get(policy)
        if packed is None:
            if len(self._limits) > 1000:  # pragma: no cover - a new policy per call
                self._limits.clear()
            packed = self._limits[policy] = b"".join(map(self.bulk, _limit_args(policy)))
        return packed

    def item(self, keys: _Keys, args: Sequence[str], limits: bytes) -> bytes:
        """The keys and the arguments of an item that are the same in every round: all but the
        held version and the round's token, rank and last-item flag."""
        packed = keys.wire
        if packed is None:
            packed = keys.wire = b"".join(map(self.bulk, keys.batched))
        encode = self.bulk
        return b"".join(
            (packed, encode(args[0]), encode(args[1]), encode(args[2]), encode(args[3]), limits)
        )

    def head(self, sha: str) -> bytes:
        """``EVALSHA <sha> 5`` with the length of the whole command: 5 keys and 21 arguments
        follow (cached)."""
        packed = self._heads.get(sha)
        if packed is None:
            self._heads.clear()
            packed = self._heads[sha] = b"*%d\r\n%b%b%b" % (
                3 + 5 + 21,
                _bulk(b"EVALSHA"),
                self.bulk(sha),
                _bulk(b"5"),
            )
        return packed

    def round(self, commands: bytes, count: int) -> list[object]:
        """Send *count* packed commands at once on the client's pool and read their replies in
        order (the exception object of an error reply in its place).

        Raises:
            redis.RedisError: the connection failed or timed out (it is closed: it may hold
                replies not read).
        """
        assert self.pool is not None
        return self.receive(self.pool, self.send(self.pool, commands), count)

    def send(self, pool: redis.ConnectionPool, commands: bytes) -> Any:
        """Write packed *commands* on a connection of *pool*; return the connection (for
        `receive`, which gives it back).

        Raises:
            redis.RedisError: the connection failed (it is closed and given back).
        """
        connection: Any = pool.get_connection(*self._name)  # its methods are untyped
        try:
            connection.send_packed_command([commands])
        except BaseException:
            connection.disconnect()
            pool.release(connection)
            raise
        return connection

    @staticmethod
    def receive(pool: redis.ConnectionPool, connection: Any, count: int) -> list[object]:
        """Read the *count* replies of what `send` wrote on *connection*, in order (the exception
        object of an error reply in its place), and give the connection back to *pool*.

        Raises:
            redis.RedisError: the connection failed or timed out (it is closed: it may hold
                replies not read).
        """
        try:
            read = connection.read_response
            replies: list[object] = []
            for _ in range(count):
                try:
                    replies.append(read())
                except redis.ResponseError as exc:  # an error reply: the stream is in step
                    replies.append(exc)
        except BaseException:
            connection.disconnect()
            raise
        finally:
            pool.release(connection)
        return replies


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
        self._client: redis.Redis | redis.RedisCluster = client
        self._cluster = isinstance(client, redis.RedisCluster)
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
        # observe_many: unique round tokens (this process and store, then a counter)
        self._token_base = f"{os.getpid():x}.{os.urandom(6).hex()}."
        self._rounds = itertools.count()
        # observe_many's rounds packed by hand on a plain redis.Redis and on Redis Cluster (per
        # node), else redis-py's pipeline
        self._wire = (
            _Wire.of_cluster(client) if isinstance(client, redis.RedisCluster) else _Wire.of(client)
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
        **redis_options: Any,
    ) -> RedisStore:
        """Open a store from ``redis://[user:password@]host:port/db``, ``rediss://...`` (TLS) or
        ``unix:///path/to/socket?db=N``; extra keyword arguments go to ``redis.Redis.from_url``.
        A ``redis+cluster://`` or ``rediss+cluster://`` URL opens a Redis Cluster
        (`from_cluster_url`).

        Raises:
            InvalidConfiguration: the URL or an option is invalid.
            StoreUnavailable: a cluster URL whose nodes cannot be reached.
        """
        if url.startswith(_CLUSTER_SCHEMES):
            return cls.from_cluster_url(
                url,
                prefix=prefix,
                server_time=server_time,
                socket_timeout=socket_timeout,
                connect_timeout=connect_timeout,
                max_attempts=max_attempts,
                **redis_options,
            )
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
        **redis_options: Any,
    ) -> RedisStore:
        """Open a store on a Redis Cluster from
        ``redis+cluster://[user:password@]host:port[,host:port...][/0][?option=value&...]``
        (``rediss+cluster://`` for TLS).  Every ``host:port`` (port 6379 when left out) is a
        startup node: the client asks the first one that answers for the cluster's slot table.
        The query options are those of ``redis://`` URLs; extra keyword arguments go to
        ``redis.RedisCluster``.  A cluster has only database 0: any other database is refused.
        The timeouts and the no-retry policy are those of `from_url`: a script that may have
        run is never sent again.

        Unlike `from_url`, this connects at once (the client needs the slot table).

        Raises:
            InvalidConfiguration: the URL or an option is invalid, or the nodes are not in
                cluster mode.
            StoreUnavailable: no startup node can be reached.
        """
        first, others = _cluster_url(url)
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
        except _ERRORS as exc:
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
        except _ERRORS as exc:
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
        except _ERRORS as exc:
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
        except _ERRORS as exc:
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
        except _ERRORS as exc:
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
    ) -> tuple[_Keys, list[str]]:
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
            limits = self._limits[machine.policy] = _limit_args(machine.policy)
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
        keys: _Keys,
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
            effects = _EFFECTS.get(outcome)
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
        if self._write(tenant, keys, version, new, records) is not None:
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
        for attempt in range(self.max_attempts):
            held = self._cache.get(tenant)
            args[-1] = "" if held is None else str(held[0])
            try:
                reply = self._observe(keys=keys.scripted, args=args)
            except _ERRORS as exc:
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
        prepared: dict[int, _Prepared] = {}
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
            except _ERRORS as exc:
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
                    self._cluster and isinstance(reply, _NOT_RUN)
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
                    self._observe.sha = self._client.script_load(_OBSERVE_LUA)
                except _ERRORS as exc:
                    failed = self._fail("script load", exc)
                    for index in retry:
                        results[index] = failed
                    retry = []
            elif isinstance(self._client, redis.RedisCluster) and any(
                isinstance(r, _NOT_RUN) for r in replies
            ):
                reloads += 1  # the slot table is stale, or a slot is migrating: refresh it
                time.sleep(0.01 * reloads)
                try:
                    self._client.nodes_manager.initialize()
                except _ERRORS as exc:
                    failed = self._fail("cluster slot table refresh", exc)
                    for index in retry:
                        results[index] = failed
                    retry = []
            if created:
                try:
                    self._client.sadd(self._registry, *created)
                except _ERRORS as exc:
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
        prepared: Mapping[int, _Prepared],
        pending: Sequence[int],
    ) -> list[object] | StoreUnavailable:
        """Send one round of a batch: an ``EVALSHA`` per pending item, pipelined; return the
        replies in order (an exception object for an item whose script failed), or the
        `StoreUnavailable` of a failed round trip.

        On a plain ``redis.Redis`` the round is packed by `_Wire` and sent in one write, on Redis
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
                    _MORE if k + 1 < total[tenant] else _LAST,
                )
            )
        if isinstance(self._client, redis.RedisCluster):
            return self._cluster_round(self._client, wire, prepared, pending, commands)
        try:
            return wire.round(b"".join(commands), len(commands))
        except _ERRORS as exc:
            return self._fail(f"observe batch of {len(pending)}", exc)

    def _cluster_round(
        self,
        client: redis.RedisCluster,
        wire: _Wire,
        prepared: Mapping[int, _Prepared],
        pending: Sequence[int],
        commands: Sequence[bytes],
    ) -> list[object]:
        """`_round` on Redis Cluster: each node's commands (the items whose tenant's slot it
        serves, in batch order) are written on a connection of that node's pool, to every node
        before any reply is read; then the replies are read node by node.

        Nothing is ever sent twice (redis-py's cluster pipeline sends every command of a node
        whose connection failed or timed out again, one by one: a script that may have run would
        be counted twice).  The items of a node that cannot be reached, or whose replies do not
        come in time, get the `StoreUnavailable` in place of their reply; the other nodes' items
        are answered."""
        replies: list[object] = [None] * len(pending)
        groups: dict[str, tuple[redis.ConnectionPool, list[int]]] = {}
        for position, index in enumerate(pending):
            keys = prepared[index][0]
            try:
                if keys.slot < 0:
                    keyslot: Any = client.keyslot  # untyped
                    keys.slot = keyslot(keys.state)
                node = client.nodes_manager.get_node_from_slot(keys.slot)
                pool = client.get_redis_connection(node).connection_pool
            except _ERRORS as exc:
                replies[position] = self._fail("observe batch: no node for the slot", exc)
                continue
            groups.setdefault(node.name, (pool, []))[1].append(position)
        sent: list[tuple[str, redis.ConnectionPool, Any, list[int]]] = []
        try:
            for name, (pool, positions) in groups.items():
                try:
                    connection = wire.send(pool, b"".join(commands[p] for p in positions))
                except _ERRORS as exc:
                    failed = self._fail(f"observe batch of {len(positions)} on {name}", exc)
                    for position in positions:
                        replies[position] = failed
                    continue
                sent.append((name, pool, connection, positions))
            while sent:
                name, pool, connection, positions = sent.pop(0)
                try:
                    got = wire.receive(pool, connection, len(positions))
                except _ERRORS as exc:
                    failed = self._fail(f"observe batch of {len(positions)} on {name}", exc)
                    for position in positions:
                        replies[position] = failed
                    continue
                for position, reply in zip(positions, got, strict=True):
                    replies[position] = reply
        finally:
            for _, pool, connection, _ in sent:  # interrupted: replies left unread
                connection.disconnect()
                pool.release(connection)
        return replies

    def _pipelined(
        self,
        batch: Sequence[ObserveItem],
        prepared: Mapping[int, _Prepared],
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
        except _ERRORS as exc:
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
        except _ERRORS as exc:
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
        except _ERRORS as exc:
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
