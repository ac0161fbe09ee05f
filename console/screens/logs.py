"""The held-call board, the push log, the event log and the audit log."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import Static

from console.model import CallEntry, LogItem
from console.screens.common import (
    ConsoleScreen,
    audit_columns,
    call_columns,
    event_columns,
    node_columns,
    push_columns,
)
from contract.documents import AuditEntry, NodeRow, PushRecord
from widgets.table import VirtualTable


class LogScreen(ConsoleScreen):
    """A title line and one table, refreshed from the model when it changed."""

    TITLE_TEXT = ""

    def __init__(self) -> None:
        super().__init__()
        self._shown_version = -1

    def refresh_view(self, now: float) -> None:
        super().refresh_view(now)
        model = self.console.model
        if model.version != self._shown_version:
            self._shown_version = model.version
            self.reload_rows(now)
        for table in self.query(VirtualTable):
            table.set_now(now)

    def reload_rows(self, now: float) -> None:
        raise NotImplementedError

    def show_log(self, name: str, table_id: str, rows: Sequence[object], now: float) -> None:
        """A newest-first log and its title: how many rows, and how many arrived above while the
        operator was scrolled away (``home`` shows them)."""
        table = self.query_one(f"#{table_id}", VirtualTable)
        table.set_rows(rows, now=now)
        self._show_title(name, table)

    def _show_title(self, name: str, table: VirtualTable[Any]) -> None:
        new = f" · {table.unseen} new ↑ (home)" if table.unseen else ""
        self.query_one(f"#{table.id}-title", Static).update(f"{name} ({table.row_count}, newest first){new}")


class CallsScreen(LogScreen):
    """Held INVITEs with their T1/T2 countdowns and push stage; recent calls below."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "open", "Trace", show=False),
        Binding("i", "open_instance", "Instance"),
        Binding("e", "export_text", "Export txt"),
        Binding("E", "export_pcap", "Export pcap"),
    ]

    def body(self) -> ComposeResult:
        columns = call_columns(self.console.model.store, self.console.in_utc)
        yield Static("Held calls", id="held-title", classes="section-title")
        yield VirtualTable[CallEntry](columns, key=lambda c: c.call.push_id or c.call.call_id,
                                     empty_text="no held calls", id="held", classes="held")
        yield Static("Recent calls", id="recent-title", classes="section-title")
        yield VirtualTable[CallEntry](columns, key=lambda c: f"{c.call.push_id}:{c.call.call_id}",
                                     empty_text="no recent calls", id="recent", classes="recent")

    def on_mount(self) -> None:
        self.query_one("#held", VirtualTable).focus()

    def reload_rows(self, now: float) -> None:
        model = self.console.model
        held = model.held_calls()
        self.query_one("#held-title", Static).update(f"Held calls ({len(held)})")
        self.query_one("#held", VirtualTable).set_rows(held, now=now)
        self.query_one("#recent", VirtualTable).set_rows(model.recent(), now=now)

    def _focused_call(self) -> CallEntry | None:
        focused = self.focused
        table = focused if isinstance(focused, VirtualTable) else self.query_one("#held", VirtualTable)
        row = table.cursor_value
        return row if isinstance(row, CallEntry) else None

    def selected_call_id(self) -> str | None:
        entry = self._focused_call()
        return entry.call.call_id if entry is not None else None

    def selected_selector(self) -> str | None:
        entry = self._focused_call()
        return entry.call.selector if entry is not None else None

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "open_instance":
            return True if self.selected_selector() else None
        return super().check_action(action, parameters)

    def action_open(self) -> None:
        entry = self._focused_call()
        if entry is not None:
            self.console.open_call(entry.call.call_id, entry.call.selector)

    def action_open_instance(self) -> None:
        selector = self.selected_selector()
        if selector:
            self.console.open_instance(selector)

    @on(VirtualTable.RowSelected)
    def _selected(self, event: VirtualTable.RowSelected) -> None:
        if isinstance(event.row, CallEntry):
            self.console.open_call(event.row.call.call_id, event.row.call.selector)

    @on(VirtualTable.RowHighlighted)
    def _highlighted(self) -> None:
        self.refresh_bindings()


class PushLogScreen(LogScreen):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("R", "replay", "Replay"),
        Binding("e", "export_text", "Export txt", show=False),
        Binding("E", "export_pcap", "Export pcap", show=False),
    ]

    def body(self) -> ComposeResult:
        yield Static("Push log (newest first)", id="push-log-title", classes="section-title")
        model = self.console.model
        yield VirtualTable[PushRecord](push_columns(model.store, self.console.in_utc, model.push_at),
                                      key=lambda p: p.push_id, empty_text="no pushes yet", id="push-log",
                                      newest_first=True)

    def on_mount(self) -> None:
        self.query_one("#push-log", VirtualTable).focus()

    def reload_rows(self, now: float) -> None:
        self.show_log("Push log", "push-log", self.console.model.push_log(), now)

    def selected_push(self) -> PushRecord | None:
        row = self.query_one("#push-log", VirtualTable).cursor_value
        return row if isinstance(row, PushRecord) else None

    def selected_selector(self) -> str | None:
        push = self.selected_push()
        return push.selector if push is not None and push.selector else None

    def selected_call_id(self) -> str | None:
        push = self.selected_push()
        return push.call_id if push is not None else None

    @on(VirtualTable.RowSelected)
    def _selected(self, event: VirtualTable.RowSelected) -> None:
        if isinstance(event.row, PushRecord) and event.row.selector:
            self.console.open_instance(event.row.selector)

    @on(VirtualTable.RowHighlighted)
    def _highlighted(self, event: VirtualTable.RowHighlighted) -> None:
        self.refresh_bindings()
        self._show_title("Push log", event.table)


class EventLogScreen(LogScreen):
    _with_node = False

    def body(self) -> ComposeResult:
        yield Static("Event log (newest first)", id="event-log-title", classes="section-title")
        yield VirtualTable[LogItem](event_columns(self.console.model.store, self.console.in_utc),
                                   key=lambda e: f"{e.seq}:{e.at}", empty_text="no events yet", id="event-log",
                                   newest_first=True)

    def on_mount(self) -> None:
        self.query_one("#event-log", VirtualTable).focus()

    def reload_rows(self, now: float) -> None:
        summary = self.console.model.summary
        cluster = summary is not None and summary.nodes_up > 1
        if cluster != self._with_node:  # which node an event happened on matters once there are two
            self._with_node = cluster
            self.query_one("#event-log", VirtualTable).set_columns(
                event_columns(self.console.model.store, self.console.in_utc, with_node=cluster))
        self.show_log("Event log", "event-log", self.console.model.event_log(), now)

    @on(VirtualTable.RowHighlighted)
    def _highlighted(self, event: VirtualTable.RowHighlighted) -> None:
        self._show_title("Event log", event.table)

    @on(VirtualTable.RowSelected)
    def _selected(self, event: VirtualTable.RowSelected) -> None:
        self.console.open_event(event.row)


class AuditScreen(LogScreen):
    def body(self) -> ComposeResult:
        yield Static("Audit log (newest first)", id="audit-log-title", classes="section-title")
        yield VirtualTable[AuditEntry](audit_columns(self.console.model.store, self.console.in_utc),
                                      key=lambda a: f"{a.at}:{a.action}:{a.target}",
                                      empty_text="no audited actions", id="audit-log", newest_first=True)

    def on_mount(self) -> None:
        self.query_one("#audit-log", VirtualTable).focus()

    def reload_rows(self, now: float) -> None:
        self.show_log("Audit log", "audit-log", self.console.model.audit_log(), now)

    @on(VirtualTable.RowHighlighted)
    def _highlighted(self, event: VirtualTable.RowHighlighted) -> None:
        self._show_title("Audit log", event.table)


class NodesScreen(LogScreen):
    """The cluster's nodes: state, instances owned, how long since each renewed its leases."""

    def body(self) -> ComposeResult:
        yield Static("Nodes", id="nodes-title", classes="section-title")
        yield VirtualTable[NodeRow](node_columns(), key=lambda n: n.name, empty_text="no nodes", id="nodes")

    def on_mount(self) -> None:
        self.query_one("#nodes", VirtualTable).focus()

    def reload_rows(self, now: float) -> None:
        nodes = self.console.model.nodes
        up = sum(1 for n in nodes if n.state == "up")
        self.query_one("#nodes-title", Static).update(f"Nodes ({up} up of {len(nodes)})")
        self.query_one("#nodes", VirtualTable).set_rows(nodes, now=now)
