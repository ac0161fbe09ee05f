"""Instance detail (header, ladder beside the raw message, timeline, push history) and the call trace."""

from __future__ import annotations

from typing import ClassVar

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, ScrollableContainer
from textual.content import Content
from textual.widgets import Static, TabbedContent, TabPane

from console.feed import FeedError
from console.model import LogItem, push_time
from console.screens.common import LANES, ConsoleScreen, build_ladder, event_columns, push_columns
from contract.documents import InstanceRow, PushRecord
from contract.events import InstanceDetail
from widgets.format import ago, countdown
from widgets.instance_table import PUSH_TONE, REG_TONE, STATE_TONE
from widgets.ladder import Ladder
from widgets.rows import LadderRow
from widgets.table import VirtualTable

TONE_STYLE = {"ok": "$success", "warn": "$warning", "bad": "bold $error", "info": "$primary", "dim": "$text-muted",
              "accent": "$accent", "": ""}


class TracePane(Horizontal):
    """A ladder with the selected arrow's raw message beside it."""

    def __init__(self, *, utc: bool, id: str | None = None) -> None:
        super().__init__(id=id, classes="trace-pane")
        self.utc = utc

    def compose(self) -> ComposeResult:
        yield Ladder(LANES, utc=self.utc, classes="ladder")
        with ScrollableContainer(classes="raw-box"):
            yield Static("", classes="raw", markup=False)

    @property
    def ladder(self) -> Ladder:
        return self.query_one(Ladder)

    def show(self, rows: list[LadderRow]) -> None:
        self.ladder.set_rows(rows)
        self.show_raw(self.ladder.cursor_value)

    def show_raw(self, row: LadderRow | None) -> None:
        self.query_one(".raw", Static).update(row.detail if row is not None else "")

    @on(VirtualTable.RowHighlighted)
    def _highlighted(self, event: VirtualTable.RowHighlighted) -> None:
        if isinstance(event.row, LadderRow):
            self.show_raw(event.row)


class InstanceDetailScreen(ConsoleScreen):
    """Everything about one instance; Esc goes back."""

    HAS_INSTANCE_ACTIONS = True

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "back", "Back"),
        Binding("t", "act('take-over')", "Take over"),
        Binding("h", "act('hand-back')", "Hand back"),
        Binding("r", "act('re-register')", "Re-register"),
        Binding("n", "act('test-push')", "Test push"),
        Binding("D", "act('disable')", "Disable"),
        Binding("e", "export_text", "Export txt"),
        Binding("E", "export_pcap", "Export pcap"),
        Binding("R", "replay", "Replay push"),  # enabled on the Pushes tab with a push selected
        Binding("ctrl+r", "reload", "Reload", show=False),
    ]

    def __init__(self, selector: str) -> None:
        super().__init__(classes="detail-screen")
        self.selector = selector
        self.detail: InstanceDetail | None = None
        self.loaded_at_version = -1

    def body(self) -> ComposeResult:
        yield Static("", id="detail-head")
        with TabbedContent(id="detail-tabs"):
            with TabPane("Ladder", id="tab-ladder"):
                yield TracePane(utc=self.console.utc, id="detail-trace")
            with TabPane("Timeline", id="tab-timeline"):
                yield VirtualTable[LogItem](
                    event_columns(self.console.model.store, self.console.in_utc, with_instance=False),
                    key=lambda e: f"{e.seq}:{e.at}", empty_text="no events", id="detail-timeline", newest_first=True)
            with TabPane("Pushes", id="tab-pushes"):
                yield VirtualTable[PushRecord](push_columns(self.console.model.store, self.console.in_utc),
                                            key=lambda p: p.push_id, empty_text="no pushes", id="detail-pushes",
                                            newest_first=True)

    def on_mount(self) -> None:
        self.query_one(Ladder).focus()
        self._show_head(self.console.now())
        self.load()

    @work(exclusive=True, group="detail-load", exit_on_error=False)
    async def load(self) -> None:
        try:
            detail = await self.console.feed.instance(self.selector)
        except FeedError as exc:
            self.notify(f"{self.selector}: {exc.detail}", title="Instance detail", severity="error", markup=False)
            return
        self.show_detail(detail)

    def show_detail(self, detail: InstanceDetail) -> None:
        self.detail = detail
        self.loaded_at_version = self.console.model.version
        utc = self.console.utc
        self.query_one(TracePane).show(build_ladder(detail.sip, detail.pushes, detail.timeline, utc=utc))
        self.query_one("#detail-timeline", VirtualTable).set_rows(
            sorted(reversed(detail.timeline), key=lambda event: event.at, reverse=True))
        self.query_one("#detail-pushes", VirtualTable).set_rows(sorted(detail.pushes, key=push_time, reverse=True))
        self._show_unseen()
        self._show_head(self.console.now())
        self.refresh_bindings()

    def action_reload(self) -> None:
        self.load()

    def refresh_view(self, now: float) -> None:
        super().refresh_view(now)
        self._show_head(now)
        for table in self.query(VirtualTable):
            table.set_now(now)

    def _row(self) -> InstanceRow | None:
        return self.console.model.store.get(self.selector) or (self.detail.row if self.detail else None)

    def _show_head(self, now: float) -> None:
        row = self._row()
        if row is None:
            self.query_one("#detail-head", Static).update(f"{self.selector}  loading…")
            return
        push = self.detail.instance.push if self.detail is not None else None
        code = "-" if row.last_code is None else f"{row.last_code} {row.last_reason or ''}".strip()
        expires = "expired" if row.expires_at is not None and row.expires_at <= now else countdown(row.expires_at, now)
        parts: list[str | tuple[str, str]] = [
            (row.aor or row.selector, "bold"), (f"  {row.selector}", "$text-muted"), "  ",
            (f" {row.state.upper()} ", f"bold reverse {TONE_STYLE[STATE_TONE.get(row.state, '')] or ''}".strip()),
            "  ", (row.reg_status, TONE_STYLE[REG_TONE.get(row.reg_status, "")]), f"  last {code}", "\n",
            ("refresh in ", "$text-muted"), countdown(row.next_refresh_at, now),
            ("  expires in ", "$text-muted"), expires,
            ("  failures ", "$text-muted"), (str(row.failure_count), "bold $error" if row.failure_count else ""),
            ("  registrar ", "$text-muted"), row.registrar or "-",
            "\n",
            ("push ", "$text-muted"), row.push_provider or "-",
            ("  last ", "$text-muted"),
            ("unreachable" if row.push_unreachable else (row.last_push_outcome or "-"),
             "bold $error" if row.push_unreachable else TONE_STYLE[PUSH_TONE.get(row.last_push_outcome or "", "")]),
            f" {ago(row.last_push_at, now)}" if row.last_push_at else "",
            ("  app seen ", "$text-muted"), ago(row.app_last_seen, now),
            ("  token ", "$text-muted"), (push.token if push is not None else None) or "-",
            ("  app ", "$text-muted"), (push.app_id if push is not None else None) or "-",
        ]
        self.query_one("#detail-head", Static).update(Content.assemble(*parts))

    # -------------------------------------------------------------- selection

    def selected_selector(self) -> str | None:
        return self.selector

    def _active_tab(self) -> str:
        return self.query_one(TabbedContent).active or "tab-ladder"

    def selected_push(self) -> PushRecord | None:
        if self._active_tab() != "tab-pushes":
            return None
        row = self.query_one("#detail-pushes", VirtualTable).cursor_value
        return row if isinstance(row, PushRecord) else None

    def selected_call_id(self) -> str | None:
        row = self.query_one(Ladder).cursor_value
        if isinstance(row, LadderRow) and row.call_id:
            return row.call_id
        return None

    @on(TabbedContent.TabActivated)
    def _tab_changed(self) -> None:
        self.refresh_bindings()

    @on(VirtualTable.RowSelected, "#detail-timeline")
    def _event_selected(self, event: VirtualTable.RowSelected) -> None:
        self.console.open_event(event.row)

    @on(VirtualTable.RowHighlighted)
    def _highlighted(self) -> None:
        self.refresh_bindings()
        self._show_unseen()

    def _show_unseen(self) -> None:
        """The Timeline and Pushes tabs say how many rows arrived above while scrolled away."""
        tabs = self.query_one(TabbedContent)
        for pane, table_id, name in (("tab-timeline", "detail-timeline", "Timeline"),
                                     ("tab-pushes", "detail-pushes", "Pushes")):
            unseen = self.query_one(f"#{table_id}", VirtualTable).unseen
            tabs.get_tab(pane).label = f"{name} · {unseen} new ↑" if unseen else name


class CallTraceScreen(ConsoleScreen):
    """One call's ladder (SIP with the PBX, pushes) beside the raw messages."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "back", "Back"),
        Binding("e", "export_text", "Export txt"),
        Binding("E", "export_pcap", "Export pcap"),
        Binding("i", "open_instance", "Instance"),
        Binding("ctrl+r", "reload", "Reload", show=False),
    ]

    def __init__(self, call_id: str, selector: str | None = None) -> None:
        super().__init__(classes="trace-screen")
        self.call_id = call_id
        self.selector = selector

    def body(self) -> ComposeResult:
        yield Static(Content.assemble(("Call ", "$text-muted"), (self.call_id, "bold")), id="trace-head")
        yield TracePane(utc=self.console.utc, id="call-trace")

    def on_mount(self) -> None:
        self.query_one(Ladder).focus()
        self.load()

    @work(exclusive=True, group="trace-load", exit_on_error=False)
    async def load(self) -> None:
        try:
            trace = await self.console.feed.call_trace(self.call_id)
        except FeedError as exc:
            self.notify(f"{self.call_id}: {exc.detail}", title="Call trace", severity="error", markup=False)
            return
        if self.selector is None and trace.selector:
            self.selector = trace.selector
        self.query_one(TracePane).show(build_ladder(trace.messages, trace.pushes, utc=self.console.utc,
                                                    app_stages=True))
        self.refresh_bindings()

    def action_reload(self) -> None:
        self.load()

    def selected_call_id(self) -> str | None:
        return self.call_id

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "open_instance":
            return self.selector is not None
        return super().check_action(action, parameters)

    def action_open_instance(self) -> None:
        if self.selector is not None:
            self.console.open_instance(self.selector)
