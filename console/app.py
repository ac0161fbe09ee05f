"""The SIPIS operations console: a Textual app that is a client of the operator API.

One :class:`SipisConsole` per operator (its own process on a pty, see DESIGN.md). It loads all
instance rows once, then follows the event stream; events queue up and are applied in batches by a
single ~1 Hz tick, which also redraws the countdowns of the visible rows only. ``p`` freezes all of it.
Actions go through a confirm modal and then the operator API; the core checks the role again.
"""

from __future__ import annotations

import asyncio
import gc
import re
import sys
import time
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from textual import events
from textual.app import App
from textual.binding import Binding, BindingType
from textual.notifications import SeverityLevel
from textual.screen import ModalScreen
from textual.theme import Theme
from textual.worker import Worker, WorkerState

from console import instrumentation
from console.feed import Feed, FeedError, Forbidden
from console.model import ALARM_TITLES, ConsoleModel, LogItem
from console.roles import ACTIONS, REPLAY_ROLE, role_allows, why_not
from console.screens import (
    AlarmsScreen,
    AuditScreen,
    CallsScreen,
    CallTraceScreen,
    ConfirmScreen,
    ConsoleScreen,
    DashboardScreen,
    EventLogScreen,
    EventScreen,
    HelpScreen,
    InstanceDetailScreen,
    NodesScreen,
    PbxScreen,
    PushLogScreen,
)
from console.screens.common import event_fields, instance_label
from console.toasts import Toasts
from contract.documents import PushRecord, PushResult
from contract.events import Alarm, Event, StreamNotice
from contract.kinds import AlarmState
from widgets.format import clock_time
from widgets.rows import StatusSnapshot

if TYPE_CHECKING:
    from textual.command import Provider

#: events waiting while paused beyond this are dropped and the instance list is reloaded on resume
MAX_PENDING = 200_000
#: below this width the app gets the ``-narrow`` class (ladder above the raw message, not beside it)
NARROW = 120
#: rows asked for first, so the dashboard has something to show while the whole list loads
FIRST_PAGE = 200
#: an event that took longer than this to arrive was waited for (the stream had nothing buffered)
EVENT_WAITED = 0.002
#: views esc can go back through
VISITED = 10
#: where exports go unless told (``--export-dir``, ``[console] export_dir``): never the working
#: directory, which may be a checkout
DEFAULT_EXPORT_DIR = Path("~/sipis-exports")


def stylesheet_path() -> Path:
    """``console.tcss``: beside the packages in a checkout, else where the wheel installed it."""
    candidates = [
        Path(__file__).resolve().parent.parent / "console.tcss",
        Path(__file__).resolve().parent / "console.tcss",
        Path(sys.prefix) / "share" / "sipis-console" / "console.tcss",
    ]
    for path in candidates:
        if path.is_file():
            return path
    return candidates[0]


HIGH_CONTRAST_THEME = Theme(
    name="sipis-high-contrast",
    primary="#00ffff",
    secondary="#ffffff",
    accent="#ff66ff",
    warning="#ffff00",
    error="#ff4040",
    success="#00ff00",
    foreground="#ffffff",
    background="#000000",
    surface="#000000",
    panel="#202020",
    boost="#303030",
    dark=True,
    variables={
        "block-cursor-background": "#ffff00",
        "block-cursor-foreground": "#000000",
        "block-cursor-text-style": "bold",
        "block-cursor-blurred-background": "#606000",
        "block-cursor-blurred-foreground": "#ffffff",
        "footer-key-foreground": "#ffff00",
        "footer-description-foreground": "#ffffff",
        "text-muted": "#c0c0c0",
        "input-cursor-background": "#ffff00",
    },
)


def _palette_provider() -> type[Provider]:
    """The palette's commands, imported when the palette first opens (``textual.command`` is ~30 ms
    of start-up otherwise)."""
    from console.commands import SipisCommands

    return SipisCommands


def aor_user(aor: str) -> str:
    """``alice`` of ``sip:alice@pbx.example.com`` (empty when there is none)."""
    scheme, _, rest = aor.partition(":")
    user, at, _ = (rest if scheme.lower() in ("sip", "sips") else "").partition("@")
    return user if at else ""


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:80] or "call"


class SipisConsole(App[int]):
    """The console app. ``feed`` is an :class:`~console.feed.Feed` (the operator API, or a fake)."""

    TITLE = "SIPIS console"
    CSS_PATH = stylesheet_path()
    COMMANDS: ClassVar[set[type[Provider] | Callable[[], type[Provider]]]] = {_palette_provider}  # ours only: one Quit
    MODES: ClassVar[dict[str, str | Callable[[], object]]] = {  # type: ignore[assignment]
        "dashboard": DashboardScreen,
        "calls": CallsScreen,
        "pushes": PushLogScreen,
        "events": EventLogScreen,
        "audit": AuditScreen,
        "pbx": PbxScreen,
        "alarms": AlarmsScreen,
        "nodes": NodesScreen,
    }
    DEFAULT_MODE = "dashboard"
    HIGH_CONTRAST = HIGH_CONTRAST_THEME.name

    BINDINGS: ClassVar[list[BindingType]] = [
        # shown by each console screen first (see ConsoleScreen.BINDINGS); here for the other screens
        Binding("q", "quit", "Quit", show=False),
        Binding("ctrl+q", "quit", "Quit", show=False, priority=True),
        Binding("ctrl+c", "ctrl_c", "Nothing", show=False, system=True),
        Binding("question_mark", "help", "Help", show=False),
        Binding("p", "toggle_pause", "Pause", show=False),
        Binding("f2", "toggle_contrast", "Contrast", show=False),
        Binding("u", "toggle_utc", "UTC", show=False),
        Binding("1", "view('dashboard')", "Instances", show=False),
        Binding("2", "view('calls')", "Calls", show=False),
        Binding("3", "view('pushes')", "Pushes", show=False),
        Binding("4", "view('events')", "Events", show=False),
        Binding("5", "view('audit')", "Audit", show=False),
        Binding("6", "view('pbx')", "PBX", show=False),
        Binding("7", "view('alarms')", "Alarms", show=False),
        Binding("8", "view('nodes')", "Nodes", show=False),
        Binding("escape", "back", "Back", show=False),  # where no screen takes esc for itself
    ]

    def __init__(
        self,
        feed: Feed,
        *,
        operator_name: str | None = None,
        role: str | None = None,
        clock: Callable[[], float] = time.time,
        utc: bool = False,
        tick_interval: float = 1.0,
        theme: str | None = None,
        export_dir: Path | None = None,
        event_pause: float = 0.2,
        gc_freeze: bool = False,
    ) -> None:
        super().__init__()
        self.feed = feed
        self.operator_name = operator_name
        self.role = role
        self.clock = clock
        self.utc = utc
        self.tick_interval = tick_interval
        self.event_pause = event_pause  # see _follow_events (alarms notify at most this much later)
        self.gc_freeze = gc_freeze  # see reload_all: for the console's own process, not for tests
        self.export_dir = export_dir
        self.model = ConsoleModel()
        self.loaded = False
        self.loading = False  # the whole instance list is being fetched: events wait until it is in
        self.ready = asyncio.Event()  # set once the first full load has finished (or failed)
        self.connected = True
        self.paused = False
        self._paused_at = 0.0
        self._pending: list[LogItem] = []
        self._resync = False
        self._summary_busy = False
        self._alarms = 0
        self._last_received_seq: int | None = None
        self._visited: list[str] = []  # the views shown before the current one, for esc
        self.toasts = Toasts()
        self._startup_theme = theme
        self._default_theme = "textual-dark"
        self.register_theme(HIGH_CONTRAST_THEME)

    # ------------------------------------------------------------------ identity and time

    def may(self, needed: str) -> bool:
        return role_allows(self.role, needed)

    def now(self) -> float:
        """The time the view shows (frozen while paused)."""
        return self._paused_at if self.paused else self.clock()

    def status_snapshot(self) -> StatusSnapshot:
        s = self.model.summary
        if s is None:
            return StatusSnapshot(node="connecting…", operator=self.operator_name or "", role=self.role or "",
                                  paused=self.paused, connected=self.connected)
        return StatusSnapshot(
            node=s.node or "?", version=s.version, uptime=s.now - s.started_at if s.started_at else None,
            pbx_reachable=s.pbx.reachable, pbx_error=s.pbx.last_error, pbx_up=s.pbx.up,
            pbx_degraded=s.pbx.degraded, pbx_down=s.pbx.down, counts=s.counts, reg_status=s.reg_status,
            held_calls=s.held_calls, calls_per_min=float(s.calls_per_min), push_success_rate=s.push.success_rate,
            push_p50_ms=s.push.latency_p50_ms, push_p99_ms=s.push.latency_p99_ms, alarms=max(s.alarms, 0),
            nodes_up=s.nodes_up, operator=self.operator_name or "", role=self.role or "", paused=self.paused,
            connected=self.connected,
        )

    # ------------------------------------------------------------------ toasts

    def notify(self, message: str, *, title: str = "", severity: SeverityLevel = "information",
               timeout: float | None = None, markup: bool = True, cause: Hashable | None = None) -> None:
        """A toast, one per ``cause`` (by default its title and text) within a minute: a repeat
        counts on the one raised (:mod:`console.toasts`). Drawn at once, even while paused."""
        timeout = self.NOTIFICATION_TIMEOUT if timeout is None else timeout
        self.toasts.raise_toast((title, message) if cause is None else cause, title, message, severity,
                                now=self.clock(), timeout=timeout)
        self.show_toasts()
        self.set_timer(timeout + 0.05, self.show_toasts, name="toast-expiry")

    def show_toasts(self) -> None:
        for screen in self.screen_stack:
            if isinstance(screen, ConsoleScreen) and screen.is_mounted:
                screen.show_toasts()

    # ------------------------------------------------------------------ start-up

    def on_resize(self, event: events.Resize) -> None:
        self.set_class(event.size.width < NARROW, "-narrow")

    def on_mount(self) -> None:
        instrumentation.mark("mounted")
        self.set_class(self.size.width < NARROW, "-narrow")
        if self._startup_theme:
            self.theme = self._startup_theme
        self._default_theme = self.theme if self.theme != self.HIGH_CONTRAST else "textual-dark"
        self.set_interval(self.tick_interval, self.tick, name="console-tick")
        self.run_worker(self._start(), name="startup", group="startup", exit_on_error=False)

    async def _start(self) -> None:
        """Identity and a first page of instances (all the first frame needs), then the summary, the
        event stream and everything else (:meth:`reload_all`). The summary is not asked for together
        with the page: with 100k instances each costs the core ~10 ms, and requests that arrive
        together are served back to back, one longer stall of its event loop."""
        first: list[Any] = [self._first_page()]
        if self.operator_name is None or self.role is None:
            first.append(self._identify())  # cheap for the core
        await asyncio.gather(*first)
        await self._poll_summary()
        self.run_worker(self._follow_events(), name="events", group="events", exit_on_error=False)
        await self.reload_all(summary=False)

    async def _identify(self) -> None:
        try:
            me = await self.feed.whoami()
        except FeedError as exc:
            self._lost(exc)
            return
        self.operator_name = self.operator_name or me.name
        self.role = self.role or me.role
        self.refresh_bindings()
        self.refresh_screen()

    async def _first_page(self) -> None:
        """The top of the instance list, shown while the whole list loads (100k rows take a while)."""
        instrumentation.mark("page_start")
        try:
            page = await self.feed.instance_page(FIRST_PAGE)
        except FeedError:
            return  # the full load that follows reports it
        instrumentation.mark("page_end", len(page.items))
        if not self.loaded and page.total > len(page.items):
            self.model.store.load(page.items, partial_total=page.total)
            instrumentation.mark("page_loaded", len(self.model.store))
            self.refresh_screen()

    async def reload_all(self, *, summary: bool = True) -> None:
        """(Re)load instances, summary, calls, pushes and audit from the core. Events that arrive
        meanwhile wait and are applied to the fresh rows afterwards."""
        self.loading = True
        try:
            instrumentation.mark("fetch_start")
            rows = await self.feed.instances()
            instrumentation.mark("fetch_end", len(rows))
            self.model.store.load(rows)
            instrumentation.mark("loaded", len(self.model.store))
            if self.gc_freeze:
                # The rows live until the next reload and hold no cycles: keep them (and the app) out of
                # the collector's generations, so its full collections stay short (they were ~6 ms a tick).
                # Young garbage first, so little of it is frozen for good.
                gc.collect(1)
                gc.freeze()
            self.loaded = True
            self.loading = False
            self.refresh_screen()
            if summary or self.model.summary is None:
                await self._poll_summary()
            self.model.load_calls(await self.feed.calls(), self.clock())
            self.model.load_pushes(await self.feed.pushes(limit=500))
            self.model.load_audit(await self.feed.audit(limit=500))
        except FeedError as exc:
            self._lost(exc)
            self.ready.set()
            return
        finally:
            self.loading = False
        self._reached(reload=False)
        self.refresh_screen()
        self.ready.set()

    def _lost(self, exc: FeedError) -> None:
        if self.connected:
            self.notify(f"{exc.detail}\nretrying by itself", title="Core unreachable" if exc.status is None
                        else f"Core error {exc.status}", severity="error", markup=False)
        self.connected = False

    def _reached(self, *, reload: bool = True) -> None:
        """The core answered: after it had been lost, say so and reload everything (it may have
        restarted, and what happened meanwhile was not streamed to us) unless this was a reload."""
        if self.connected:
            return
        self.connected = True
        self._resync = self._resync or reload
        self.notify("the core answers again; reloading", title="Core reconnected", markup=False)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        self.worker_failed(event.worker)

    def worker_failed(self, worker: Worker[object]) -> None:
        """A background job raised something other than a FeedError: say so, do not hide it."""
        if worker.state is WorkerState.ERROR and worker.error is not None:
            error = worker.error
            self.notify(f"{worker.name or worker.group}: {type(error).__name__}: {error}", title="Console error",
                        severity="error", timeout=10, markup=False)

    # ------------------------------------------------------------------ events

    async def _follow_events(self) -> None:
        """Read the event stream. After an event that had to be waited for, pause ``event_pause``
        before reading on: whatever arrives meanwhile is read in one go. The core sends each event as
        soon as it happens, and reading them one by one (a wake-up, an HTTP chunk, a line each) is most
        of what a console costs under churn; they are applied once a second anyway."""
        delay = 1.0
        loop = asyncio.get_running_loop()
        while True:
            try:
                asked = loop.time()
                async for event in self.feed.events(since=self._last_received_seq):
                    self._reached()
                    self.receive_event(event)
                    delay = 1.0
                    if self.event_pause and loop.time() - asked > EVENT_WAITED:
                        await asyncio.sleep(self.event_pause)
                    asked = loop.time()
            except FeedError as exc:
                self._lost(exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    def receive_event(self, event: LogItem) -> None:
        """An event arrived: alarms notify at once (even when paused), the rest waits for the tick. A
        gap or overflow notice (the core lost events for us) reloads the snapshots."""
        if isinstance(event, StreamNotice):
            self._resync = True
        else:
            last = self._last_received_seq
            if event.seq and last is not None and event.seq <= last:  # a restarted core numbers anew
                self._resync = True
                self.model.last_seq = None
            if event.seq:
                self._last_received_seq = event.seq
            if isinstance(event.payload, Alarm):
                self._alarm(event, event.payload)
        if len(self._pending) >= MAX_PENDING:
            self._pending.clear()
            self._resync = True
        self._pending.append(event)

    def _alarm(self, event: Event, alarm: Alarm) -> None:
        if alarm.state == AlarmState.CLEARED:
            return  # one toast per raise; the Alarms view shows the clear
        title = ALARM_TITLES.get(alarm.alarm) or f"Alarm: {alarm.alarm}"
        bits = [instance_label(self.model.store, event.selector)] if event.selector else []
        bits += [str(value) for value in (alarm.target, alarm.code, alarm.reason) if value not in (None, "")]
        self._alarms += 1
        self.notify(" ".join(bits) or alarm.alarm, title=title, severity="error", timeout=10, markup=False,
                    cause=(alarm.alarm, event.selector))

    def apply_pending(self) -> None:
        """Apply the queued events in one batch."""
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        applied = self.model.apply(batch)
        if applied.refetch:
            self.run_worker(self._refetch(sorted(applied.refetch)), group="refetch", exit_on_error=False)
        if applied.touched:
            for screen in self.screen_stack:
                if isinstance(screen, InstanceDetailScreen) and screen.selector in applied.touched:
                    screen.load()

    async def _refetch(self, selectors: list[str]) -> None:
        for selector in selectors:
            try:
                detail = await self.feed.instance(selector)
            except FeedError:
                continue
            self.model.store.upsert(detail.row)

    # ------------------------------------------------------------------ the tick

    def tick(self) -> None:
        """The one periodic job (~1 Hz): apply events, poll the summary, redraw what is visible."""
        if self.paused:
            return
        if self._resync:
            self._resync = False
            self._pending.clear()
            self.run_worker(self.reload_all(), group="resync", exclusive=True, exit_on_error=False)
        if not self.loading:
            self.apply_pending()
        self.toasts.expire(self.clock())
        if not self._summary_busy and self.loaded:
            self.run_worker(self._poll_summary(), group="summary", exit_on_error=False)
        self.refresh_screen()
        instrumentation.mark("tick")

    async def refresh_now(self) -> None:
        """Everything a tick does, awaited (tests, and after resume)."""
        if self.paused:
            return
        if not self.loading:
            self.apply_pending()
        await self._poll_summary()
        self.refresh_screen()

    async def _poll_summary(self) -> None:
        self._summary_busy = True
        try:
            summary = await self.feed.summary()
        except FeedError as exc:
            self._lost(exc)
            return
        finally:
            self._summary_busy = False
        self._reached()
        self.model.record_summary(summary)
        try:
            self.model.load_nodes(await self.feed.nodes())
        except FeedError as exc:
            self._lost(exc)

    def refresh_screen(self) -> None:
        """Redraw the top-most console screen (below any modal)."""
        if self.paused:
            return
        for screen in reversed(self.screen_stack):
            if isinstance(screen, ConsoleScreen):
                if screen.is_mounted:
                    screen.refresh_view(self.clock())
                break

    # ------------------------------------------------------------------ navigation

    async def action_view(self, mode: str) -> None:
        """The named top-level view itself, never a detail screen left open on it earlier."""
        if mode not in self.MODES:
            return
        if mode != self.current_mode:
            self._visited = [*self._visited, self.current_mode][-VISITED:]
            await self.switch_mode(mode)
        await self._to_view()

    async def _to_view(self) -> None:
        """Close the screens stacked on the current view (a dialog stays: it is answered first)."""
        while len(self.screen_stack) > 1 and not isinstance(self.screen, ModalScreen):
            await self.pop_screen()

    async def action_back(self) -> None:
        """esc: one step back: the screen below, else the view shown before this one."""
        if len(self.screen_stack) > 1:
            await self.pop_screen()
            return
        while self._visited:
            mode = self._visited.pop()
            if mode != self.current_mode:
                await self.switch_mode(mode)
                return

    async def action_filter(self) -> None:
        if self.current_mode != "dashboard":
            await self.switch_mode("dashboard")
        while len(self.screen_stack) > 1 and not isinstance(self.screen, DashboardScreen):
            await self.pop_screen()
        screen = self.screen
        if isinstance(screen, DashboardScreen):
            screen.action_filter()

    def open_instance(self, selector: str) -> None:
        self.push_screen(InstanceDetailScreen(selector))

    def open_event(self, item: object) -> None:
        """The whole event, every field in words."""
        if isinstance(item, Event | StreamNotice):
            selector = item.selector if isinstance(item, Event) else None
            where = f"  {instance_label(self.model.store, selector)}" if selector else ""
            title = f"{item.kind}{where}  at {clock_time(item.at, utc=self.utc)}{' UTC' if self.utc else ''}"
            known = selector if selector and selector in self.model.store else None
            self.push_screen(EventScreen(title, event_fields(item, self.utc, every=True), known, self.open_instance))

    def in_utc(self) -> bool:
        """Whether times show in UTC (``u`` toggles; local time otherwise)."""
        return self.utc

    def action_toggle_utc(self) -> None:
        self.utc = not self.utc
        from widgets.ladder import Ladder

        for screen in self.screen_stack:
            for ladder in screen.query(Ladder):
                ladder.utc = self.utc
            if isinstance(screen, InstanceDetailScreen | CallTraceScreen) and screen.is_mounted:
                screen.load()  # the raw messages' headers carry times too
            screen.refresh(repaint=True)
        self.refresh_screen()
        self.notify("times in UTC" if self.utc else f"times in local time ({time.strftime('%Z')})",
                    title="Clock", timeout=3, cause="clock")

    def open_call(self, call_id: str, selector: str | None = None) -> None:
        self.push_screen(CallTraceScreen(call_id, selector))

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(self.role))

    def action_toggle_pause(self) -> None:
        self.paused = not self.paused
        if self.paused:
            self._paused_at = self.clock()
            self._show_strips()
        else:
            self._show_strips()
            self.run_worker(self.refresh_now(), group="resume", exit_on_error=False)
        self.refresh_bindings()

    def _show_strips(self) -> None:
        from widgets.status_strip import StatusStrip

        for screen in self.screen_stack:
            for strip in screen.query(StatusStrip):
                strip.show(self.status_snapshot())

    def action_toggle_contrast(self) -> None:
        self.theme = self._default_theme if self.theme == self.HIGH_CONTRAST else self.HIGH_CONTRAST

    def action_ctrl_c(self) -> None:
        self.notify("Ctrl+C does nothing here: press q to quit.", severity="information", timeout=3)

    async def action_quit(self) -> None:
        if isinstance(self.screen, ConfirmScreen):
            return

        def done(answer: bool | None) -> None:
            if answer:
                self.exit(0)

        self.push_screen(ConfirmScreen("Quit?", "Leave the SIPIS console?", confirm="Quit"), done)

    # ------------------------------------------------------------------ actions (confirm → operator API)

    def request_action(self, selector: str, name: str) -> None:
        label, needed = ACTIONS[name]
        if not self.may(needed):
            self.notify(f"{label} needs the {needed} role.", severity="warning")
            return
        reason = why_not(name, self.model.store.get(selector))
        if reason is not None:  # said before any confirm, not refused after it
            self.notify(f"{label}: not now: {reason}", title=label, severity="warning", markup=False)
            return
        target = instance_label(self.model.store, selector)

        def done(answer: bool | None) -> None:
            if answer:
                self.run_worker(self._run_action(selector, name), group="actions", exit_on_error=False)

        if name == "disable":  # wipes the credentials: the operator types the AOR's user part
            self.push_screen(ConfirmScreen(
                f"{label}: this wipes the credentials", f"{label} {target}\n({selector})\nThe app has to enrol "
                "again before the SIPIS can register for it.", confirm=label, danger=True,
                type_to_confirm=aor_user(target) or selector), done)
            return
        self.push_screen(ConfirmScreen(f"{label}?", f"{label} {target}\n({selector})", confirm=label), done)

    async def _run_action(self, selector: str, name: str) -> None:
        label = ACTIONS[name][0]
        target = instance_label(self.model.store, selector)
        try:
            result = await self.feed.action(selector, name)
        except Forbidden as exc:
            self.notify(f"403 forbidden: {exc.detail}", title=label, severity="error", markup=False)
            return
        except FeedError as exc:
            status = f"{exc.status} " if exc.status else ""
            self.notify(f"{status}{exc.detail}", title=f"{label} failed", severity="error", markup=False)
            return
        if isinstance(result, PushResult):
            text = f"{target}: push {result.push.outcome}"
            if result.push.latency_ms is not None:
                text += f" in {result.push.latency_ms:.0f} ms"
        else:
            self.model.store.upsert(result.row)
            text = f"{target}: done"
        self.notify(text, title=label, markup=False)

    def request_replay(self, push: PushRecord) -> None:
        if not self.may(REPLAY_ROLE):
            self.notify(f"Replaying a push needs the {REPLAY_ROLE} role.", severity="warning")
            return
        target = instance_label(self.model.store, push.selector)

        def done(answer: bool | None) -> None:
            if answer:
                self.run_worker(self._run_replay(push), group="actions", exit_on_error=False)

        self.push_screen(ConfirmScreen("Replay push?", f"Send push {push.push_id} ({push.kind}) to {target} again",
                                       confirm="Replay"), done)

    async def _run_replay(self, push: PushRecord) -> None:
        try:
            new = await self.feed.replay_push(push.push_id)
        except Forbidden as exc:
            self.notify(f"403 forbidden: {exc.detail}", title="Replay push", severity="error", markup=False)
            return
        except FeedError as exc:
            status = f"{exc.status} " if exc.status else ""
            self.notify(f"{status}{exc.detail}", title="Replay failed", severity="error", markup=False)
            return
        self.notify(f"{new.push_id}: {new.outcome}", title="Push replayed", markup=False)

    # ------------------------------------------------------------------ exports

    def export_trace(self, call_id: str, fmt: str) -> None:
        self.run_worker(self._export(call_id, fmt), group="export", exit_on_error=False)

    async def _export(self, call_id: str, fmt: str) -> Path | None:
        folder = (self.export_dir or DEFAULT_EXPORT_DIR).expanduser()
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)  # traces hold numbers and addresses
            if fmt == "pcap":
                data: bytes = await self.feed.call_trace_pcap(call_id)
                path = folder / f"sipis-call-{_safe_name(call_id)}.pcap"
            else:
                data = (await self.feed.call_trace_text(call_id)).encode()
                path = folder / f"sipis-call-{_safe_name(call_id)}.txt"
            path.write_bytes(data)
        except FeedError as exc:
            self.notify(exc.detail, title=f"Export {fmt} failed", severity="error", markup=False)
            return None
        except OSError as exc:
            self.notify(str(exc), title=f"Export {fmt} failed", severity="error", markup=False)
            return None
        self.notify(str(path), title=f"Trace written ({fmt})", markup=False)
        return path


def run_console(feed: Feed, *, operator_name: str | None = None, role: str | None = None,
                theme: str | None = None, utc: bool = False, export_dir: Path | None = None) -> int:
    """Run the console on the current terminal until the operator quits; returns the exit status."""
    app = SipisConsole(feed, operator_name=operator_name, role=role, theme=theme, utc=utc, gc_freeze=True,
                       export_dir=export_dir)
    app.run()
    return app.return_code or 0
