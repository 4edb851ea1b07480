"""domainpolicy: accepted-domain relay policy for multi-tenant mail services.

The public surface is flat: import everything from ``domainpolicy``.  Implementation modules are
private (``domainpolicy._names`` and so on); ``domainpolicy.testing`` (hypothesis strategies) and
``domainpolicy.integrations`` are the public submodules.
"""

from __future__ import annotations

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

# --- matcher (issue 3) ---

# --- block state machine (issue 4) ---

# --- replies and NDRs (issue 5) ---

# --- policy and stores (issue 6) ---

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
    # block state machine (issue 4)
    # replies and NDRs (issue 5)
    # policy and stores (issue 6)
]
