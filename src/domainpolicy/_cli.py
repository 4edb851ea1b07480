"""The ``domainpolicy`` command line.

Exit codes: 0 success; 1 some input was refused (invalid domain or address, policy refusal);
2 usage or configuration error.  Errors are one line on stderr, never a traceback.
Every command takes ``--json`` for machine-readable output on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TextIO

from ._errors import DomainPolicyError, InvalidAddress, InvalidDomain
from ._names import domain_to_unicode, normalize_domain, parse_address
from ._psl import default_public_suffixes

if TYPE_CHECKING:
    from ._matcher import DomainMatcher

__all__ = [
    "EXIT_INVALID",
    "EXIT_OK",
    "EXIT_USAGE",
    "Progress",
    "add_progress_option",
    "build_parser",
    "main",
]

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2

Handler = Callable[[argparse.Namespace, TextIO], int]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse's own exit path, kept to one line
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _emit(out: TextIO, args: argparse.Namespace, record: dict[str, Any], text: str) -> None:
    if args.json:
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
    else:
        out.write(text + "\n")


def _inputs(values: Sequence[str], path: str | None) -> Iterator[str]:
    yield from values
    if path is not None:
        handle: TextIO
        with sys.stdin if path == "-" else open(path, encoding="utf-8") as handle:
            for raw in handle:
                line = raw.strip()
                if line and not line.startswith("#"):
                    yield line


def _error_record(value: str, exc: InvalidDomain | InvalidAddress) -> dict[str, Any]:
    return {
        "input": value,
        "ok": False,
        "reason": exc.reason,
        "position": exc.position,
        "error": str(exc),
    }


def _cmd_normalize(args: argparse.Namespace, out: TextIO) -> int:
    status = EXIT_OK
    for value in _inputs(args.domains, args.file):
        try:
            key = normalize_domain(value, allow_single_label=args.allow_single_label)
        except InvalidDomain as exc:
            status = EXIT_INVALID
            _emit(
                out,
                args,
                _error_record(value, exc),
                f"{value}\tINVALID\t{exc.reason}\t{exc.detail}",
            )
            continue
        unicode = domain_to_unicode(key, allow_single_label=True)
        _emit(
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
        from ._matcher import DomainMatcher

        return DomainMatcher.load(args.snapshot)
    if args.config is not None:
        from ._config import load_config

        return load_config(args.config).matcher
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
    status = EXIT_OK
    try:
        matcher = _check_matcher(args)
    except DomainPolicyError as exc:
        lines = [line.strip().removeprefix("- ") for line in str(exc).splitlines()]
        detail = "; ".join(line for line in lines[1:] if line)
        sys.stderr.write(f"domainpolicy: error: {lines[0]}{': ' + detail if detail else ''}\n")
        return EXIT_USAGE
    for value in _inputs(args.targets, args.file):
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
            _emit(
                out, args, _error_record(value, exc), f"{value}: INVALID {exc.reason}: {exc.detail}"
            )
            continue
        if matcher is not None:
            record.update(_describe_match(matcher, key))
        lines = [f"{value}:"] + [
            f"  {k}: {v}" for k, v in record.items() if k not in ("input", "ok")
        ]
        _emit(out, args, record, "\n".join(lines))
    return status


def add_progress_option(parser: argparse.ArgumentParser) -> None:
    """``--progress`` / ``--no-progress`` for a command that may run long."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--progress",
        action="store_true",
        default=None,
        help="show a progress bar on stderr (default: only when stderr is a terminal)",
    )
    group.add_argument("--no-progress", dest="progress", action="store_false", help="never show it")


class Progress:
    """A progress bar on stderr, ``[#####    ]  20% <label>``, redrawn when the percentage
    changes; nothing at all unless *enabled* (``--progress``, or stderr is a terminal)."""

    def __init__(self, total: int, args: argparse.Namespace) -> None:
        self.total = max(total, 1)
        self.enabled: bool = args.progress if args.progress is not None else sys.stderr.isatty()
        self.shown = -1

    def draw(self, done: int, label: str, *, force: bool = False) -> None:
        """Show *done* of the total with *label* (only if the percentage changed, or *force*)."""
        if not self.enabled:
            return
        percent = min(100, done * 100 // self.total)
        if percent == self.shown and not force:
            return
        self.shown = percent
        sys.stderr.write(f"\r[{'#' * (percent // 4):<25}] {percent:3d}% {label}")
        sys.stderr.flush()

    def finish(self, done: int | None = None, label: str = "") -> None:
        """Draw the final state (when *done* is given) and end the line."""
        if done is not None:
            self.draw(done, label, force=True)
        if self.enabled and self.shown >= 0:
            sys.stderr.write("\n")
            sys.stderr.flush()


# Later parts of domainpolicy add their commands here: name -> (help, configure, handler).
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Handler]] = {}


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


COMMANDS["normalize"] = (
    "print the canonical A-label and display forms of domains",
    _configure_normalize,
    _cmd_normalize,
)
COMMANDS["check"] = (
    "parse an address or domain and show its normalised form and registrable domain "
    "(with --config or --snapshot: also the tenant and accepted-domain entry that match)",
    _configure_check,
    _cmd_check,
)


def _register_commands() -> None:
    """Import the modules that add commands to `COMMANDS` (each registers on import)."""
    import importlib

    for name in _COMMAND_MODULES:
        importlib.import_module(name, __package__)


# Modules that register further commands; kept as names so importing _cli stays cheap.
_COMMAND_MODULES: tuple[str, ...] = ("._cli_replay", "._cli_admin", "._cli_serve")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered command."""
    _register_commands()
    parser = _Parser(prog="domainpolicy", description="Accepted-domain relay policy tools.")
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=_Parser
    )
    for name, (help_text, configure, handler) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--json", action="store_true", help="one JSON object per line on stdout")
        configure(sub)
        sub.set_defaults(handler=handler)
    return parser


def main(argv: Iterable[str] | None = None, *, out: TextIO | None = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    stream = out if out is not None else sys.stdout
    try:
        code: int = args.handler(args, stream)
    except BrokenPipeError:
        # The reader went away (``domainpolicy check ... | head``): not an error of ours.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except DomainPolicyError as exc:
        sys.stderr.write(f"domainpolicy: error: {str(exc).splitlines()[0]}\n")
        return EXIT_USAGE
    except OSError as exc:
        sys.stderr.write(f"domainpolicy: error: {exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return code


def console() -> None:  # pragma: no cover - thin wrapper for the console script
    """Entry point of the ``domainpolicy`` console script."""
    sys.exit(main())
