"""Registry commands of the ``domainpolicy`` command line: ``registry import|export|history``.

Declares its commands in `COMMANDS`; imports `common` and the library, never the
`domainpolicy._cli` package.  See ``docs/integrations.md`` ("Command line") and
``domainpolicy._registry_io`` for the precedence between the file and the store.

* ``registry import FILE [--store URL] --by WHO [--reason TEXT] [--replace] [--dry-run]``: make
  the store's registry hold the file's accepted domains and connectors, as one audited record;
  ``--dry-run`` validates and prints the diff without writing.
* ``registry export (--config FILE | --store URL) [-o FILE]``: the registry as TOML that
  ``registry import`` reads back to the same registry.
* ``registry history (--config FILE | --store URL) [--since VERSION]``: the registry's records.

Exit codes: 0 success; 1 refused (the import breaks a rule: every problem listed); 2 usage,
configuration or store error (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import TextIO

from domainpolicy._blockstate import BlockMachine
from domainpolicy._config import load_config
from domainpolicy._errors import DomainPolicyError, InvalidConfiguration
from domainpolicy._registry_io import export_toml, import_configuration, registry_of
from domainpolicy._stores import StateStore, open_store

from .common import EXIT_INVALID, EXIT_OK, EXIT_USAGE, Command

__all__ = ["COMMANDS"]

_EXIT_CODES = (
    "exit codes: 0 ok; 1 refused (the import breaks a rule); 2 usage, configuration or store "
    "error (one line on stderr)"
)


def _error(message: str, code: int = EXIT_USAGE) -> int:
    sys.stderr.write(f"domainpolicy: error: {message.splitlines()[0]}\n")
    return code


def _stamp(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def _add_store(parser: argparse.ArgumentParser, *, config: bool) -> None:
    parser.epilog = _EXIT_CODES
    if config:
        parser.add_argument(
            "--config", metavar="FILE", help="configuration whose [store] to use (TOML)"
        )
    parser.add_argument(
        "--store",
        metavar="URL",
        help="store URL (sqlite:PATH, redis://HOST:PORT/DB, redis+cluster://...); default: the "
        "configuration's",
    )


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = _EXIT_CODES
    commands = parser.add_subparsers(
        dest="registry_command", metavar="ACTION", required=True, parser_class=type(parser)
    )
    imp = commands.add_parser(
        "import",
        help="make the store's registry hold a configuration file's domains and connectors",
        description="Import a configuration file's accepted domains and connectors into the "
        "store's tenant registry as one audited record (additions and changes; --replace also "
        "removes what the file does not list).",
    )
    imp.add_argument("file", metavar="FILE", help="the configuration (TOML)")
    _add_store(imp, config=False)
    imp.add_argument("--by", required=True, metavar="WHO", help="who imports (audit trail)")
    imp.add_argument("--reason", default="", help="why (audit trail)")
    imp.add_argument(
        "--replace", action="store_true", help="also remove domains and connectors not in FILE"
    )
    imp.add_argument("--dry-run", action="store_true", help="validate and print the diff only")
    exp = commands.add_parser(
        "export",
        help="print the registry as TOML that re-imports to the same registry",
        description="Print the store's tenant registry as configuration TOML.",
    )
    _add_store(exp, config=True)
    exp.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    hist = commands.add_parser(
        "history",
        help="the registry's records: version, when, who, why, what",
        description="Print the registry's committed records, oldest first.",
    )
    _add_store(hist, config=True)
    hist.add_argument("--since", type=int, default=0, metavar="VERSION", help="after VERSION")


def _open(args: argparse.Namespace) -> StateStore:
    if args.store is not None:
        return open_store(args.store)
    config_path = getattr(args, "config", None) or getattr(args, "file", None)
    if config_path is None:
        raise InvalidConfiguration(["needs --config FILE or --store URL"])
    return load_config(config_path).open_store()


def _cmd_import(args: argparse.Namespace, out: TextIO) -> int:
    config = load_config(args.file)
    store = open_store(args.store) if args.store is not None else config.open_store()
    try:
        try:
            changes, record = import_configuration(
                store,
                config.matcher,
                config.connector_list,
                actor=args.by,
                reason=args.reason,
                now=store.now(),
                machine=BlockMachine(config.block_policy),
                replace=args.replace,
                dry_run=args.dry_run,
            )
        except InvalidConfiguration as exc:
            problems = list(exc.problems)
            if args.json:
                out.write(json.dumps({"ok": False, "problems": problems}) + "\n")
            else:
                out.write(f"registry import {args.file}: refused\n")
                out.writelines(f"  - {p}\n" for p in problems)
            return EXIT_INVALID
        version = registry_of(store).registry_version() if record is None else record.version
        if args.json:
            out.write(
                json.dumps(
                    {
                        "ok": True,
                        "dry_run": args.dry_run,
                        "version": version,
                        "changes": [c.to_dict() for c in changes],
                    },
                    ensure_ascii=False,
                )
                + "\n"
            )
        else:
            verb = "would change" if args.dry_run else "changed"
            head = f"registry import {args.file}: {verb} {len(changes)} entries" + (
                "" if args.dry_run else f"; registry version {version}"
            )
            out.write(head + "\n")
            out.writelines(f"  {c.describe()}\n" for c in changes)
        return EXIT_OK
    finally:
        store.close()


def _cmd_export(args: argparse.Namespace, out: TextIO) -> int:
    store = _open(args)
    try:
        text = export_toml(registry_of(store).registry_view())
    finally:
        store.close()
    if args.output is None:
        out.write(text)
        return EXIT_OK
    temporary = f"{args.output}.tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(temporary, args.output)
    return EXIT_OK


def _cmd_history(args: argparse.Namespace, out: TextIO) -> int:
    store = _open(args)
    try:
        records = registry_of(store).registry_records(args.since)
    finally:
        store.close()
    for record in records:
        if args.json:
            out.write(json.dumps(record.to_dict(), ensure_ascii=False) + "\n")
            continue
        why = f": {record.reason}" if record.reason else ""
        out.write(f"version {record.version} at {_stamp(record.at)} by {record.actor}{why}\n")
        out.writelines(f"  {c.describe()}\n" for c in record.changes)
    return EXIT_OK


def _cmd_registry(args: argparse.Namespace, out: TextIO) -> int:
    handler = {"import": _cmd_import, "export": _cmd_export, "history": _cmd_history}
    try:
        return handler[args.registry_command](args, out)
    except DomainPolicyError as exc:
        return _error(str(exc).replace("\n", " "))
    except OSError as exc:
        return _error(str(exc))


COMMANDS: dict[str, Command] = {
    "registry": (
        "the store's tenant registry: import a configuration file, export it, its history",
        _configure,
        _cmd_registry,
    ),
}
