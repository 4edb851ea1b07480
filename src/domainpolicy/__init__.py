"""domainpolicy: accepted-domain relay policy for multi-tenant mail services.

The public surface is flat: import everything from ``domainpolicy``.  Implementation modules are
private (``domainpolicy._names`` and so on); ``domainpolicy.testing`` (hypothesis strategies) and
``domainpolicy.integrations`` are the public submodules.
"""

from __future__ import annotations

# --- matcher (issue 3) ---
from ._connectors import ConnectorTable, InboundConnector

# --- errors (foundation) ---
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

# --- names (foundation) ---
from ._names import (
    MAX_INPUT_CHARS,
    Address,
    NormalizedDomain,
    domain_to_unicode,
    normalize_domain,
    parse_address,
)
from ._psl import PublicSuffixes, default_public_suffixes, is_public_suffix, registrable_domain

# --- block state machine (issue 4) ---
# isort: split
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

# --- replies and NDRs (issue 5) ---
# isort: split
from ._dsn import DsnRecipient, InvalidDsn, build_dsn, dsn_languages
from ._replies import (
    MAX_REPLY_LINE_OCTETS,
    POSTFIX_REJECT_RESERVE,
    Reply,
    ReplyCatalog,
    ReplyCode,
    sanitize_reply_text,
)

# --- policy and stores (issue 6) ---
# isort: split
from ._stores import AuditRecord, MemoryStore, Mutation, SQLiteStore, StateStore, open_store

__version__ = "0.1.0.dev0"

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
    # names
    "MAX_INPUT_CHARS",
    "Address",
    "NormalizedDomain",
    "PublicSuffixes",
    "default_public_suffixes",
    "domain_to_unicode",
    "is_public_suffix",
    "normalize_domain",
    "parse_address",
    "registrable_domain",
    # matcher (issue 3)
    "ConnectorTable",
    "InboundConnector",
    "SNAPSHOT_VERSION",
    "AcceptedDomain",
    "DomainMatcher",
    "DomainType",
    "Match",
    "MatchKind",
    "Owner",
    # block state machine (issue 4)
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
    # replies and NDRs (issue 5)
    "MAX_REPLY_LINE_OCTETS",
    "POSTFIX_REJECT_RESERVE",
    "DsnRecipient",
    "InvalidDsn",
    "Reply",
    "ReplyCatalog",
    "ReplyCode",
    "build_dsn",
    "dsn_languages",
    "sanitize_reply_text",
    # policy and stores (issue 6)
    "AuditRecord",
    "MemoryStore",
    "Mutation",
    "SQLiteStore",
    "StateStore",
    "open_store",
]
