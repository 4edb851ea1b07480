"""aiosmtpd integration: a handler that applies the relay policy inside an aiosmtpd server.

``PolicyHandler(policy)`` is an aiosmtpd handler (``handle_MAIL``, ``handle_RCPT``,
``handle_DATA``, ``handle_PROXY``)::

    from aiosmtpd.controller import Controller
    from domainpolicy import load_config
    from domainpolicy.integrations.aiosmtpd import PolicyHandler

    policy = load_config("tenants.toml").build_policy()
    controller = Controller(PolicyHandler(policy, relay=forward), hostname="127.0.0.1", port=10025)

Where the check happens, and why
--------------------------------
* ``check_at="mail"`` (the default): the policy is consulted once, at ``MAIL FROM``.  Everything
  it needs is known there: the client (address, TLS certificate, SASL login) and the sender
  domain.  A refused sender never gets to send recipients or content, and each message is
  counted exactly once.  aiosmtpd answers every later ``RCPT`` of a refused transaction with
  ``503 Error: need MAIL command`` by itself, because ``envelope.mail_from`` stays unset.
* ``check_at="rcpt"``: ``MAIL FROM`` only checks the sender's syntax (``501 5.1.7``; nothing is
  counted) and the policy is consulted at the **first** ``RCPT TO`` of the message; later
  recipients get the first recipient's answer.  This is the stage for policies that count
  recipients (``count="recipients"``): the recipients only exist at ``RCPT``.  With such a
  policy the first recipient decides the message and every further recipient of an accepted
  message is counted too, one evaluation each (weight 1), so a message to 100 recipients weighs
  100; the recipient that takes the tenant over its limit, and every one after it, is refused
  with the policy's reply (the crossing unit is refused, as for messages).  A refused message is
  refused for all its recipients without counting them again.  ``check_at="mail"`` with a
  ``count="recipients"`` policy is refused at construction: at ``MAIL`` there are no
  recipients, so every message would weigh 1.

A temporary failure (the store is down: ``451 4.3.0``) is never remembered: the next ``RCPT``
of the same message asks the policy again, and nothing was counted for the failed attempt.

Replies are the policy's `Reply` values rendered with ``str()``: several lines joined by CRLF,
which aiosmtpd sends verbatim (it adds the final CRLF), so a tenant's multi-line override reaches
the client intact.

What the request is made of
---------------------------
* client IP: the address of a valid PROXY protocol header when the server was started with
  ``proxy_protocol_timeout`` (the proxy's own address is never used: a ``PROXY UNKNOWN`` header
  gives no address), else ``session.peer``;
* TLS certificate names: from the verified peer certificate (``session.ssl["peercert"]`` after
  STARTTLS, or the transport's ``peercert`` for implicit TLS); every ``subjectAltName`` DNS name
  in certificate order, else the subject's common name (see `peer_certificate_names`), as
  ``tls_cert_names``, and the first of them as ``tls_cert_name``.  A connector matches when any
  of the names matches it (names of different tenants are ambiguous: the client address
  decides).  Python only exposes a certificate it verified: the server's SSL context needs
  ``verify_mode`` ``CERT_OPTIONAL`` or ``CERT_REQUIRED`` and the client CAs loaded;
* SASL user: ``session.auth_data.login`` after a successful ``AUTH`` (aiosmtpd's
  ``authenticator`` API), or the legacy ``auth_callback`` login data;
* the envelope sender and the recipients known at the stage of the check.

Delivery: ``handle_DATA`` passes the envelope to the optional *relay* callable (sync callables
run in a worker thread, so a blocking ``smtplib`` call does not stall the event loop) and
answers ``250 2.0.0 OK``, or the relay's own reply when it returns one.  A relay that raises
gets ``451 4.4.0``: the client keeps the message and retries.
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import itertools
import logging
import os
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final, Literal, TypeAlias

import attrs

from domainpolicy._alerts.sinks import AlertsConfig
from domainpolicy._alerts.worker import AlertWorker
from domainpolicy._errors import InvalidAddress, InvalidConfiguration, shown
from domainpolicy._names import parse_address
from domainpolicy._policy import ACCEPTED_REPLY, Decision, Outcome, RelayPolicy, RelayRequest
from domainpolicy._replies import Reply, ReplyCode

__all__ = [
    "DELIVERED_REPLY",
    "RECIPIENT_OK_REPLY",
    "RELAY_FAILED_REPLY",
    "PolicyHandler",
    "RelayCallable",
    "peer_certificate_name",
    "peer_certificate_names",
]

log = logging.getLogger("domainpolicy.integrations.aiosmtpd")

RECIPIENT_OK_REPLY: Final = Reply(250, "2.1.5", "Recipient OK")
"""The answer to an accepted ``RCPT TO``."""

DELIVERED_REPLY: Final = Reply(250, "2.0.0", "OK")
"""The answer at the end of ``DATA`` when the relay (if any) returned no reply of its own."""

RELAY_FAILED_REPLY: Final = Reply(451, "4.4.0", "Relay to the next hop failed, try again later")
"""The answer at the end of ``DATA`` when the relay callable raised."""

RelayCallable: TypeAlias = Callable[[Any], Awaitable[str | Reply | None] | str | Reply | None]
"""A relay: called with the aiosmtpd ``Envelope`` of an accepted message; returns None (answer
`DELIVERED_REPLY`) or the reply to give (a `Reply` or reply text); raises to tempfail."""


def peer_certificate_names(peercert: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The names to attribute a TLS client by, from a verified peer certificate.

    *peercert* is the dict of `ssl.SSLSocket.getpeercert` (as aiosmtpd and asyncio expose it).
    Every ``subjectAltName`` DNS name, in certificate order (other kinds, such as IP addresses,
    are not names); without any, the subject's first ``commonName`` alone (RFC 6125 section
    6.4.4: the CN only counts when there is no DNS name).  An empty dict (a certificate Python
    did not verify) or None gives ``()``.  All names are returned; `ConnectorTable.attribute`
    considers the first `ConnectorTable.MAX_CERT_NAMES` of them.

    Never raises: malformed entries are skipped.
    """
    if not isinstance(peercert, Mapping) or not peercert:
        return ()
    names = tuple(
        entry[1]
        for entry in _entries(peercert.get("subjectAltName"))
        if isinstance(entry, Sequence)
        and len(entry) == 2
        and entry[0] == "DNS"
        and isinstance(entry[1], str)
        and entry[1]
    )
    if names:
        return names
    for rdn in _entries(peercert.get("subject")):
        for pair in _entries(rdn):
            if (
                isinstance(pair, Sequence)
                and len(pair) == 2
                and pair[0] == "commonName"
                and isinstance(pair[1], str)
                and pair[1]
            ):
                return (pair[1],)
    return ()


def peer_certificate_name(peercert: Mapping[str, Any] | None) -> str | None:
    """The first of `peer_certificate_names`: the first ``subjectAltName`` DNS name, else the
    subject's ``commonName``; None when there is none (kept for compatibility: attribution uses
    all the names).

    Never raises: malformed entries are skipped.
    """
    names = peer_certificate_names(peercert)
    return names[0] if names else None


def _entries(value: object) -> Sequence[object]:
    """*value* if it is a list or tuple (a ``getpeercert`` sequence), else nothing."""
    return value if isinstance(value, tuple | list) else ()


def _is_async(function: object) -> bool:
    return inspect.iscoroutinefunction(function) or inspect.iscoroutinefunction(
        getattr(function, "__call__", None)  # noqa: B004 - an instance with an async __call__
    )


def _client_ip(session: Any) -> str | None:
    proxy = getattr(session, "proxy_data", None)
    if proxy is not None:
        # Behind a PROXY-protocol proxy the connection's peer is the proxy itself.
        source = getattr(proxy, "src_addr", None) if getattr(proxy, "valid", False) else None
        return None if source is None else _ip_text(source)
    peer = getattr(session, "peer", None)
    if isinstance(peer, tuple | list) and peer:
        return _ip_text(peer[0])
    return None


def _ip_text(value: object) -> str | None:
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return str(value)
    if isinstance(value, str):
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            return None
    return None


def _tls_cert_names(server: Any, session: Any) -> tuple[str, ...]:
    ssl_info = getattr(session, "ssl", None)
    peercert = ssl_info.get("peercert") if isinstance(ssl_info, Mapping) else None
    if not peercert:
        transport = getattr(server, "transport", None)
        get_extra = getattr(transport, "get_extra_info", None)
        if callable(get_extra):
            peercert = get_extra("peercert")
    return peer_certificate_names(peercert)


def _sasl_user(session: Any) -> str | None:
    login: object = None
    if getattr(session, "authenticated", None):
        data = getattr(session, "auth_data", None)
        login = getattr(data, "login", data)
    if login is None:
        # The legacy auth_callback API stores the login in Session.login_data, whose getter
        # logs a deprecation warning on every read; read the value behind it instead.
        login = getattr(session, "_login_data", None)
    if isinstance(login, bytes | bytearray):
        login = bytes(login).decode("utf-8", "replace")
    return login if isinstance(login, str) and login else None


@attrs.define
class _Message:
    """What the handler remembers about the message of one aiosmtpd envelope."""

    id: str
    decision: Decision | None = None


class PolicyHandler:
    """An aiosmtpd handler that applies a `RelayPolicy` (see the module documentation).

    Args:
        policy: the relay policy to consult.
        check_at: ``"mail"`` (decide at ``MAIL FROM``) or ``"rcpt"`` (decide at the first
            ``RCPT TO``; required by ``count="recipients"`` policies).
        relay: called with the envelope of each accepted message at the end of ``DATA``
            (sync or async; see `RelayCallable`).  None: accept and drop the content.
        on_decision: called with each `RelayRequest` and its `Decision` (metrics, tests);
            exceptions it raises are logged and ignored.
        alerts: the ``[alerts]`` configuration (`PolicyConfig.alerts`): when given, the
            handler starts an `AlertWorker` on the policy's store (a daemon thread, never in
            the SMTP path), which delivers the outbox's alerts to the sinks; `close` stops it.

    Raises:
        InvalidConfiguration: an argument is of the wrong type or value, or *check_at* is
            ``"mail"`` for a policy that counts recipients.
    """

    def __init__(
        self,
        policy: RelayPolicy,
        *,
        check_at: Literal["mail", "rcpt"] = "mail",
        relay: RelayCallable | None = None,
        on_decision: Callable[[RelayRequest, Decision], None] | None = None,
        alerts: AlertsConfig | None = None,
    ) -> None:
        problems = []
        given: dict[str, object] = {
            "policy": policy,
            "check_at": check_at,
            "relay": relay,
            "on_decision": on_decision,
            "alerts": alerts,
        }
        if not isinstance(given["policy"], RelayPolicy):
            problems.append(f"policy={shown(policy)}: must be a RelayPolicy")
        if given["check_at"] not in ("mail", "rcpt"):
            problems.append(f"check_at={check_at!r}: must be 'mail' or 'rcpt'")
        elif check_at == "mail" and getattr(policy, "count", None) == "recipients":
            problems.append(
                "check_at='mail' with a policy that counts recipients: there are no recipients "
                "at MAIL FROM, use check_at='rcpt'"
            )
        if relay is not None and not callable(given["relay"]):
            problems.append(f"relay={shown(relay)}: must be callable or None")
        if on_decision is not None and not callable(given["on_decision"]):
            problems.append(f"on_decision={shown(on_decision)}: must be callable or None")
        if alerts is not None and not isinstance(given["alerts"], AlertsConfig):
            problems.append(f"alerts={shown(alerts)}: must be an AlertsConfig or None")
        if problems:
            raise InvalidConfiguration(problems, source="PolicyHandler")
        self.policy = policy
        self.check_at = check_at
        self.relay = relay
        self.on_decision = on_decision
        self._messages: weakref.WeakKeyDictionary[Any, _Message] = weakref.WeakKeyDictionary()
        self._ids = itertools.count(1)
        self._id_prefix = f"aiosmtpd-{os.getpid()}-"
        self.alert_worker: AlertWorker | None = None
        if alerts is not None:
            self.alert_worker = AlertWorker(
                policy.store, alerts, policy=policy.machine.policy, clock=policy.clock
            )
            self.alert_worker.start()

    def close(self) -> None:
        """Stop the alert delivery worker, if any (after its current delivery)."""
        if self.alert_worker is not None:
            self.alert_worker.stop()
            self.alert_worker = None

    # ------------------------------------------------------------------ aiosmtpd hooks

    async def handle_PROXY(self, server: Any, session: Any, envelope: Any, proxy_data: Any) -> bool:
        """Accept a valid PROXY protocol header (only called when the server expects one);
        its source address becomes the client IP of every request of the session.

        Never raises.
        """
        return bool(getattr(proxy_data, "valid", False))

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, mail_options: list[str]
    ) -> str:
        """``MAIL FROM``: decide (``check_at="mail"``) or check the sender's syntax (``"rcpt"``).

        On acceptance sets ``envelope.mail_from`` and extends ``envelope.mail_options``, as
        aiosmtpd requires of a MAIL hook.

        Never raises: an unexpected error is logged and answered with ``451 4.3.0``.
        """
        try:
            if self.check_at == "mail":
                # A new MAIL in the same envelope (after a refusal) is a new attempt.
                message = self._messages[envelope] = self._new_message()
                decision = await self._decide(server, session, message, address, ())
                reply = decision.reply
                accepted = decision.accepted
            else:
                try:
                    parse_address(address)
                except InvalidAddress:
                    reply, accepted = self.policy.reply(ReplyCode.BAD_SENDER), False
                else:
                    reply, accepted = ACCEPTED_REPLY, True
            if accepted:
                envelope.mail_from = address
                envelope.mail_options.extend(mail_options)
            return str(reply)
        except Exception:
            log.exception("unexpected error at MAIL FROM %r", address)
            return str(self.policy.reply(ReplyCode.STORE_UNAVAILABLE))

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        """``RCPT TO``: accept (``check_at="mail"``) or decide at the first recipient.

        On acceptance appends to ``envelope.rcpt_tos`` (and ``envelope.rcpt_options``).

        Never raises: an unexpected error is logged and answered with ``451 4.3.0``.
        """
        try:
            reply = await self._recipient(server, session, envelope, address)
            if reply is None:
                envelope.rcpt_tos.append(address)
                envelope.rcpt_options.extend(rcpt_options)
                return str(RECIPIENT_OK_REPLY)
            return str(reply)
        except Exception:
            log.exception("unexpected error at RCPT TO %r", address)
            return str(self.policy.reply(ReplyCode.STORE_UNAVAILABLE))

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        """End of ``DATA``: hand the accepted message to the relay callable, if any.

        Never raises: a relay that raises is logged and answered with `RELAY_FAILED_REPLY`.
        """
        message = self._messages.pop(envelope, None)
        relay = self.relay
        if relay is None:
            return str(DELIVERED_REPLY)
        try:
            if _is_async(relay):
                result: object = await relay(envelope)  # type: ignore[misc]
            else:
                # A sync relay (smtplib) blocks: keep it off the event loop.
                result = await asyncio.to_thread(relay, envelope)
                if inspect.isawaitable(result):
                    result = await result
        except Exception:
            log.exception(
                "relay failed for message %s from %r",
                message.id if message is not None else "-",
                envelope.mail_from,
            )
            return str(RELAY_FAILED_REPLY)
        if result is None:
            return str(DELIVERED_REPLY)
        if isinstance(result, Reply | str):
            return str(result)
        log.error("relay returned %s, not a reply or None; answering OK", shown(result))
        return str(DELIVERED_REPLY)

    # ------------------------------------------------------------------ the decision

    def build_request(
        self,
        server: Any,
        session: Any,
        sender: str,
        recipients: tuple[str, ...],
        message_id: str | None = None,
    ) -> RelayRequest:
        """The `RelayRequest` for the current transaction (override to add fields).

        Never raises.
        """
        cert_names = _tls_cert_names(server, session)
        return RelayRequest(
            sender=sender,
            client_ip=_client_ip(session),
            tls_cert_name=cert_names[0] if cert_names else None,
            tls_cert_names=cert_names,
            sasl_user=_sasl_user(session),
            recipients=recipients,
            message_id=message_id,
        )

    def _new_message(self) -> _Message:
        return _Message(f"{self._id_prefix}{next(self._ids)}")

    async def _decide(
        self,
        server: Any,
        session: Any,
        message: _Message,
        sender: str,
        recipients: tuple[str, ...],
    ) -> Decision:
        request = self.build_request(server, session, sender, recipients, message.id)
        decision = await self.policy.evaluate_async(request)
        log.info(
            "message=%s client=%s sender=%r tenant=%s domain=%s outcome=%s reason=%s reply=%d %s",
            message.id,
            request.client_ip,
            sender,
            decision.tenant,
            decision.sender_domain,
            decision.outcome.value,
            decision.reason,
            decision.reply.code,
            decision.reply.status,
        )
        if self.on_decision is not None:
            try:
                self.on_decision(request, decision)
            except Exception:
                log.exception("on_decision callback failed")
        return decision

    async def _recipient(
        self, server: Any, session: Any, envelope: Any, address: str
    ) -> Reply | None:
        """None when *address* is accepted, else the reply refusing it."""
        if self.check_at == "mail":
            return None  # decided at MAIL FROM: aiosmtpd only gets here after an acceptance
        message = self._messages.get(envelope)
        if message is None:
            message = self._messages[envelope] = self._new_message()
        first = message.decision
        if first is not None:
            if not first.accepted:
                return first.reply  # the message is refused: once, not per recipient
            if self.policy.count != "recipients":
                return None  # counted once per message, at the first recipient
        decision = await self._decide(server, session, message, envelope.mail_from, (address,))
        if first is None and decision.outcome is not Outcome.TEMPFAIL:
            message.decision = decision
        return None if decision.accepted else decision.reply
