"""The web console: tenant self-service remediation and the support desk's unblock queue, as an
ASGI application (`create_app`) that ``domainpolicy console`` serves with uvicorn and that an
embedder can mount in its own application.

Needs the ``console`` extra (``pip install 'domainpolicy[console]'``: Starlette, Jinja2,
uvicorn).  This module imports nothing from it until `create_app` is called, so that the command
line can say what is missing in one line.

Tenant admins see and remediate their one tenant (evidence, chart, checklist, unblock request,
history); support sees the queue of unblock requests, approves or denies them, blocks or
suspends, searches tenants and reads any audit trail.  A JSON API under ``/api`` mirrors the
actions with the same authorisation (a session with an ``X-CSRF-Token`` header, or HTTP Basic).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from starlette.types import ASGIApp

    from domainpolicy._policy import RelayPolicy
    from domainpolicy._stores.accounts import AccountStore

__all__ = ["create_app"]


def create_app(
    policy: RelayPolicy,
    accounts: AccountStore | None = None,
    *,
    tenants: Iterable[str] | Callable[[], Iterable[str]] = (),
    secure_cookies: bool | None = None,
) -> ASGIApp:
    """The console's ASGI application.

    Args:
        policy: the relay policy whose store holds the tenants' state; every action goes through
            it (and is written to the audit trail with the signed-in account's name).
        accounts: where the console's accounts live (default: those kept with the policy's
            store, see ``domainpolicy console user add``).
        tenants: tenants to list besides the stored ones (for example the configured ones), or
            a callable returning them.
        secure_cookies: mark the session cookie ``Secure``; None (default): when the request
            came over TLS (mounted behind a TLS proxy, pass True).

    Raises:
        ImportError: the ``console`` extra is not installed.
        InvalidConfiguration: the store keeps no accounts (not a memory, SQLite or Redis store)
            and none were given.
    """
    from domainpolicy._stores.accounts import accounts_for
    from domainpolicy.console._app import Console, build_app

    if accounts is None:
        accounts = accounts_for(policy.store)
    if callable(tenants):
        source = tenants

        def known() -> set[str]:
            return set(source())

    else:
        fixed = frozenset(tenants)

        def known() -> set[str]:
            return set(fixed)

    console = Console(policy, accounts, known_tenants=known, secure_cookies=secure_cookies)
    return build_app(console)
