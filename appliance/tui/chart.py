"""A line chart of whole-lung PLO over days, drawn with box-drawing characters (no colour needed:
points are ●, the line ·, the alert threshold ┄ with its value)."""

from __future__ import annotations

from rich.text import Text
from textual.widget import Widget

from appliance.tui.data import fmt_pct
from appliance.tui.theme import BLUE, SKY, VERMILLION

Y_GUTTER = 6
"""Columns for the y labels and the axis: '100.0┤'."""
NICE_MAXIMA = (1, 2, 5, 10, 20, 25, 50, 75, 100)


def _nice_max(value: float) -> float:
    return next((m for m in NICE_MAXIMA if value <= m), 100.0)


def draw_chart(points: list[tuple[float, float]], width: int, height: int,
               threshold: float | None = None) -> Text:
    """``points``: (days, PLO %) in time order. Falls back to one line per point when the area
    is too small for a chart."""
    if not points:
        return Text("no analysed scans", style="dim")
    plot_w, plot_h = width - Y_GUTTER - 1, height - 2
    if plot_w < 12 or plot_h < 3:
        return Text("  ".join(f"day {d:.0f}: {fmt_pct(v)}%" for d, v in points))
    top = max(v for _, v in points)
    show_threshold = threshold is not None and top > threshold / 2
    ymax = _nice_max(max(top, threshold if show_threshold else 0.0) * 1.1 or 1.0)
    xs = [d for d, _ in points]
    x0, x1 = min(xs), max(xs)
    span = (x1 - x0) or 1.0

    def col(x: float) -> int:
        return round((x - x0) / span * (plot_w - 1)) if x1 > x0 else plot_w // 2

    def row(y: float) -> int:
        return round((1 - min(max(y, 0.0), ymax) / ymax) * (plot_h - 1))

    grid = [[(" ", "")] * plot_w for _ in range(plot_h)]
    if show_threshold:
        r = row(threshold)
        grid[r] = [("┄", VERMILLION)] * plot_w
        label = f" ! {threshold:g}% "[:plot_w]
        for i, ch in enumerate(label):  # at the right end, where the label is least in the way
            grid[r][plot_w - len(label) + i] = (ch, VERMILLION)
    cells = [(col(d), row(v), v) for d, v in points]
    for (c0, r0, _), (c1, r1, _) in zip(cells, cells[1:], strict=False):
        for c in range(c0 + 1, c1):
            grid[round(r0 + (r1 - r0) * (c - c0) / (c1 - c0))][c] = ("·", SKY)
    for c, r, v in cells:
        grid[r][c] = ("●", f"bold {BLUE}")
        label = fmt_pct(v)
        lr = r - 1 if r > 0 else r + 1
        start = min(max(0, c - len(label) // 2), plot_w - len(label))
        if lr < plot_h and all(grid[lr][start + i][0] in " ┄·" for i in range(len(label))):
            for i, ch in enumerate(label):
                grid[lr][start + i] = (ch, "bold")
    labelled = {0: ymax, (plot_h - 1) // 2: ymax / 2, plot_h - 1: 0.0}
    text = Text()
    for r in range(plot_h):
        y = labelled.get(r)
        text.append(f"{y:>{Y_GUTTER - 1}g}┤" if y is not None else " " * (Y_GUTTER - 1) + "│",
                    style="dim")
        for ch, style in grid[r]:
            text.append(ch, style=style)
        text.append("\n")
    text.append(" " * (Y_GUTTER - 1) + "└" + "─" * plot_w + "\n", style="dim")
    ticks = [" "] * plot_w
    for d, (c, _, _) in zip(xs, cells, strict=True):
        label = f"{d:.0f}"
        start = min(max(0, c - len(label) // 2), plot_w - len(label))
        if all(t == " " for t in ticks[max(0, start - 1): start + len(label) + 1]):
            ticks[start: start + len(label)] = list(label)
    text.append(" " * Y_GUTTER + "".join(ticks), style="dim")
    return text


class PloChart(Widget):
    """Whole-lung PLO over days; ``set_points`` then it redraws at its own size."""

    DEFAULT_CSS = "PloChart { height: 1fr; }"

    def __init__(self, *, id: str | None = None) -> None:  # noqa: A002 - Textual's name
        super().__init__(id=id)
        self.points: list[tuple[float, float]] = []
        self.threshold: float | None = None

    def set_points(self, points: list[tuple[float, float]], threshold: float | None) -> None:
        self.points, self.threshold = points, threshold
        self.refresh()

    def render(self) -> Text:
        return draw_chart(self.points, self.content_size.width, self.content_size.height,
                          self.threshold)
