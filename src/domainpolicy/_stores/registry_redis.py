"""The tenant registry in Redis and Redis Cluster: the key layout, the commit script and the
three primitives of `RegistryStore` (mixed into `RedisStore`).

Key layout
----------
::

    <prefix>{registry}:v                string: the registry's version (absent: 0)
    <prefix>{registry}:log              list: one small commit entry (JSON) per version:
                                        version, at, actor, reason, and the keys of its parts
    <prefix>{reg:<tenant>}:rec:<v>:<n>  string: one tenant's part of the mutation of version v
                                        (JSON list of [position, change]); n is a random nonce

``<tenant>`` is percent-encoded as in `domainpolicy._stores.redis_schema` (a hostile id cannot
end the hash tag).  Changes without a tenant (a connector removal) go to the part of the tenant
``""``.

Why this layout (Redis Cluster)
-------------------------------
The registry's content -- the domains and connectors, which may be millions -- lives in the
slots of the tenants it is about, so no slot (no node) holds the whole registry and an import of
many tenants spreads its memory and its writes over the cluster.  What stays in one slot is the
*sequencer*: the version and the list of commit entries, a few hundred bytes per mutation.  A
single sequencer is what gives the two guarantees the registry needs, cheaply:

* every process polls **one** ``GET`` of ``{registry}:v`` and applies the records after its
  version in one order, so all processes reach the same registry by the same steps;
* a commit is validated against the whole registry at version ``v`` (a domain claim, a
  wildcard's slot, a certificate name under another tenant's domain, an IP range of another
  tenant: these rules cross tenants, so per-tenant claims alone could not check them) and
  appended with a compare-and-set on ``v``.  Of two writers racing from the same version one
  wins; the other catches up, validates again, and gets the rule it now breaks (the domain is
  claimed by the winner).

The write order makes a commit all or nothing across slots: (1) the parts are written to the
tenants' slots under fresh keys that nothing references yet; (2) one Lua script on the sequencer
slot checks ``v`` and, if it still is the version validated against, pushes the commit entry and
sets ``v + 1``.  Step 2 is the commit point.  A crash (or a lost race) after step 1 leaves only
unreferenced parts, never read; the losing writer deletes its parts, and a crash's parts are
garbage that `RegistryRedis.registry_orphans` lists for repair.  A reader reads the entries
after its version, then their parts (one pipelined round across the slots); a part referenced by
an entry always exists (it was written before the entry), so a reader never sees half a
mutation.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from typing import Any, Final
from urllib.parse import quote

import redis

from domainpolicy._errors import InvalidConfiguration, StoreUnavailable
from domainpolicy._registry import RegistryChange, RegistryRecord
from domainpolicy._stores._resp import ERRORS
from domainpolicy._stores.registry_base import RegistryStore

__all__ = ["APPEND_LUA", "RegistryRedis"]

_SAFE: Final = "-._~@+=:"

APPEND_LUA: Final = r"""
-- KEYS: 1 version, 2 log; ARGV: 1 the expected version, 2 the commit entry (JSON)
local v = tonumber(redis.call('GET', KEYS[1]) or '0')
if v ~= tonumber(ARGV[1]) then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[2])
redis.call('SET', KEYS[1], tostring(v + 1))
return 1
"""


def _decoded(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, str):
        return value
    raise TypeError(f"expected a Redis string, got {type(value).__name__}")


class RegistryRedis(RegistryStore):
    """The registry primitives on a redis-py client (``self._client``) with a key prefix."""

    _client: redis.Redis | redis.RedisCluster
    prefix: str
    _fail: Callable[[str, Exception], StoreUnavailable]
    _check_open: Callable[[], None]

    def _registry_keys_init(self) -> None:
        base = f"{self.prefix}{{registry}}:"
        self._registry_v = base + "v"
        self._registry_log_key = base + "log"
        self._registry_append_script = self._client.register_script(APPEND_LUA)
        self._registry_init()

    def _part_key(self, tenant: str, version: int) -> str:
        nonce = os.urandom(6).hex()
        return f"{self.prefix}{{reg:{quote(tenant, safe=_SAFE)}}}:rec:{version}:{nonce}"

    def _registry_version(self) -> int:
        self._check_open()
        try:
            value = self._client.get(self._registry_v)
        except ERRORS as exc:
            raise self._fail("registry version", exc) from exc
        try:
            return 0 if value is None else int(_decoded(value))
        except (TypeError, ValueError) as exc:
            raise StoreUnavailable(f"Redis store: corrupt registry version {value!r}") from exc

    def _registry_records(self, since: int) -> list[RegistryRecord]:
        self._check_open()
        try:
            rows = self._client.lrange(self._registry_log_key, max(since, 0), -1)
            entries: list[dict[str, Any]] = [json.loads(_decoded(row)) for row in rows]
            keys = [key for entry in entries for key in entry["parts"]]
            parts: list[object] = []
            if keys:
                pipe = self._client.pipeline(transaction=False)
                for key in keys:
                    pipe.get(key)
                parts = pipe.execute()
        except ERRORS as exc:
            raise self._fail("registry records", exc) from exc
        except (TypeError, ValueError, KeyError) as exc:
            raise StoreUnavailable(f"Redis store: corrupt registry log: {exc!r}") from exc
        records = []
        found = dict(zip(keys, parts, strict=True))
        try:
            for entry in entries:
                numbered: list[tuple[int, dict[str, Any]]] = []
                for key in entry["parts"]:
                    text = found[key]
                    if text is None:
                        raise ValueError(f"part {key!r} of version {entry['version']} is missing")
                    numbered.extend((int(p), c) for p, c in json.loads(_decoded(text)))
                numbered.sort(key=lambda item: item[0])
                records.append(
                    RegistryRecord(
                        int(entry["version"]),
                        float(entry["at"]),
                        str(entry["actor"]),
                        str(entry["reason"]),
                        tuple(RegistryChange.from_dict(c) for _, c in numbered),
                    )
                )
        except (TypeError, ValueError, KeyError, InvalidConfiguration) as exc:
            raise StoreUnavailable(f"Redis store: corrupt registry log: {exc!r}") from exc
        if records and records[0].version != since + 1:
            raise StoreUnavailable(
                f"Redis store: registry log starts at version {records[0].version}, "
                f"expected {since + 1}"
            )
        return records

    def _registry_stamp(self, version: int) -> tuple[float, str, str] | None:
        self._check_open()
        if version < 1:
            return None
        try:
            row = self._client.lindex(self._registry_log_key, version - 1)
        except ERRORS as exc:
            raise self._fail("registry stamp", exc) from exc
        if row is None:
            return None
        try:
            entry = json.loads(_decoded(row))
            return float(entry["at"]), str(entry["actor"]), str(entry["reason"])
        except (TypeError, ValueError, KeyError) as exc:
            raise StoreUnavailable(f"Redis store: corrupt registry log: {exc!r}") from exc

    def _registry_append(self, expected: int, record: RegistryRecord) -> bool:
        self._check_open()
        groups: dict[str, list[list[object]]] = {}
        for position, change in enumerate(record.changes):
            groups.setdefault(change.tenant or "", []).append([position, change.to_dict()])
        parts = {
            self._part_key(tenant, record.version): json.dumps(
                changes, separators=(",", ":"), ensure_ascii=False
            )
            for tenant, changes in groups.items()
        }
        entry = json.dumps(
            {
                "version": record.version,
                "at": record.at,
                "actor": record.actor,
                "reason": record.reason,
                "parts": list(parts),
            },
            separators=(",", ":"),
            ensure_ascii=False,
        )
        try:
            pipe = self._client.pipeline(transaction=False)
            for key, text in parts.items():
                pipe.set(key, text)
            pipe.execute()
            won = self._registry_append_script(
                keys=[self._registry_v, self._registry_log_key], args=[expected, entry]
            )
        except ERRORS as exc:
            raise self._fail("registry commit", exc) from exc
        if int(won) == 1:
            return True
        with contextlib.suppress(*ERRORS):  # else unreferenced garbage: registry_orphans lists it
            self._client.delete(*parts)
        return False

    def registry_orphans(self) -> list[str]:
        """Keys of registry parts no commit entry references (left by a writer that crashed
        between writing its parts and committing): safe to delete.

        Raises:
            StoreUnavailable: Redis failed.
        """
        self._check_open()
        try:
            referenced = {
                key
                for row in self._client.lrange(self._registry_log_key, 0, -1)
                for key in json.loads(_decoded(row))["parts"]
            }
            pattern = f"{self.prefix}{{reg:*}}:rec:*"
            found = {_decoded(key) for key in self._client.scan_iter(match=pattern, count=1000)}
        except ERRORS as exc:
            raise self._fail("registry orphans", exc) from exc
        except (TypeError, ValueError, KeyError) as exc:
            raise StoreUnavailable(f"Redis store: corrupt registry log: {exc!r}") from exc
        return sorted(found - referenced)
