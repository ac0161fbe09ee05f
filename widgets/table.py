"""A Line-API table over a plain row sequence: only the visible lines are ever rendered.

``DataTable`` turns every row into objects and measures every cell when rows are loaded (13 s for
100k rows); this table keeps a reference to a ``Sequence`` the caller owns and formats a row only when
its line is painted, so 100k rows cost nothing until they scroll into view. Cell text may depend on
the time (countdowns): the caller sets :attr:`VirtualTable.now` and only visible lines are redrawn.

The table does not sort or filter: clicking a header posts :class:`VirtualTable.HeaderClicked` and the
owner decides. The cursor follows a row's key across :meth:`VirtualTable.set_rows`; a ``newest_first``
table (a log) follows the newest row instead while the cursor is on the first one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Literal, TypeVar

from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding, BindingType
from textual.geometry import Region, Size
from textual.message import Message
from textual.scroll_view import ScrollView
from textual.strip import Strip

from widgets.format import fit

T = TypeVar("T")

#: the colour "tones" a cell may ask for; each is a component class ``virtual-table--<tone>``
TONES = ("ok", "warn", "bad", "info", "dim", "accent")


@dataclass(frozen=True, slots=True)
class Column(Generic[T]):
    """How to show one column: ``text(row, now)`` and optionally ``tone(row, now)`` (one of TONES)."""

    key: str
    title: str
    width: int
    text: Callable[[T, float], str]
    tone: Callable[[T, float], str] | None = None
    align: Literal["left", "right"] = "left"
    flex: int = 0  # share of the spare width
    priority: int = 0  # when the table is narrow, columns with the highest priority number go first


def _least(column: Column[Any], sorted_by: str | None) -> int:
    """A column's width: the sorted one's never less than its title and the arrow (``Code▲``, not
    ``Cod…``)."""
    return max(column.width, len(column.title) + 1) if column.key == sorted_by else column.width


class VirtualTable(ScrollView, Generic[T], can_focus=True):
    """A fast, read-only table with a row cursor and a fixed header line."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("up,k", "cursor(-1)", "Up", show=False),
        Binding("down,j", "cursor(1)", "Down", show=False),
        Binding("pageup", "page(-1)", "Page up", show=False),
        Binding("pagedown", "page(1)", "Page down", show=False),
        Binding("home", "first", "First", show=False),
        Binding("end", "last", "Last", show=False),
        Binding("enter", "select", "Open", show=False),
    ]

    COMPONENT_CLASSES: ClassVar[set[str]] = {
        "virtual-table--header",
        "virtual-table--header-sorted",
        "virtual-table--cursor",
        "virtual-table--even",
        "virtual-table--empty",
        *(f"virtual-table--{tone}" for tone in TONES),
    }

    DEFAULT_CSS = """
    VirtualTable {
        height: 1fr;
        overflow-x: hidden;
        overflow-y: auto;
        scrollbar-size-vertical: 1;
        background: $surface;
        color: $foreground;
        & > .virtual-table--header { text-style: bold; background: $panel; color: $foreground; }
        & > .virtual-table--header-sorted { text-style: bold underline; background: $panel; color: $accent; }
        & > .virtual-table--cursor {
            background: $block-cursor-blurred-background;
            color: $block-cursor-blurred-foreground;
        }
        &:focus > .virtual-table--cursor {
            background: $block-cursor-background;
            color: $block-cursor-foreground;
            text-style: $block-cursor-text-style;
        }
        & > .virtual-table--even { background: $surface-lighten-1 30%; }
        & > .virtual-table--empty { color: $text-muted; text-style: italic; }
        & > .virtual-table--ok { color: $success; }
        & > .virtual-table--warn { color: $warning; }
        & > .virtual-table--bad { color: $error; text-style: bold; }
        & > .virtual-table--info { color: $primary; }
        & > .virtual-table--dim { color: $text-muted; }
        & > .virtual-table--accent { color: $accent; }
    }
    """

    class _RowMessage(Message):
        """Something happened to one row (``index`` in the current view)."""

        def __init__(self, table: VirtualTable[Any], index: int, row: Any) -> None:
            super().__init__()
            self.table = table
            self.index = index
            self.row = row

        @property
        def control(self) -> VirtualTable[Any]:
            return self.table

    class RowHighlighted(_RowMessage):
        """The cursor moved to another row."""

    class RowSelected(_RowMessage):
        """Enter (or a click on the highlighted row / a double click) on a row."""

    class HeaderClicked(Message):
        """A column header was clicked (the owner decides how to sort)."""

        def __init__(self, table: VirtualTable[Any], column: str) -> None:
            super().__init__()
            self.table = table
            self.column = column

        @property
        def control(self) -> VirtualTable[Any]:
            return self.table

    def __init__(
        self,
        columns: Sequence[Column[T]],
        *,
        key: Callable[[T], str],
        empty_text: str = "nothing to show",
        name: str | None = None,
        id: str | None = None,
        classes: str | None = None,
        newest_first: bool = False,
    ) -> None:
        super().__init__(name=name, id=id, classes=classes)
        #: a log, newest row first: see :meth:`_follow_newest`
        self.newest_first = newest_first
        #: (newest_first) rows that arrived above the newest one the operator was shown at the top
        self.unseen = 0
        self._newest_key: str | None = None
        self.columns: list[Column[T]] = list(columns)
        self.row_key = key
        self.empty_text = empty_text
        self.now = 0.0
        self.sort_column: str | None = None
        self.sort_desc = False
        self._rows: Sequence[T] = ()
        self.cursor_row = 0
        self._cursor_key: str | None = None
        self._layout_width: tuple[int, str | None] = (-1, None)  # what _layout was made for
        self._layout: list[tuple[Column[T], int]] = []
        self._styles: dict[tuple[str, str], Style] = {}

    # ------------------------------------------------------------------ data

    @property
    def rows(self) -> Sequence[T]:
        return self._rows

    @property
    def row_count(self) -> int:
        return len(self._rows)

    @property
    def cursor_value(self) -> T | None:
        """The row under the cursor, if any."""
        if 0 <= self.cursor_row < len(self._rows):
            return self._rows[self.cursor_row]
        return None

    def set_rows(self, rows: Sequence[T], *, now: float | None = None) -> None:
        """Show ``rows`` (kept by reference); the cursor stays on the same row key where possible.

        A ``rows`` object with a ``locate(key) -> int | None`` method is asked where the cursor's
        row went instead of scanning it.
        """
        if now is not None:
            self.now = now
        following = self.newest_first and self.cursor_row == 0
        top, before = int(self.scroll_offset.y), self.cursor_row
        self._rows = rows
        n = len(rows)
        self.virtual_size = Size(max(1, self.scrollable_content_region.width), n + 1)
        index = self.cursor_row
        if self._cursor_key is not None and not following:
            index = self._find(self._cursor_key, index)
        self._move_cursor(min(max(index, 0), max(n - 1, 0)), post=True, force=True)
        if self.newest_first and not following:
            self._stay_put(top + self.cursor_row - before)
        self.refresh()

    def _stay_put(self, top: int) -> None:
        """A log scrolled away from its newest row: rows that arrived above move the view down with
        them, so what the operator reads stays where it was; :attr:`unseen` counts them."""
        if top != int(self.scroll_offset.y):
            self.scroll_to(y=top, animate=False, immediate=True)
        rows, key = self._rows, self._newest_key
        self.unseen = next((i for i, row in enumerate(rows) if self.row_key(row) == key), 0)

    def set_now(self, now: float) -> None:
        """New time for countdown cells: repaints the visible lines only."""
        self.now = now
        self.refresh()

    def set_sort_indicator(self, column: str | None, desc: bool) -> None:
        layout_changes = column != self.sort_column
        self.sort_column, self.sort_desc = column, desc
        if layout_changes:  # the sorted column may need room for its arrow
            self.refresh()
        else:
            self.refresh(Region(0, 0, self.size.width, 1))

    def _find(self, key: str, hint: int) -> int:
        rows, row_key = self._rows, self.row_key
        if 0 <= hint < len(rows) and row_key(rows[hint]) == key:
            return hint
        locate = getattr(rows, "locate", None)
        if locate is not None:  # the sequence can find a key faster than a scan (e.g. an index)
            found = locate(key)
            return hint if found is None else int(found)
        for i, row in enumerate(rows):
            if row_key(row) == key:
                return i
        return hint

    # ------------------------------------------------------------------ cursor

    def _move_cursor(self, index: int, *, post: bool = True, force: bool = False) -> None:
        n = len(self._rows)
        index = min(max(index, 0), max(n - 1, 0))
        old = self.cursor_row
        row = self._rows[index] if n else None
        new_key = self.row_key(row) if row is not None else None
        changed = index != old or new_key != self._cursor_key
        self.cursor_row = index
        self._cursor_key = new_key
        if self.newest_first and index == 0:  # at the newest row: everything above has been seen
            self.unseen, self._newest_key = 0, new_key
        self._scroll_cursor_into_view()
        if changed or force:
            self.refresh_row(old)
            self.refresh_row(index)
        if post and changed and row is not None:
            self.post_message(self.RowHighlighted(self, index, row))

    def refresh_row(self, index: int) -> None:
        y = index - int(self.scroll_offset.y) + 1
        if 1 <= y < self.size.height:
            self.refresh(Region(0, y, self.size.width, 1))

    def _visible_rows(self) -> int:
        return max(1, self.scrollable_content_region.height - 1)

    def _scroll_cursor_into_view(self) -> None:
        top = int(self.scroll_offset.y)
        visible = self._visible_rows()
        cursor = self.cursor_row
        if cursor < top:
            self.scroll_to(y=cursor, animate=False, immediate=True)
        elif cursor >= top + visible:
            self.scroll_to(y=cursor - visible + 1, animate=False, immediate=True)

    def move_cursor_to(self, index: int) -> None:
        self._move_cursor(index)

    def action_cursor(self, delta: int) -> None:
        self._move_cursor(self.cursor_row + delta)

    def action_page(self, direction: int) -> None:
        self._move_cursor(self.cursor_row + direction * self._visible_rows())

    def action_first(self) -> None:
        self._move_cursor(0)

    def action_last(self) -> None:
        self._move_cursor(len(self._rows) - 1)

    def action_select(self) -> None:
        row = self.cursor_value
        if row is not None:
            self.post_message(self.RowSelected(self, self.cursor_row, row))

    async def _on_click(self, event: events.Click) -> None:
        offset = event.get_content_offset(self)
        if offset is None:
            return
        if offset.y == 0:
            column = self._column_at(offset.x)
            if column is not None:
                self.post_message(self.HeaderClicked(self, column))
            return
        index = int(self.scroll_offset.y) + offset.y - 1
        if 0 <= index < len(self._rows):
            again = index == self.cursor_row
            self._move_cursor(index)
            if again or event.chain >= 2:
                self.action_select()

    def _column_at(self, x: int) -> str | None:
        position = 0
        for column, width in self._columns_for(self.scrollable_content_region.width):
            if position <= x < position + width + 1:
                return column.key
            position += width + 1
        return None

    # ------------------------------------------------------------------ layout and styles

    def _on_resize(self, event: events.Resize) -> None:
        self.virtual_size = Size(max(1, self.scrollable_content_region.width), len(self._rows) + 1)
        self._scroll_cursor_into_view()

    def set_columns(self, columns: Sequence[Column[T]]) -> None:
        """Show these columns from now on (the rows stay)."""
        self.columns = list(columns)
        self._layout_width = (-1, None)
        self.refresh()

    def _columns_for(self, width: int) -> list[tuple[Column[T], int]]:
        """Which columns fit in ``width`` and how wide each one is (cached per width)."""
        if (width, self.sort_column) == self._layout_width:
            return self._layout
        chosen = list(self.columns)
        sorted_by = self.sort_column

        def needed(columns: list[Column[T]]) -> int:
            return sum(_least(c, sorted_by) for c in columns) + max(len(columns) - 1, 0)

        while len(chosen) > 1 and needed(chosen) > width:
            worst = max(chosen, key=lambda c: c.priority)
            if worst.priority == 0:
                break
            chosen.remove(worst)
        spare = max(width - needed(chosen), 0)
        total_flex = sum(c.flex for c in chosen)
        layout: list[tuple[Column[T], int]] = []
        given = 0
        flex_columns = [c for c in chosen if c.flex]
        for column in chosen:
            extra = 0
            if column.flex and total_flex:
                if column is flex_columns[-1]:
                    extra = spare - given
                else:
                    extra = spare * column.flex // total_flex
                    given += extra
            layout.append((column, _least(column, sorted_by) + extra))
        self._layout_width, self._layout = (width, sorted_by), layout
        return layout

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._styles.clear()

    def _style(self, row_class: str, tone: str) -> Style:
        key = (row_class, tone)
        style = self._styles.get(key)
        if style is None:
            base = self.rich_style
            if row_class:
                base = base + self.get_component_rich_style(f"virtual-table--{row_class}")
            if tone and row_class != "cursor":
                base = base + self.get_component_rich_style(f"virtual-table--{tone}", partial=True)
            style = base
            self._styles[key] = style
        return style

    # ------------------------------------------------------------------ rendering

    def render_line(self, y: int) -> Strip:
        width = self.scrollable_content_region.width
        layout = self._columns_for(width)
        if y == 0:
            return self._render_header(layout, width)
        index = int(self.scroll_offset.y) + y - 1
        rows = self._rows
        if index >= len(rows):
            if index == 0 and self.empty_text:
                style = self._style("empty", "")
                return Strip([Segment(fit(" " + self.empty_text, width), style)], width)
            return Strip.blank(width, self.rich_style)
        row = rows[index]
        if index == self.cursor_row:
            row_class = "cursor"
        elif index % 2:
            row_class = "even"
        else:
            row_class = ""
        now = self.now
        gap = self._style(row_class, "")
        segments: list[Segment] = []
        used = 0
        for n, (column, cell_width) in enumerate(layout):
            if n:
                segments.append(Segment(" ", gap))
                used += 1
            text = fit(column.text(row, now), cell_width, right=column.align == "right")
            tone = column.tone(row, now) if column.tone is not None else ""
            segments.append(Segment(text, self._style(row_class, tone)))
            used += cell_width
        if used < width:
            segments.append(Segment(" " * (width - used), gap))
        return Strip(segments, max(width, used)).crop(0, width)

    def _render_header(self, layout: list[tuple[Column[T], int]], width: int) -> Strip:
        plain = self._style("header", "")
        sorted_style = self._style("header-sorted", "")
        segments: list[Segment] = []
        used = 0
        for n, (column, cell_width) in enumerate(layout):
            if n:
                segments.append(Segment(" ", plain))
                used += 1
            title = column.title
            style = plain
            if column.key == self.sort_column:
                title = f"{title}{'▼' if self.sort_desc else '▲'}"
                style = sorted_style
            segments.append(Segment(fit(title, cell_width, right=column.align == "right"), style))
            used += cell_width
        if used < width:
            segments.append(Segment(" " * (width - used), plain))
        return Strip(segments, max(width, used)).crop(0, width)
