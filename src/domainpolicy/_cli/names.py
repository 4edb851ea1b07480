"""The name commands: ``normalize`` (canonical A-label and display forms of domains) and
``check`` (parse an address or domain; with ``--config`` or ``--snapshot``, also the tenant and
accepted-domain entry that match, and why).

Imports `common` and the library's core; the matcher and the configuration are imported only when
``check`` is given one, so that plain ``normalize`` and ``check`` stay cheap.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any, TextIO

from domainpolicy._errors import InvalidAddress, InvalidDomain
from domainpolicy._names import domain_to_unicode, normalize_domain, parse_address
from domainpolicy._psl import default_public_suffixes

from .common import EXIT_INVALID, EXIT_OK, Command, CommandError, emit, inputs, read_config

if TYPE_CHECKING:
    from domainpolicy._matcher import DomainMatcher

__all__ = ["COMMANDS"]


def _error_record(value: str, exc: InvalidDomain | InvalidAddress) -> dict[str, Any]:
    return {
        "input": value,
        "ok": False,
        "reason": exc.reason,
        "position": exc.position,
        "error": str(exc),
    }


def _needs_input(args: argparse.Namespace, values: list[str], what: str) -> None:
    """Refuse a command given nothing to work on (a usage error, not a silent success).

    Raises:
        CommandError: no *values* and no ``-f FILE``.
    """
    if not values and args.file is None:
        raise CommandError(f"{args.command} needs at least one {what} or -f FILE ('-': stdin)")


def _cmd_normalize(args: argparse.Namespace, out: TextIO) -> int:
    _needs_input(args, args.domains, "DOMAIN")
    status = EXIT_OK
    for value in inputs(args.domains, args.file):
        try:
            key = normalize_domain(value, allow_single_label=args.allow_single_label)
        except InvalidDomain as exc:
            status = EXIT_INVALID
            emit(
                out,
                args,
                _error_record(value, exc),
                f"{value}\tINVALID\t{exc.reason}\t{exc.detail}",
            )
            continue
        unicode = domain_to_unicode(key, allow_single_label=True)
        emit(
            out,
            args,
            {"input": value, "ok": True, "domain": key, "unicode": unicode},
            f"{value}\t{key}\t{unicode}",
        )
    return status


def _describe_domain(key: str) -> dict[str, Any]:
    suffixes = default_public_suffixes()
    return {
        "domain": key,
        "unicode": domain_to_unicode(key, allow_single_label=True),
        "registrable_domain": suffixes.registrable(key),
        "public_suffix": suffixes.public_suffix(key),
        "is_public_suffix": suffixes.is_public(key),
    }


def _check_matcher(args: argparse.Namespace) -> DomainMatcher | None:
    """The `DomainMatcher` of ``check --config``/``--snapshot``, or None (imported lazily so
    that plain ``check`` stays cheap).

    Raises:
        InvalidConfiguration: the configuration is invalid.
        InvalidSnapshot: the snapshot cannot be read.
    """
    if args.snapshot is not None:
        from domainpolicy._matcher import DomainMatcher

        return DomainMatcher.load(args.snapshot)
    if args.config is not None:
        return read_config(args.config).matcher
    return None


def _describe_match(matcher: DomainMatcher, key: str | None) -> dict[str, Any]:
    """Which tenant and accepted-domain entry match the normalised domain *key*, and why."""
    if key is None:
        return {"tenant": None, "entry": None, "match": None, "why": "no domain to match"}
    found = matcher.match(key)
    if found is None:
        why = "no accepted domain of any tenant matches"
        parent = key.partition(".")[2]
        while "." in parent:  # a parent accepted without its subdomains explains many misses
            above = matcher.match(parent)
            if above is not None:
                why += (
                    f"; {above.entry.domain} (tenant {above.tenant}) is accepted, "
                    "but not its subdomains"
                )
                break
            parent = parent.partition(".")[2]
        return {"tenant": None, "entry": None, "match": None, "why": why}
    entry = found.entry
    why = {
        "exact": f"{entry.domain} is itself an accepted domain of tenant {entry.tenant}",
        "subdomain": f"under {entry.domain}, accepted by tenant {entry.tenant} with subdomains",
        "wildcard": f"under the wildcard {entry.domain} of tenant {entry.tenant}",
    }[found.kind.value]
    return {
        "tenant": entry.tenant,
        "entry": entry.domain,
        "entry_type": entry.domain_type.value,
        "match_subdomains": entry.match_subdomains,
        "match": found.kind.value,
        "why": why,
    }


def _cmd_check(args: argparse.Namespace, out: TextIO) -> int:
    _needs_input(args, args.targets, "ADDRESS-OR-DOMAIN")
    status = EXIT_OK
    matcher = _check_matcher(args)  # an error is one line from main, exit 2
    for value in inputs(args.targets, args.file):
        record: dict[str, Any] = {"input": value}
        try:
            key: str | None
            if "@" in value or value.strip() in ("<>", ""):
                address = parse_address(value)
                record.update(
                    kind="address",
                    ok=True,
                    local_part=address.local_part,
                    literal=address.literal,
                    null=address.is_null,
                    smtputf8=address.needs_smtputf8,
                )
                key = address.domain
                if address.domain is not None:
                    record.update(_describe_domain(address.domain))
            else:
                key = normalize_domain(value)
                record.update(kind="domain", ok=True, **_describe_domain(key))
        except (InvalidDomain, InvalidAddress) as exc:
            status = EXIT_INVALID
            emit(
                out, args, _error_record(value, exc), f"{value}: INVALID {exc.reason}: {exc.detail}"
            )
            continue
        if matcher is not None:
            record.update(_describe_match(matcher, key))
        lines = [f"{value}:"] + [
            f"  {k}: {v}" for k, v in record.items() if k not in ("input", "ok")
        ]
        emit(out, args, record, "\n".join(lines))
    return status


def _configure_normalize(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("domains", nargs="*", metavar="DOMAIN", help="domains to normalise")
    parser.add_argument("-f", "--file", help="read one domain per line from FILE ('-': stdin)")
    parser.add_argument(
        "--allow-single-label",
        action="store_true",
        help="accept names of one label such as localhost",
    )


def _configure_check(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("targets", nargs="*", metavar="ADDRESS-OR-DOMAIN")
    parser.add_argument("-f", "--file", help="read one address or domain per line ('-': stdin)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--config",
        metavar="FILE",
        help="also say which tenant and accepted-domain entry match, from this configuration",
    )
    source.add_argument(
        "--snapshot",
        metavar="FILE",
        help="the same, from a matcher snapshot written by 'domainpolicy compile'",
    )


COMMANDS: dict[str, Command] = {
    "normalize": (
        "print the canonical A-label and display forms of domains",
        _configure_normalize,
        _cmd_normalize,
    ),
    "check": (
        "parse an address or domain and show its normalised form and registrable domain "
        "(with --config or --snapshot: also the tenant and accepted-domain entry that match)",
        _configure_check,
        _cmd_check,
    ),
}
