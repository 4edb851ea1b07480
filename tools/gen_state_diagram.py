"""Regenerate the generated sections of docs/state-machine.md from the code.

Each section sits between ``<!-- BEGIN GENERATED: name -->`` and ``<!-- END GENERATED: name -->``:

* ``diagram``: the picture ``docs/images/state-machine.svg`` (drawn here, as an arc diagram of
  every state-changing edge of ``TRANSITIONS``, no script or web service needed to view it) and
  a reference to it;
* ``table``: the full transition table, self-loops included;
* ``defaults``: every ``BlockPolicy`` default with the reason kept in its field metadata;
* ``timeline``: a worked timeline produced by running the machine on a scripted scenario.

Usage: ``python tools/gen_state_diagram.py`` rewrites the page and the picture; ``--check`` exits
1 if either is stale.  ``tests/test_blockstate_docs.py`` runs the check, so neither can drift.
The script lives outside ``docs/`` so that the built site does not carry a copy of it.
"""

from __future__ import annotations

import re
import sys
from datetime import UTC, datetime
from pathlib import Path

import attrs

from _svg import MONO, Canvas, text_width, update
from domainpolicy._blockstate import (
    TRANSITIONS,
    BlockMachine,
    BlockPolicy,
    ChecklistIncomplete,
    Edge,
    Effects,
    State,
    TenantState,
)

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGE = DOCS / "state-machine.md"
PICTURE = DOCS / "images" / "state-machine.svg"

# (line and text colour, node fill) of each state, in State order; a state added later gets grey.
PALETTE = [
    ("#1e7b34", "#e3f4e6"),
    ("#b35900", "#fdebd9"),
    ("#1f5fa8", "#e1ecf8"),
    ("#a51d2d", "#f9e0e3"),
]
NODE_H, SPACING, LEVEL_H, NODE_FONT, LABEL_FONT = 36.0, 200.0, 26.0, 13.0, 12.0


def edge_title(edge: Edge) -> str:
    """How the picture names an edge (its tooltip)."""
    return f"{edge.source.name} -> {edge.target.name}: {edge.event.value}" + (
        f" [{edge.when}]" if edge.when else ""
    )


def render_svg() -> str:
    """An arc diagram of the state-changing edges of ``TRANSITIONS``.

    The states stand in a row in `State` order.  An edge to a later state is drawn above the
    row, an edge to an earlier one below it; each runs up (or down) from a port of its source,
    across at its own level and into its target, with an arrowhead in the target's colour.
    Levels are packed so that an edge passes over every edge whose span overlaps its own, and
    ports are ordered so that no edge crosses another at its ends.  A label names the event
    and, by number, its condition (`conditions`, listed on the page under the picture).
    """
    states = list(State)
    index = {state: i for i, state in enumerate(states)}
    colours = {
        s: PALETTE[i] if i < len(PALETTE) else ("#555", "#eee") for i, s in enumerate(states)
    }
    edges = [e for e in TRANSITIONS if e.source is not e.target]
    notes = conditions()

    def span(edge: Edge) -> tuple[int, int]:
        a, b = index[edge.source], index[edge.target]
        return min(a, b), max(a, b)

    above = {e: index[e.target] > index[e.source] for e in edges}
    level: dict[Edge, int] = {}
    for edge in sorted(edges, key=lambda e: (span(e)[1] - span(e)[0], edges.index(e))):
        lo, hi = span(edge)
        level[edge] = 1 + max(
            (
                level[o]
                for o in level
                if above[o] == above[edge] and span(o)[0] < hi and lo < span(o)[1]
            ),
            default=0,
        )
    up = max((level[e] for e in edges if above[e]), default=0)
    down = max((level[e] for e in edges if not above[e]), default=0)

    widths = {s: text_width(s.name, NODE_FONT) + 28 for s in states}
    left = 70 + widths[states[0]] / 2
    centre = {s: left + i * SPACING for i, s in enumerate(states)}
    top = up * LEVEL_H + 24
    bottom = top + NODE_H
    canvas = Canvas(
        centre[states[-1]] + widths[states[-1]] / 2 + 16,
        bottom + down * LEVEL_H + 12,
        title="Block state machine: every state-changing transition",
        desc="States in a row; transitions to a later state above, to an earlier state below; "
        "a number in brackets refers to the transition's condition, listed under the picture.",
    )
    for state in states:
        canvas.arrow_marker(f"to-{state.name}", colours[state][0])

    # Ports: each end of an edge gets its own x on the top or bottom side of its node.
    ports: dict[tuple[Edge, State], float] = {}
    for state in states:
        for side in (True, False):
            ends = []
            for edge in edges:
                if above[edge] is not side:
                    continue
                for end, other in ((edge.source, edge.target), (edge.target, edge.source)):
                    if end is state:
                        d = 1 if index[other] > index[state] else -1
                        ends.append(((d, -level[edge] if d > 0 else level[edge]), edge))
            ends.sort(key=lambda item: item[0])
            inner = widths[state] - 20
            for k, (_, edge) in enumerate(ends):
                x = centre[state] - inner / 2 + inner * (k + 1) / (len(ends) + 1)
                ports[(edge, state)] = x

    for edge in edges:
        colour = colours[edge.target][0]
        sx, tx = ports[(edge, edge.source)], ports[(edge, edge.target)]
        edge_y = top if above[edge] else bottom
        y = top - level[edge] * LEVEL_H if above[edge] else bottom + level[edge] * LEVEL_H
        label = edge.event.value + (f" [{notes.index(edge.when) + 1}]" if edge.when else "")
        canvas.open_group("edge", edge_title(edge))
        canvas.polyline(
            [(sx, edge_y), (sx, y), (tx, y), (tx, edge_y)],
            stroke=colour,
            width=1.4,
            marker=f"to-{edge.target.name}",
        )
        canvas.text(
            (sx + tx) / 2,
            y - 6,
            label,
            size=LABEL_FONT,
            anchor="middle",
            font=MONO,
            fill=colour,
            halo=True,
        )
        canvas.close_group()

    first = states[0]
    start_x = centre[first] - widths[first] / 2 - 44
    canvas.open_group("start", f"start -> {first.name}")
    canvas.circle(start_x, top + NODE_H / 2, 6, fill="#222")
    canvas.polyline(
        [(start_x + 6, top + NODE_H / 2), (centre[first] - widths[first] / 2, top + NODE_H / 2)],
        stroke="#222",
        width=1.4,
        marker=f"to-{first.name}",
    )
    canvas.close_group()
    for state in states:
        line, fill = colours[state]
        canvas.open_group("state", state.name)
        canvas.rect(
            centre[state] - widths[state] / 2,
            top,
            widths[state],
            NODE_H,
            fill=fill,
            stroke=line,
            rx=8,
        )
        canvas.text(
            centre[state],
            top + NODE_H / 2 + 4,
            state.name,
            size=NODE_FONT,
            anchor="middle",
            font=MONO,
            weight="bold",
            fill=line,
        )
        canvas.close_group()
    return canvas.render()


def conditions() -> list[str]:
    """The distinct conditions (``when``) of the state-changing edges, numbered from 1 in the
    picture, in table order."""
    notes: list[str] = []
    for edge in TRANSITIONS:
        if edge.source is not edge.target and edge.when and edge.when not in notes:
            notes.append(edge.when)
    return notes


def render_diagram() -> str:
    """The page's reference to the picture `render_svg` draws, and its numbered conditions."""
    lines = [
        "![The block state machine: every state-changing transition of TRANSITIONS, "
        "transitions to a later state above the row, to an earlier one below]"
        "(images/state-machine.svg)",
        "",
    ]
    lines += [f"- **[{n}]** {note}" for n, note in enumerate(conditions(), 1)]
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
    """Rewrite the page and the picture, or with ``--check`` report whether they are up to date."""
    outputs = {PAGE: regenerate(PAGE.read_text(encoding="utf-8")), PICTURE: render_svg()}
    return update(outputs, check="--check" in argv, command="python tools/gen_state_diagram.py")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
