"""The ``domainpolicy`` command line: the parser and `main`; each command lives in a module of
this package.

* `common`: exit codes, the one-line-error parser, ``--json`` output, the progress bar;
* `names`: ``normalize``, ``check``;
* `admin`: ``compile``, ``tenant ...``, ``ndr``;
* `registry`: ``registry import|export|history`` (the store's tenant registry);
* `replay`: ``replay``;
* `serve`: ``serve`` (the Postfix policy server);
* `alerts`: ``alerts deliver|list|retry|test`` (the alert outbox);
* `webconsole`: ``console`` (the web console) and ``console user add|list`` (not named
  ``console``: that name is the console script's entry point in this package).

Each command module declares a ``COMMANDS`` table and imports `common` and the library, never
this package.  The command modules are imported when the parser is built, not when this package
is imported, so ``import domainpolicy._cli`` stays cheap.

Exit codes: 0 success; 1 some input was refused (invalid domain or address, policy refusal);
2 usage or configuration error.  Errors are one line on stderr with their detail
(`common.one_line`), never a traceback.  ``domainpolicy`` alone prints the usage and exits 2;
``--version`` prints the version.
Every command takes ``--json`` for machine-readable output on stdout.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from typing import TextIO

from domainpolicy._errors import DomainPolicyError

from .common import EXIT_INVALID, EXIT_OK, EXIT_USAGE, Command, CommandError, Parser, one_line

__all__ = [
    "EXIT_INVALID",
    "EXIT_OK",
    "EXIT_USAGE",
    "build_parser",
    "commands",
    "console",
    "main",
]


def commands() -> dict[str, Command]:
    """Every command, in the order ``domainpolicy --help`` lists them."""
    from . import admin, alerts, names, registry, replay, serve, webconsole

    return {
        **names.COMMANDS,
        **replay.COMMANDS,
        **admin.COMMANDS,
        **registry.COMMANDS,
        **serve.COMMANDS,
        **alerts.COMMANDS,
        **webconsole.COMMANDS,
    }


def _version() -> str:
    """The installed distribution's version (the package is never imported back from here)."""
    from importlib import metadata

    try:
        return metadata.version("domainpolicy")
    except metadata.PackageNotFoundError:  # pragma: no cover - run from a bare source tree
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered command."""
    parser = Parser(prog="domainpolicy", description="Accepted-domain relay policy tools.")
    parser.add_argument("--version", action="version", version=f"domainpolicy {_version()}")
    subparsers = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=Parser
    )
    for name, (help_text, configure, handler) in commands().items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--json", action="store_true", help="one JSON object per line on stdout")
        configure(sub)
        sub.set_defaults(handler=handler)
    return parser


def main(argv: Iterable[str] | None = None, *, out: TextIO | None = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    parser = build_parser()
    arguments = list(argv) if argv is not None else sys.argv[1:]
    if not arguments:  # a first try: show what there is to run
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    args = parser.parse_args(arguments)
    stream = out if out is not None else sys.stdout
    try:
        code: int = args.handler(args, stream)
    except BrokenPipeError:
        # The reader went away (``domainpolicy check ... | head``): not an error of ours.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except CommandError as exc:
        sys.stderr.write(f"domainpolicy: error: {one_line(exc)}\n")
        return exc.code
    except DomainPolicyError as exc:
        sys.stderr.write(f"domainpolicy: error: {one_line(exc)}\n")
        return EXIT_USAGE
    except OSError as exc:
        sys.stderr.write(f"domainpolicy: error: {one_line(exc)}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return code


def console() -> None:  # pragma: no cover - thin wrapper for the console script
    """Entry point of the ``domainpolicy`` console script."""
    sys.exit(main())
