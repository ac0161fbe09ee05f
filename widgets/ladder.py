"""A sngrep-style ladder diagram: lanes (e.g. PBX ⇄ SIPIS ⇄ push/app) and one arrow per line.

Fed with :class:`~widgets.rows.LadderRow` items in time order; the cursor picks an arrow and the
owner shows its ``detail`` (the raw message) beside the ladder. Built on :class:`VirtualTable`, so a
trace of any length scrolls without cost.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.segment import Segment
from textual.strip import Strip

from widgets.format import clock_time_ms, fit
from widgets.rows import LadderRow
from widgets.table import Column, VirtualTable

TIME_WIDTH = 12


class Ladder(VirtualTable[LadderRow]):
    """Arrows between lanes; time on the left."""

    DEFAULT_CSS = """
    Ladder > .virtual-table--even { background: $surface; }
    """

    def __init__(self, lanes: Sequence[str], *, utc: bool = False, id: str | None = None,
                 classes: str | None = None) -> None:
        self.lanes = list(lanes)
        self.utc = utc
        columns: list[Column[LadderRow]] = [
            Column("at", "Time", TIME_WIDTH, lambda r, now: clock_time_ms(r.at, utc=self.utc)),
            Column("flow", "Flow", 20, lambda r, now: r.label, flex=1),
        ]
        super().__init__(columns, key=lambda r: f"{r.at:.6f}|{r.label}|{r.source}>{r.target}",
                         empty_text="no messages recorded", id=id, classes=classes)

    # positions of the lanes inside the diagram area
    def _lane_x(self, width: int) -> list[int]:
        n = len(self.lanes)
        margin = max((len(name) for name in self.lanes), default=4) // 2 + 1
        if n == 1:
            return [width // 2]
        span = max(width - 2 * margin - 1, n)
        return [margin + (span * i) // (n - 1) for i in range(n)]

    def _diagram_width(self, width: int) -> int:
        return max(width - TIME_WIDTH - 1, 10)

    def _render_header(self, layout: list[tuple[Column[LadderRow], int]], width: int) -> Strip:
        style = self._style("header", "")
        area = self._diagram_width(width)
        chars = [" "] * area
        for name, x in zip(self.lanes, self._lane_x(area), strict=True):
            start = max(0, min(area - len(name), x - len(name) // 2))
            chars[start:start + len(name)] = list(name)
        text = fit("Time", TIME_WIDTH) + " " + "".join(chars)
        return Strip([Segment(fit(text, width), style)], width)

    def render_line(self, y: int) -> Strip:
        width = self.scrollable_content_region.width
        if y == 0:
            return self._render_header([], width)
        index = int(self.scroll_offset.y) + y - 1
        rows = self._rows
        if index >= len(rows):
            if index == 0 and self.empty_text:
                return Strip([Segment(fit(" " + self.empty_text, width), self._style("empty", ""))], width)
            return Strip.blank(width, self.rich_style)
        row = rows[index]
        row_class = "cursor" if index == self.cursor_row else ""
        lane_style = self._style(row_class, "dim")
        arrow_style = self._style(row_class, row.tone)
        area = self._diagram_width(width)
        xs = self._lane_x(area)
        chars = [" "] * area
        for x in xs:
            chars[x] = "│"
        source = xs[min(row.source, len(xs) - 1)]
        target = xs[min(row.target, len(xs) - 1)]
        lo, hi = min(source, target), max(source, target)
        if lo == hi:
            label = f"● {row.label}"
            start, end = lo, min(area, lo + len(label))
            chars[start:end] = list(label[: end - start])
            lo, hi = start, end
        else:
            for x in range(lo + 1, hi):
                chars[x] = "┼" if x in xs else "─"
            if target > source:
                chars[hi - 1] = "▶"
            else:
                chars[lo + 1] = "◀"
            room = hi - lo - 5
            if room > 0:
                label = f" {fit(row.label, min(len(row.label), room))} " if row.label else ""
                start = lo + 2 + max(0, (room - len(label) + 2) // 2)
                chars[start:start + len(label)] = list(label)
        time_text = fit(clock_time_ms(row.at, utc=self.utc), TIME_WIDTH) + " "
        segments = [
            Segment(time_text, self._style(row_class, "dim")),
            Segment("".join(chars[: lo + 1]), lane_style),
            Segment("".join(chars[lo + 1: hi]), arrow_style),
            Segment("".join(chars[hi:]), lane_style),
        ]
        used = len(time_text) + area
        if used < width:
            segments.append(Segment(" " * (width - used), self._style(row_class, "")))
        return Strip(segments, max(width, used)).crop(0, width)
