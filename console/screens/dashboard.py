"""The dashboard: status strip, sparklines, and the instance table with filter and sort."""

from __future__ import annotations

from typing import ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import Input, Static

from console.screens.common import ConsoleScreen
from contract.documents import InstanceRow
from widgets.format import thousands
from widgets.instance_table import INSTANCE_COLUMN_KEYS, INSTANCE_COLUMNS, InstanceTable
from widgets.sparklines import SparkPanel
from widgets.table import VirtualTable

COLUMN_TITLES = {c.key: c.title for c in INSTANCE_COLUMNS}
SPARK_SERIES = [("proxied", "registrations proxied"), ("calls", "calls/min"), ("push_failures", "push failures")]


class DashboardScreen(ConsoleScreen):
    HAS_INSTANCE_ACTIONS = True

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("slash", "filter", "Filter"),
        Binding("escape", "clear_filter", "Clear filter", show=False),
        Binding("s", "sort_next", "Sort"),
        Binding("S", "sort_reverse", "Reverse", show=False),
        Binding("enter", "open", "Detail", show=False),
        Binding("t", "act('take-over')", "Take over"),
        Binding("h", "act('hand-back')", "Hand back"),
        Binding("r", "act('re-register')", "Re-register"),
        Binding("n", "act('test-push')", "Test push"),
        Binding("D", "act('disable')", "Disable"),  # hidden unless the role allows it (check_action)
    ]

    def __init__(self) -> None:
        super().__init__(id="dashboard")
        self._shown_version = -1
        self._shown_info = ""
        self._had_selection = False

    def body(self) -> ComposeResult:
        yield SparkPanel(SPARK_SERIES, id="sparks")
        yield Static("", id="table-info")
        yield InstanceTable(id="instances")
        yield Input(placeholder="filter: words, state:proxied, status:unauth, code:403, push:rej, provider:fcm",
                    id="filter", compact=True)

    @property
    def table(self) -> InstanceTable:
        return self.query_one(InstanceTable)

    @property
    def filter_input(self) -> Input:
        return self.query_one("#filter", Input)

    def on_mount(self) -> None:
        self.table.focus()

    # -------------------------------------------------------------- refresh

    def refresh_view(self, now: float) -> None:
        super().refresh_view(now)
        store = self.console.model.store
        table = self.table
        if store.version != self._shown_version:
            self._shown_version = store.version
            table.set_sort_indicator(store.sort_key, store.sort_desc)
            table.set_rows(store.view(), now=now)
            self._selection_changed()
        else:
            table.set_now(now)
        self._show_info()
        model = self.console.model
        sparks = self.query_one(SparkPanel)
        for key, _title in SPARK_SERIES:
            data = list(model.series[key])
            caption = f"{data[-1]:,.0f}" if data else "-"
            sparks.show(key, data, caption)

    def _show_info(self) -> None:
        store = self.console.model.store
        total = store.total
        arrow = "▼" if store.sort_desc else "▲"
        if store.partial and store.query:  # only the first page is in: the count comes with the rest
            text = f"Instances  … of {thousands(total)}"
        else:
            text = f"Instances  {thousands(store.matched)} of {thousands(total)}"
        text += f"   sort {COLUMN_TITLES.get(store.sort_key, store.sort_key)}{arrow}"
        if store.query:
            text += f"   filter “{store.query}”"
        if not self.console.loaded:
            text += "   loading…"
        if text != self._shown_info:  # one line of fixed size: no new layout needed
            self._shown_info = text
            self.query_one("#table-info", Static).update(text, layout=False)

    def _show_rows(self) -> None:
        store = self.console.model.store
        self._shown_version = store.version
        self.table.set_sort_indicator(store.sort_key, store.sort_desc)
        self.table.set_rows(store.view(), now=self.console.now())
        self._show_info()
        self._selection_changed()  # e.g. a filter that matches nothing

    # -------------------------------------------------------------- filter

    def action_filter(self) -> None:
        box = self.filter_input
        box.add_class("-active")
        box.focus()

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        self.console.model.store.set_query(event.value)
        self._show_rows()

    @on(Input.Submitted, "#filter")
    def _filter_submitted(self, event: Input.Submitted) -> None:
        if not event.value:
            self.filter_input.remove_class("-active")
        self.table.focus()

    async def action_clear_filter(self) -> None:
        box = self.filter_input
        if not box.value and not box.has_class("-active"):
            await self.console.action_back()  # nothing to clear: esc goes back
            return
        if box.value:
            box.value = ""  # posts Input.Changed → rows shown again
            self.console.model.store.set_query("")
            self._show_rows()
        box.remove_class("-active")
        self.table.focus()

    # -------------------------------------------------------------- sort

    def action_sort_next(self) -> None:
        store = self.console.model.store
        keys = list(INSTANCE_COLUMN_KEYS)
        following = keys[(keys.index(store.sort_key) + 1) % len(keys)] if store.sort_key in keys else keys[0]
        store.set_sort(following, False)
        self._show_rows()

    def action_sort_reverse(self) -> None:
        store = self.console.model.store
        store.set_sort(store.sort_key, not store.sort_desc)
        self._show_rows()

    @on(VirtualTable.HeaderClicked, "#instances")
    def _header_clicked(self, event: VirtualTable.HeaderClicked) -> None:
        self.console.model.store.set_sort(event.column)
        self._show_rows()

    # -------------------------------------------------------------- drill-down and actions

    def selected_selector(self) -> str | None:
        row = self.table.selected
        return row.selector if row is not None else None

    def action_open(self) -> None:
        selector = self.selected_selector()
        if selector is not None:
            self.console.open_instance(selector)

    @on(VirtualTable.RowSelected, "#instances")
    def _row_selected(self, event: VirtualTable.RowSelected) -> None:
        row = event.row
        if isinstance(row, InstanceRow):
            self.console.open_instance(row.selector)

    @on(VirtualTable.RowHighlighted, "#instances")
    def _row_highlighted(self, event: VirtualTable.RowHighlighted) -> None:
        self._selection_changed()

    def _selection_changed(self) -> None:
        """The footer's instance actions depend only on whether a row is selected, not on which: redo
        the bindings (the footer rebuilds all its keys, ~10 ms) only when that changes."""
        selected = self.table.selected is not None
        if selected != self._had_selection:
            self._had_selection = selected
            self.refresh_bindings()
