"""The Redis key layout of `RedisStore` and the Lua scripts that read and write it.

Imports only the pure core: `domainpolicy._stores.redis` (the store), `_resp` (the packed rounds)
and `cluster` use it.

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

The alert outbox's keys (``:obrow``, ``:obst``, ``:obdone`` per tenant, two global index sets)
are described in `domainpolicy._stores.redis_outbox`; ``COMMIT_LUA`` writes a transition's
outbox rows in the same script as its state.

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
"""

from __future__ import annotations

from typing import Final
from urllib.parse import quote

from domainpolicy._blockstate import BlockPolicy, Effects, Verdict

__all__ = ["COMMIT_LUA", "EFFECTS", "OBSERVE_LUA", "SNAPSHOT_LUA", "Keys", "limit_args"]

_SAFE: Final = "-._~@+=:"

OBSERVE_LUA: Final = r"""
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

SNAPSHOT_LUA: Final = r"""
-- KEYS: 1 state, 2 bt, 3 bu, 4 dom
return {redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2]),
        redis.call('HGETALL', KEYS[3]), redis.call('HGETALL', KEYS[4])}
"""

COMMIT_LUA: Final = r"""
-- KEYS: 1 state, 2 bt, 3 bu, 4 dom, 5 audit, [6 obrow, 7 obst: with outbox rows]
-- ARGV: 1 expected v, 2 st, 3 head, 4 T, 5 U, 6 warned ('' = none), 7 pu ('' = none), 8 doc,
--       9 nb, nb x (k, t, u), nd, nd x (d, k), na, na x record, [no, no x (id, row, status)]
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
-- the alert outbox rows of this transition (see domainpolicy._stores.redis_outbox)
local no = tonumber(ARGV[i]) or 0; i = i + 1
for _ = 1, no do
  redis.call('HSETNX', KEYS[6], ARGV[i], ARGV[i + 1])
  redis.call('HSETNX', KEYS[7], ARGV[i], ARGV[i + 2])
  i = i + 3
end
return v + 1
"""

EFFECTS: Final[dict[str, Effects]] = {
    "accept": Effects(Verdict.ACCEPT),
    "750": Effects(Verdict.REFUSE_UNREGISTERED),
    "705": Effects(Verdict.REFUSE_THRESHOLD),
}


def limit_args(policy: BlockPolicy) -> tuple[str, ...]:
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


class Keys:
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
