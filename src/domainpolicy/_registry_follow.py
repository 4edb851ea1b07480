"""Following a store's tenant registry: a cheap version poll and incremental catch-up.

A `RegistryFollower` holds the `RegistryView` a process decides with.  `RegistryFollower.poll`
asks the store for the registry's version (one ``GET`` on Redis, one primary-key ``max()`` on
SQLite); only when it moved does it read the records since the view's version and apply them to
a *copy* of the view with `DomainMatcher.with_changes` (no recompile), which then replaces the
view in one assignment: a decision in flight finishes with the registry it started with, and a
registry is never partially applied (a record that fails to apply leaves the old view).

When the store fails, the follower keeps the last view it had, logs the staleness (at most every
`STALE_LOG_SECONDS`) and reports it (`RegistryFollower.stale_seconds`), so that decisions go on
with the last known registry rather than failing.

Imports the registry core and the registry store contract only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Final

from ._errors import DomainPolicyError, InvalidConfiguration, shown
from ._registry import RegistryView
from ._stores.registry_base import RegistryStore

__all__ = ["DEFAULT_POLL_SECONDS", "STALE_LOG_SECONDS", "RegistryFollower"]

log = logging.getLogger("domainpolicy.registry")

DEFAULT_POLL_SECONDS: Final = 0.25
"""How often a follower asks for the registry's version by default (well within the 1 s a
change may take to be enforced everywhere)."""

STALE_LOG_SECONDS: Final = 10.0
"""A follower that cannot reach the store logs that its registry is stale at most this often."""


class RegistryFollower:
    """The registry a process decides with, kept up to date from a store.

    Args:
        store: the store holding the registry.
        interval: seconds between version polls (> 0).
        view: the view to start from (a snapshot's; default: read the whole registry now).
        clock: a monotonic clock (tests).

    Raises:
        InvalidConfiguration: *store* keeps no registry or *interval* is not positive seconds.
        StoreUnavailable: *view* is None and the registry cannot be read.
    """

    def __init__(
        self,
        store: object,
        *,
        interval: float = DEFAULT_POLL_SECONDS,
        view: RegistryView | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        problems = []
        if not isinstance(store, RegistryStore):
            problems.append(f"store {shown(store)} keeps no tenant registry")
        if type(interval) not in (int, float) or not 0 < interval <= 3600:
            problems.append(f"interval={shown(interval)}: must be seconds in (0, 3600]")
        if problems:
            raise InvalidConfiguration(problems, source="RegistryFollower")
        assert isinstance(store, RegistryStore)
        self.store = store
        self.interval = float(interval)
        self._clock = clock
        self._lock = threading.Lock()
        self.view = view if view is not None else store.registry_view()
        if view is not None:
            self._catch_up()
        self.next_poll = clock() + self.interval
        self.last_success = clock()
        self._stale_since: float | None = None
        self._last_stale_log = float("-inf")

    @property
    def version(self) -> int:
        """The registry version of the current view."""
        return self.view.version

    @property
    def stale_seconds(self) -> float:
        """Seconds since the store last answered a poll, when the latest poll failed; else 0."""
        if self._stale_since is None:
            return 0.0
        return max(0.0, self._clock() - self.last_success)

    def _catch_up(self) -> bool:
        """Apply the records after the view's version to a copy; swap it in.  True if changed.
        Raises `StoreUnavailable` (the view is unchanged)."""
        if self.store.registry_version() == self.view.version:
            return False
        records = self.store.registry_records(self.view.version)
        if not records:
            return False
        view = self.view.copy()
        for record in records:
            view.apply(record)
        self.view = view
        return True

    def poll(self, *, force: bool = False) -> RegistryView | None:
        """Poll now if due (or *force*): the new view when the registry changed, else None.

        Never raises: a store failure or a record that does not apply keeps the current view
        and is logged (the view is stale until a poll succeeds).  Concurrent callers do not
        wait: one polls, the others go on with the current view.
        """
        now = self._clock()
        if not force and now < self.next_poll:
            return None
        if not self._lock.acquire(blocking=force):
            return None
        try:
            self.next_poll = now + self.interval
            try:
                changed = self._catch_up()
            except (DomainPolicyError, InvalidConfiguration) as exc:
                if self._stale_since is None:
                    self._stale_since = now
                if now - self._last_stale_log >= STALE_LOG_SECONDS:
                    self._last_stale_log = now
                    log.warning(
                        "registry stale for %.1f s (version %d kept): %s",
                        now - self.last_success,
                        self.view.version,
                        exc,
                    )
                return None
            if self._stale_since is not None:
                log.info("registry reachable again after %.1f s", now - self.last_success)
            self._stale_since = None
            self.last_success = now
            return self.view if changed else None
        finally:
            self._lock.release()
