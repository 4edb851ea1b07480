"""``domainpolicy console``: serve the web console, and manage its accounts::

    domainpolicy console --config tenants.toml --listen 127.0.0.1:8080 [--store URL]
    domainpolicy console user add NAME --role support|tenant-admin [--tenant T] --config FILE
    domainpolicy console user list --config FILE

Serving needs the ``console`` extra (Starlette, Jinja2, uvicorn); without it the command exits 2
with one line saying what to install.  The accounts live in the state store (memory, SQLite or
Redis).  Once listening it prints ``listening on
http://HOST:PORT`` on stdout.

Declares its commands in `COMMANDS`; imports `common` and the library, and the console package
only inside the handler.
"""

from __future__ import annotations

import argparse
import getpass
import socket
import sys
from typing import TextIO

from domainpolicy._errors import DomainPolicyError
from domainpolicy._registry_io import policy_from_config
from domainpolicy._stores import StateStore, open_store
from domainpolicy._stores.accounts import ROLES, TENANT_ADMIN, Account, accounts_for

from .common import EXIT_INVALID, EXIT_OK, EXIT_USAGE, Command, CommandError, emit, one_line

__all__ = ["COMMANDS", "EXTRA_MISSING"]

EXTRA_MISSING = "the console needs the console extra: pip install 'domainpolicy[console]'"


def _add_source(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="tenant configuration (TOML): accepted domains, thresholds, store",
    )
    parser.add_argument(
        "--store",
        metavar="URL",
        default=argparse.SUPPRESS,
        help="state store URL (memory:, sqlite:PATH); default: the configured one",
    )


def _configure(parser: argparse.ArgumentParser) -> None:
    _add_source(parser)
    parser.add_argument(
        "--listen",
        default="127.0.0.1:8080",
        metavar="HOST:PORT",
        help="address to serve on (default: 127.0.0.1:8080)",
    )
    parser.add_argument("--certfile", metavar="FILE", help="serve over TLS with this certificate")
    parser.add_argument("--keyfile", metavar="FILE", help="the TLS certificate's private key")
    users = parser.add_subparsers(dest="console_command", metavar="user", parser_class=type(parser))
    user = users.add_parser("user", help="manage console accounts")
    actions = user.add_subparsers(
        dest="user_command", metavar="ACTION", required=True, parser_class=type(parser)
    )
    add = actions.add_parser("add", help="create or replace an account (password on stdin)")
    add.add_argument("name", metavar="NAME", help="the login name")
    add.add_argument("--role", required=True, choices=ROLES, help="support or tenant-admin")
    add.add_argument("--tenant", help="the tenant of a tenant-admin")
    add.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from the first line of stdin instead of prompting",
    )
    _add_source(add)
    listing = actions.add_parser("list", help="list the accounts")
    _add_source(listing)


def _open(args: argparse.Namespace) -> tuple[StateStore, object]:
    config_path = getattr(args, "config", None)
    store_url = getattr(args, "store", None)
    if config_path is None and store_url is None:
        raise CommandError("console needs --config FILE or --store URL")
    config = None
    if config_path is not None:
        from .common import read_config

        config = read_config(config_path)
    store = open_store(store_url) if store_url is not None else config.open_store()  # type: ignore[union-attr]
    return store, config


def _user(args: argparse.Namespace, out: TextIO) -> int:
    store, config = _open(args)
    try:
        accounts = accounts_for(store)
        if args.user_command == "list":
            for account in accounts.list():
                emit(
                    out,
                    args,
                    {"name": account.name, "role": account.role, "tenant": account.tenant},
                    f"{account.name}\t{account.role}\t{account.tenant or ''}",
                )
            return EXIT_OK
        if (args.role == TENANT_ADMIN) != (args.tenant is not None):
            raise CommandError("--tenant is required for a tenant-admin and refused for support")
        known = set(store.tenants())
        if config is not None:
            known |= set(config.matcher.tenants())  # type: ignore[attr-defined]
        if args.tenant is not None and args.tenant not in known:
            raise CommandError(
                f"unknown tenant {args.tenant!r}: not in the configuration or the state store",
                EXIT_INVALID,
            )
        if args.password_stdin:
            password = sys.stdin.readline().rstrip("\r\n")
        else:
            password = getpass.getpass(f"password for {args.name}: ")
        if len(password) < 12:
            raise CommandError("the password must be at least 12 characters", EXIT_INVALID)
        from domainpolicy.console._auth import hash_password

        accounts.put(Account(args.name, args.role, args.tenant, hash_password(password)))
        emit(
            out,
            args,
            {"ok": True, "name": args.name, "role": args.role, "tenant": args.tenant},
            f"account {args.name} ({args.role}{' of ' + args.tenant if args.tenant else ''}) saved",
        )
        return EXIT_OK
    finally:
        store.close()


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or not host:
        raise CommandError(f"--listen {text!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def _cmd_console(args: argparse.Namespace, out: TextIO) -> int:
    if args.console_command == "user":
        return _user(args, out)
    try:
        import starlette  # noqa: F401
        import uvicorn

        from domainpolicy.console import create_app
    except ImportError:
        raise CommandError(EXTRA_MISSING) from None
    host, port = _listen(args.listen)
    if (args.certfile is None) != (args.keyfile is None):
        raise CommandError("--certfile and --keyfile go together")
    store, config = _open(args)
    try:
        if config is None:
            raise CommandError("console needs --config FILE (the tenants' accepted domains)")
        # The store's tenant registry (seeded from the configuration when empty): a domain the
        # console registers is accepted by every server that follows the registry.
        policy = policy_from_config(config, store)  # type: ignore[arg-type]

        def known_tenants() -> frozenset[str]:  # the registry's now, not at start
            return policy.matcher.tenants()

        app = create_app(policy, tenants=known_tenants)
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                log_level="warning",
                access_log=False,
                ssl_certfile=args.certfile,
                ssl_keyfile=args.keyfile,
                lifespan="off",
            )
        )
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            sock = socket.create_server((host, port), family=family)
        except OSError as exc:
            raise CommandError(f"cannot listen on {args.listen}: {one_line(exc)}") from exc
        port = sock.getsockname()[1]
        scheme = "https" if args.certfile else "http"
        shown = f"[{host}]" if ":" in host else host
        emit(
            out,
            args,
            {"listening": f"{scheme}://{shown}:{port}"},
            f"listening on {scheme}://{shown}:{port}",
        )
        out.flush()
        with sock:
            server.run(sockets=[sock])
        return EXIT_OK if server.started else EXIT_USAGE
    except DomainPolicyError as exc:
        raise CommandError(one_line(exc)) from exc
    finally:
        store.close()


COMMANDS: dict[str, Command] = {
    "console": (
        "serve the web console, or manage its accounts (console user add)",
        _configure,
        _cmd_console,
    ),
}
