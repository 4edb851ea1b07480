"""The delivery worker: claims outbox rows with a lease, hands them to their sinks, acks or
fails them (exponential backoff with jitter; the dead letter after ``max_attempts``), and
enqueues reminders while a tenant stays blocked or suspended.

Imports `domainpolicy._alerts.sinks`, the outbox values and the store contract
(`domainpolicy._stores.base`); the command line (``domainpolicy alerts``), ``serve`` and the
aiosmtpd integration use it.  It runs in its own thread: a decision never waits for it (it
shares the store only through the store's own short transactions).
"""

from __future__ import annotations

import logging
import os
import random
import threading
import uuid
from collections.abc import Callable
from typing import Final

import attrs

from domainpolicy._alerts.sinks import AlertsConfig, DeliveryFailed
from domainpolicy._blockstate import BlockPolicy, State
from domainpolicy._errors import StoreUnavailable
from domainpolicy._stores.base import StateStore
from domainpolicy._stores.outbox import OutboxRow, alert_payload, reminder_id

__all__ = ["AlertWorker", "DeliveryReport"]

_log = logging.getLogger("domainpolicy.alerts")
_REMINDED: Final = (State.BLOCKED, State.SUSPENDED)


@attrs.frozen
class DeliveryReport:
    """What one pass of `AlertWorker.run_once` did."""

    delivered: int = 0
    retried: int = 0
    dead: int = 0
    reminders: int = 0


class AlertWorker:
    """Delivers the outbox of *store* to the sinks of *config*.

    Args:
        store: the store (its alert route is set to ``config.route``).
        config: sinks, contacts, schedule.
        policy: the thresholds, quoted in reminders (optional).
        clock: the time (default: the store's clock).
        rng: the jitter's random source (tests pass a seeded one).
    """

    def __init__(
        self,
        store: StateStore,
        config: AlertsConfig,
        *,
        policy: BlockPolicy | None = None,
        clock: Callable[[], float] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.policy = policy
        self.clock = clock if clock is not None else store.now
        self.owner = f"{os.getpid()}.{uuid.uuid4().hex[:12]}"
        self._rng = rng or random.Random()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_reminders = 0.0
        store.route_alerts(config.route)

    def backoff(self, attempts: int) -> float:
        """Seconds before the next attempt after *attempts* failed ones (with jitter)."""
        delay = min(self.config.backoff_max, self.config.backoff_base * 2 ** max(0, attempts - 1))
        return float(delay * self._rng.uniform(0.5, 1.0))

    def deliver(self, row: OutboxRow, now: float) -> str:
        """Deliver one claimed row; returns ``delivered``, ``retried`` or ``dead``.

        Raises:
            StoreUnavailable: the store failed while recording the outcome.
        """
        sink = self.config.sinks.get(row.sink)
        try:
            if sink is None:
                raise DeliveryFailed(f"sink {row.sink!r} is not configured", permanent=True)
            sink.deliver(row, self.config, now)
        except DeliveryFailed as exc:
            dead = exc.permanent or row.attempts >= self.config.max_attempts
            retry_at = None if dead else now + self.backoff(row.attempts)
            self.store.fail_alert(row.id, self.owner, now, error=exc.reason, retry_at=retry_at)
            _log.warning(
                "alert %s to sink %s attempt %d failed%s: %s",
                row.alert_id,
                row.sink,
                row.attempts,
                " (dead letter)" if dead else f", retry in {retry_at - now:.0f} s",  # type: ignore[operator]
                exc.reason,
            )
            return "dead" if dead else "retried"
        except Exception as exc:  # a bug in a sink must not stop the worker
            self.store.fail_alert(
                row.id, self.owner, now, error=f"{type(exc).__name__}: {exc}", retry_at=None
            )
            _log.exception("alert %s to sink %s: unexpected error", row.alert_id, row.sink)
            return "dead"
        self.store.ack_alert(row.id, self.clock())
        return "delivered"

    def remind(self, now: float) -> int:
        """Enqueue the due reminder of every blocked or suspended tenant (once per interval
        and block, whatever the number of workers); returns how many rows were added.

        Raises:
            StoreUnavailable: the store failed.
        """
        interval = self.config.reminder_interval
        if not interval:
            return 0
        rows: list[OutboxRow] = []
        for tenant in self.store.tenants():
            state = self.store.load(tenant)
            block = state.block
            if state.state not in _REMINDED or block is None:
                continue
            number = int((now - block.since) // interval)
            sinks = self.config.route_kind("reminder", tenant)
            if number < 1 or not sinks:
                continue
            alert_id = reminder_id(tenant, block.since, number)
            at = block.since + number * interval
            limits = None if self.policy is None else self.policy.limits()
            payload = alert_payload(
                alert_id,
                "reminder",
                state,
                at,
                f"tenant {tenant} is still {state.state.value} ({block.code.value})",
                limits=limits,
                reminder=number,
            )
            rows += [
                OutboxRow(
                    id=f"{alert_id}.{sink}",
                    alert_id=alert_id,
                    sink=sink,
                    tenant=tenant,
                    kind="reminder",
                    created=at,
                    payload=payload,
                    due=at,
                )
                for sink in sinks
            ]
        return self.store.enqueue_alerts(rows) if rows else 0

    def run_once(self, now: float | None = None, *, limit: int = 100) -> DeliveryReport:
        """One pass: enqueue due reminders, claim due rows and deliver them.

        Raises:
            StoreUnavailable: the store failed.
        """
        at = self.clock() if now is None else now
        reminders = 0
        if at >= self._next_reminders:
            reminders = self.remind(at)
            self._next_reminders = at + min(60.0, max(1.0, self.config.reminder_interval / 4))
        rows = self.store.claim_alerts(
            list(self.config.sinks), at, lease=self.config.lease, owner=self.owner, limit=limit
        )
        counts = {"delivered": 0, "retried": 0, "dead": 0}
        for row in rows:
            counts[self.deliver(row, at if now is not None else self.clock())] += 1
        return DeliveryReport(reminders=reminders, **counts)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                report = self.run_once()
            except StoreUnavailable as exc:
                _log.warning("alert delivery: store unavailable: %s", exc)
                report = DeliveryReport()
            if not (report.delivered or report.retried or report.dead):
                self._stop.wait(self.config.poll_interval)

    def start(self) -> None:
        """Run `run_once` in a daemon thread until `stop`."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._loop, name="domainpolicy-alerts", daemon=True
            )
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread (after its current delivery, at most *timeout* seconds)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
