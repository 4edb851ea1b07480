"""MTA integrations: how domainpolicy meets real mail servers.

``domainpolicy.integrations.postfix`` speaks Postfix's SMTPD access policy delegation protocol
(request parser, asyncio `PolicyServer`, per-message `InstanceCache`, and `make_handler`, which
answers with a `RelayPolicy`).  The names below are
re-exported for convenience; the MTA-specific modules are the documented homes.
"""

from __future__ import annotations

from ._metrics import ACTION_CLASSES, LATENCY_BUCKETS, MetricsEndpoint, PolicyMetrics, action_class
from .postfix import (
    DECIDING_STATES,
    DEFAULT_FALLBACK_ACTION,
    KNOWN_ATTRIBUTES,
    InstanceCache,
    ListenAddress,
    MalformedRequest,
    PolicyLimits,
    PolicyRequest,
    PolicyServer,
    PostfixHandler,
    ServerSettings,
    annotate,
    certificate_name,
    install_signal_handlers,
    make_handler,
    parse_listen_address,
    parse_request,
    relay_request,
    sanitize_action,
    xtext_decode,
)

__all__ = [
    "ACTION_CLASSES",
    "DECIDING_STATES",
    "DEFAULT_FALLBACK_ACTION",
    "KNOWN_ATTRIBUTES",
    "LATENCY_BUCKETS",
    "InstanceCache",
    "ListenAddress",
    "MalformedRequest",
    "MetricsEndpoint",
    "PolicyLimits",
    "PolicyMetrics",
    "PolicyRequest",
    "PolicyServer",
    "PostfixHandler",
    "ServerSettings",
    "action_class",
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
