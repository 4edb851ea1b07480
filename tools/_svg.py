"""A small deterministic SVG writer for the generated documentation pictures.

The same input always gives the same bytes (numbers are rounded to one decimal, nothing depends
on the platform or on installed fonts), so a test can compare a committed picture with its
regeneration byte for byte.  Text is measured with a fixed advance per character for the
monospace font the pictures use, which is good enough to keep labels apart.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

MONO = "DejaVu Sans Mono, Menlo, Consolas, monospace"
SANS = "DejaVu Sans, Helvetica, Arial, sans-serif"
ADVANCE = 0.61  # advance of one monospace character, in ems


def num(value: float) -> str:
    """*value* with at most one decimal, without a trailing ``.0`` (``-0`` is ``0``)."""
    text = f"{value:.1f}".removesuffix(".0")
    return "0" if text == "-0" else text


def esc(text: str) -> str:
    """*text* escaped for XML character data and attribute values."""
    return (
        text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    )


def text_width(text: str, size: float) -> float:
    """The width of *text* in the monospace font at *size* pixels."""
    return len(text) * size * ADVANCE


class Canvas:
    """An SVG document built element by element; `render` returns its text."""

    def __init__(self, width: float, height: float, *, title: str, desc: str = "") -> None:
        self.width = width
        self.height = height
        self.title = title
        self.desc = desc
        self.defs: list[str] = []
        self.items: list[str] = []

    def add(self, element: str) -> None:
        """Append raw SVG markup (already escaped)."""
        self.items.append(element)

    def open_group(self, cls: str = "", title: str = "") -> None:
        """Start a ``<g>``, with a class and a ``<title>`` (a tooltip, and text for tests)."""
        attrs = f' class="{esc(cls)}"' if cls else ""
        self.items.append(f"<g{attrs}>" + (f"<title>{esc(title)}</title>" if title else ""))

    def close_group(self) -> None:
        """End the last ``<g>``."""
        self.items.append("</g>")

    def rect(
        self,
        x: float,
        y: float,
        w: float,
        h: float,
        *,
        fill: str,
        stroke: str = "none",
        rx: float = 0,
    ) -> None:
        """A rectangle (rounded by *rx*)."""
        corner = f' rx="{num(rx)}"' if rx else ""
        self.items.append(
            f'<rect x="{num(x)}" y="{num(y)}" width="{num(w)}" height="{num(h)}"{corner} '
            f'fill="{fill}" stroke="{stroke}"/>'
        )

    def line(
        self,
        x1: float,
        y1: float,
        x2: float,
        y2: float,
        *,
        stroke: str,
        width: float = 1,
        dash: str = "",
    ) -> None:
        """A straight line."""
        dashes = f' stroke-dasharray="{dash}"' if dash else ""
        self.items.append(
            f'<line x1="{num(x1)}" y1="{num(y1)}" x2="{num(x2)}" y2="{num(y2)}" '
            f'stroke="{stroke}" stroke-width="{num(width)}"{dashes}/>'
        )

    def polyline(
        self,
        points: Iterable[tuple[float, float]],
        *,
        stroke: str,
        width: float = 1,
        marker: str = "",
        dash: str = "",
    ) -> None:
        """Connected line segments, optionally ending in the marker with id *marker*."""
        coords = " ".join(f"{num(x)},{num(y)}" for x, y in points)
        end = f' marker-end="url(#{marker})"' if marker else ""
        dashes = f' stroke-dasharray="{dash}"' if dash else ""
        self.items.append(
            f'<polyline points="{coords}" fill="none" stroke="{stroke}" '
            f'stroke-width="{num(width)}" stroke-linejoin="round"{dashes}{end}/>'
        )

    def circle(self, x: float, y: float, r: float, *, fill: str, stroke: str = "none") -> None:
        """A circle."""
        self.items.append(
            f'<circle cx="{num(x)}" cy="{num(y)}" r="{num(r)}" fill="{fill}" stroke="{stroke}"/>'
        )

    def text(
        self,
        x: float,
        y: float,
        content: str,
        *,
        size: float = 12,
        anchor: str = "start",
        font: str = SANS,
        weight: str = "normal",
        fill: str = "#222",
        halo: bool = False,
        rotate: float = 0,
    ) -> None:
        """Text at (*x*, *y*) (the baseline); *halo* draws a white outline behind the letters
        so that the text stays readable over lines."""
        extra = ' stroke="#fff" stroke-width="4" paint-order="stroke"' if halo else ""
        if weight != "normal":
            extra += f' font-weight="{weight}"'
        if rotate:
            extra += f' transform="rotate({num(rotate)} {num(x)} {num(y)})"'
        self.items.append(
            f'<text x="{num(x)}" y="{num(y)}" font-family="{font}" font-size="{num(size)}" '
            f'text-anchor="{anchor}" fill="{fill}"{extra}>{esc(content)}</text>'
        )

    def arrow_marker(self, marker_id: str, color: str) -> None:
        """Define an arrowhead marker in *color* for `polyline`'s *marker*."""
        self.defs.append(
            f'<marker id="{marker_id}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
            f'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
            f'fill="{color}"/></marker>'
        )

    def render(self) -> str:
        """The whole document, ending with a newline."""
        head = (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{num(self.width)}" '
            f'height="{num(self.height)}" viewBox="0 0 {num(self.width)} {num(self.height)}" '
            f'role="img">'
        )
        parts = [head, f"<title>{esc(self.title)}</title>"]
        if self.desc:
            parts.append(f"<desc>{esc(self.desc)}</desc>")
        if self.defs:
            parts.append("<defs>" + "".join(self.defs) + "</defs>")
        parts.append(f'<rect width="{num(self.width)}" height="{num(self.height)}" fill="#fff"/>')
        parts += self.items
        parts.append("</svg>")
        return "\n".join(parts) + "\n"


def update(outputs: dict[Path, str], *, check: bool, command: str) -> int:
    """Write every stale file of *outputs* (path -> text), or with *check* only name each stale
    one on stderr (asking for *command*) and return 1; 0 when nothing was stale."""
    stale = [p for p, text in outputs.items() if not p.exists() or p.read_text("utf-8") != text]
    for path in stale:
        if check:
            print(f"{path} is stale: run {command}", file=sys.stderr)
        else:
            path.parent.mkdir(exist_ok=True)
            path.write_text(outputs[path], encoding="utf-8")
    return 1 if check and stale else 0
