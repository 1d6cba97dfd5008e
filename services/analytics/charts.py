"""Server-side SVG charts: no script, no CDN, and readable by screen readers via <title>.

Every mark carries data-day and data-value, so tests (and curious admins) can read the exact
figure a bar or point stands for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

WIDTH, HEIGHT = 640, 220
LEFT, RIGHT, TOP, BOTTOM = 48, 12, 16, 34


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    magnitude = 10 ** math.floor(math.log10(value))
    # Steps whose quarter is a round number, for the four grid lines.
    for step in (1, 2, 4, 6, 8, 10):
        if value <= step * magnitude:
            return float(step * magnitude)
    return float(10 * magnitude)


def _format(value: float) -> str:
    return f"{value:.0f}" if value >= 10 or value == int(value) else f"{value:.1f}"


def _frame(chart_id: str, title: str, top: float, labels: Sequence[str], unit: str) -> list[str]:
    plot_h = HEIGHT - TOP - BOTTOM
    parts = [
        f'<svg id="{escape(chart_id)}" class="chart" role="img" viewBox="0 0 {WIDTH} {HEIGHT}"'
        f' width="{WIDTH}" height="{HEIGHT}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(title)}</title>",
    ]
    for i in range(5):
        value = top * i / 4
        y = TOP + plot_h - plot_h * i / 4
        parts.append(
            f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"'
            ' stroke="#e1e1e1" stroke-width="1"/>'
            f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11"'
            f' fill="#616161">{_format(value)}{escape(unit)}</text>'
        )
    every = max(1, math.ceil(len(labels) / 8))
    step = (WIDTH - LEFT - RIGHT) / max(1, len(labels))
    for i, label in enumerate(labels):
        if i % every == 0:
            x = LEFT + step * (i + 0.5)
            parts.append(
                f'<text x="{x:.1f}" y="{HEIGHT - 12}" text-anchor="middle" font-size="11"'
                f' fill="#616161">{escape(label[5:])}</text>'
            )
    return parts


def bar_chart(
    chart_id: str, title: str, points: Sequence[tuple[str, float]], unit: str = ""
) -> str:
    top = _nice_max(max((v for _, v in points), default=0))
    parts = _frame(chart_id, title, top, [d for d, _ in points], unit)
    plot_h = HEIGHT - TOP - BOTTOM
    step = (WIDTH - LEFT - RIGHT) / max(1, len(points))
    for i, (day, value) in enumerate(points):
        h = plot_h * value / top
        parts.append(
            f'<rect class="mark" data-day="{escape(day)}" data-value="{_format(value)}"'
            f' x="{LEFT + step * i + step * 0.15:.1f}" y="{TOP + plot_h - h:.1f}"'
            f' width="{step * 0.7:.1f}" height="{h:.1f}" fill="#5b5fc7">'
            f"<title>{escape(day)}: {_format(value)}{escape(unit)}</title></rect>"
        )
    parts.append("</svg>")
    return "".join(parts)


def line_chart(
    chart_id: str, title: str, points: Sequence[tuple[str, float | None]], unit: str = ""
) -> str:
    """Days without a value leave a gap in the line rather than dropping to zero."""
    top = _nice_max(max((v for _, v in points if v is not None), default=0))
    parts = _frame(chart_id, title, top, [d for d, _ in points], unit)
    plot_h = HEIGHT - TOP - BOTTOM
    step = (WIDTH - LEFT - RIGHT) / max(1, len(points))
    segment: list[str] = []
    marks: list[str] = []
    segments: list[list[str]] = [segment]
    for i, (day, value) in enumerate(points):
        if value is None:
            segment = []
            segments.append(segment)
            continue
        x, y = LEFT + step * (i + 0.5), TOP + plot_h - plot_h * value / top
        segment.append(f"{x:.1f},{y:.1f}")
        marks.append(
            f'<circle class="mark" data-day="{escape(day)}" data-value="{_format(value)}"'
            f' cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="#c4314b">'
            f"<title>{escape(day)}: {_format(value)}{escape(unit)}</title></circle>"
        )
    for points_text in segments:
        if len(points_text) > 1:
            parts.append(
                f'<polyline points="{" ".join(points_text)}" fill="none" stroke="#c4314b"'
                ' stroke-width="2"/>'
            )
    parts += marks
    parts.append("</svg>")
    return "".join(parts)
