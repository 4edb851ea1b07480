"""Regenerate the generated sections of docs/state-machine.md from the code.

Each section sits between ``<!-- BEGIN GENERATED: name -->`` and ``<!-- END GENERATED: name -->``:

* ``diagram``: a mermaid state diagram of every state-changing edge of ``TRANSITIONS``;
* ``table``: the full transition table, self-loops included;
* ``defaults``: every ``BlockPolicy`` default with the reason kept in its field metadata;
* ``timeline``: a worked timeline produced by running the machine on a scripted scenario.

Usage: ``python tools/gen_state_diagram.py`` rewrites the page; ``--check`` exits 1 if the page is
stale.  ``tests/test_blockstate_docs.py`` runs the check, so the page cannot drift.  The script
lives outside ``docs/`` so that the built site does not carry a copy of it.
"""

from __future__ import annotations

import re
import sys
from datetime import UTC, datetime
from pathlib import Path

import attrs

from domainpolicy._blockstate import (
    TRANSITIONS,
    BlockMachine,
    BlockPolicy,
    ChecklistIncomplete,
    Effects,
    State,
    TenantState,
)

PAGE = Path(__file__).resolve().parent.parent / "docs" / "state-machine.md"


def render_diagram() -> str:
    """A mermaid ``stateDiagram-v2`` of the state-changing edges, in table order."""
    lines = ["```mermaid", "stateDiagram-v2", "    [*] --> ACTIVE"]
    for edge in TRANSITIONS:
        if edge.source is edge.target:
            continue
        label = edge.event.value + (f" [{edge.when}]" if edge.when else "")
        lines.append(f"    {edge.source.name} --> {edge.target.name}: {label}")
    lines.append("```")
    return "\n".join(lines)


def render_table() -> str:
    """Every row of ``TRANSITIONS`` as a markdown table."""
    rows = ["| from | event | to | when |", "|---|---|---|---|"]
    for edge in TRANSITIONS:
        rows.append(
            f"| `{edge.source.name}` | `{edge.event.value}` | `{edge.target.name}` "
            f"| {edge.when or '-'} |"
        )
    allowed = {(e.source, e.event) for e in TRANSITIONS}
    refused = [
        f"`{event.value}` in `{state.name}`"
        for state in State
        for event in sorted({e.event for e in TRANSITIONS}, key=lambda e: e.value)
        if (state, event) not in allowed
    ]
    rows += [
        "",
        "Refused with `InvalidTransition` (the state is unchanged): " + ", ".join(refused) + ".",
    ]
    return "\n".join(rows)


def render_defaults() -> str:
    """Every ``BlockPolicy`` field with its default and reason."""
    rows = ["| setting | default | why |", "|---|---|---|"]
    for field in attrs.fields(BlockPolicy):
        rows.append(f"| `{field.name}` | `{field.default!r}` | {field.metadata['reason']} |")
    return "\n".join(rows)


def _clock(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%a %d %b %H:%M")


def _row(now: float, what: str, state: TenantState, effects: Effects | None) -> str:
    w = state.window
    counts = f"{w.unregistered} / {w.total} / {len(w.domains)}"
    parts: list[str] = []
    if effects is not None:
        if effects.decision is not None:
            parts.append(f"`{effects.decision.value}`")
        parts += [f"{t.source.name} -> {t.target.name}" for t in effects.transitions]
        parts += [f"alert `{a.kind.value}`" for a in effects.alerts]
    return (
        f"| {_clock(now)} | {what} | {'; '.join(parts) or '-'} | `{state.state.name}` "
        f"| {counts if effects is None or effects.decision is not None else '-'} |"
    )


def render_timeline() -> str:
    """Run a scripted compromise with the default policy and tabulate what happened."""
    machine = BlockMachine(BlockPolicy())
    state = TenantState.new("contoso")
    start = datetime(2025, 3, 3, 8, 0, tzinfo=UTC).timestamp()  # a Monday
    rows = [
        "| time (UTC) | event | effects | state | window after an observation: "
        "unregistered / total / domains |",
        "|---|---|---|---|---|",
    ]
    now = start - 3 * 86400
    state, effects = machine.create_connector(state, now, "inbound-from-198.51.100.7")
    rows.append(_row(now, "attacker creates an inbound connector", state, effects))
    now = start
    # Normal morning: 40 registered messages a minute and 1 forwarded (unregistered) ones.
    logged_warn = logged_block = False
    for minute in range(60 * 4):
        now = start + minute * 60.0
        state, effects = machine.observe(state, now, registered=True, weight=40)
        sender = "partner.example" if minute % 2 else "gmail.com"
        state, effects = machine.observe(state, now + 1, registered=False, registrable=sender)
        if minute == 30:
            rows.append(
                _row(now, "normal relay: 40 registered + 1 forwarded a minute", state, None)
            )
        if minute >= 120:
            # 10:00 the on-premises server is compromised: 60 spam messages a minute from a
            # new forged domain every minute.
            forged = f"forged{minute}.example"
            state, effects = machine.observe(
                state, now + 2, registered=False, registrable=forged, weight=60
            )
            if effects.alerts and not logged_warn and not effects.transitions:
                logged_warn = True
                rows.append(_row(now + 2, f"spam burst from `{forged}`", state, effects))
            if effects.transitions and not logged_block:
                logged_block = True
                rows.append(
                    _row(now + 2, f"spam from `{forged}` crosses the limit", state, effects)
                )
            state, effects = machine.observe(state, now + 3, registered=True)
            if minute == 130:
                rows.append(_row(now + 3, "registered mail while blocked", state, effects))
        if state.state is not State.ACTIVE and minute >= 140:
            break
    assert state.block is not None
    now += 3600
    try:
        machine.request_unblock(state, now, code="5.7.750", evidence="we cleaned it")
    except ChecklistIncomplete as exc:
        missing = len(exc.missing)
        rows.append(
            f"| {_clock(now)} | early unblock request | refused: `{type(exc).__name__}`, "
            f"{missing} steps missing | `{state.state.name}` | - |"
        )
    now += 3600
    offending = [d for d in state.block.offending if d.startswith("forged")]
    state, effects = machine.declare_not_ours(state, now, offending, by="admin@contoso")
    rows.append(_row(now, f"declare {len(offending)} forged domains not ours", state, effects))
    for domain in ("gmail.com", "partner.example"):
        state, effects = machine.declare_not_ours(state, now + 60, [domain], by="admin@contoso")
    rows.append(_row(now + 60, "declare the forwarded senders not ours", state, effects))
    state, effects = machine.review_connector(
        state, now + 120, "inbound-from-198.51.100.7", kept=False, by="admin@contoso"
    )
    rows.append(_row(now + 120, "review the connector: removed", state, effects))
    state, effects = machine.attest(
        state, now + 180, by="admin@contoso", note="server reimaged, relay locked to 10.0.0.0/24"
    )
    rows.append(_row(now + 180, "attest the on-premises server", state, effects))
    state, effects = machine.request_unblock(
        state, now + 240, code="5.7.750", evidence="connector removed, server reimaged"
    )
    rows.append(_row(now + 240, "unblock request quoting 5.7.750", state, effects))
    now = start + 86400
    state, effects = machine.approve(state, now, by="support@provider", reason="evidence checked")
    until = state.probation_until
    assert until is not None
    rows.append(
        _row(now, f"support approves; probation until {_clock(until)} (+7 days)", state, effects)
    )
    for minute in range(60):
        t = now + 600 + minute * 60.0
        state, effects = machine.observe(
            state, t, registered=False, registrable=f"again{minute}.example", weight=10
        )
        if effects.transitions:
            rows.append(_row(t, "re-offence on probation (limits halved)", state, effects))
            break
    rows.append(
        f"| | | offences: {state.offences}; the next approval gives "
        f"{machine.policy.probation_for(state.offences) // 86400} days of probation | | |"
    )
    return "\n".join(rows)


SECTIONS = {
    "diagram": render_diagram,
    "table": render_table,
    "defaults": render_defaults,
    "timeline": render_timeline,
}


def regenerate(text: str) -> str:
    """Return *text* with every generated section replaced by its current rendering."""
    for name, render in SECTIONS.items():
        pattern = re.compile(
            rf"(<!-- BEGIN GENERATED: {name} -->\n)(?:.*?\n)?(<!-- END GENERATED: {name} -->)",
            re.S,
        )
        if not pattern.search(text):
            raise SystemExit(f"{PAGE}: markers for section {name!r} not found")
        block = render() + "\n"
        text = pattern.sub(lambda m, b=block: m.group(1) + b + m.group(2), text)  # type: ignore[misc]
    return text


def main(argv: list[str]) -> int:
    """Rewrite the page, or with ``--check`` report whether it is up to date."""
    current = PAGE.read_text(encoding="utf-8")
    fresh = regenerate(current)
    if "--check" in argv:
        if fresh != current:
            print(f"{PAGE} is stale: run python tools/gen_state_diagram.py", file=sys.stderr)
            return 1
        return 0
    if fresh != current:
        PAGE.write_text(fresh, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
