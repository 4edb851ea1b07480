"""The console's chart: a tenant's unregistered relay per bucket over the window, with the running
total against the message limit, drawn as server-side SVG (no JavaScript, no library).

Pure: takes a `Window`'s buckets and the limits, returns SVG text whose only variable parts are
numbers (nothing the tenant wrote reaches it).  Imports only the standard library.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["relay_chart"]

_W = 640
_H = 220
_LEFT = 48
_BOTTOM = 28
_TOP = 12
_RIGHT = 12


def relay_chart(
    buckets: Sequence[Sequence[int]], head: int, count: int, limit: int, bucket_seconds: int
) -> str:
    """SVG of *count* buckets ending at *head*: a bar per bucket of unregistered messages, a
    line of their running total, and the *limit* as a dashed line.

    Args:
        buckets: ``[index, total, unregistered]`` rows (`Window.buckets_list`).
        head: the newest bucket's index.
        count: buckets per window.
        limit: the unregistered-message limit of the window.
        bucket_seconds: seconds per bucket (for the axis label).
    """
    count = max(1, int(count))
    first = int(head) - count + 1
    per = [0] * count
    for index, _total, unregistered in buckets:
        if first <= index <= head:
            per[int(index) - first] += int(unregistered)
    running: list[int] = []
    acc = 0
    for value in per:
        acc += value
        running.append(acc)
    top = max([int(limit), *running, 1])
    scale = (_H - _TOP - _BOTTOM) / (top * 1.1)
    step = (_W - _LEFT - _RIGHT) / count
    base = _H - _BOTTOM

    def y(value: float) -> float:
        return base - value * scale

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {_W} {_H}" width="{_W}" '
        f'height="{_H}" role="img" aria-labelledby="chart-title" class="chart">',
        '<title id="chart-title">Unregistered relay per bucket and running total against the '
        "limit</title>",
        f'<line x1="{_LEFT}" y1="{base}" x2="{_W - _RIGHT}" y2="{base}" class="axis"/>',
        f'<line x1="{_LEFT}" y1="{_TOP}" x2="{_LEFT}" y2="{base}" class="axis"/>',
    ]
    width = max(step * 0.7, 1.0)
    for i, value in enumerate(per):
        if value:
            x = _LEFT + i * step + (step - width) / 2
            parts.append(
                f'<rect x="{x:.1f}" y="{y(value):.1f}" width="{width:.1f}" '
                f'height="{value * scale:.1f}" class="bar"><title>{value}</title></rect>'
            )
    points = " ".join(f"{_LEFT + (i + 0.5) * step:.1f},{y(v):.1f}" for i, v in enumerate(running))
    parts.append(f'<polyline points="{points}" class="running" fill="none"/>')
    parts.append(
        f'<line x1="{_LEFT}" y1="{y(limit):.1f}" x2="{_W - _RIGHT}" y2="{y(limit):.1f}" '
        'class="limit" stroke-dasharray="6 4"/>'
    )
    parts.append(f'<text x="{_LEFT - 4}" y="{y(limit) + 4:.1f}" text-anchor="end">{limit}</text>')
    parts.append(f'<text x="{_LEFT - 4}" y="{base + 4}" text-anchor="end">0</text>')
    minutes = count * bucket_seconds // 60
    parts.append(
        f'<text x="{_W - _RIGHT}" y="{_H - 8}" text-anchor="end">last {minutes} min, '
        f"{bucket_seconds} s per bar; dashed: limit</text>"
    )
    parts.append("</svg>")
    return "".join(parts)
