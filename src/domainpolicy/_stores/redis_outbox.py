"""The alert outbox of `RedisStore`: its keys, its Lua scripts and the code that runs them.

Imports the outbox values (`domainpolicy._stores.outbox`) and the shared Redis error list
(`_resp`); `domainpolicy._stores.redis` uses it.  The Lua text of the write with the transition
is the tail of ``COMMIT_LUA`` in `domainpolicy._stores.redis_schema` (`outbox_args` builds the
arguments it reads).

Key layout (Redis and Redis Cluster)
------------------------------------
Every per-tenant key carries the tenant's hash tag, so a tenant's outbox lives in the slot of
its state and the compare-and-set script that writes a transition writes its rows too::

    <prefix>{<tenant>}:obrow     hash: row id -> the row (JSON, never changed after the write)
    <prefix>{<tenant>}:obst      hash: row id -> "status|attempts|due|lease_until|owner|error"
    <prefix>{<tenant>}:obdone    list: ids of delivered rows, newest first (the newest 1,000
                                 are kept; older delivered rows are removed from both hashes)
    <prefix>outbox:pending       set: tenants that may have pending rows (the claim index)
    <prefix>outbox:all           set: tenants that ever had rows (for listing and retry)

The two sets are global keys (not in the tenant's slot), so they are updated right *after* the
script that wrote the rows.  A crash in between leaves rows that no index points to; a worker
repairs the index from the tenant registry when it first claims and every ten minutes after
(`RedisOutbox.repair`), so such a row is delivered late, never lost.  A claimer removes a tenant
from ``outbox:pending`` only after finding no pending row, and re-adds it if a row appears
in between (a writer adds to the set after its script, a claimer checks after removing).

A claim runs one script per tenant: it picks the due, pending, unleased rows of the sinks
asked for, counts an attempt and writes ``lease_until`` and the owner into the row's status, all
atomically on the tenant's slot; so two workers never hold the same row, and a lease is
compared with the caller's clock (`RedisStore.now`: the server's ``TIME`` by default).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any, Final
from urllib.parse import quote

from domainpolicy._errors import StoreUnavailable, shown
from domainpolicy._stores._resp import ERRORS
from domainpolicy._stores.outbox import OutboxRow, check_claim

__all__ = ["RedisOutbox", "outbox_args", "outbox_keys"]

_SAFE: Final = "-._~@+=:"
_REPAIR_EVERY: Final = 600.0
_KEEP_DELIVERED: Final = 1000


_PARSE: Final = r"""
local function parse(s)
  local st, a, due, lu, ow, err = string.match(s, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|(.*)$')
  return st, tonumber(a), due, tonumber(lu), ow, err
end
"""

_CLAIM_LUA: Final = (
    _PARSE
    + r"""
-- KEYS: 1 obrow, 2 obst; ARGV: 1 now, 2 lease_until, 3 owner, 4 limit, 5.. sinks
local now, lu_new, owner, limit = tonumber(ARGV[1]), ARGV[2], ARGV[3], tonumber(ARGV[4])
local want = {}
for j = 5, #ARGV do want[ARGV[j]] = true end
local all = redis.call('HGETALL', KEYS[2])
local out = {0}
local n = 0
for j = 1, #all, 2 do
  local id = all[j]
  local st, a, due, lu, ow, err = parse(all[j + 1])
  if st == 'pending' then
    out[1] = out[1] + 1
    local sink = string.match(id, '^[^.]*%.(.*)$')
    if n < limit and want[sink] and tonumber(due) <= now and lu <= now then
      local s = table.concat({st, string.format('%d', a + 1), due, lu_new, owner, err}, '|')
      redis.call('HSET', KEYS[2], id, s)
      out[#out + 1] = s
      out[#out + 1] = redis.call('HGET', KEYS[1], id)
      n = n + 1
    end
  end
end
return out
"""
)

_ACK_LUA: Final = (
    _PARSE
    + r"""
-- KEYS: 1 obrow, 2 obst, 3 obdone; ARGV: 1 id, 2 now, 3 keep
local s = redis.call('HGET', KEYS[2], ARGV[1])
if not s then return 0 end
local st, a, due, lu, ow, err = parse(s)
if st ~= 'pending' then return 0 end
local ns = {'delivered', string.format('%d', a), ARGV[2], '0', '', err}
redis.call('HSET', KEYS[2], ARGV[1], table.concat(ns, '|'))
redis.call('LPUSH', KEYS[3], ARGV[1])
while redis.call('LLEN', KEYS[3]) > tonumber(ARGV[3]) do
  local old = redis.call('RPOP', KEYS[3])
  redis.call('HDEL', KEYS[1], old)
  redis.call('HDEL', KEYS[2], old)
end
return 1
"""
)

_FAIL_LUA: Final = (
    _PARSE
    + r"""
-- KEYS: 1 obst; ARGV: 1 id, 2 owner, 3 now, 4 error, 5 retry_at ('' = dead)
local s = redis.call('HGET', KEYS[1], ARGV[1])
if not s then return 0 end
local st, a, due, lu, ow, err = parse(s)
if st ~= 'pending' or ow ~= ARGV[2] then return 0 end
local ns
if ARGV[5] == '' then ns = {'dead', string.format('%d', a), ARGV[3], '0', '', ARGV[4]}
else ns = {'pending', string.format('%d', a), ARGV[5], '0', '', ARGV[4]} end
redis.call('HSET', KEYS[1], ARGV[1], table.concat(ns, '|'))
return 1
"""
)

_RETRY_LUA: Final = (
    _PARSE
    + r"""
-- KEYS: 1 obst; ARGV: 1 id, 2 now
local s = redis.call('HGET', KEYS[1], ARGV[1])
if not s then return 0 end
local st, a, due, lu, ow, err = parse(s)
if st ~= 'dead' then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], table.concat({'pending', '0', ARGV[2], '0', '', err}, '|'))
return 1
"""
)

_ENQUEUE_LUA: Final = r"""
-- KEYS: 1 obrow, 2 obst; ARGV: n x (id, row, status)
local added = 0
for j = 1, #ARGV, 3 do
  if redis.call('HSETNX', KEYS[1], ARGV[j], ARGV[j + 1]) == 1 then
    redis.call('HSET', KEYS[2], ARGV[j], ARGV[j + 2])
    added = added + 1
  end
end
return added
"""

_PENDING_LUA: Final = r"""
-- KEYS: 1 obst; the number of pending rows
local n = 0
for _, s in ipairs(redis.call('HVALS', KEYS[1])) do
  if string.sub(s, 1, 8) == 'pending|' then n = n + 1 end
end
return n
"""


def outbox_keys(prefix: str, tenant: str) -> list[str]:
    """``[obrow, obst, obdone]`` of *tenant* (in the slot of its other keys)."""
    base = f"{prefix}{{{quote(tenant, safe=_SAFE)}}}:"
    return [base + "obrow", base + "obst", base + "obdone"]


def _clean(text: str) -> str:
    return text.replace("|", "/").replace("\r", " ").replace("\n", " ")[:500]


def _status(row: OutboxRow) -> str:
    return "|".join(
        (
            row.status,
            str(row.attempts),
            repr(float(row.due)),
            repr(float(row.lease_until)),
            _clean(row.owner or ""),
            _clean(row.last_error or ""),
        )
    )


def outbox_args(rows: Sequence[OutboxRow]) -> list[str | int]:
    """The arguments `COMMIT_OUTBOX_LUA` reads: the count, then (id, row, status) per row."""
    args: list[str | int] = [len(rows)]
    for row in rows:
        args += [row.id, _row_json(row), _status(row)]
    return args


def _row_json(row: OutboxRow) -> str:
    data = row.to_dict()
    for key in ("status", "attempts", "due", "last_error", "lease_until", "owner"):
        data.pop(key)
    return json.dumps(data, separators=(",", ":"))


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _merge(row_json: object, status: object) -> OutboxRow:
    try:
        data: dict[str, Any] = json.loads(_text(row_json))
        st, attempts, due, lease, owner, error = _text(status).split("|", 5)
        data.update(
            status=st,
            attempts=int(attempts),
            due=float(due),
            lease_until=float(lease),
            owner=owner or None,
            last_error=error or None,
        )
        return OutboxRow.from_dict(data)
    except (ValueError, TypeError, AttributeError) as exc:
        raise StoreUnavailable(
            f"Redis store: corrupt outbox row {shown(row_json)} / {shown(status)}: {exc}"
        ) from exc


class RedisOutbox:
    """The outbox operations of one `RedisStore` (its client and prefix)."""

    def __init__(self, client: Any, prefix: str, registry: str) -> None:
        self._client = client
        self._prefix = prefix
        self._registry = registry
        self._pending = prefix + "outbox:pending"
        self._all = prefix + "outbox:all"
        self._claim = client.register_script(_CLAIM_LUA)
        self._ack = client.register_script(_ACK_LUA)
        self._fail_script = client.register_script(_FAIL_LUA)
        self._retry = client.register_script(_RETRY_LUA)
        self._enqueue = client.register_script(_ENQUEUE_LUA)
        self._count = client.register_script(_PENDING_LUA)
        self._repaired = -_REPAIR_EVERY
        self._seen: dict[str, str] = {}  # row id -> tenant, from claims

    def _fail(self, what: str, exc: Exception) -> StoreUnavailable:
        return StoreUnavailable(f"Redis store failed during {what}: {exc}")

    def indexed(self, tenants: Sequence[str]) -> None:
        """Add *tenants* to the claim index (after the script that wrote their rows).

        Raises:
            StoreUnavailable: Redis failed.
        """
        if not tenants:
            return
        try:
            pipe = self._client.pipeline(transaction=False)
            pipe.sadd(self._pending, *tenants)
            pipe.sadd(self._all, *tenants)
            pipe.execute()
        except ERRORS as exc:
            raise self._fail("outbox index", exc) from exc

    def repair(self) -> None:
        """Index every registered tenant that has outbox rows (after a crash between a write
        and its index update).

        Raises:
            StoreUnavailable: Redis failed.
        """
        try:
            members = sorted(_text(m) for m in self._client.smembers(self._registry))
            pipe = self._client.pipeline(transaction=False)
            for member in members:
                pipe.exists(outbox_keys(self._prefix, member)[1])
            present = pipe.execute()
        except ERRORS as exc:
            raise self._fail("outbox repair", exc) from exc
        self.indexed([m for m, here in zip(members, present, strict=True) if here])

    def enqueue(self, rows: Sequence[OutboxRow]) -> int:
        """See `StateStore.enqueue_alerts`."""
        by_tenant: dict[str, list[OutboxRow]] = {}
        for row in rows:
            by_tenant.setdefault(row.tenant, []).append(row)
        added = 0
        for tenant, mine in by_tenant.items():
            args: list[str] = []
            for row in mine:
                args += [row.id, _row_json(row), _status(row)]
            try:
                added += int(self._enqueue(keys=outbox_keys(self._prefix, tenant)[:2], args=args))
            except ERRORS as exc:
                raise self._fail(f"outbox write of tenant {shown(tenant)}", exc) from exc
        self.indexed(list(by_tenant))
        return added

    def claim(
        self, sinks: Sequence[str], now: float, lease: float, owner: str, limit: int
    ) -> list[OutboxRow]:
        """See `StateStore.claim_alerts`."""
        check_claim(sinks, now, lease, limit)
        if not sinks:
            return []
        if time.monotonic() - self._repaired >= _REPAIR_EVERY:
            self.repair()
            self._repaired = time.monotonic()
        try:
            tenants = sorted(_text(t) for t in self._client.smembers(self._pending))
        except ERRORS as exc:
            raise self._fail("outbox claim", exc) from exc
        claimed: list[OutboxRow] = []
        for tenant in tenants:
            if len(claimed) >= limit:
                break
            keys = outbox_keys(self._prefix, tenant)
            try:
                reply = self._claim(
                    keys=keys[:2],
                    args=[
                        repr(float(now)),
                        repr(float(now + lease)),
                        _clean(owner),
                        limit - len(claimed),
                        *sinks,
                    ],
                )
                if int(reply[0]) == 0:
                    self._client.srem(self._pending, tenant)
                    if int(self._count(keys=keys[1:2], args=[])) > 0:
                        self._client.sadd(self._pending, tenant)
            except ERRORS as exc:
                raise self._fail(f"outbox claim of tenant {shown(tenant)}", exc) from exc
            for j in range(1, len(reply), 2):
                claimed.append(_merge(reply[j + 1], reply[j]))
        if len(self._seen) > 100_000:
            self._seen.clear()
        self._seen.update((row.id, row.tenant) for row in claimed)
        claimed.sort(key=lambda r: (r.due, r.id))
        return claimed

    def _tenant_of(self, row_id: str) -> str | None:
        if row_id in self._seen:
            return self._seen[row_id]
        try:
            members = sorted(_text(m) for m in self._client.smembers(self._all))
            pipe = self._client.pipeline(transaction=False)
            for member in members:
                pipe.hexists(outbox_keys(self._prefix, member)[1], row_id)
            found = pipe.execute()
        except ERRORS as exc:
            raise self._fail("outbox lookup", exc) from exc
        for member, here in zip(members, found, strict=True):
            if here:
                return member
        return None

    def ack(self, row_id: str, now: float) -> bool:
        """See `StateStore.ack_alert`."""
        tenant = self._tenant_of(row_id)
        if tenant is None:
            return False
        try:
            done = self._ack(
                keys=outbox_keys(self._prefix, tenant),
                args=[row_id, repr(float(now)), _KEEP_DELIVERED],
            )
        except ERRORS as exc:
            raise self._fail(f"outbox ack of {shown(row_id)}", exc) from exc
        return bool(done)

    def fail(self, row_id: str, owner: str, now: float, error: str, retry_at: float | None) -> bool:
        """See `StateStore.fail_alert`."""
        tenant = self._tenant_of(row_id)
        if tenant is None:
            return False
        try:
            done = self._fail_script(
                keys=outbox_keys(self._prefix, tenant)[1:2],
                args=[
                    row_id,
                    _clean(owner),
                    repr(float(now)),
                    _clean(error),
                    "" if retry_at is None else repr(float(retry_at)),
                ],
            )
        except ERRORS as exc:
            raise self._fail(f"outbox failure of {shown(row_id)}", exc) from exc
        return bool(done)

    def retry(self, row_id: str, now: float) -> bool:
        """See `StateStore.retry_alert`."""
        tenant = self._tenant_of(row_id)
        if tenant is None:
            return False
        try:
            done = self._retry(
                keys=outbox_keys(self._prefix, tenant)[1:2], args=[row_id, repr(float(now))]
            )
        except ERRORS as exc:
            raise self._fail(f"outbox retry of {shown(row_id)}", exc) from exc
        if done:
            self.indexed([tenant])
        return bool(done)

    def rows(self, status: str | None, limit: int) -> list[OutboxRow]:
        """See `StateStore.alert_rows`."""
        try:
            members = sorted(_text(m) for m in self._client.smembers(self._all))
            pipe = self._client.pipeline(transaction=False)
            for member in members:
                keys = outbox_keys(self._prefix, member)
                pipe.hgetall(keys[0])
                pipe.hgetall(keys[1])
            replies = pipe.execute()
        except ERRORS as exc:
            raise self._fail("outbox list", exc) from exc
        rows: list[OutboxRow] = []
        for j in range(0, len(replies), 2):
            texts = {_text(k): v for k, v in replies[j].items()}
            for key, status_text in replies[j + 1].items():
                row_id = _text(key)
                if row_id in texts and (
                    status is None or _text(status_text).startswith(status + "|")
                ):
                    rows.append(_merge(texts[row_id], status_text))
        rows.sort(key=lambda r: (r.created, r.id))
        return rows[:limit]
