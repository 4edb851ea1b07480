"""domainpolicy: accepted-domain relay policy for multi-tenant mail services.

The public surface is flat: import everything from ``domainpolicy``.  Implementation modules are
private (``domainpolicy._names`` and so on); ``domainpolicy.testing`` (hypothesis strategies) and
``domainpolicy.integrations`` (Postfix, aiosmtpd) are the public submodules.
"""

from __future__ import annotations

from ._alerts import (
    AlertsConfig,
    AlertWorker,
    DeliveryReport,
    LogSink,
    SmtpSink,
    TenantContacts,
    WebhookSink,
)
from ._alerts.notice import SIGNATURE_HEADER
from ._alerts.notice import verify as verify_webhook
from ._blockstate import (
    STATE_SCHEMA_VERSION,
    TRANSITIONS,
    Alert,
    AlertKind,
    Attestation,
    Block,
    BlockCode,
    BlockMachine,
    BlockPolicy,
    Checklist,
    ChecklistIncomplete,
    ConnectorReview,
    Denial,
    Edge,
    Effects,
    Event,
    Evidence,
    InvalidEvent,
    InvalidTenantState,
    Limits,
    State,
    TenantState,
    Transition,
    UnblockRequest,
    Verdict,
    Window,
)
from ._config import PolicyConfig, load_config, parse_domains_file
from ._connectors import ConnectorTable, InboundConnector
from ._dsn import DsnRecipient, InvalidDsn, build_dsn, dsn_languages
from ._errors import (
    DomainPolicyError,
    InvalidAddress,
    InvalidConfiguration,
    InvalidDomain,
    InvalidReply,
    InvalidSnapshot,
    InvalidTransition,
    StoreUnavailable,
)
from ._matcher import (
    SNAPSHOT_VERSION,
    AcceptedDomain,
    DomainMatcher,
    DomainType,
    Match,
    MatchKind,
    Owner,
)
from ._names import (
    MAX_INPUT_CHARS,
    Address,
    NormalizedDomain,
    domain_to_unicode,
    normalize_domain,
    parse_address,
)
from ._policy import ACCEPTED_REPLY, Decision, Outcome, RelayPolicy, RelayRequest, TenantStatus
from ._psl import PublicSuffixes, default_public_suffixes, is_public_suffix, registrable_domain
from ._replies import (
    MAX_REPLY_LINE_OCTETS,
    POSTFIX_REJECT_RESERVE,
    Reply,
    ReplyCatalog,
    ReplyCode,
    sanitize_reply_text,
)
from ._stores import (
    AuditRecord,
    MemoryStore,
    Mutation,
    ObserveItem,
    ObserveResult,
    SQLiteStore,
    StateStore,
    open_store,
)

__version__ = "0.1.0.dev0"


def __getattr__(name: str) -> object:
    """``domainpolicy.RedisStore``, imported on first use (it needs the ``redis`` extra)."""
    if name == "RedisStore":
        try:
            from ._stores.redis import RedisStore
        except ImportError as exc:
            raise ImportError(
                "domainpolicy.RedisStore needs the redis extra: pip install 'domainpolicy[redis]'"
            ) from exc
        return RedisStore
    raise AttributeError(f"module 'domainpolicy' has no attribute {name!r}")


__all__ = [
    # errors
    "DomainPolicyError",
    "InvalidAddress",
    "InvalidConfiguration",
    "InvalidDomain",
    "InvalidReply",
    "InvalidSnapshot",
    "InvalidTransition",
    "StoreUnavailable",
    # names and addresses
    "MAX_INPUT_CHARS",
    "Address",
    "NormalizedDomain",
    "domain_to_unicode",
    "normalize_domain",
    "parse_address",
    "PublicSuffixes",
    "default_public_suffixes",
    "is_public_suffix",
    "registrable_domain",
    # accepted-domain matcher and connectors
    "SNAPSHOT_VERSION",
    "AcceptedDomain",
    "DomainMatcher",
    "DomainType",
    "Match",
    "MatchKind",
    "Owner",
    "ConnectorTable",
    "InboundConnector",
    # block state machine
    "STATE_SCHEMA_VERSION",
    "TRANSITIONS",
    "Alert",
    "AlertKind",
    "Attestation",
    "Block",
    "BlockCode",
    "BlockMachine",
    "BlockPolicy",
    "Checklist",
    "ChecklistIncomplete",
    "ConnectorReview",
    "Denial",
    "Edge",
    "Effects",
    "Event",
    "Evidence",
    "InvalidEvent",
    "InvalidTenantState",
    "Limits",
    "State",
    "TenantState",
    "Transition",
    "UnblockRequest",
    "Verdict",
    "Window",
    # SMTP replies and NDRs
    "MAX_REPLY_LINE_OCTETS",
    "POSTFIX_REJECT_RESERVE",
    "Reply",
    "ReplyCatalog",
    "ReplyCode",
    "sanitize_reply_text",
    "DsnRecipient",
    "InvalidDsn",
    "build_dsn",
    "dsn_languages",
    # relay policy, configuration and stores
    "ACCEPTED_REPLY",
    "Decision",
    "Outcome",
    "RelayPolicy",
    "RelayRequest",
    "TenantStatus",
    "PolicyConfig",
    "load_config",
    "parse_domains_file",
    "AuditRecord",
    "MemoryStore",
    "Mutation",
    "ObserveItem",
    "ObserveResult",
    "SQLiteStore",
    "StateStore",
    "open_store",
    # alerts: the outbox's delivery worker and its sinks
    "AlertWorker",
    "AlertsConfig",
    "DeliveryReport",
    "LogSink",
    "SmtpSink",
    "TenantContacts",
    "WebhookSink",
    "SIGNATURE_HEADER",
    "verify_webhook",
]
