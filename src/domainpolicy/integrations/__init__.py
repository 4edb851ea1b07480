"""MTA integrations: how domainpolicy meets real mail servers.

``domainpolicy.integrations.postfix`` speaks Postfix's SMTPD access policy delegation protocol
(request parser, asyncio `PolicyServer`, per-message `InstanceCache`).  The names below are
re-exported for convenience; the MTA-specific modules are the documented homes.
"""

from __future__ import annotations

from ._metrics import ACTION_CLASSES, LATENCY_BUCKETS, MetricsEndpoint, PolicyMetrics, action_class
from .postfix import (
    DEFAULT_FALLBACK_ACTION,
    KNOWN_ATTRIBUTES,
    InstanceCache,
    ListenAddress,
    MalformedRequest,
    PolicyHandler,
    PolicyLimits,
    PolicyRequest,
    PolicyServer,
    ServerSettings,
    annotate,
    install_signal_handlers,
    parse_listen_address,
    parse_request,
    sanitize_action,
    xtext_decode,
)

__all__ = [
    "ACTION_CLASSES",
    "DEFAULT_FALLBACK_ACTION",
    "KNOWN_ATTRIBUTES",
    "LATENCY_BUCKETS",
    "InstanceCache",
    "ListenAddress",
    "MalformedRequest",
    "MetricsEndpoint",
    "PolicyHandler",
    "PolicyLimits",
    "PolicyMetrics",
    "PolicyRequest",
    "PolicyServer",
    "ServerSettings",
    "action_class",
    "annotate",
    "install_signal_handlers",
    "parse_listen_address",
    "parse_request",
    "sanitize_action",
    "xtext_decode",
]
