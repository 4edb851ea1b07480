"""The tenant registry and the TOML configuration: import, export, seed, and the policy built from
a configuration and a store's registry.

Precedence: **the file seeds, the store rules.**

* A store whose registry is empty (version 0) is seeded once from the configuration's accepted
  domains and connectors (`seed_registry`, done by ``serve`` and the ``tenant`` commands).
* From then on the registry is the truth: the configuration's domains and connectors are not
  read again (its thresholds, replies, relay options and store still are).  An edited file is
  applied with ``domainpolicy registry import FILE`` (`import_configuration`: additions and
  changes; with ``--replace`` also removals; ``--dry-run`` prints the diff), and
  ``domainpolicy registry export`` writes TOML that imports back to the same registry.

Imports the configuration, the registry, the policy and the registry store contract.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable, Iterable
from typing import Any

from ._blockstate import BlockMachine, Effects, TenantState
from ._config import PolicyConfig
from ._connectors import InboundConnector
from ._errors import InvalidConfiguration, InvalidTransition, shown
from ._matcher import AcceptedDomain, DomainType
from ._policy import RelayPolicy
from ._registry import RegistryChange, RegistryRecord, RegistryView
from ._registry_follow import DEFAULT_POLL_SECONDS
from ._stores import StateStore
from ._stores.registry_base import RegistryStore

__all__ = [
    "SEED_ACTOR",
    "export_toml",
    "import_configuration",
    "policy_from_config",
    "registry_of",
    "seed_registry",
]

SEED_ACTOR = "config-seed"
"""The actor of the record that seeds an empty registry from a configuration file."""


def registry_of(store: StateStore) -> RegistryStore:
    """*store* as a registry store.

    Raises:
        InvalidConfiguration: the store keeps no registry.
    """
    if not isinstance(store, RegistryStore):
        raise InvalidConfiguration([f"store {shown(store)} keeps no tenant registry"])
    return store


def _record_connectors(
    store: StateStore,
    machine: BlockMachine,
    connectors: Iterable[InboundConnector],
    *,
    actor: str,
    now: float,
    undated_are_new: bool = True,
) -> None:
    """Put each connector on its tenant's checklist (created at its ``created_at``, else
    *now*; with *undated_are_new* False a connector without ``created_at`` is left off: its
    age is unknown); one already listed is left as is."""
    for connector in connectors:
        created = connector.created_at
        if created is None and not undated_are_new:
            continue
        when = now if created is None else created.timestamp()

        def event(
            state: TenantState, at: float, c: InboundConnector = connector, w: float = when
        ) -> tuple[TenantState, Effects]:
            if any(name == c.name for name, _ in state.connectors):
                return state, Effects()
            return machine.create_connector(state, w, c.name)

        try:
            store.apply(
                connector.tenant,
                event,
                when,  # the audit record says when the connector was created
                action="create_connector",
                actor=actor,
                detail={"connector": connector.name, "registry": True},
            )
        except InvalidTransition:
            continue  # an invalid created_at the machine refuses: the registry has it anyway


def import_configuration(
    store: StateStore,
    domains: Iterable[AcceptedDomain],
    connectors: Iterable[InboundConnector],
    *,
    actor: str,
    now: float,
    machine: BlockMachine,
    reason: str = "",
    replace: bool = False,
    dry_run: bool = False,
    undated_are_new: bool = True,
) -> tuple[list[RegistryChange], RegistryRecord | None]:
    """Make the registry hold *domains* and *connectors*: one record with the difference
    (additions and changes; with *replace*, removals of everything not listed, too).

    Every connector added or changed is put on its tenant's checklist (item 6 of issue 14: a
    connector created inside the look-back window is reviewed at block time, however it was
    created), at its ``created_at`` or, without one, now (*undated_are_new*; the seed of an
    empty registry passes False: the connectors of the operator's file are the ones that were
    there before, not new ones).  With *dry_run* the changes are validated and returned, and
    nothing is written.

    Returns the changes and the committed record (None: nothing to do, or *dry_run*).

    Raises:
        InvalidConfiguration: the store keeps no registry, or the changes break a rule (every
            problem listed); nothing was written.
        StoreUnavailable: the store failed; nothing was written.
    """
    registry = registry_of(store)
    view = registry.registry_view()
    changes = view.diff(domains, connectors, replace=replace)
    if dry_run:
        view.check(changes)
        return changes, None
    record = registry.registry_commit(changes, actor=actor, reason=reason, now=now)
    added = [c.connector for c in changes if c.connector is not None]
    _record_connectors(store, machine, added, actor=actor, now=now, undated_are_new=undated_are_new)
    return changes, record


def seed_registry(config: PolicyConfig, store: StateStore, *, now: float) -> RegistryRecord | None:
    """Import *config*'s domains and connectors into *store*'s registry if it is empty (version
    0); the record's actor is `SEED_ACTOR`.  Returns the record, or None when the registry was
    not empty (or the configuration has nothing).

    Raises:
        InvalidConfiguration: the store keeps no registry, or the import breaks a rule.
        StoreUnavailable: the store failed.
    """
    registry = registry_of(store)
    if registry.registry_version() != 0:
        return None
    _, record = import_configuration(
        store,
        config.matcher,
        config.connector_list,
        actor=SEED_ACTOR,
        reason=f"seeded from {config.source}",
        now=now,
        machine=BlockMachine(config.block_policy),
        undated_are_new=False,
    )
    return record


def policy_from_config(
    config: PolicyConfig,
    store: StateStore,
    *,
    poll_interval: float = DEFAULT_POLL_SECONDS,
    view: RegistryView | None = None,
    clock: Callable[[], float] | None = None,
) -> RelayPolicy:
    """A `RelayPolicy` deciding with *store*'s registry (seeded from *config* when empty) and
    *config*'s thresholds, replies and relay options; it follows the registry's changes.

    Raises:
        InvalidConfiguration: the store keeps no registry, an option is invalid, or the seed
            breaks a rule.
        StoreUnavailable: the store failed.
    """
    seed_registry(config, store, now=(clock or store.now)())
    return RelayPolicy.from_registry(
        store,
        poll_interval=poll_interval,
        view=view,
        block_policy=config.block_policy,
        replies=config.replies,
        clock=clock,
        **config.relay,
    )


def _toml_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _toml_domain(entry: AcceptedDomain) -> str:
    if entry.domain_type is DomainType.AUTHORITATIVE and not entry.match_subdomains:
        return _toml_string(entry.domain)
    parts = [f"domain = {_toml_string(entry.domain)}"]
    if entry.match_subdomains:
        parts.append("match_subdomains = true")
    if entry.domain_type is not DomainType.AUTHORITATIVE:
        parts.append(f"type = {_toml_string(str(entry.domain_type))}")
    return "{ " + ", ".join(parts) + " }"


def _toml_datetime(value: datetime.datetime) -> str:
    return value.isoformat()


def export_toml(view: RegistryView) -> str:
    """The registry as configuration TOML (``[tenants.<id>] domains`` and ``[[connectors]]``)
    that `import_configuration` (``registry import``) reads back to the same registry.

    Never raises.
    """
    lines = [f"# domainpolicy registry export: version {view.version}", ""]
    by_tenant: dict[str, list[AcceptedDomain]] = {}
    for entry in view.matcher:
        by_tenant.setdefault(entry.tenant, []).append(entry)
    for tenant in sorted(by_tenant):
        lines.append(f"[tenants.{_toml_string(tenant)}]")
        lines.append("domains = [")
        lines += [f"    {_toml_domain(e)}," for e in sorted(by_tenant[tenant], key=_domain_key)]
        lines += ["]", ""]
    for name in sorted(view.connectors):
        connector = view.connectors[name]
        fields: list[tuple[str, Any]] = [
            ("name", _toml_string(connector.name)),
            ("tenant", _toml_string(connector.tenant)),
            (
                "sender_ip_ranges",
                "[" + ", ".join(_toml_string(str(n)) for n in connector.sender_ip_ranges) + "]",
            ),
            (
                "tls_cert_names",
                "[" + ", ".join(_toml_string(n) for n in connector.tls_cert_names) + "]",
            ),
        ]
        if connector.created_at is not None:
            fields.append(("created_at", _toml_datetime(connector.created_at)))
        fields.append(("enabled", "true" if connector.enabled else "false"))
        lines.append("[[connectors]]")
        lines += [f"{key} = {value}" for key, value in fields]
        lines.append("")
    return "\n".join(lines)


def _domain_key(entry: AcceptedDomain) -> str:
    return entry.domain
