"""The PBX view (every registrar target and push provider with its health, instances and last
error) and the Alarms view (active and past alarm episodes, acknowledge)."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.content import Content
from textual.widgets import Static

from console.feed import FeedError
from console.roles import ACKNOWLEDGE_ROLE
from console.screens.common import ConsoleScreen
from contract.documents import AlarmRecord, HealthTarget, HealthTargets
from widgets.format import ago, clock_time, fit, thousands
from widgets.table import Column, VirtualTable

#: seconds between two reads of the targets (or alarms) while the view is shown
POLL_INTERVAL = 5.0
STATE_STYLE = {"up": "bold $success", "degraded": "bold $warning", "down": "bold $error", "unknown": "$text-muted"}
SECTIONS = (("pbx", "Registrar targets"), ("provider", "Push providers"))


class PbxScreen(ConsoleScreen):
    """Polls ``/v1/health/targets`` while shown; one line per target."""

    def __init__(self) -> None:
        super().__init__()
        self.targets: HealthTargets | None = None
        self._read_at: float | None = None
        self._busy = False

    def body(self) -> ComposeResult:
        yield Static("loading…", id="health-targets")

    def refresh_view(self, now: float) -> None:
        super().refresh_view(now)
        if not self._busy and (self._read_at is None or now - self._read_at >= POLL_INTERVAL):
            self._busy = True
            self._read_at = now
            self.run_worker(self._read(), group="health", exit_on_error=False)
        elif self.targets is not None:
            self.query_one("#health-targets", Static).update(render_targets(self.targets, now))

    async def _read(self) -> None:
        try:
            self.targets = await self.console.feed.health_targets()
        except FeedError as exc:
            self.query_one("#health-targets", Static).update(Content(f"cannot read the targets: {exc}"))
            return
        finally:
            self._busy = False
        self.query_one("#health-targets", Static).update(render_targets(self.targets, self.console.now()))


def render_targets(targets: HealthTargets, now: float) -> Content:
    parts: list[str | tuple[str, str]] = []
    for subject, title in SECTIONS:
        rows = [t for t in targets.targets if t.subject == subject]
        parts += [(title, "bold"), "\n"]
        if not rows:
            parts += [("  none known yet", "$text-muted"), "\n"]
        for target in rows:
            parts += _line(target, now)
        parts.append("\n")
    return Content.assemble(*parts)


def _line(target: HealthTarget, now: float) -> list[str | tuple[str, str]]:
    line: list[str | tuple[str, str]] = [
        "  ", (fit(target.state, 9), STATE_STYLE.get(target.state, "")), fit(target.target, 32),
        f" {thousands(target.instances):>7} inst  since {fit(ago(target.since, now), 8)}"]
    if target.last_error:
        line += ["  ", (f"{target.last_error} ({ago(target.last_error_at, now)})", "$error")]
    return [*line, "\n"]


class AlarmsScreen(ConsoleScreen):
    """Active alarm episodes and the last finished ones; ``a`` acknowledges the selected one."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("a", "acknowledge", "Acknowledge")]

    def __init__(self) -> None:
        super().__init__()
        self._read_at: float | None = None
        self._busy = False

    def body(self) -> ComposeResult:
        yield Static("Alarms", id="alarms-title", classes="section-title")
        yield VirtualTable[AlarmRecord](alarm_columns(self.console.in_utc), key=lambda a: a.id,
                                        empty_text="no alarms", id="alarms")

    def on_mount(self) -> None:
        self.query_one("#alarms", VirtualTable).focus()

    def refresh_view(self, now: float) -> None:
        super().refresh_view(now)
        if not self._busy and (self._read_at is None or now - self._read_at >= POLL_INTERVAL):
            self.reload()

    def reload(self) -> None:
        self._busy = True
        self._read_at = self.console.now()
        self.run_worker(self._read(), group="alarms", exit_on_error=False)

    async def _read(self) -> None:
        try:
            alarms = await self.console.feed.alarms()
        except FeedError as exc:
            self.query_one("#alarms-title", Static).update(f"Alarms: cannot read them ({exc})")
            return
        finally:
            self._busy = False
        self.query_one("#alarms-title", Static).update(
            f"Alarms: {len(alarms.active)} active, {len(alarms.history)} past (newest first)")
        self.query_one("#alarms", VirtualTable).set_rows([*alarms.active, *alarms.history],
                                                        now=self.console.now())
        self.refresh_bindings()

    def selected_alarm(self) -> AlarmRecord | None:
        row = self.query_one("#alarms", VirtualTable).cursor_value
        return row if isinstance(row, AlarmRecord) else None

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "acknowledge":
            if not self.console.may(ACKNOWLEDGE_ROLE):
                return False
            alarm = self.selected_alarm()
            return True if alarm is not None and alarm.acknowledged_by is None else None
        return super().check_action(action, parameters)

    def action_acknowledge(self) -> None:
        alarm = self.selected_alarm()
        if alarm is not None:
            self.run_worker(self._acknowledge(alarm.id), group="acknowledge", exit_on_error=False)

    async def _acknowledge(self, alarm_id: str) -> None:
        try:
            await self.console.feed.acknowledge_alarm(alarm_id)
        except FeedError as exc:
            self.notify(str(exc), title="Acknowledge failed", severity="error", markup=False)
            return
        self.reload()

    @on(VirtualTable.RowHighlighted)
    def _highlighted(self) -> None:
        self.refresh_bindings()


def alarm_columns(utc: Callable[[], bool]) -> list[Column[AlarmRecord]]:
    return [
        Column("state", "State", 7, lambda a, now: a.state, lambda a, now: "bad" if a.state == "raised" else "dim"),
        Column("at", "Raised", 8, lambda a, now: clock_time(a.raised_at, utc=utc()), lambda a, now: "dim"),
        Column("alarm", "Alarm", 14, lambda a, now: a.alarm),
        Column("target", "Target", 22, lambda a, now: a.target or "", flex=1),
        Column("reason", "Reason", 24, lambda a, now: a.reason or "", flex=1, priority=1),
        Column("cleared", "Cleared", 8, lambda a, now: clock_time(a.cleared_at, utc=utc()) if a.cleared_at else "",
               lambda a, now: "dim", priority=2),
        Column("ack", "Seen by", 10, lambda a, now: a.acknowledged_by or "", priority=1),
    ]
