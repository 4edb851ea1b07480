"""The rounds of `RedisStore.observe_many` packed into RESP by hand and sent on redis-py's
connections (`Wire`), and what redis-py raises (`ERRORS`).

Imports redis-py, the key layout (`redis_schema`) and the pure core; used by the store and by
`cluster`.

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
the same way and split by node (see `domainpolicy._stores.cluster`).  Any other client (a
subclass or a fake of ``redis.Redis``, a pool with client-side caching) keeps redis-py's
pipeline; both send the same commands and get the same results.

`commit_and_wait` sends the commit script of a state change and ``WAIT`` on one connection (the
store's ``wait_replicas`` option): ``WAIT`` waits for the writes of its own connection.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, Final, cast

import redis
from redis.exceptions import NoScriptError, RedisClusterException

from domainpolicy._blockstate import BlockPolicy
from domainpolicy._stores.redis_schema import Keys, limit_args

__all__ = ["ERRORS", "LAST", "MORE", "Prepared", "Wire", "bulk", "commit_and_wait"]

ERRORS: Final = (redis.RedisError, RedisClusterException)
"""What redis-py raises: ``RedisClusterException`` (no slot covered, no node reachable while the
cluster client refreshes its topology) is not a ``RedisError``."""


Prepared = tuple[Keys, list[str], bytes]
"""An item of `RedisStore.observe_many`: keys, script arguments (the held version left blank),
and the arguments that do not change between rounds packed by `Wire.item` (``b""`` without)."""

MORE: Final = b"$1\r\n1\r\n"
LAST: Final = b"$1\r\n0\r\n"


def bulk(data: bytes) -> bytes:
    """*data* as one RESP bulk string."""
    return b"$%d\r\n%b\r\n" % (len(data), data)


class Wire:
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
    def of(cls, client: object) -> Wire | None:
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
    def of_cluster(cls, client: redis.RedisCluster) -> Wire:
        """A packer for the rounds of a Redis Cluster client: no pool of its own, `send` is
        given the pool of each node."""
        encoder = client.encoder
        name = cls._connection_name(redis.ConnectionPool.get_connection)
        return cls(encoder.encoding, encoder.encoding_errors, name or (), None)

    def bulk(self, text: str) -> bytes:
        """*text* encoded as the client encodes arguments, as one RESP bulk string."""
        return bulk(text.encode(self._encoding, self._errors))

    def limits(self, policy: BlockPolicy) -> bytes:
        """The 13 limit arguments of *policy*, packed (cached)."""
        packed = self._limits.get(policy)
        if packed is None:
            if len(self._limits) > 1000:  # pragma: no cover - a new policy per call
                self._limits.clear()
            packed = self._limits[policy] = b"".join(map(self.bulk, limit_args(policy)))
        return packed

    def item(self, keys: Keys, args: Sequence[str], limits: bytes) -> bytes:
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
                bulk(b"EVALSHA"),
                self.bulk(sha),
                bulk(b"5"),
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


def commit_and_wait(
    client: redis.Redis | redis.RedisCluster,
    wire: Wire | None,
    keys: Keys,
    script: tuple[str, str],
    written: Sequence[str],
    args: Sequence[str | int],
    wait: tuple[int, int],
) -> tuple[object, int]:
    """Run the commit *script* (its SHA and text) on *written* keys with *args*, then
    ``WAIT replicas timeout_ms`` (*wait*), on one connection to the node of the tenant's slot;
    return the script's reply and how many replicas acknowledged.  After a ``NOSCRIPT`` (not
    run) the script's text is sent with ``EVAL``.  *wire* None (a client that is not a plain
    ``redis.Redis``): redis-py's pipeline, on one connection too.

    Raises:
        redis.RedisError: the connection failed or timed out, or the script failed.
    """
    if isinstance(client, redis.RedisCluster):
        if keys.slot < 0:
            keyslot: Any = client.keyslot  # untyped
            keys.slot = keyslot(keys.state)
        node = client.nodes_manager.get_node_from_slot(keys.slot)
        pool = client.get_redis_connection(node).connection_pool
    else:
        pool = client.connection_pool
    encoder: Any = pool.get_encoder()  # untyped
    waiting = [b"WAIT", b"%d" % wait[0], b"%d" % wait[1]]
    fixed = [b"%d" % len(written), *(encoder.encode(part) for part in (*written, *args))]
    for name, text in ((b"EVALSHA", script[0]), (b"EVAL", script[1])):
        commit = [name, text.encode(), *fixed]
        if wire is None:
            with client.pipeline(transaction=False) as pipe:
                pipe.execute_command(*commit)
                pipe.execute_command(*waiting)
                reply, acknowledged = pipe.execute(raise_on_error=False)
        else:
            packed = b"".join(
                b"*%d\r\n%b" % (len(parts), b"".join(bulk(part) for part in parts))
                for parts in (commit, waiting)
            )
            reply, acknowledged = wire.receive(pool, wire.send(pool, packed), 2)
        if isinstance(reply, NoScriptError):  # not run: send the script itself
            continue
        if isinstance(reply, Exception):
            raise reply
        if isinstance(acknowledged, Exception):
            raise acknowledged
        return reply, int(cast(int, acknowledged))
    raise NoScriptError("the commit script is not loaded")  # pragma: no cover
