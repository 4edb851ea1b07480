"""The history of a fault run and its checker (Jepsen-style: a workload, a fault schedule, a
checker of the recorded history against the final stored state).

Every decision a workload process makes is one `Op`: who asked (process), for which tenant,
registered or unregistered sender, the outcome (``accept`` / ``refuse`` / ``tempfail``), the
reason, whether the store counted it, and when it started and ended (the host's wall clock,
shared by every process; a skewed *policy* clock does not change these times).

`check` compares the ops with what the store holds at the end (`Final`, read with the store's
``load`` and ``history``) and reports per tenant and in total:

* ``lost``: acknowledged (counted) unregistered observations missing from the stored count;
* ``doubled``: stored unregistered observations beyond the acknowledged ones plus the
  indeterminate ones (a ``store_unavailable`` tempfail may or may not have been counted: the
  request can reach Redis and the reply be lost);
* ``indeterminate_counted``: how many of those indeterminate ones the store did count;
* ``blocks``: ``active -> blocked`` transitions in the audit trail (exactly one for a tenant
  whose acknowledged unregistered count crossed the limit, none for one that stayed under);
* ``accepts_over_limit``: acknowledged accepts of unregistered mail beyond the limit, and
  ``accepts_after_block``: accepts of unregistered mail that started after a refusal for the
  block had been acknowledged;
* ``failure_accepts``: accepts the store did not count (a store failure turned into an accept);
* per fault window (from its start to the next fault's start): decisions, 4xx, how long the
  fault was in force, and the time from the fault's end to the last tempfail (recovery).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from domainpolicy import State, StateStore

__all__ = ["Fault", "Final", "Op", "Report", "check", "read_final", "read_ops", "write_ops"]


@dataclass(frozen=True)
class Op:
    """One decision of the workload."""

    process: int
    tenant: str
    registered: bool
    outcome: str  # accept | refuse | tempfail
    reason: str
    counted: bool
    start: float
    end: float


@dataclass(frozen=True)
class Fault:
    """One injected fault: its kind and when it was in force (host wall clock)."""

    name: str
    start: float
    end: float


@dataclass(frozen=True)
class Final:
    """What the store holds for one tenant at the end of the run."""

    unregistered: int
    total: int
    state: str
    blocks: int


@dataclass
class TenantReport:
    """The checker's figures for one tenant."""

    acknowledged: int = 0
    indeterminate: int = 0
    stored: int = 0
    lost: int = 0
    doubled: int = 0
    indeterminate_counted: int = 0
    blocks: int = 0
    expected_blocks: int = 0
    accepts_over_limit: int = 0
    accepts_after_block: int = 0


@dataclass
class FaultReport:
    """The checker's figures for one fault window."""

    name: str
    decisions: int = 0
    tempfails: int = 0
    fault_seconds: float = 0.0
    recovery_seconds: float = 0.0


@dataclass
class Report:
    """Everything the checker found."""

    decisions: int = 0
    accepts: int = 0
    refusals: int = 0
    tempfails: int = 0
    failure_accepts: int = 0
    tenants: dict[str, TenantReport] = field(default_factory=dict)
    faults: list[FaultReport] = field(default_factory=list)

    def total(self, name: str) -> int:
        """The sum of one `TenantReport` figure over every tenant."""
        return sum(int(getattr(t, name)) for t in self.tenants.values())

    def violations(self, *, indeterminate_allowed: bool = True) -> list[str]:
        """Broken promises, one line each (empty: the run kept every promise).

        With *indeterminate_allowed* false (SQLite: a failed transaction is rolled back), a
        tempfail that was counted anyway is a violation too.
        """
        found = []
        if self.failure_accepts:
            found.append(f"{self.failure_accepts} accepts the store did not count")
        for tenant, t in sorted(self.tenants.items()):
            for name in ("lost", "doubled", "accepts_over_limit", "accepts_after_block"):
                if getattr(t, name):
                    found.append(f"{tenant}: {name}={getattr(t, name)}")
            if t.blocks != t.expected_blocks:
                found.append(
                    f"{tenant}: {t.blocks} block transitions, {t.expected_blocks} expected"
                )
            if not indeterminate_allowed and t.indeterminate_counted:
                found.append(f"{tenant}: {t.indeterminate_counted} tempfails were counted")
        return found

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe summary (totals, per fault) for the long-run runner."""
        return {
            "decisions": self.decisions,
            "accepts": self.accepts,
            "refusals": self.refusals,
            "tempfails_4xx": self.tempfails,
            "failure_accepts": self.failure_accepts,
            **{
                name: self.total(name)
                for name in (
                    "acknowledged",
                    "indeterminate",
                    "stored",
                    "lost",
                    "doubled",
                    "indeterminate_counted",
                    "blocks",
                    "expected_blocks",
                    "accepts_over_limit",
                    "accepts_after_block",
                )
            },
            "faults": [asdict(f) for f in self.faults],
        }


def write_ops(path: Path, ops: Iterable[Op]) -> None:
    """Write *ops* to *path*, one JSON object a line."""
    with path.open("w", encoding="utf-8") as out:
        for op in ops:
            out.write(json.dumps(asdict(op)) + "\n")


def read_ops(paths: Iterable[Path]) -> list[Op]:
    """Every op written by `write_ops` to *paths*, ordered by start time."""
    ops = [
        Op(**json.loads(line))
        for path in paths
        for line in path.read_text(encoding="utf-8").splitlines()
        if line
    ]
    ops.sort(key=lambda op: op.start)
    return ops


def read_final(store: StateStore, tenants: Iterable[str]) -> dict[str, Final]:
    """The final stored state of *tenants*: the window's counts and the audit trail's blocks."""
    final = {}
    for tenant in tenants:
        state = store.load(tenant)
        blocks = sum(
            1
            for record in store.history(tenant)
            if record.after == State.BLOCKED.value and record.before == State.ACTIVE.value
        )
        final[tenant] = Final(
            state.window.unregistered, state.window.total, state.state.value, blocks
        )
    return final


def check(
    ops: Sequence[Op],
    final: Mapping[str, Final],
    *,
    limit: int,
    faults: Sequence[Fault] = (),
) -> Report:
    """Check the history *ops* against the *final* stored state (see the module docstring)."""
    report = Report(decisions=len(ops))
    for tenant, stored in final.items():
        report.tenants[tenant] = TenantReport(stored=stored.unregistered, blocks=stored.blocks)
    accepted_unregistered: dict[str, int] = {}
    block_acknowledged: dict[str, float] = {}
    for op in ops:
        t = report.tenants.setdefault(op.tenant, TenantReport())
        if op.outcome == "accept":
            report.accepts += 1
            if not op.counted:
                report.failure_accepts += 1
        elif op.outcome == "refuse":
            report.refusals += 1
        else:
            report.tempfails += 1
        if op.registered:
            continue
        if op.counted:
            t.acknowledged += 1
            if op.outcome == "accept":
                accepted_unregistered[op.tenant] = accepted_unregistered.get(op.tenant, 0) + 1
            elif op.reason == "blocked":
                known = block_acknowledged.get(op.tenant)
                block_acknowledged[op.tenant] = op.end if known is None else min(known, op.end)
        elif op.reason == "store_unavailable":
            t.indeterminate += 1
    for tenant, t in report.tenants.items():
        t.lost = max(0, t.acknowledged - t.stored)
        t.doubled = max(0, t.stored - t.acknowledged - t.indeterminate)
        t.indeterminate_counted = min(t.indeterminate, max(0, t.stored - t.acknowledged))
        # The machine blocks at the counted message that crosses the limit (counted: acknowledged
        # or an indeterminate one the store did count).
        t.expected_blocks = 1 if max(t.acknowledged, t.stored) > limit else 0
        t.accepts_over_limit = max(0, accepted_unregistered.get(tenant, 0) - limit)
        blocked_at = block_acknowledged.get(tenant)
        if blocked_at is not None:
            t.accepts_after_block = sum(
                1
                for op in ops
                if op.tenant == tenant
                and not op.registered
                and op.outcome == "accept"
                and op.start > blocked_at
            )
    bounds = sorted(faults, key=lambda f: f.start)
    for index, fault in enumerate(bounds):
        until = bounds[index + 1].start if index + 1 < len(bounds) else float("inf")
        inside = [op for op in ops if fault.start <= op.start < until]
        failed = [op for op in inside if op.outcome == "tempfail"]
        last = max((op.end for op in failed), default=fault.end)
        report.faults.append(
            FaultReport(
                fault.name,
                decisions=len(inside),
                tempfails=len(failed),
                fault_seconds=round(fault.end - fault.start, 3),
                recovery_seconds=round(max(0.0, last - fault.end), 3),
            )
        )
    return report
