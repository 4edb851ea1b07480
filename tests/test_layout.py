"""The package's layout keeps its promises: the public surface is pinned, imports flow one way.

The public names (``domainpolicy.__all__`` and each public submodule's ``__all__``) are pinned
here, so a reorganisation of the private modules cannot drop or rename one.  The import graph of
``src/domainpolicy`` (imports inside functions included) has no circle, and no submodule of a
package imports that package's ``__init__`` back.  Each module opens with a docstring, and a
module over 1,200 lines says in it why it is not split.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "domainpolicy"
MAX_LINES = 1200

PUBLIC_ALL = {
    "domainpolicy": [
        "DomainPolicyError",
        "InvalidAddress",
        "InvalidConfiguration",
        "InvalidDomain",
        "InvalidReply",
        "InvalidSnapshot",
        "InvalidTransition",
        "StoreUnavailable",
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
        "SNAPSHOT_VERSION",
        "AcceptedDomain",
        "DomainMatcher",
        "DomainType",
        "Match",
        "MatchKind",
        "Owner",
        "ConnectorTable",
        "InboundConnector",
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
        "AlertWorker",
        "AlertsConfig",
        "DeliveryReport",
        "LogSink",
        "SmtpSink",
        "TenantContacts",
        "WebhookSink",
        "SIGNATURE_HEADER",
        "verify_webhook",
    ],
    "domainpolicy.integrations": [
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
    ],
    "domainpolicy.integrations.postfix": [
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
    ],
    "domainpolicy.console": ["create_app"],
    "domainpolicy.integrations.aiosmtpd": [
        "DELIVERED_REPLY",
        "RECIPIENT_OK_REPLY",
        "RELAY_FAILED_REPLY",
        "PolicyHandler",
        "RelayCallable",
        "peer_certificate_name",
        "peer_certificate_names",
    ],
    "domainpolicy.testing": [
        "addresses",
        "ascii_labels",
        "domains",
        "hostile_text",
        "idn_labels",
        "local_parts",
        "replies",
        "reply_texts",
    ],
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(module: str, node: ast.ImportFrom) -> list[str]:
    """The modules of the package an ``from ... import ...`` names (a name may be a module)."""
    if node.level:
        base = module if _is_package(module) else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            base = base.rpartition(".")[0]
        target = f"{base}.{node.module}" if node.module else base
    else:
        target = node.module or ""
    found = [target] if target in MODULES else []
    found += [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
    return found


def _imports(module: str) -> set[str]:
    """Every module of the package that *module* imports, at any depth of its code."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            out.update(_resolve(module, node))
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in MODULES)
    out.discard(module)
    return out


GRAPH = {name: _imports(name) for name in MODULES}


@pytest.mark.parametrize("module", sorted(PUBLIC_ALL))
def test_public_all_is_pinned(module: str) -> None:
    """Each public module's ``__all__`` is exactly the pinned list, and every name resolves."""
    imported = importlib.import_module(module)
    assert list(imported.__all__) == PUBLIC_ALL[module]
    for name in imported.__all__:
        assert hasattr(imported, name), f"{module}.{name}"


def test_import_graph_has_no_circle() -> None:
    """No module of the package reaches itself through its imports (function-level ones too)."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    circles: list[list[str]] = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for nxt in sorted(GRAPH[name]):
            if state.get(nxt) == 1:
                circles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert circles == []


def test_no_submodule_imports_its_package_back() -> None:
    """A package's ``__init__`` is imported by its users, never by its own submodules."""
    offenders = [
        (name, target)
        for name, targets in GRAPH.items()
        for target in targets
        if _is_package(target) and name.startswith(f"{target}.")
    ]
    assert offenders == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_opens_with_a_docstring(module: str) -> None:
    """Each file opens with a docstring saying what lives there."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    assert ast.get_docstring(tree), module


@pytest.mark.parametrize("module", sorted(MODULES))
def test_long_modules_say_why(module: str) -> None:
    """A module over 1,200 lines states in its docstring why it is one file."""
    text = MODULES[module].read_text(encoding="utf-8")
    if text.count("\n") > MAX_LINES:
        docstring = ast.get_docstring(ast.parse(text)) or ""
        assert "Why one file" in docstring, f"{module}: {text.count(chr(10))} lines"
