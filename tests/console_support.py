"""Helpers shared by the console tests: a policy with two tenants, accounts, a blocked tenant,
signing in through the login form, reading CSRF tokens from pages."""

from __future__ import annotations

import re
import time
from typing import Any

from domainpolicy import (
    AcceptedDomain,
    BlockPolicy,
    ConnectorTable,
    DomainMatcher,
    InboundConnector,
    MemoryStore,
    RelayPolicy,
    RelayRequest,
    StateStore,
)
from domainpolicy._stores.accounts import SUPPORT, TENANT_ADMIN, Account, AccountStore
from domainpolicy.console._auth import hash_password

PASSWORD = "correct horse battery"
ONPREM_IP = "198.51.100.9"
EVIL_CONNECTOR = "<script>alert('c')</script>"

_CSRF = re.compile(r'name="csrf" value="([^"]*)"')


def make_policy(store: StateStore | None = None) -> RelayPolicy:
    """Tenants contoso (with an on-premises connector) and fabrikam; small limits."""
    matcher = DomainMatcher.compile(
        [AcceptedDomain("contoso.com", "contoso"), AcceptedDomain("fabrikam.com", "fabrikam")]
    )
    onprem = InboundConnector("onprem", "contoso", sender_ip_ranges=["198.51.100.0/24"])
    return RelayPolicy(
        matcher,
        ConnectorTable.compile([onprem], matcher),
        BlockPolicy(message_limit=4, domain_limit=3, max_tracked_domains=10),
        store if store is not None else MemoryStore(),
    )


def block_contoso(policy: RelayPolicy, *, evil_connector: bool = True) -> None:
    """Spray forged senders through contoso's server until it is blocked; a connector created
    just before (named with markup) must be reviewed."""
    if evil_connector:
        policy.connector_created(
            InboundConnector(EVIL_CONNECTOR, "contoso", sender_ip_ranges=["203.0.113.0/24"]),
            when=time.time() - 60,
        )
    for n in range(6):
        policy.evaluate(RelayRequest(f"spam@forged{n}.example", client_ip=ONPREM_IP))
    assert policy.status("contoso").state.value == "blocked"


def add_accounts(accounts: AccountStore) -> None:
    hashed = hash_password(PASSWORD, n=2**10)
    accounts.put(Account("alice", TENANT_ADMIN, "contoso", hashed))
    accounts.put(Account("fred", TENANT_ADMIN, "fabrikam", hashed))
    accounts.put(Account("sam", SUPPORT, None, hashed))


def csrf_of(html: str) -> str:
    found = _CSRF.search(html)
    assert found, html[:500]
    return found.group(1)


def login(client: Any, name: str, password: str = PASSWORD) -> Any:
    page = client.get("/login")
    return client.post(
        "/login",
        data={"csrf": csrf_of(page.text), "name": name, "password": password},
        follow_redirects=False,
    )
