"""Postfix SMTPD access policy delegation: a strict request parser and an asyncio server.

Three modules, one direction: `protocol` (parse, limits, sanitise, xtext; no I/O) <- `server`
(the asyncio `PolicyServer`, logging, listen addresses, signals) <- `handler` (`make_handler`:
the relay policy, the per-message `InstanceCache`, group commit).  This ``__init__`` re-exports
their public names; the modules never import it.

Protocol (``SMTPD_POLICY_README``): Postfix sends ``name=value`` lines ended by an empty line;
the server answers one ``action=...`` line and an empty line.  One connection carries many
requests, across many SMTP sessions, so per-message state is keyed on the ``instance``
attribute (see `InstanceCache`), never on the connection.

Design
------
* `parse_request` / `PolicyRequest`: every attribute Postfix 2.1 to 3.12 sends is a field
  (an absent attribute is ``""``, as Postfix itself sends ``name=`` for empty values); unknown
  attributes are kept in `PolicyRequest.unknown` and otherwise ignored; ``ccert_*`` values are
  xtext-decoded (RFC 3461); values are UTF-8 (SMTPUTF8 senders arrive raw), and bytes that are
  not UTF-8 become U+FFFD so that the policy, not the transport, refuses them.
* The parser is strict and bounded (`PolicyLimits`): line length, attribute count and request
  size are capped, attribute names must be ``[A-Za-z0-9_.-]+``, NUL bytes and duplicate
  attributes are refused, ``request=smtpd_access_policy`` is required.  Lines end with LF
  alone, as Postfix sends them: a CR is part of the value (and ``\\r\\n`` is not an empty
  line).
* A malformed request gets **no reply**: `PolicyServer` logs a warning, counts it and closes
  the connection, as the protocol requires.  Postfix then reconnects, retries and finally
  applies ``smtpd_policy_service_default_action``.
* The handler (`PostfixHandler`) returns the action text.  The server sanitises it
  (`sanitize_action`: one line of printable ASCII, bounded length) so a handler bug can never
  inject protocol lines.  A handler that raises or returns a non-string, or that does not answer
  within ``request_timeout``, gets the fallback action (default ``451 4.3.0 Policy service
  temporarily unavailable``) instead of a disconnect: the answer is explicit and immediate,
  Postfix does not retry (which would call the failing handler again and could count the
  message twice) and the problem is logged and counted.
* Group commit (`make_handler`, stores that do I/O): Postfix opens many policy connections and
  sends one request at a time on each, so under load many requests wait at once.  A request
  that arrives when no decision is running is decided at once, alone; requests that arrive
  while one runs in the worker thread are queued and decided together by one
  `RelayPolicy.evaluate_many` when it returns (one SQLite transaction, one Redis round trip),
  at most ``max_batch`` (`DEFAULT_MAX_BATCH`, 256) at a time.  The decisions are those of
  deciding the requests one by one in arrival order; a waiter that times out does not cancel
  its batch.
* Structured logging: one INFO line per request on ``domainpolicy.integrations.postfix``,
  ``key=value`` formatted, with the fields also attached as ``record.policy`` (a dict) for JSON
  formatters.  The handler adds its own fields (tenant, verdict, ...) with `annotate`.
"""

from __future__ import annotations

from domainpolicy.integrations.postfix.handler import (
    DECIDING_STATES,
    DEFAULT_MAX_BATCH,
    InstanceCache,
    certificate_name,
    make_handler,
    relay_request,
)
from domainpolicy.integrations.postfix.protocol import (
    KNOWN_ATTRIBUTES,
    MalformedRequest,
    PolicyLimits,
    PolicyRequest,
    parse_request,
    sanitize_action,
    xtext_decode,
)
from domainpolicy.integrations.postfix.server import (
    DEFAULT_FALLBACK_ACTION,
    ListenAddress,
    PolicyServer,
    PostfixHandler,
    ServerSettings,
    annotate,
    install_signal_handlers,
    parse_listen_address,
)

__all__ = [
    "DECIDING_STATES",
    "DEFAULT_FALLBACK_ACTION",
    "DEFAULT_MAX_BATCH",
    "KNOWN_ATTRIBUTES",
    "InstanceCache",
    "ListenAddress",
    "MalformedRequest",
    "PolicyLimits",
    "PolicyRequest",
    "PolicyServer",
    "PostfixHandler",
    "ServerSettings",
    "annotate",
    "certificate_name",
    "install_signal_handlers",
    "make_handler",
    "parse_listen_address",
    "parse_request",
    "relay_request",
    "sanitize_action",
    "xtext_decode",
]
