"""State stores: where tenant block state and the audit trail live.

One interface, three implementations, one file each:

* `base`: the contract (`StateStore`), `AuditRecord` and the helpers every store shares;
* `memory`: `MemoryStore` (tests, one process);
* `sqlite`: `SQLiteStore` (the embedded default: one file, several processes on one host);
* `redis`: `RedisStore` (a fleet of MTAs sharing state, Redis or Redis Cluster), with its key
  layout and Lua scripts in `redis_schema`, the hand-packed RESP rounds in `_resp` and the Redis
  Cluster routing in `cluster`; imported only when a Redis store is opened (optional extra).

This package's ``__init__`` re-exports the contract and the stores and holds `open_store`; the
backends import `base` (and their own helpers), never this ``__init__``.
"""

from __future__ import annotations

from typing import Any

from domainpolicy._errors import InvalidConfiguration
from domainpolicy._stores.base import (
    AuditRecord,
    Mutation,
    ObserveItem,
    ObserveResult,
    StateStore,
)
from domainpolicy._stores.memory import MemoryStore
from domainpolicy._stores.sqlite import SQLiteStore

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
            from domainpolicy._stores.redis import RedisStore
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
