"""The relay policy as a Postfix handler: `make_handler` (once-per-message decisions through
`InstanceCache`, group commit of concurrent requests into one `RelayPolicy.evaluate_many`),
`relay_request` (a policy request as a `RelayRequest`) and `certificate_name`.

Imports `protocol`, `server` (for `annotate`) and the policy.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Final, Generic, TypeAlias, TypeVar

from domainpolicy._errors import InvalidConfiguration, shown
from domainpolicy._policy import Decision, Outcome, RelayPolicy, RelayRequest
from domainpolicy._replies import POSTFIX_REJECT_RESERVE, Reply
from domainpolicy._stores import MemoryStore
from domainpolicy.integrations.postfix.protocol import PolicyRequest
from domainpolicy.integrations.postfix.server import PostfixHandler, annotate

__all__ = [
    "DECIDING_STATES",
    "DEFAULT_MAX_BATCH",
    "InstanceCache",
    "certificate_name",
    "make_handler",
    "relay_request",
]


_log = logging.getLogger("domainpolicy.integrations.postfix")


# --------------------------------------------------------------------------- per-message cache


T = TypeVar("T")


class _ComputeFailed(Exception):
    """Internal: the computation another caller was running failed; compute again."""


class InstanceCache(Generic[T]):
    """A bounded LRU with TTL, holding the first decision made for each message.

    Postfix asks once per recipient; the policy must count once per message.  Key the cache on
    `PolicyRequest.message_key` and later recipients of the same message get the first answer
    without a second count::

        cache: InstanceCache[str] = InstanceCache()

        async def handler(request: PolicyRequest) -> str:
            key = request.message_key
            if key is None:
                return await decide(request)
            return await cache.get_or_compute(key, lambda: decide(request))

    Concurrent callers with the same key share one computation.  A computation that raises
    (or is cancelled) is not cached: the next caller computes again.
    """

    def __init__(
        self,
        maxsize: int = 100_000,
        ttl: float = 3600.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Keep at most *maxsize* entries, each for *ttl* seconds as measured by *clock*.

        Raises:
            InvalidConfiguration: *maxsize* or *ttl* is not positive.
        """
        if maxsize <= 0 or not ttl > 0:
            raise InvalidConfiguration(
                [f"InstanceCache needs a positive maxsize and ttl, got {maxsize!r}, {ttl!r}"]
            )
        self.maxsize = maxsize
        self.ttl = ttl
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, T]] = OrderedDict()
        self._pending: dict[str, asyncio.Future[T]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> T | None:
        """The value stored for *key*, or None if absent or expired."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, value = entry
        if expires <= self._clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return value

    def put(self, key: str, value: T) -> None:
        """Store *value* for *key* (replacing any), evicting the least recently used entry."""
        self._entries[key] = (self._clock() + self.ttl, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.maxsize:
            self._entries.popitem(last=False)

    async def get_or_compute(self, key: str, compute: Callable[[], Awaitable[T]]) -> T:
        """Return the cached value for *key*, or await *compute()* once and cache its result.

        Raises:
            Exception: whatever *compute* raises (then nothing is cached).
        """
        while True:
            cached = self.get(key)
            if cached is not None:
                return cached
            pending = self._pending.get(key)
            if pending is None:
                break
            try:
                return await asyncio.shield(pending)
            except _ComputeFailed:
                continue
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            value = await compute()
        except BaseException:
            future.set_exception(_ComputeFailed())
            future.exception()  # mark retrieved: nobody may be waiting
            raise
        else:
            self.put(key, value)
            future.set_result(value)
            return value
        finally:
            del self._pending[key]


# --------------------------------------------------------------------------- the relay policy


DECIDING_STATES: Final = frozenset({"MAIL", "RCPT", "DATA", "END-OF-MESSAGE"})
"""Protocol states in which the handler consults the policy; other states get ``DUNNO``.

``CONNECT``, ``EHLO``/``HELO``, ``VRFY`` and ``ETRN`` carry no envelope sender, so there is
nothing to decide (and nothing is counted).  Put ``check_policy_service`` in
``smtpd_relay_restrictions`` (state ``RCPT``), as documented.  A request whose
``protocol_state`` is missing or is none of the states Postfix sends (they are upper case: a
lower-case ``rcpt`` is not one) is decided too: an unknown state is never a way around the
counting.
"""

_ENVELOPE_FREE_STATES: Final = frozenset({"CONNECT", "EHLO", "HELO", "VRFY", "ETRN"})

_CN_RE: Final = re.compile(r"(?:^|[,/+])\s*CN\s*=\s*([^,/+]+)", re.IGNORECASE)
_FINGERPRINT_SEPARATORS: Final = str.maketrans("", "", ":- ")


def _fingerprint_key(value: str) -> str:
    return value.translate(_FINGERPRINT_SEPARATORS).upper()


def certificate_name(request: PolicyRequest, pinned: Mapping[str, str] | None = None) -> str | None:
    """The TLS client certificate name to attribute the connection by, or None.

    1. ``ccert_fingerprint`` (or ``ccert_pubkey_fingerprint``) found in *pinned* (fingerprint ->
       certificate name, keys as upper-case hex digits without separators; `make_handler`
       prepares them from any spelling): the pinned name.  Postfix sends the
       fingerprints for any certificate presented, verified or not, so pinning is how an
       operator vouches for a certificate that no trusted CA signed.
    2. Else ``ccert_subject``: Postfix sends the **CommonName** of the subject (not the whole
       DN), xtext-encoded, and only for a certificate it verified against its trusted CAs
       (empty otherwise).  A value that looks like a distinguished name
       (``CN=mail.contoso.com,O=Contoso``, as some proxies pass it) yields its last ``CN``.
    3. Else None: attribution falls back to the client address and the sender domain.

    The name is only a claim to match against connectors: `ConnectorTable` trusts it only if it
    is (under) one of the connector tenant's accepted domains.
    """
    if pinned:
        for fingerprint in (request.ccert_fingerprint, request.ccert_pubkey_fingerprint):
            if fingerprint:
                name = pinned.get(_fingerprint_key(fingerprint))
                if name is not None:
                    return name
    subject = request.ccert_subject.strip()
    if not subject:
        return None
    if "=" in subject:
        found = _CN_RE.findall(subject)
        return (found[-1].strip() or None) if found else None
    return subject


def relay_request(
    request: PolicyRequest, *, pinned: Mapping[str, str] | None = None
) -> RelayRequest:
    """Map a Postfix policy request onto the facade's `RelayRequest`.

    ``sender`` as sent (empty: the null sender), ``client_address`` -> ``client_ip``,
    `certificate_name` -> ``tls_cert_name``, ``sasl_username`` -> ``sasl_user``, ``recipient``
    -> ``recipients`` (empty before RCPT), ``instance`` -> ``message_id``.  Empty attributes
    become None.
    """
    return RelayRequest(
        sender=request.sender,
        client_ip=request.client_address or None,
        tls_cert_name=certificate_name(request, pinned),
        sasl_user=request.sasl_username or None,
        recipients=(request.recipient,) if request.recipient else (),
        message_id=request.instance or None,
    )


# --------------------------------------------------------------------------- batching


DEFAULT_MAX_BATCH: Final = 256
"""Largest batch `make_handler` decides in one `RelayPolicy.evaluate_many` call."""


class _BatchFailed(RuntimeError):
    """Internal: a batch failed as a whole (a bug); each of its requests gets the fallback."""


_Decided: TypeAlias = tuple[Decision, int]
"""A decision and the number of requests decided together with it (itself included)."""


class _Batcher:
    """Group commit for a policy whose store does I/O: decide concurrent requests together.

    `submit` queues a request and returns a future for its decision.  A request that arrives
    while no batch is running starts one at once (a batch of one, decided with
    `RelayPolicy.evaluate`: no added latency at low load); requests that arrive while a batch is
    being decided in the worker thread wait and go together, in arrival order, as the next
    `RelayPolicy.evaluate_many` (at most *max_batch*; the rest waits for the following batch).
    The decisions are those of calling `RelayPolicy.evaluate` for each request in arrival order.

    The futures belong to the batcher: a waiter must not cancel them (``asyncio.shield``), so a
    waiter that times out or goes away leaves the batch running.  If deciding a batch raises
    (it should not: `RelayPolicy.evaluate_many` never raises for its requests), or the driver
    task is cancelled, every waiter of that batch and of the queue gets `_BatchFailed`.
    """

    __slots__ = ("_queue", "_task", "max_batch", "policy")

    def __init__(self, policy: RelayPolicy, max_batch: int) -> None:
        self.policy = policy
        self.max_batch = max_batch
        self._queue: list[tuple[RelayRequest, asyncio.Future[_Decided]]] = []
        self._task: asyncio.Task[None] | None = None

    def submit(self, relay: RelayRequest) -> asyncio.Future[_Decided]:
        """Queue *relay*; the future completes with its decision and the size of the batch it
        was decided in (or `_BatchFailed`)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_Decided] = loop.create_future()
        self._queue.append((relay, future))
        if self._task is None:
            self._task = loop.create_task(self._drive())
        return future

    def _decide(self, relays: list[RelayRequest]) -> list[Decision]:
        """In the worker thread: one request with `evaluate`, more with `evaluate_many`."""
        if len(relays) == 1:
            return [self.policy.evaluate(relays[0])]
        return self.policy.evaluate_many(relays)

    async def _drive(self) -> None:
        queue = self._queue
        batch: list[tuple[RelayRequest, asyncio.Future[_Decided]]] = []
        try:
            while queue:
                batch = queue[: self.max_batch]
                del queue[: self.max_batch]
                try:
                    decisions = await asyncio.to_thread(self._decide, [r for r, _ in batch])
                    if len(decisions) != len(batch):
                        raise _BatchFailed(
                            f"{len(decisions)} decisions for a batch of {len(batch)} requests"
                        )
                except Exception as exc:
                    _log.exception("deciding a batch of %d policy requests failed", len(batch))
                    _fail(batch, exc)
                else:
                    for (_, future), decision in zip(batch, decisions, strict=True):
                        if not future.done():
                            future.set_result((decision, len(batch)))
                batch = []
        except BaseException as exc:  # cancelled (the loop is shutting down): nobody may hang
            _fail(batch + queue, exc)
            queue.clear()
            raise
        finally:
            self._task = None


def _fail(
    waiters: Iterable[tuple[RelayRequest, asyncio.Future[_Decided]]], cause: BaseException
) -> None:
    for _, future in waiters:
        if not future.done():
            error = _BatchFailed(f"the batch of policy requests failed: {cause!r}")
            error.__cause__ = cause
            future.set_exception(error)


def make_handler(
    policy: RelayPolicy,
    *,
    cache: InstanceCache[Decision] | None = None,
    pinned_certificates: Mapping[str, str] | None = None,
    blocking: bool | None = None,
    max_batch: int | None = None,
    permit_connectors: bool = False,
) -> PostfixHandler:
    """A `PostfixHandler` answering Postfix with *policy*'s decisions.

    * **Once per message.**  The decision is made on the first request of a message and reused
      for its other recipients (keyed on `PolicyRequest.message_key` in *cache*, default a new
      `InstanceCache` of 100,000 messages for an hour), so a message counts once however many
      recipients it has.  With the policy's ``count="recipients"`` the key also holds the
      recipient: each recipient counts once.  A request without ``instance`` is decided alone.
    * **Answer.**  ``DUNNO`` when accepted (the remaining restrictions decide), else the reply
      as one line, ``<code> <status> <text>``, from ``decision.reply.single_line(reserve=
      POSTFIX_REJECT_RESERVE)`` (room for the ``<rcpt>: Recipient address rejected:`` text
      Postfix inserts).  States without an envelope (``CONNECT``, ``EHLO``, ``HELO``, ``VRFY``,
      ``ETRN``) get ``DUNNO``; a missing or unknown state is decided (see `DECIDING_STATES`).
      With *permit_connectors*, an accepted message that an inbound connector attributed to
      its tenant (by client IP or certificate, `RelayPolicy.connector_tenant`) gets ``OK``
      instead: Postfix permits it without its later restrictions, so the connectors' ranges
      need not be repeated in ``mynetworks``.  Other accepted mail (a tenant found by the
      sender's domain only) still gets ``DUNNO``; refusals are unchanged.
    * **Log line.**  `annotate` adds ``tenant``, ``sender_domain``, ``verdict`` (``accept``,
      ``refuse``, ``tempfail``, or ``skip``), ``code``, ``status``, ``reason``, ``cached``
      (the decision of an earlier recipient) and, for a request decided in the worker thread,
      ``batch`` (how many requests were decided together with it, itself included: 1 when
      alone) to the server's line for the request.
    * **Never hangs.**  With a store that does I/O (*blocking*; default: any store but a
      `MemoryStore`) the policy runs in a worker thread and the server's ``request_timeout``
      bounds the wait (answering its fallback ``451 4.3.0``).  A decision that completes after
      that timeout is still cached for the message's later recipients, so a slow store does
      not count the message twice.  Store failures are already ``451 4.3.0`` decisions
      (`RelayPolicy.evaluate` never raises).  A `MemoryStore` is evaluated inline: no thread
      hop, no I/O to wait for, no batching.
    * **Group commit** (blocking stores).  Requests that arrive while a decision is running in
      the worker thread are queued and decided together, in arrival order, by one
      `RelayPolicy.evaluate_many` when it returns (SQLite: one transaction; Redis: one
      pipelined round trip), at most *max_batch* (default `DEFAULT_MAX_BATCH`, 256) at a time;
      the rest waits for the following batch.  A request that arrives when nothing is running
      starts at once, alone (`RelayPolicy.evaluate`), so low load sees no added latency.  The
      decisions are exactly those of deciding the requests one after the other in arrival
      order; the other recipients of a message being decided wait for its decision instead
      of joining a batch.  A request that times out, or whose connection closes, does not
      cancel its batch.  A batch that fails as a whole (a bug: `RelayPolicy.evaluate_many`
      never raises for its requests) makes each of its requests raise, which the server
      answers with its fallback action.  With SQLite a store failure fails the whole batch
      (each of its messages gets ``451 4.3.0``, none is counted).  ``max_batch=1`` turns
      batching off: each request is decided alone, in its own worker thread
      (`RelayPolicy.evaluate_async`), as before batching existed.

    *pinned_certificates* maps certificate fingerprints to names (see `certificate_name`).

    Raises:
        InvalidConfiguration: *max_batch* is not a positive integer.
    """
    if max_batch is None:
        max_batch = DEFAULT_MAX_BATCH
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise InvalidConfiguration(
            [f"max_batch must be a positive integer, got {shown(max_batch)}"]
        )
    decisions: InstanceCache[Decision] = cache if cache is not None else InstanceCache()
    pinned = {_fingerprint_key(k): v for k, v in (pinned_certificates or {}).items()} or None
    in_thread = not isinstance(policy.store, MemoryStore) if blocking is None else blocking
    batcher = _Batcher(policy, max_batch) if in_thread and max_batch > 1 else None
    per_recipient = policy.count == "recipients"
    rendered: dict[Reply, str] = {}

    def action_of(decision: Decision, relay: RelayRequest) -> str:
        if decision.outcome is Outcome.ACCEPT:
            if (
                permit_connectors
                and decision.tenant is not None
                and policy.connector_tenant(relay) == decision.tenant
            ):
                return "OK"
            return "DUNNO"
        reply = decision.reply
        text = rendered.get(reply)
        if text is None:
            if len(rendered) >= 1024:  # replies come from a finite catalogue; stay bounded
                rendered.clear()
            text = rendered[reply] = str(reply.single_line(reserve=POSTFIX_REJECT_RESERVE))
        return text

    def cache_late(key: str | None, done: asyncio.Future[_Decided]) -> None:
        if done.cancelled() or done.exception() is not None:  # (marks the error retrieved)
            return
        if key is not None:
            decisions.put(key, done.result()[0])

    async def alone(relay: RelayRequest) -> _Decided:
        return await policy.evaluate_async(relay), 1

    async def evaluate(relay: RelayRequest, key: str | None) -> Decision:
        if not in_thread:
            return policy.evaluate(relay)
        pending = (
            batcher.submit(relay) if batcher is not None else asyncio.ensure_future(alone(relay))
        )
        try:
            decision, size = await asyncio.shield(pending)
        except asyncio.CancelledError:
            # Timed out (or shut down): the decision goes on; keep it for the later recipients.
            pending.add_done_callback(lambda done: cache_late(key, done))
            raise
        annotate(batch=size)
        return decision

    async def handler(request: PolicyRequest) -> str:
        state = request.protocol_state
        if state in _ENVELOPE_FREE_STATES:
            annotate(verdict="skip", reason="protocol_state")
            return "DUNNO"
        relay = relay_request(request, pinned=pinned)
        key = request.message_key
        if key is not None and per_recipient:
            key = f"{key}\x00{request.recipient}"
        cached = False
        if key is None:
            decision = await evaluate(relay, None)
        else:
            found = decisions.get(key)
            if found is not None:
                decision, cached = found, True
            else:
                decision = await decisions.get_or_compute(key, lambda: evaluate(relay, key))
        reply = decision.reply
        annotate(
            tenant=decision.tenant or "",
            sender_domain=decision.sender_domain or "",
            verdict=decision.outcome.value,
            code=reply.code,
            status=reply.status,
            reason=decision.reason,
            cached=cached,
        )
        return action_of(decision, relay)

    return handler
