"""Operator commands of the ``domainpolicy`` command line: ``compile``, ``tenant ...`` and ``ndr``.

Declares its commands in `COMMANDS` (`domainpolicy._cli.build_parser` reads them); imports
`common` and the library, never the `domainpolicy._cli` package.  See ``docs/integrations.md``
("Command line").

* ``compile DOMAINS-FILE -o SNAPSHOT``: compile a large ``domain<TAB>tenant<TAB>flags`` file into
  a matcher snapshot, reporting counts and every problem with its line number;
  ``compile --registry STORE-URL -o SNAPSHOT`` writes a registry snapshot of a store's tenant
  registry instead (for ``serve --snapshot``).
* ``tenant status|history TENANT``: what an operator wants to see about a tenant.
* ``tenant register-domain|remove-domain|add-connector|remove-connector|declare-not-ours|
  connector-created|review-connector|attest|request-unblock|approve|deny|block|suspend TENANT
  ... --by WHO``: the administrative operations of `RelayPolicy`, applied to the configured (or
  ``--store``) store.  Domains and connectors change the store's tenant registry (seeded from
  the configuration when empty, see `domainpolicy._registry_io`), so every ``serve`` following
  that store enforces them within its poll interval, without a reload.
* ``ndr CODE``: the SMTP reply for a code and a non-delivery report built with `build_dsn`.

Exit codes, as for every command: 0 success; 1 refused (invalid input, a transition the block
state machine refuses, problems in a domains file); 2 usage, configuration or store error.
Errors are one line on stderr; refusals are the command's output (stdout, ``--json`` too).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import re
import socket
import sys
from array import array
from collections.abc import Callable, Iterator
from typing import Any, Final, TextIO

from domainpolicy._blockstate import Block, ChecklistIncomplete, TenantState
from domainpolicy._config import PolicyConfig, parse_domains_file
from domainpolicy._connectors import InboundConnector
from domainpolicy._dsn import build_dsn
from domainpolicy._errors import (
    DomainPolicyError,
    InvalidAddress,
    InvalidConfiguration,
    InvalidTransition,
)
from domainpolicy._matcher import AcceptedDomain, DomainMatcher, DomainType
from domainpolicy._names import parse_address
from domainpolicy._policy import RelayPolicy, TenantStatus
from domainpolicy._psl import PublicSuffixes
from domainpolicy._registry_io import policy_from_config
from domainpolicy._registry_snapshot import snapshot_registry
from domainpolicy._replies import Reply, ReplyCode
from domainpolicy._stores import AuditRecord, StateStore, open_store

from .common import (
    EXIT_INVALID,
    EXIT_OK,
    EXIT_USAGE,
    Command,
    Progress,
    add_progress_option,
    one_line,
    read_config,
    whole_number,
)

__all__ = ["COMMANDS"]

_ENTRY_RE: Final = re.compile(r"^entry #(\d+) ")
_ENTRY_PREFIX_RE: Final = re.compile(r"^entry #\d+ \(.*?\): ")
_PROGRESS_STEP: Final = 65536  # lines between progress-bar redraws (cheap for millions of lines)
_EXIT_CODES: Final = (
    "exit codes: 0 ok; 1 refused (invalid input, a refused transition, problems found); "
    "2 usage, configuration or store error (one line on stderr)"
)


# --------------------------------------------------------------------------- helpers


def _error(message: str, code: int = EXIT_USAGE) -> int:
    """Write one error line on stderr and return *code*."""
    sys.stderr.write(f"domainpolicy: error: {message}\n")
    return code


def _write(out: TextIO, args: argparse.Namespace, record: dict[str, Any], text: str) -> None:
    out.write((json.dumps(record, ensure_ascii=False) if args.json else text) + "\n")


def _stamp(at: float | None) -> str:
    if at is None:
        return "-"
    return datetime.datetime.fromtimestamp(at, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _aware_datetime(text: str) -> datetime.datetime:
    """argparse type: an ISO 8601 date-time with a time zone (``Z`` allowed)."""
    try:
        value = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 date-time") from exc
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no time zone (add Z or +00:00)")
    return value


_count = whole_number(0)
_positive_int = whole_number(1)


def _add_json(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: a sub-command's default must not overwrite ``tenant --json status ...``.
    parser.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="one JSON object per line on stdout",
    )


# --------------------------------------------------------------------------- compile


class _ReadError(Exception):
    """The domains file itself could not be read (as opposed to problems in its lines)."""


def _count_lines(path: str) -> int:
    """Lines in *path* (a last line without a newline counts), read as bytes: fast."""
    count = 0
    last = b"\n"
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (last != b"\n")


def _configure_compile(parser: argparse.ArgumentParser) -> None:
    parser.epilog = _EXIT_CODES
    parser.add_argument(
        "domains_file",
        metavar="DOMAINS-FILE",
        nargs="?",
        help="accepted domains, one 'domain<TAB>tenant<TAB>flags' per line (flags: "
        "subdomains and/or one of authoritative, internal_relay, external_relay)",
    )
    parser.add_argument(
        "--registry",
        metavar="STORE-URL",
        help="instead of a domains file: write a registry snapshot of this store's tenant "
        "registry (for 'serve --snapshot')",
    )
    parser.add_argument(
        "-o", "--output", required=True, metavar="SNAPSHOT", help="snapshot file to write"
    )
    parser.add_argument(
        "--public-suffix-list",
        metavar="FILE",
        help="Public Suffix List file (public_suffix_list.dat format; default: bundled)",
    )
    parser.add_argument(
        "--max-domains-per-tenant",
        type=_positive_int,
        metavar="N",
        help="refuse tenants with more than N entries (default: no limit)",
    )
    parser.add_argument(
        "--tenant", help="tenant of lines that have no tenant column (default: such lines are bad)"
    )
    add_progress_option(parser)


def _cmd_compile_registry(args: argparse.Namespace, out: TextIO) -> int:
    try:
        store = open_store(args.registry)
    except DomainPolicyError as exc:
        return _error(one_line(exc))
    try:
        view = snapshot_registry(store, args.output)
    except DomainPolicyError as exc:
        return _error(one_line(exc))
    finally:
        store.close()
    record = {
        "ok": True,
        "source": args.registry,
        "snapshot": args.output,
        "registry_version": view.version,
        "compiled": len(view.matcher),
        "connectors": len(view.connectors),
    }
    text = (
        f"wrote {args.output}: registry version {view.version}, {len(view.matcher)} accepted "
        f"domains, {len(view.connectors)} connectors"
    )
    _write(out, args, record, text)
    return EXIT_OK


def _cmd_compile(args: argparse.Namespace, out: TextIO) -> int:
    if (args.registry is None) == (args.domains_file is None):
        return _error("compile needs a DOMAINS-FILE or --registry STORE-URL (one of them)")
    if args.registry is not None:
        return _cmd_compile_registry(args, out)
    source: str = args.domains_file
    try:
        suffixes = (
            PublicSuffixes.from_file(args.public_suffix_list) if args.public_suffix_list else None
        )
        total = _count_lines(source)
    except OSError as exc:
        return _error(f"cannot read domains file {source!r}: {exc.strerror or exc}")
    except DomainPolicyError as exc:
        return _error(one_line(exc))
    progress = Progress(total, args)
    problems: list[tuple[int | None, str]] = []
    line_of = array("L")  # line number of each entry, by its position in the compiled sequence
    tenants: set[str] = set()
    last = [0]

    def entries() -> Iterator[AcceptedDomain]:
        progress.draw(0, f"0/{total} lines")
        redraw = _PROGRESS_STEP if progress.enabled else total + 1
        try:
            for number, item in parse_domains_file(source, tenant=args.tenant):
                last[0] = number
                if number >= redraw:
                    progress.draw(number, f"{number}/{total} lines")
                    redraw = number + _PROGRESS_STEP
                if isinstance(item, str):
                    problems.append((number, item))
                    continue
                line_of.append(number)
                tenants.add(item.tenant)
                yield item
        except InvalidConfiguration as exc:  # unreadable or not UTF-8: not a line problem
            raise _ReadError(one_line(exc)) from exc

    matcher: DomainMatcher | None = None
    try:
        matcher = DomainMatcher.compile(
            entries(),
            public_suffixes=suffixes,
            max_domains_per_tenant=args.max_domains_per_tenant,
        )
    except _ReadError as exc:
        progress.finish(last[0], f"{last[0]}/{total} lines")
        return _error(str(exc))
    except InvalidConfiguration as exc:
        for problem in exc.problems:
            found = _ENTRY_RE.match(problem)
            if found and int(found.group(1)) < len(line_of):
                problems.append((line_of[int(found.group(1))], problem[found.end() :]))
            else:
                problems.append((None, problem))
    progress.finish(total, f"{total}/{total} lines")
    problems.sort(key=lambda item: (item[0] is None, item[0] or 0))
    written = None
    if matcher is not None and not problems:
        matcher.save(args.output)  # InvalidSnapshot (cannot write): exit 2 through _cli.main
        written = args.output
    record = {
        "ok": written is not None,
        "source": source,
        "snapshot": written,
        "lines": total,
        "entries": len(line_of),
        "compiled": None if matcher is None else len(matcher),
        "tenants": len(tenants),
        "problems": [{"line": line, "message": message} for line, message in problems],
    }
    text = [
        f"{source}:{line}: {message}" if line is not None else f"{source}: {message}"
        for line, message in problems
    ]
    text.append(f"{source}: {total} lines, {len(line_of)} entries, {len(tenants)} tenants")
    if written is not None:
        assert matcher is not None
        merged = len(line_of) - len(matcher)
        text.append(
            f"wrote {written}: {len(matcher)} accepted domains"
            + (
                f" ({merged} identical duplicate{'s' if merged != 1 else ''} merged)"
                if merged
                else ""
            )
        )
    else:
        count = len(problems)
        text.append(f"{count} problem{'s' if count != 1 else ''}: snapshot not written")
    _write(out, args, record, "\n".join(text))
    return EXIT_OK if written is not None else EXIT_INVALID


# --------------------------------------------------------------------------- tenant


class _Refused(Exception):
    """A tenant command refused before touching anything (e.g. an unknown tenant)."""


def _open_policy(
    args: argparse.Namespace,
) -> tuple[PolicyConfig | None, StateStore, RelayPolicy | None]:
    """Load ``--config`` (if given) and open ``--store`` or the configured store.

    Raises:
        DomainPolicyError: the configuration or the store URL is unusable.
    """
    if args.config is None:  # tenant history: the store is enough
        return None, open_store(args.store), None
    config = read_config(args.config)
    store = open_store(args.store) if args.store is not None else config.open_store()
    try:
        return config, store, policy_from_config(config, store)
    except BaseException:
        store.close()
        raise


def _check_tenant(
    tenant: str, config: PolicyConfig | None, store: StateStore, policy: RelayPolicy | None
) -> None:
    """Refuse a tenant that is neither configured, registered nor stored: almost always a typo
    (registering a first domain or connector creates a tenant)."""
    if config is not None and (
        tenant in config.matcher.tenants() or any(c.tenant == tenant for c in config.connector_list)
    ):
        return
    if policy is not None and tenant in policy.matcher.tenants():
        return
    if tenant in store.tenants():
        return
    where = "in the configuration or " if config is not None else ""
    raise _Refused(f"unknown tenant {tenant!r}: not {where}in the state store")


def _block_dict(block: Block | None) -> dict[str, Any] | None:
    if block is None:
        return None
    return {
        "code": block.code.value,
        "since": block.since,
        "reason": block.reason,
        "actor": block.actor,
        "offending": list(block.offending),
        "registered": list(block.registered),
        "declared": list(block.declared),
        "to_review": list(block.to_review),
        "reviewed": [
            {"connector": r.connector, "kept": r.kept, "by": r.by, "at": r.at}
            for r in block.reviews
        ],
        "attested": block.attestation is not None,
        "request_pending": block.request is not None,
    }


def _domain_text(entry: AcceptedDomain) -> str:
    flags = []
    if entry.match_subdomains:
        flags.append("and subdomains")
    if entry.domain_type is not DomainType.AUTHORITATIVE:
        flags.append(entry.domain_type.value)
    return entry.domain + (f" ({', '.join(flags)})" if flags else "")


def _record_lines(record: AuditRecord, indent: str) -> list[str]:
    who = f" by {record.actor}" if record.actor else ""
    lines = [f"{indent}{_stamp(record.at)} {record.action}{who}: {record.before} -> {record.after}"]
    for key, value in record.detail.items():
        if key == "transitions":
            lines += [f"{indent}    {t.get('reason')}" for t in value if isinstance(t, dict)]
        elif key == "alerts":
            lines += [
                f"{indent}    alert {a.get('kind')}: {a.get('message')}"
                for a in value
                if isinstance(a, dict)
            ]
        elif value not in ("", None, []):
            shown = ", ".join(map(str, value)) if isinstance(value, list) else value
            lines.append(f"{indent}    {key}: {shown}")
    return lines


def _added(status: TenantStatus, key: str) -> str:
    info = status.added.get(key)
    if info is None:
        return ""
    return f" -- added {_stamp(info.at)} by {info.actor} (version {info.version})"


def _status_text(status: TenantStatus, now: float) -> str:
    block = status.raw.block
    state = status.state.value + (f" ({block.code.value})" if block is not None else "")
    lines = [f"tenant {status.tenant}: {state}"]
    if block is not None:
        lines.append(f"  since {_stamp(block.since)}: {block.reason}")
        if block.request is not None:
            lines.append(f"  unblock request pending since {_stamp(block.request.at)}")
    as_of = f" (as of {_stamp(status.as_of)})" if status.as_of is not None else ""
    lines.append(
        f"  window{as_of}: {status.total} relayed, {status.unregistered} from unregistered "
        f"domains, {status.distinct_domains} distinct unregistered "
        f"domain{'' if status.distinct_domains == 1 else 's'}"
    )
    if status.probation_until is not None:
        word = "on probation until" if status.raw.on_probation(now) else "probation ended"
        lines.append(f"  {word} {_stamp(status.probation_until)}")
    if status.checklist is not None:
        if status.checklist.complete:
            lines.append("  checklist: complete")
        else:
            lines.append(f"  checklist: {len(status.checklist.missing)} missing")
            lines += [f"    - {step}" for step in status.checklist.missing]
    if status.registry_version is None:
        domains = ", ".join(_domain_text(d) for d in status.accepted_domains) or "(none)"
        lines.append(f"  accepted domains: {domains}")
    else:
        lines.append(
            f"  accepted domains (registry version {status.registry_version}):"
            + ("" if status.accepted_domains else " (none)")
        )
        for entry in status.accepted_domains:
            lines.append(f"    {_domain_text(entry)}{_added(status, entry.domain)}")
        if status.connectors:
            lines.append("  inbound connectors:")
        for connector in status.connectors:
            parts = [str(n) for n in connector.sender_ip_ranges] + list(connector.tls_cert_names)
            off = "" if connector.enabled else ", disabled"
            lines.append(
                f"    {connector.name} ({', '.join(parts) or 'no match'}{off})"
                f"{_added(status, 'connector:' + connector.name)}"
            )
    if status.history:
        lines.append(f"  recent history ({len(status.history)}):")
        for record in status.history:
            lines += _record_lines(record, "    ")
    return "\n".join(lines)


def _tenant_status(args: argparse.Namespace, out: TextIO, policy: RelayPolicy) -> int:
    status = policy.status(args.tenant, history=args.history)
    now = policy.store.now()
    record = {
        **status.to_dict(),
        "on_probation": status.raw.on_probation(now),
        "block": _block_dict(status.raw.block),
    }
    _write(out, args, record, _status_text(status, now))
    return EXIT_OK


def _tenant_history(args: argparse.Namespace, out: TextIO, store: StateStore) -> int:
    records = store.history(args.tenant, limit=args.limit)
    if args.json:
        for item in records:
            out.write(json.dumps(item.to_dict(), ensure_ascii=False) + "\n")
        return EXIT_OK
    if not records:
        out.write(f"tenant {args.tenant}: no history\n")
    for item in records:
        out.write("\n".join(_record_lines(item, "")) + "\n")
    return EXIT_OK


# An action: (help, extra arguments, the call on the policy, a note to print on success).
_Call = Callable[[RelayPolicy, argparse.Namespace, PolicyConfig], TenantState]


def _args_domain(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--domain", required=True, help="the accepted domain")


def _args_register(parser: argparse.ArgumentParser) -> None:
    _args_domain(parser)
    parser.add_argument(
        "--subdomains", action="store_true", help="also accept every name under the domain"
    )
    parser.add_argument(
        "--type",
        choices=[t.value for t in DomainType],
        default=DomainType.AUTHORITATIVE.value,
        help="domain type (default: authoritative)",
    )


def _args_declare(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--domain",
        action="append",
        required=True,
        dest="domains",
        help="an offending domain that is not the tenant's (repeat for several)",
    )
    parser.add_argument("--note", default="", help="why, for the audit trail")


def _args_connector_created(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--connector", required=True, help="the inbound connector's name")
    parser.add_argument(
        "--at",
        type=_aware_datetime,
        help="when it was created (ISO 8601 with a zone; default: the configured created_at, "
        "else now)",
    )


def _args_review(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--connector", required=True, help="the inbound connector's name")
    outcome = parser.add_mutually_exclusive_group(required=True)
    outcome.add_argument("--kept", dest="kept", action="store_true", help="it was kept")
    outcome.add_argument("--removed", dest="kept", action="store_false", help="it was removed")


def _args_note(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--note", required=True, help="what was done to secure the server")


def _args_request(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--code", required=True, help="the enhanced status code of the block (5.7.750 or 5.7.705)"
    )
    parser.add_argument("--evidence", required=True, help="what was done, for support")


def _args_reason(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reason", required=True, help="why, for the audit trail")


def _connector_created(
    policy: RelayPolicy, args: argparse.Namespace, config: PolicyConfig
) -> TenantState:
    known = [
        c for c in config.connector_list if c.name == args.connector and c.tenant == args.tenant
    ]
    connector = known[0] if known else InboundConnector(name=args.connector, tenant=args.tenant)
    when = args.at.timestamp() if args.at is not None else None
    if when is None and connector.created_at is not None:
        when = connector.created_at.timestamp()
    return policy.connector_created(connector, when=when)


_CONFIG_NOTE: Final = (
    "note: the store's tenant registry changed; every server following this store enforces "
    "it within its poll interval (no reload); the configuration file is not edited (see "
    "'domainpolicy registry export')"
)


def _args_connector(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--connector", required=True, help="the inbound connector's name")


def _args_add_connector(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--connector", required=True, help="the inbound connector's name")
    parser.add_argument(
        "--ip-range",
        action="append",
        default=[],
        dest="ranges",
        metavar="CIDR",
        help="a sender IP range (repeat for several)",
    )
    parser.add_argument(
        "--cert-name",
        action="append",
        default=[],
        dest="cert_names",
        metavar="NAME",
        help="a TLS certificate name under the tenant's domains (repeat for several)",
    )
    parser.add_argument(
        "--created-at",
        type=_aware_datetime,
        help="when it was created (ISO 8601 with a zone; default: now)",
    )
    parser.add_argument("--disabled", action="store_true", help="add it disabled")


def _add_connector(
    policy: RelayPolicy, args: argparse.Namespace, config: PolicyConfig
) -> TenantState:
    try:
        connector = InboundConnector(
            args.connector,
            args.tenant,
            sender_ip_ranges=tuple(args.ranges),
            tls_cert_names=tuple(args.cert_names),
            created_at=args.created_at,
            enabled=not args.disabled,
        )
    except ValueError as exc:
        raise InvalidConfiguration([f"connector {args.connector!r}: {exc}"]) from exc
    return policy.add_connector(connector, by=args.by)


def _remove_connector(
    policy: RelayPolicy, args: argparse.Namespace, config: PolicyConfig
) -> TenantState:
    policy.remove_connector(args.connector, by=args.by)
    return policy.store.load(args.tenant)


_ACTIONS: Final[
    dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], _Call, str | None]]
] = {
    "register-domain": (
        "register an accepted domain (resolves it in the remediation checklist)",
        _args_register,
        lambda p, a, c: p.register_domain(
            a.tenant,
            a.domain,
            by=a.by,
            match_subdomains=a.subdomains,
            domain_type=DomainType(a.type),
        ),
        _CONFIG_NOTE,
    ),
    "remove-domain": (
        "remove an accepted domain (reopens it in the remediation checklist)",
        _args_domain,
        lambda p, a, c: p.remove_domain(a.tenant, a.domain, by=a.by),
        _CONFIG_NOTE,
    ),
    "add-connector": (
        "add (or replace) an inbound connector in the registry; it joins the checklist",
        _args_add_connector,
        _add_connector,
        _CONFIG_NOTE,
    ),
    "remove-connector": (
        "remove an inbound connector from the registry",
        _args_connector,
        _remove_connector,
        _CONFIG_NOTE,
    ),
    "declare-not-ours": (
        "declare offending domains not the tenant's (forged by the spammer)",
        _args_declare,
        lambda p, a, c: p.declare_not_ours(a.tenant, a.domains, by=a.by, note=a.note),
        None,
    ),
    "connector-created": (
        "record that an inbound connector was created (it must be reviewed after a block)",
        _args_connector_created,
        _connector_created,
        None,
    ),
    "review-connector": (
        "record the review of an inbound connector: kept or removed",
        _args_review,
        lambda p, a, c: p.review_connector(a.tenant, a.connector, kept=a.kept, by=a.by),
        None,
    ),
    "attest": (
        "attest that the tenant's on-premises server is secured",
        _args_note,
        lambda p, a, c: p.attest(a.tenant, by=a.by, note=a.note),
        None,
    ),
    "request-unblock": (
        "ask support to lift the block (refused, listing every missing step, until the "
        "checklist is complete)",
        _args_request,
        lambda p, a, c: p.request_unblock(a.tenant, code=a.code, evidence=a.evidence, by=a.by),
        None,
    ),
    "approve": (
        "approve the pending unblock request: ACTIVE on probation",
        _args_reason,
        lambda p, a, c: p.approve(a.tenant, by=a.by, reason=a.reason),
        None,
    ),
    "deny": (
        "deny the pending unblock request (the checklist is kept)",
        _args_reason,
        lambda p, a, c: p.deny(a.tenant, by=a.by, reason=a.reason),
        None,
    ),
    "block": (
        "block an ACTIVE tenant from sending from unregistered domains (5.7.750)",
        _args_reason,
        lambda p, a, c: p.block(a.tenant, by=a.by, reason=a.reason),
        None,
    ),
    "suspend": (
        "suspend all relay for the tenant (5.7.705)",
        _args_reason,
        lambda p, a, c: p.suspend(a.tenant, by=a.by, reason=a.reason),
        None,
    ),
}


def _run_action(
    args: argparse.Namespace, out: TextIO, policy: RelayPolicy, config: PolicyConfig
) -> int:
    name: str = args.tenant_command
    _, _, call, note = _ACTIONS[name]
    head = f"{name} {args.tenant} by {args.by}"
    base = {"action": name, "tenant": args.tenant, "by": args.by}
    try:
        state = call(policy, args, config)
    except ChecklistIncomplete as exc:
        missing = list(exc.missing)
        text = [f"{head}: refused: {str(exc).splitlines()[0]}"]
        text += [f"  missing: {step}" for step in missing]
        _write(
            out,
            args,
            {"ok": False, **base, "error": one_line(exc), "missing": missing},
            "\n".join(text),
        )
        return EXIT_INVALID
    except (InvalidTransition, InvalidConfiguration, InvalidAddress) as exc:
        # InvalidTransition includes InvalidEvent (a bad or unknown domain, connector, code...);
        # InvalidConfiguration: the matcher refused a domain (a public suffix, another tenant's).
        if isinstance(exc, InvalidConfiguration):
            message = "; ".join(_ENTRY_PREFIX_RE.sub("", p) for p in exc.problems)
        else:
            message = one_line(exc)
        _write(
            out,
            args,
            {"ok": False, **base, "error": message, "missing": []},
            f"{head}: refused: {message}",
        )
        return EXIT_INVALID
    checklist = policy.machine.checklist(state) if state.block is not None else None
    record = {
        "ok": True,
        **base,
        "state": state.state.value,
        "probation_until": state.probation_until,
        "checklist": None
        if checklist is None
        else {"complete": checklist.complete, "missing": list(checklist.missing)},
        "block": _block_dict(state.block),
    }
    code = f" ({state.block.code.value})" if state.block is not None else ""
    text = [f"{head}: ok; tenant {args.tenant} is {state.state.value}{code}"]
    if state.probation_until is not None and state.on_probation(policy.store.now()):
        text.append(f"  on probation until {_stamp(state.probation_until)}")
    if checklist is not None:
        text.append("  checklist: complete" if checklist.complete else "  checklist:")
        text += [f"    - {step}" for step in checklist.missing]
    _write(out, args, record, "\n".join(text))
    if note is not None:  # on stderr, so that --json output stays the documented record
        sys.stderr.write(f"domainpolicy: {note}\n")
    return EXIT_OK


def _add_tenant_common(parser: argparse.ArgumentParser, *, config_required: bool) -> None:
    parser.epilog = _EXIT_CODES
    parser.add_argument("tenant", metavar="TENANT", help="the tenant's id")
    parser.add_argument(
        "--config",
        required=config_required,
        metavar="FILE",
        help="tenant configuration (TOML): accepted domains, thresholds, store",
    )
    parser.add_argument(
        "--store",
        metavar="URL",
        help="state store URL (memory:, sqlite:PATH, redis://HOST:PORT/DB, "
        "redis+cluster://HOST:PORT[,HOST:PORT...]); default: the configured one",
    )
    _add_json(parser)


def _configure_tenant(parser: argparse.ArgumentParser) -> None:
    parser.epilog = _EXIT_CODES
    commands = parser.add_subparsers(
        dest="tenant_command", metavar="ACTION", required=True, parser_class=type(parser)
    )
    status = commands.add_parser(
        "status",
        help="state, window counts, checklist, probation, accepted domains, recent history",
        description="Show a tenant's state, counts in the window, remediation checklist, "
        "probation, accepted domains and recent history.",
    )
    _add_tenant_common(status, config_required=True)
    status.add_argument(
        "--history",
        type=_count,
        default=10,
        metavar="N",
        help="audit records to show (default: 10; 0: none)",
    )
    history = commands.add_parser(
        "history",
        help="the tenant's audit trail, oldest first",
        description="Print the tenant's audit trail, oldest first (--config or --store).",
    )
    _add_tenant_common(history, config_required=False)
    history.add_argument(
        "--limit", type=_positive_int, metavar="N", help="only the newest N records"
    )
    for name, (help_text, configure, _, _) in _ACTIONS.items():
        description = help_text[0].upper() + help_text[1:] + "."
        sub = commands.add_parser(name, help=help_text, description=description)
        _add_tenant_common(sub, config_required=True)
        sub.add_argument("--by", required=True, metavar="WHO", help="who does it (audit trail)")
        configure(sub)


def _cmd_tenant(args: argparse.Namespace, out: TextIO) -> int:
    if args.config is None and args.store is None:
        return _error(f"tenant {args.tenant_command} needs --config FILE or --store URL")
    try:
        config, store, policy = _open_policy(args)
    except DomainPolicyError as exc:
        return _error(one_line(exc))
    try:
        if args.tenant_command not in ("register-domain", "add-connector"):
            _check_tenant(args.tenant, config, store, policy)
        if args.tenant_command == "history":
            return _tenant_history(args, out, store)
        assert config is not None  # --config is required for every other action
        assert policy is not None
        if args.tenant_command == "status":
            return _tenant_status(args, out, policy)
        return _run_action(args, out, policy, config)
    except _Refused as exc:
        return _error(str(exc), EXIT_INVALID)
    except DomainPolicyError as exc:  # StoreUnavailable and the like
        return _error(one_line(exc))
    finally:
        store.close()


# --------------------------------------------------------------------------- ndr


def _configure_ndr(parser: argparse.ArgumentParser) -> None:
    parser.epilog = _EXIT_CODES
    parser.add_argument(
        "code",
        metavar="CODE",
        help="a status (5.7.750) or name (blocked_unregistered) of a reply the policy gives",
    )
    parser.add_argument(
        "--language", default="en", help="language of the report text (en, ja; default: en)"
    )
    parser.add_argument(
        "--sender",
        default="sender@contoso.com",
        metavar="ADDR",
        help="envelope sender of the refused message: the report goes to it",
    )
    parser.add_argument(
        "--recipient",
        action="append",
        metavar="ADDR",
        help="a refused recipient (repeat for several; default: recipient@example.org)",
    )
    parser.add_argument(
        "--server-name",
        metavar="NAME",
        help="host name appended to the reply in brackets (default: the configured one)",
    )
    parser.add_argument(
        "--reporting-mta",
        metavar="NAME",
        help="host writing the report (default: the server name, else this host's name)",
    )
    parser.add_argument("--config", metavar="FILE", help="use this configuration's reply texts")
    parser.add_argument(
        "--tenant", help="show the reply as this tenant sees it (its overrides, with --config)"
    )
    parser.add_argument("--subject", default="Test message", help="Subject of the original")
    parser.add_argument(
        "--original",
        metavar="FILE",
        help="the refused message (raw RFC 5322) instead of a generated one",
    )
    parser.add_argument(
        "--return-content",
        choices=["headers", "full", "none"],
        default="headers",
        help="how much of the original the report carries (default: headers)",
    )
    parser.add_argument(
        "--date",
        type=_aware_datetime,
        metavar="ISO",
        help="Date of the report and arrival date (ISO 8601 with a zone; default: now)",
    )
    parser.add_argument(
        "--message-id", metavar="<ID@HOST>", help="Message-ID of the report (default: a fresh one)"
    )
    parser.add_argument(
        "--only",
        choices=["reply", "text", "message"],
        help="print only the reply, the report's readable text or the whole report",
    )


def _original(
    args: argparse.Namespace, sender: str, recipients: list[str], date: datetime.datetime
) -> bytes:
    if args.original is not None:
        with open(args.original, "rb") as handle:
            return handle.read()
    digest = hashlib.sha256(f"{sender} {recipients} {date.isoformat()}".encode()).hexdigest()
    domain = parse_address(sender).domain or "localhost"
    subject = " ".join(args.subject.split())
    lines = [
        f"Return-Path: <{sender}>",
        f"From: <{sender}>",
        f"To: {', '.join(f'<{r}>' for r in recipients)}",
        f"Subject: {subject}",
        f"Date: {date.strftime('%a, %d %b %Y %H:%M:%S %z')}",
        f"Message-ID: <{digest[:24]}@{domain}>",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "",
        "This message was refused.",
        "",
    ]
    return "\r\n".join(lines).encode("utf-8")


def _cmd_ndr(args: argparse.Namespace, out: TextIO) -> int:
    if args.tenant is not None and args.config is None:
        return _error("ndr --tenant needs --config FILE (the tenant's reply texts)")
    try:
        config = read_config(args.config) if args.config is not None else None
    except DomainPolicyError as exc:
        return _error(one_line(exc))
    try:
        code = ReplyCode.lookup(args.code)
        reply: Reply
        if config is not None:
            reply = config.replies.reply(code, tenant=args.tenant, server_name=args.server_name)
            server = args.server_name or config.replies.server_name
        else:
            reply = code.reply(server_name=args.server_name)
            server = args.server_name
        address = parse_address(args.sender)
        sender = "" if address.is_null else address.mailbox
        recipients = [parse_address(r).mailbox for r in args.recipient or ["recipient@example.org"]]
        date = args.date or datetime.datetime.now(datetime.UTC)
        original = _original(args, sender, recipients, date)
        message = build_dsn(
            original,
            recipients,
            reply,
            reporting_mta=args.reporting_mta or server or socket.gethostname(),
            arrival_date=date,
            language=args.language,
            return_content=args.return_content,
            envelope_sender=sender,
            message_id=args.message_id,
            date=date,
        )
    except OSError as exc:
        return _error(f"cannot read {args.original!r}: {exc.strerror or exc}")
    except DomainPolicyError as exc:  # unknown code, bad address, language, message id...
        return _error(one_line(exc), EXIT_INVALID)
    text_part = None
    rendered = None
    if message is not None:
        for part in message.walk():
            if part.get_content_type() == "text/plain" and text_part is None:
                text_part = str(part.get_content())
        rendered = message.as_bytes().decode("utf-8", "replace").replace("\r\n", "\n")
    record = {
        "code": code.name,
        "status": reply.status,
        "reply": list(reply.lines()),
        "language": args.language,
        "text": text_part,
        "dsn": rendered,
    }
    if text_part is None or rendered is None:
        none = "(no report is due: the sender is <> or the original is automatic or a report)\n"
        text_part = rendered = none
    sections = {
        "reply": "\n".join(reply.lines()) + "\n",
        "text": text_part,
        "message": rendered,
    }
    if args.only is not None:
        body = sections[args.only]
    elif message is None:
        body = sections["reply"] + text_part
    else:
        body = "\n".join(
            f"== {title} ==\n{sections[key]}"
            for key, title in (("reply", "reply"), ("text", "report text"), ("message", "report"))
        )
    _write(out, args, record, body.rstrip("\n"))
    return EXIT_OK


# --------------------------------------------------------------------------- registration

COMMANDS: dict[str, Command] = {
    "compile": (
        "compile a domain<TAB>tenant<TAB>flags file into a matcher snapshot",
        _configure_compile,
        _cmd_compile,
    ),
    "tenant": (
        "show and administer a tenant's block state: status, history, remediation, unblock",
        _configure_tenant,
        _cmd_tenant,
    ),
    "ndr": (
        "print the SMTP reply for a code and the non-delivery report it produces",
        _configure_ndr,
        _cmd_ndr,
    ),
}
