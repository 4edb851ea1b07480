"""The registry contract every store implements: a versioned, append-only change log with a
compare-and-set append, and the validated commit built on it.

A backend implements three primitives (`RegistryStore._registry_version`,
`RegistryStore._registry_records`, `RegistryStore._registry_append`); everything else is here,
once:

* `RegistryStore.registry_commit` validates a mutation against the registry at the newest
  version (a `RegistryView` this store object keeps and moves forward with the log, so a
  mutation costs the records since the last one, not a recompile), then appends it with a
  compare-and-set on the version.  If another writer appended first, the view catches up and
  the mutation is validated again: of two processes claiming one domain for two tenants,
  exactly one wins and the other gets `InvalidConfiguration` naming the owner.  A record is
  appended whole or not at all (one transaction, one Lua script), so a crash mid-import leaves
  the previous registry intact.
* `RegistryStore.registry_version` is the cheap poll (SQLite: one indexed ``max()``; Redis:
  one ``GET``); `RegistryStore.registry_records` returns the records since a version, which a
  follower applies with `RegistryView.apply` (`DomainMatcher.with_changes`).

Imports the pure core (`domainpolicy._registry`, `domainpolicy._errors`) only.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Sequence
from typing import Final

from domainpolicy._errors import InvalidConfiguration, StoreUnavailable
from domainpolicy._registry import RegistryChange, RegistryRecord, RegistryView

__all__ = ["COMMIT_ATTEMPTS", "RegistryStore"]

COMMIT_ATTEMPTS: Final = 50
"""How many times `RegistryStore.registry_commit` retries a commit that lost a race."""


class RegistryStore(abc.ABC):
    """The registry half of a store (mixed into every `StateStore`)."""

    _registry_lock: threading.Lock
    _registry_view: RegistryView | None

    def _registry_init(self) -> None:
        self._registry_lock = threading.Lock()
        self._registry_view = None

    # ---------------------------------------------------------------- backend primitives

    @abc.abstractmethod
    def _registry_version(self) -> int:
        """The version of the newest record (0: empty).  Raises `StoreUnavailable`."""

    @abc.abstractmethod
    def _registry_records(self, since: int) -> list[RegistryRecord]:
        """The records after version *since*, oldest first.  Raises `StoreUnavailable`."""

    @abc.abstractmethod
    def _registry_append(self, expected: int, record: RegistryRecord) -> bool:
        """Append *record* (version ``expected + 1``) atomically iff the newest version is still
        *expected*; False when another writer got there first.  Raises `StoreUnavailable`."""

    @abc.abstractmethod
    def _registry_stamp(self, version: int) -> tuple[float, str, str] | None:
        """``(at, actor, reason)`` of the record of *version* without reading its changes, or
        None when there is none.  Raises `StoreUnavailable`."""

    # ---------------------------------------------------------------- the contract

    def registry_stamp(self, version: int) -> tuple[float, str, str] | None:
        """When, by whom and why the mutation of *version* was committed (None: no such
        version), read without its changes (cheap even for a huge import).

        Raises:
            StoreUnavailable: the store failed.
        """
        return self._registry_stamp(version)

    def registry_version(self) -> int:
        """The registry's version: the number of the last committed mutation (0: empty).
        Cheap, for polling.

        Raises:
            StoreUnavailable: the store failed.
        """
        return self._registry_version()

    def registry_records(self, since: int = 0) -> list[RegistryRecord]:
        """The committed mutations after version *since*, oldest first (the audit trail of
        the registry, and what a follower applies).

        Raises:
            StoreUnavailable: the store failed or holds a corrupt record.
        """
        return self._registry_records(since)

    def registry_view(self) -> RegistryView:
        """The registry at its newest version, compiled (a copy the caller may keep).

        Raises:
            StoreUnavailable: the store failed or its log is corrupt.
        """
        with self._registry_lock:
            return self._caught_up().copy()

    def registry_prime(self, view: RegistryView) -> None:
        """Use (a copy of) *view* as this store object's compiled registry when it is newer
        than the one it has (e.g. one loaded from a snapshot), so that the next commit catches
        up from its version instead of reading the whole log.  Never raises."""
        with self._registry_lock:
            current = self._registry_view
            if current is None or current.version < view.version:
                self._registry_view = view.copy()

    def _caught_up(self) -> RegistryView:
        view = self._registry_view
        if view is None:
            view = self._registry_view = RegistryView()
        for record in self._registry_records(view.version):
            try:
                view.apply(record)
            except InvalidConfiguration as exc:
                self._registry_view = None
                raise StoreUnavailable(
                    f"corrupt registry log at version {record.version}: {exc}"
                ) from exc
        return view

    def registry_commit(
        self,
        changes: Sequence[RegistryChange],
        *,
        actor: str,
        reason: str = "",
        now: float,
    ) -> RegistryRecord | None:
        """Validate *changes* against the newest registry and commit them as one record.

        Returns the record, or None when *changes* is empty (nothing is written).

        Raises:
            InvalidConfiguration: the changes break a rule of `DomainMatcher.compile` /
                `ConnectorTable.compile` (all problems listed); nothing was written.
            StoreUnavailable: the store failed, or the commit lost `COMMIT_ATTEMPTS` races in a
                row; nothing was written.
        """
        changes = tuple(changes)
        if not isinstance(actor, str) or not actor:
            raise InvalidConfiguration(["a registry change needs a non-empty actor (who)"])
        if not changes:
            return None
        with self._registry_lock:
            for _ in range(COMMIT_ATTEMPTS):
                view = self._caught_up()
                checked = view.check(changes)
                record = RegistryRecord(view.version + 1, now, actor, reason, changes)
                if self._registry_append(view.version, record):
                    view.apply(record, checked)
                    return record
        raise StoreUnavailable(
            f"registry commit lost {COMMIT_ATTEMPTS} races in a row to other writers"
        )
