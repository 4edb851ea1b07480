"""Draw the plots of docs/performance.md from the benchmarks' JSON output.

Each plot is made from one file in ``benchmarks/data/``, in the format the benchmarks write
with ``--json FILE``:

* ``matcher.json`` (``bench_matcher.py``): lookups/s against N for every contender, raw queries
  and pre-normalised keys side by side -> ``docs/images/perf-matcher.svg``;
* ``policy_server.json`` (``bench_policy_server.py``): requests/s and p99 latency against the
  number of connections for every server -> ``docs/images/perf-policy-server.svg``;
* ``policy.json`` (``bench_policy.py``): decisions/s against the ``evaluate_many`` batch size
  for every store, one and two processes -> ``docs/images/perf-policy-batch.svg``.

Usage: ``python tools/gen_perf_plots.py`` rewrites the pictures; ``--check`` exits 1 if one is
stale (``tests/test_perf_plots.py`` runs the check).  To plot a new run, write its JSON over the
data file (``python benchmarks/bench_policy.py --json benchmarks/data/policy.json``), update
the tables of the page, and run this script.  The drawing is our own, with fixed fonts and
rounding, so the same data always gives the same bytes.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from _svg import MONO, Canvas, text_width, update

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "benchmarks" / "data"
IMAGES = ROOT / "docs" / "images"

PALETTE = ["#1f5fa8", "#e07b00", "#2a9d3c", "#c0392b", "#8e5bb5", "#8c564b", "#d4589f", "#6b6b6b"]
TICK_FONT, LABEL_FONT, TITLE_FONT = 11.0, 11.0, 12.5
PANEL_H = 210.0
MARGIN_L, MARGIN_B, MARGIN_T = 58.0, 40.0, 26.0


class Series(NamedTuple):
    """One line of a plot: its legend name, colour, dash pattern and (x, y) points."""

    name: str
    colour: str
    points: tuple[tuple[float, float], ...]
    dash: str = ""


class Panel(NamedTuple):
    """One chart of a plot: log-log axes over the series' points."""

    title: str
    xlabel: str
    ylabel: str
    series: tuple[Series, ...]
    xticks: tuple[float, ...]


def si(value: float) -> str:
    """A tick label: ``2k``, ``1.5M``, ``0.5``."""
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= factor:
            return f"{value / factor:g}{suffix}"
    return f"{value:g}"


def _grid(lo: float, hi: float) -> list[float]:
    """The 1-2-5 values from the largest one <= *lo* to the smallest one >= *hi*."""
    values: list[float] = []
    exponent = math.floor(math.log10(lo)) - 1
    while not values or values[-1] < hi:
        values += [float(f"{step}e{exponent}") for step in (1, 2, 5)]
        exponent += 1
    values.append(float(f"1e{exponent}"))
    first = values.index(max(v for v in values if v <= lo))
    last = values.index(min(v for v in values if v >= hi))
    if first == last:  # a single value: one step either side
        first, last = first - 1, last + 1
    return values[first : last + 1]


def draw_panel(canvas: Canvas, left: float, top: float, panel: Panel, panel_w: float) -> None:
    """Draw *panel*, *panel_w* wide, with its plot area's top-left corner at (*left*, *top*)."""
    xs = [x for s in panel.series for x, _ in s.points]
    ys = [y for s in panel.series for _, y in s.points]
    grid = _grid(min(ys), max(ys))
    ylo, yhi = math.log10(grid[0]), math.log10(grid[-1])
    xlo, xhi = math.log10(min(xs)), math.log10(max(xs))
    pad = (xhi - xlo) * 0.08 or 0.5
    xlo, xhi = xlo - pad, xhi + pad

    def px(x: float) -> float:
        return left + (math.log10(x) - xlo) / (xhi - xlo) * panel_w

    def py(y: float) -> float:
        return top + PANEL_H - (math.log10(y) - ylo) / (yhi - ylo) * PANEL_H

    canvas.text(
        left + panel_w / 2, top - 10, panel.title, size=TITLE_FONT, anchor="middle", weight="bold"
    )
    labelled = grid if len(grid) <= 9 else [v for v in grid if f"{v:e}"[0] in "15"]
    for value in grid:
        canvas.line(left, py(value), left + panel_w, py(value), stroke="#e4e4e4")
        if value in labelled:
            canvas.text(left - 6, py(value) + 4, si(value), size=TICK_FONT, anchor="end", font=MONO)
    for value in panel.xticks:
        canvas.line(px(value), top, px(value), top + PANEL_H, stroke="#efefef")
        canvas.text(
            px(value), top + PANEL_H + 15, si(value), size=TICK_FONT, anchor="middle", font=MONO
        )
    canvas.rect(left, top, panel_w, PANEL_H, fill="none", stroke="#999")
    canvas.text(
        left + panel_w / 2, top + PANEL_H + 32, panel.xlabel, size=LABEL_FONT, anchor="middle"
    )
    canvas.text(
        left - 44, top + PANEL_H / 2, panel.ylabel, size=LABEL_FONT, anchor="middle", rotate=-90
    )
    for series in panel.series:
        points = [(px(x), py(y)) for x, y in series.points]
        canvas.open_group(
            "series",
            f"{panel.title}: {series.name}: "
            + ", ".join(f"{si(x)} -> {y:,.6g}" for x, y in series.points),
        )
        if len(points) > 1:
            canvas.polyline(points, stroke=series.colour, width=1.8, dash=series.dash)
        for x, y in points:
            canvas.circle(x, y, 2.8, fill=series.colour)
        canvas.close_group()


def draw_legend(
    canvas: Canvas, left: float, top: float, width: float, series: Sequence[Series]
) -> float:
    """Draw a legend of *series* in rows from (*left*, *top*); return its height."""
    x, y = left, top
    for item in series:
        item_width = 26 + text_width(item.name, LABEL_FONT) + 18
        if x + item_width > left + width and x > left:
            x, y = left, y + 18
        canvas.line(x, y - 4, x + 20, y - 4, stroke=item.colour, width=2.2, dash=item.dash)
        canvas.circle(x + 10, y - 4, 2.8, fill=item.colour)
        canvas.text(x + 26, y, item.name, size=LABEL_FONT, font=MONO)
        x += item_width
    return y - top + 18


def render(title: str, panels: Sequence[Panel], note: str, panel_w: float = 300) -> str:
    """Panels side by side, one legend of every series under them, and *note* under that."""
    width = len(panels) * (panel_w + MARGIN_L) + 16
    legend: list[Series] = []
    for panel in panels:
        legend += [s for s in panel.series if s.name not in {x.name for x in legend}]
    probe = Canvas(width, 0, title=title)
    legend_h = draw_legend(probe, 16, 0, width - 32, legend)
    height = MARGIN_T + PANEL_H + MARGIN_B + 14 + legend_h + 20
    canvas = Canvas(width, height, title=title, desc=note)
    for i, panel in enumerate(panels):
        draw_panel(canvas, MARGIN_L + i * (panel_w + MARGIN_L), MARGIN_T, panel, panel_w)
    top = MARGIN_T + PANEL_H + MARGIN_B + 14
    draw_legend(canvas, 16, top, width - 32, legend)
    canvas.text(16, top + legend_h + 8, note, size=10, fill="#555")
    return canvas.render()


def _note(doc: dict[str, Any]) -> str:
    return f"{doc['benchmark']}, measured {doc['measured']}, Python {doc['python']}; log scales"


def _colours(names: Sequence[str], fixed: dict[str, str]) -> dict[str, str]:
    """A colour per name: *fixed* ones first, then the palette's unused colours in order."""
    spare = [c for c in PALETTE if c not in fixed.values()]
    colours: dict[str, str] = {}
    for name in names:
        colours[name] = fixed.get(name) or spare[len(colours) % len(spare)]
    return colours


def matcher_plot(doc: dict[str, Any]) -> str:
    """Lookups/s against N, raw queries and pre-normalised keys."""
    results = sorted(doc["results"], key=lambda r: r["n"])
    names: list[str] = []
    for record in results:
        names += [n for n in record["lookups_per_s"] if n not in names]
    families = _colours(
        [n.removesuffix(" raw").removesuffix(" key") for n in names],
        {"ours": PALETTE[0], "before": PALETTE[7], "flat": PALETTE[1], "nested": PALETTE[2]},
    )
    sizes = tuple(float(r["n"]) for r in results)

    def series(kind: Callable[[str], bool]) -> tuple[Series, ...]:
        return tuple(
            Series(
                name,
                families[name.removesuffix(" raw").removesuffix(" key")],
                tuple(
                    (float(r["n"]), float(r["lookups_per_s"][name]))
                    for r in results
                    if name in r["lookups_per_s"]
                ),
                "5,3" if name.startswith("before") else "",
            )
            for name in names
            if kind(name)
        )

    return render(
        "Matcher lookups per second against the number of accepted domains N",
        [
            Panel(
                "raw queries (normalised)",
                "N (accepted domains)",
                "lookups/s",
                series(lambda n: n.endswith(" raw")),
                sizes,
            ),
            Panel(
                "pre-normalised keys",
                "N (accepted domains)",
                "lookups/s",
                series(lambda n: not n.endswith(" raw")),
                sizes,
            ),
        ],
        _note(doc),
    )


def server_plot(doc: dict[str, Any]) -> str:
    """Requests/s and p99 latency against connections, per server."""
    servers: list[str] = []
    for record in doc["results"]:
        if record["server"] not in servers:
            servers.append(record["server"])
    colours = _colours(
        [s.removesuffix("-nobatch") for s in servers],
        {"trivial": PALETTE[7], "memory": PALETTE[0], "sqlite": PALETTE[1], "redis": PALETTE[3]},
    )
    levels = tuple(sorted({float(r["connections"]) for r in doc["results"]}))

    def series(field: str) -> tuple[Series, ...]:
        return tuple(
            Series(
                server,
                colours[server.removesuffix("-nobatch")],
                tuple(
                    sorted(
                        (float(r["connections"]), float(r[field]))
                        for r in doc["results"]
                        if r["server"] == server
                    )
                ),
                "5,3" if server.endswith("-nobatch") else "",
            )
            for server in servers
        )

    return render(
        "Postfix policy server: throughput and p99 latency against concurrent connections",
        [
            Panel("throughput", "connections", "requests/s", series("req_per_s"), levels),
            Panel("p99 latency", "connections", "p99 latency, ms", series("p99_ms"), levels),
        ],
        _note(doc) + "; -nobatch: --max-batch 1 (dashed)",
    )


def batch_plot(doc: dict[str, Any]) -> str:
    """Decisions/s against the evaluate_many batch size, per store and process count."""
    rows = [r for r in doc["results"] if r["batch"] is not None]
    keys: list[tuple[str, int]] = []
    for record in rows:
        if (record["store"], record["processes"]) not in keys:
            keys.append((record["store"], record["processes"]))
    colours = _colours(
        [store for store, _ in keys],
        {"memory": PALETTE[0], "sqlite": PALETTE[1], "redis": PALETTE[3]},
    )
    batches = tuple(sorted({float(r["batch"]) for r in rows}))
    titles = {
        "accept_registered": "accept (registered)",
        "accept_unregistered": "accept (unregistered)",
        "refuse": "refuse",
    }

    def series(kind: str) -> tuple[Series, ...]:
        return tuple(
            Series(
                f"{store}, {processes} process{'es' if processes > 1 else ''}",
                colours[store],
                tuple(
                    sorted(
                        (float(r["batch"]), float(r["decisions_per_s"][kind]))
                        for r in rows
                        if (r["store"], r["processes"]) == (store, processes)
                    )
                ),
                "5,3" if processes > 1 else "",
            )
            for store, processes in keys
        )

    return render(
        "Relay policy decisions per second against the evaluate_many batch size",
        [
            Panel(titles.get(kind, kind), "batch size", "decisions/s", series(kind), batches)
            for kind in rows[0]["decisions_per_s"]
        ],
        _note(doc) + "; evaluate_many(n) per store",
        panel_w=210,
    )


PLOTS: dict[str, tuple[str, Callable[[dict[str, Any]], str]]] = {
    "perf-matcher.svg": ("matcher.json", matcher_plot),
    "perf-policy-server.svg": ("policy_server.json", server_plot),
    "perf-policy-batch.svg": ("policy.json", batch_plot),
}


def render_all() -> dict[Path, str]:
    """Every picture's path and its text, drawn from the data files."""
    return {
        IMAGES / picture: draw(json.loads((DATA / data).read_text(encoding="utf-8")))
        for picture, (data, draw) in PLOTS.items()
    }


def main(argv: list[str]) -> int:
    """Rewrite the pictures, or with ``--check`` report whether they are up to date."""
    return update(render_all(), check="--check" in argv, command="python tools/gen_perf_plots.py")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
