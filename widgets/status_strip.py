"""The always-visible status strip: node (and the cluster's nodes up), uptime, PBX, registrations,
calls, push, operator, PAUSED."""

from __future__ import annotations

from textual.content import Content
from textual.widgets import Static

from widgets.format import duration, thousands
from widgets.rows import StatusSnapshot

STATE_ORDER = ("proxied", "active", "inactive", "off")
STATE_STYLE = {"proxied": "$success", "active": "$primary", "inactive": "$warning", "off": "$text-muted"}
BADGE = "bold $background on {}"

Part = str | tuple[str, str]


class StatusStrip(Static):
    """Two short lines that fit 80 columns; the widget only formats the snapshot it is given."""

    DEFAULT_CSS = """
    StatusStrip {
        height: 2;
        padding: 0 1;
        background: $panel;
        color: $foreground;
        text-wrap: nowrap;
        text-overflow: ellipsis;
    }
    """

    def __init__(self, snapshot: StatusSnapshot | None = None, *, id: str | None = None,
                 classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.snapshot = snapshot or StatusSnapshot()

    def on_mount(self) -> None:
        self.update(self.render_snapshot(self.snapshot))

    def show(self, snapshot: StatusSnapshot) -> None:
        if snapshot != self.snapshot or snapshot.counts != self.snapshot.counts \
                or snapshot.reg_status != self.snapshot.reg_status:
            self.snapshot = snapshot
            self.update(self.render_snapshot(snapshot), layout=False)  # always two lines: same size

    @staticmethod
    def render_snapshot(s: StatusSnapshot) -> Content:
        top: list[Part] = [(s.node, "bold")]
        if s.version:
            top.append((f" {s.version}", "$text-muted"))
        if s.nodes_up > 1:
            top += ["  nodes ", (str(s.nodes_up), "bold"), " up"]
        top += ["  up ", (duration(s.uptime) if s.uptime is not None else "-", "bold"), "  PBX "]
        if s.pbx_reachable is None or not (s.pbx_up or s.pbx_degraded or s.pbx_down):
            top.append(("?", "$text-muted"))  # no registrar target answered or failed yet
        else:
            pbx: list[Part] = []
            if s.pbx_up:
                pbx.append((f"{s.pbx_up} up", "bold $success"))
            if s.pbx_degraded:
                pbx.append((f"{s.pbx_degraded} degraded", "bold $warning"))
            if s.pbx_down:
                pbx.append((f" {s.pbx_down} DOWN ", BADGE.format("$error")))
            for n, part in enumerate(pbx):
                top += [" "] * bool(n) + [part]
        top += ["  held ", (str(s.held_calls), "bold $warning" if s.held_calls else "bold"),
                f"  {s.calls_per_min:.0f} calls/min"]
        if s.alarms:
            top += ["  alarms ", (str(s.alarms), "bold $error")]
        if not s.connected:
            top += ["  ", (" DISCONNECTED ", BADGE.format("$error"))]
        top += ["  ", (s.operator or "?", "bold"), " "]
        role_badge = {"viewer": BADGE.format("$warning"), "admin": BADGE.format("$accent")}
        top.append((f" {(s.role or '?').upper()} ", role_badge.get(s.role, BADGE.format("$primary"))))
        if s.paused:
            top += [" ", (" PAUSED ", BADGE.format("$warning"))]

        bottom: list[Part] = ["regs "]
        for n, state in enumerate(STATE_ORDER):
            if n:
                bottom.append(" ")
            bottom += [(f"{state} ", "$text-muted"), (thousands(s.counts.get(state, 0)), STATE_STYLE[state])]
        failing = s.reg_status.get("unauthorized", 0) + s.reg_status.get("error", 0)
        if failing:
            bottom += [("  failing ", "$text-muted"), (thousands(failing), "bold $error")]
        bottom.append("  push ")
        if s.push_success_rate is None:
            bottom.append(("-", "$text-muted"))
        else:
            rate = s.push_success_rate * 100
            tone = "$success" if rate >= 99 else "$warning" if rate >= 90 else "bold $error"
            bottom.append((f"{rate:.1f}%", tone))
        if s.push_p50_ms is not None:
            bottom.append((f" p50 {s.push_p50_ms:.0f}ms", "$text-muted"))
        if s.push_p99_ms is not None:
            bottom.append((f" p99 {s.push_p99_ms:.0f}ms", "$text-muted"))
        return Content.assemble(*top, "\n", *bottom)
