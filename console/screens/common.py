"""Pieces every console screen shares: the base screen, column specs, event text, ladder building."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, ClassVar, cast

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.content import Content
from textual.screen import Screen
from textual.widgets import Footer, Static
from textual.worker import Worker

from console.model import CallEntry, InstanceStore, LogItem, push_time
from console.roles import ACTIONS, REPLAY_ROLE, why_not
from console.toasts import Toast
from contract.codec import encode_notice, payload_data
from contract.documents import AuditEntry, NodeRow, PushRecord, SipMessage
from contract.events import Alarm, Event, InstanceAppReport, StreamNotice
from widgets.format import clock_time, countdown, duration
from widgets.instance_table import PUSH_TEXT, PUSH_TONE, short_uri
from widgets.rows import LadderRow
from widgets.status_strip import StatusStrip
from widgets.table import Column

if TYPE_CHECKING:
    from console.app import SipisConsole

LANES = ("PBX", "SIPIS", "Push/App")
PBX, SIPIS, PUSH = 0, 1, 2


class ConsoleScreen(Screen[None]):
    """A full-screen view: status strip on top, footer at the bottom, ``body()`` between."""

    #: instance actions shown on this screen need the selected instance (see :meth:`selected_selector`)
    HAS_INSTANCE_ACTIONS = False

    # First in every footer, so a narrow one (80 columns) still has them.
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "app.quit", "Quit"),
        Binding("question_mark", "app.help", "Help"),
        Binding("p", "app.toggle_pause", "Pause"),
    ]

    @property
    def console(self) -> SipisConsole:
        return cast("SipisConsole", self.app)

    def compose(self) -> ComposeResult:
        yield StatusStrip(self.console.status_snapshot())
        yield from self.body()
        yield ToastLines(id="toasts")
        yield Footer()

    def body(self) -> ComposeResult:
        yield from ()

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        self.console.worker_failed(event.worker)

    def on_screen_resume(self) -> None:
        self.refresh_view(self.console.now())
        self.show_toasts()

    def show_toasts(self) -> None:
        self.query_one(ToastLines).show(self.console.toasts.shown(self.console.clock()))

    def refresh_view(self, now: float) -> None:
        """Redraw from the model (called by the app's 1 Hz tick and when the screen comes back)."""
        for strip in self.query(StatusStrip):
            strip.show(self.console.status_snapshot())

    # -------------------------------------------------------------- selection, for actions and the palette

    def selected_selector(self) -> str | None:
        return None

    def selected_push(self) -> PushRecord | None:
        return None

    def selected_call_id(self) -> str | None:
        return None

    # -------------------------------------------------------------- role-gated actions

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "act" and parameters:
            name = str(parameters[0])
            if name not in ACTIONS or not self.console.may(ACTIONS[name][1]):
                return False
            selector = self.selected_selector()
            if selector is None or why_not(name, self.console.model.store.get(selector)) is not None:
                return None  # shown disabled (the palette says why)
            return True
        if action == "replay":
            if not self.console.may(REPLAY_ROLE):
                return False
            return True if self.selected_push() is not None else None
        if action in ("export_text", "export_pcap"):
            return True if self.selected_call_id() is not None else None
        return True

    def action_act(self, name: str) -> None:
        selector = self.selected_selector()
        if selector is None:
            self.notify("Select an instance first", severity="warning")
            return
        self.console.request_action(selector, name)

    def action_replay(self) -> None:
        push = self.selected_push()
        if push is None:
            self.notify("Select a push first", severity="warning")
            return
        self.console.request_replay(push)

    def action_export_text(self) -> None:
        self._export("text")

    def action_export_pcap(self) -> None:
        self._export("pcap")

    def _export(self, fmt: str) -> None:
        call_id = self.selected_call_id()
        if call_id is None:
            self.notify("Select a message of a call first", severity="warning")
            return
        self.console.export_trace(call_id, fmt)

    async def action_back(self) -> None:
        await self.console.action_back()


class ToastLines(Static):
    """The screen's toasts (:mod:`console.toasts`), one line each, between the body and the footer:
    the body gives up those lines instead of having its columns covered."""

    ICONS: ClassVar[dict[str, tuple[str, str]]] = {"error": ("✖", "bold $error"), "warning": ("▲", "bold $warning"),
                                                   "information": ("●", "bold $primary")}

    def show(self, toasts: list[Toast]) -> None:
        self.display = bool(toasts)
        parts: list[str | tuple[str, str]] = []
        for toast in toasts:
            icon, style = self.ICONS.get(toast.severity, self.ICONS["information"])
            message = " · ".join(line for line in toast.message.splitlines() if line.strip())
            parts += ["\n" if parts else "", (f"{icon} {toast.title or toast.severity}", style), f"  {message}"]
            if toast.count > 1:
                parts.append((f"  ×{toast.count}", "bold"))
        self.update(Content.assemble(*parts))


# ---------------------------------------------------------------------------------------------- text helpers


#: data keys shown first in an event's one-line description
FIRST_KEYS = ("outcome", "stage", "result", "state", "status", "reported", "code", "reason", "final_status",
              "provider_code", "provider_reason", "latency_ms", "action", "operator", "target")


def event_data(item: LogItem) -> dict[str, Any]:
    """An event's data as it came over the wire (a notice's: what was lost)."""
    if isinstance(item, StreamNotice):
        return {k: v for k, v in encode_notice(item).items() if k not in ("kind", "at")}
    return payload_data(item.payload)


def selector_of(item: LogItem) -> str | None:
    return None if isinstance(item, StreamNotice) else item.selector


def describe_event(event: LogItem, utc: bool = False) -> str:
    """One line for an event in words: its interesting fields, most telling first, long identifiers
    last (:func:`event_fields` names and formats them)."""
    data = event_data(event)
    head = str(data.get("alarm") or "alarm") if isinstance(event, Event) and isinstance(event.payload, Alarm) else ""
    shown = [f"{name} {value}" for name, value in event_fields(event, utc) if name != "alarm"]
    return "  ".join([head, *shown] if head else shown)


#: fields the one-line description leaves to the full view (enter)
LONG_FIELDS = {"stages", "request_summary", "previous_state", "selector", "detail"}


def event_fields(event: LogItem, utc: bool = False, *, every: bool = False) -> list[tuple[str, str]]:
    """An event's fields as (name in words, value in words): times as clock times, durations and
    sizes with their units, nothing empty. ``every``: also the long ones (the full view)."""
    data = event_data(event)
    keys = [k for k in FIRST_KEYS if k in data] + [k for k in data if k not in FIRST_KEYS]
    keys.sort(key=lambda k: k.endswith("_id") or k == "id")  # long identifiers last (stable sort)
    fields = []
    for key in keys:
        value = data[key]
        if value is None or value == "" or (not every and (key in LONG_FIELDS or isinstance(value, dict | list))):
            continue
        fields.append((key.replace("_", " "), _in_words(key, value, utc)))
    return fields


def _in_words(key: str, value: Any, utc: bool) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return ", ".join(f"{k.replace('_', ' ')} {_in_words(k, v, utc)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(_in_words(key, v, utc) for v in value)
    if isinstance(value, int | float):
        if key.endswith("_at") or key in ("at", "invite_received", "push_sent", "provider_accepted",
                                           "device_progress", "app_active", "released", "ended"):
            return clock_time(value, utc=utc)
        if key.endswith("_ms"):
            return f"{value:.0f} ms"
        if key in ("expires", "t1_remaining", "t2_remaining", "retry_after") or key.endswith("_s"):
            return f"{value:g} s"
        if key == "bytes":
            return f"{value:,} bytes"
        return f"{value:g}" if isinstance(value, float) else str(value)
    return str(value)


def push_label(outcome: str) -> str:
    return PUSH_TEXT.get(outcome, outcome)


def instance_label(store: InstanceStore, selector: str | None) -> str:
    if not selector:
        return "-"
    row = store.get(selector)
    return row.aor if row is not None and row.aor else selector


# ---------------------------------------------------------------------------------------------- columns


def call_columns(store: InstanceStore, utc: Callable[[], bool]) -> list[Column[CallEntry]]:
    def t_tone(deadline: float | None, now: float) -> str:
        if deadline is None:
            return "dim"
        left = deadline - now
        return "bad" if left <= 10 else "warn" if left <= 30 else ""

    return [
        Column("received", "Received", 8, lambda c, now: clock_time(c.call.received_at, utc=utc()),
               lambda c, now: "dim", priority=2),
        Column("caller", "Caller", 14, lambda c, now: short_uri(c.call.caller or "-"), flex=1),
        Column("instance", "Instance", 14, lambda c, now: short_uri(instance_label(store, c.call.selector)),
               flex=1),
        Column("stage", "Stage", 22, lambda c, now: c.call.stage if c.held else (c.call.outcome or c.call.stage),
               lambda c, now: "info" if c.held else "dim"),
        Column("t1", "T1", 6, lambda c, now: countdown(c.t1_deadline, now) if c.held else "-",
               lambda c, now: t_tone(c.t1_deadline, now) if c.held else "dim", align="right"),
        Column("t2", "T2", 6, lambda c, now: countdown(c.t2_deadline, now) if c.held else "-",
               lambda c, now: t_tone(c.t2_deadline, now) if c.held else "dim", align="right"),
        Column("push", "Push", 10, lambda c, now: push_label(c.push_outcome) if c.push_outcome else "-",
               lambda c, now: PUSH_TONE.get(c.push_outcome or "", "dim"), priority=1),
        Column("final", "Final", 5, lambda c, now: "" if c.call.final_status is None else str(c.call.final_status),
               align="right", priority=2),
        Column("call_id", "Call-ID", 16, lambda c, now: c.call.call_id, lambda c, now: "dim", priority=3),
    ]


def push_columns(store: InstanceStore, utc: Callable[[], bool],
                 time_of: Callable[[PushRecord], float] = push_time) -> list[Column[PushRecord]]:
    """``time_of``: when a push went out (the model knows when it first saw one without stages)."""
    return [
        Column("at", "Time", 8, lambda p, now: clock_time(time_of(p), utc=utc()), lambda p, now: "dim"),
        Column("instance", "Instance", 18, lambda p, now: short_uri(instance_label(store, p.selector)), flex=1),
        Column("kind", "Kind", 8, lambda p, now: p.kind),
        Column("provider", "Provider", 8, lambda p, now: p.provider),
        Column("outcome", "Outcome", 10, lambda p, now: push_label(p.outcome),
               lambda p, now: PUSH_TONE.get(p.outcome, "")),
        Column("code", "Code", 4, lambda p, now: "" if p.provider_code is None else str(p.provider_code),
               align="right", priority=1),
        Column("latency", "Latency", 7, lambda p, now: "" if p.latency_ms is None else f"{p.latency_ms:.0f}ms",
               align="right", priority=1),
        Column("attempt", "Try", 3, lambda p, now: str(p.attempt), align="right", priority=2),
        Column("replay", "Replay of", 12, lambda p, now: p.replay_of or "", lambda p, now: "dim", priority=4),
        Column("push_id", "Push id", 14, lambda p, now: p.push_id, lambda p, now: "dim", priority=3),
    ]


def event_columns(store: InstanceStore, utc: Callable[[], bool], *,
                  with_instance: bool = True, with_node: bool = False) -> list[Column[LogItem]]:
    """``with_node``: a Node column (a cluster of more than one node is up)."""

    def tone(e: LogItem, now: float) -> str:
        payload = e.payload if isinstance(e, Event) else None
        if isinstance(payload, Alarm):
            return "bad"
        if isinstance(payload, PushRecord):
            return PUSH_TONE.get(payload.outcome, "")
        return "accent" if isinstance(payload, AuditEntry) else ""

    columns: list[Column[LogItem]] = [
        Column("at", "Time", 8, lambda e, now: clock_time(e.at, utc=utc()), lambda e, now: "dim"),
        Column("kind", "Kind", 19, lambda e, now: e.kind, tone),
    ]
    if with_node:
        columns.append(Column("node", "Node", 10, lambda e, now: (e.node if isinstance(e, Event) else None) or "",
                              lambda e, now: "dim", priority=1))
    if with_instance:
        columns.append(Column("instance", "Instance", 18,
                              lambda e, now: short_uri(instance_label(store, selector_of(e))), flex=1))
    columns.append(Column("detail", "Detail", 20, lambda e, now: describe_event(e, utc()), flex=2))
    return columns


NODE_TONE = {"up": "ok", "draining": "warn", "gone": "bad"}


def node_columns() -> list[Column[NodeRow]]:
    return [
        Column("name", "Node", 16, lambda n, now: n.name, flex=1),
        Column("state", "State", 9, lambda n, now: n.state, lambda n, now: NODE_TONE.get(n.state, "dim")),
        Column("instances", "Instances", 9, lambda n, now: f"{n.instances:,}"),
        Column("lease_lag", "Lease lag", 9, lambda n, now: f"{n.lease_lag:.1f}s",
               lambda n, now: "bad" if n.state == "gone" else "dim"),
        Column("up", "Up for", 8, lambda n, now: duration(max(0.0, now - n.started_at)), lambda n, now: "dim"),
    ]


def audit_columns(store: InstanceStore, utc: Callable[[], bool]) -> list[Column[AuditEntry]]:
    return [
        Column("at", "Time", 8, lambda a, now: clock_time(a.at, utc=utc()), lambda a, now: "dim"),
        Column("operator", "Operator", 10, lambda a, now: a.operator),
        Column("role", "Role", 8, lambda a, now: a.role, lambda a, now: "dim"),
        Column("action", "Action", 12, lambda a, now: a.action, lambda a, now: "accent"),
        Column("target", "Target", 14, lambda a, now: short_uri(instance_label(store, a.target)) if a.target
               in store else (a.target or "-"), flex=1),
        Column("outcome", "Outcome", 10, lambda a, now: a.outcome,
               lambda a, now: "bad" if a.outcome in ("refused", "error", "not-found") else "ok"),
        Column("detail", "Detail", 12, lambda a, now: "  ".join(f"{k.replace('_', ' ')} {_in_words(k, v, utc())}"
                                                                for k, v in a.detail.items()),
               lambda a, now: "dim", flex=1, priority=1),
    ]


# ---------------------------------------------------------------------------------------------- ladders


def _push_status(raw: str) -> str | None:
    for line in raw.split("\r\n" if "\r\n" in raw else "\n"):
        name, sep, value = line.partition(":")
        if sep and name.strip().lower() == "x-sipis-push-status":
            return value.strip()
    return None


def _sip_label(message: SipMessage) -> tuple[str, str]:
    first = message.first_line
    if first.startswith("SIP/"):
        status_text = first.split(" ", 1)[1] if " " in first else first
        status = message.status or int(status_text.split()[0]) if status_text[:3].isdigit() else 0
        stage = _push_status(message.raw)
        label = f"{status_text.split()[0]} {stage}" if stage else status_text
        if status < 200:
            tone = "info"
        elif status < 300:
            tone = "ok"
        elif status < 400:
            tone = "accent"
        elif status in (401, 407):
            tone = "warn"
        else:
            tone = "bad"
        return label, tone
    return (message.method or first.split(" ", 1)[0]), "accent"


def _sip_detail(message: SipMessage, utc: bool) -> str:
    arrow = "SIPIS → PBX" if message.direction == "out" else "PBX → SIPIS"
    where = f"{message.local} → {message.remote}" if message.direction == "out" else \
        f"{message.remote} → {message.local}"
    head = f"{arrow}  {message.transport} {where}  at {clock_time(message.at, utc=utc)}"
    return f"{head}\n\n{message.raw.replace(chr(13), '') or message.first_line}"


def _push_detail(push: PushRecord, utc: bool) -> str:
    lines = [f"push {push.push_id}  ({push.kind} via {push.provider})",
             f"outcome   {push.outcome}" + (f"  {push.provider_code}" if push.provider_code is not None else ""),
             ]
    if push.provider_reason:
        lines.append(f"reason    {push.provider_reason}")
    if push.latency_ms is not None:
        lines.append(f"latency   {push.latency_ms:.0f} ms")
    lines.append(f"attempt   {push.attempt}")
    if push.call_id:
        lines.append(f"call      {push.call_id}")
    if push.replay_of:
        lines.append(f"replay of {push.replay_of}")
    if push.error:
        lines.append(f"error     {push.error}")
    for stage, at in push.stages.items():
        lines.append(f"stage     {stage} at {clock_time(at, utc=utc)}")
    for key, value in push.request_summary.items():
        lines.append(f"request   {key}={value}")
    return "\n".join(lines)


#: push stages reported by the app (shown as app → SIPIS arrows in a call trace)
APP_STAGES = {"device_progress": "app: making progress", "app_active": "app: active"}


def build_ladder(sip: Iterable[SipMessage], pushes: Iterable[PushRecord], timeline: Iterable[Event] = (),
                 *, utc: bool = False, app_stages: bool = False) -> list[LadderRow]:
    """The arrows PBX ⇄ SIPIS ⇄ push/app of a trace, in time order.

    App reports come from the instance ``timeline`` (``instance.app`` events) or, for a call trace
    without one, from the push stages (``app_stages``).
    """
    rows: list[LadderRow] = []
    for message in sip:
        label, tone = _sip_label(message)
        source, target = (SIPIS, PBX) if message.direction == "out" else (PBX, SIPIS)
        rows.append(LadderRow(message.at, source, target, label, tone, _sip_detail(message, utc), message.call_id))
    for push in pushes:
        detail = _push_detail(push, utc)
        at = push_time(push)
        rows.append(LadderRow(at, SIPIS, PUSH, f"push {push.kind} ({push.provider})", "accent", detail,
                              push.call_id))
        if app_stages:
            for stage, label in APP_STAGES.items():
                if stage in push.stages:
                    rows.append(LadderRow(push.stages[stage], PUSH, SIPIS, label, "info", detail, push.call_id))
        if push.outcome != "pending":
            answered = push.stages.get("provider_accepted") or (at + (push.latency_ms or 0.0) / 1000.0)
            code = f"{push.provider_code} " if push.provider_code is not None else ""
            latency = f" {push.latency_ms:.0f}ms" if push.latency_ms is not None else ""
            rows.append(LadderRow(max(answered, at), PUSH, SIPIS, f"{code}{push_label(push.outcome)}{latency}",
                                  PUSH_TONE.get(push.outcome, ""), detail, push.call_id))
    for event in timeline:
        if isinstance(event.payload, InstanceAppReport):
            reported = event.payload.reported or "report"
            detail = "app → SIPIS  " + describe_event(event)
            rows.append(LadderRow(event.at, PUSH, SIPIS, f"app: {reported}", "info", detail, None))
    rows.sort(key=lambda r: r.at)
    return rows


def format_view_value(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)
