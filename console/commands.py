"""The command palette (ctrl+p): every view, every action the operator's role allows, and the toggles."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, cast

from textual.command import DiscoveryHit, Hit, Hits, Provider

from console.roles import ACTIONS, REPLAY_ROLE, why_not

if TYPE_CHECKING:
    from console.app import SipisConsole

#: mode name → (palette title, help)
VIEWS: dict[str, tuple[str, str]] = {
    "dashboard": ("View: instances (dashboard)", "status, sparklines and every instance · key 1"),
    "calls": ("View: held calls", "INVITEs waiting for a woken app, T1/T2 countdowns · key 2"),
    "pushes": ("View: push log", "every push and its outcome · key 3"),
    "events": ("View: event log", "the core's event stream · key 4"),
    "audit": ("View: audit log", "every operator action, whatever the outcome · key 5"),
    "pbx": ("View: PBX and providers", "health of every registrar target and push provider · key 6"),
    "alarms": ("View: alarms", "active and past alarm episodes; acknowledge · key 7"),
    "nodes": ("View: nodes", "the cluster's nodes: up / draining / gone, instances, lease lag · key 8"),
}


@dataclass(frozen=True, slots=True)
class PaletteCommand:
    title: str
    help: str
    run: Callable[[], object]


def palette_commands(app: SipisConsole) -> list[PaletteCommand]:
    """What the palette offers right now (depends on the screen, the selection and the role)."""
    from console.screens.common import ConsoleScreen

    commands = [PaletteCommand(title, text, partial(app.action_view, mode)) for mode, (title, text) in VIEWS.items()]
    commands += [
        PaletteCommand("Filter instances", "filter the instance table as you type · key /", app.action_filter),
        PaletteCommand("Help: key map", "every key of the console · key ?", app.action_help),
        PaletteCommand("Resume updates" if app.paused else "Pause updates",
                       "freeze the view; events queue up meanwhile · key p", app.action_toggle_pause),
        PaletteCommand("Theme: high contrast" if app.theme != app.HIGH_CONTRAST else "Theme: default",
                       "switch between the default and the high-contrast theme · key f2", app.action_toggle_contrast),
        PaletteCommand("Theme: choose…", "every theme Textual has", app.action_change_theme),
        PaletteCommand("Times in local time" if app.utc else "Times in UTC", "how every time is shown · key u",
                       app.action_toggle_utc),
        PaletteCommand("Quit", "leave the console (asks first) · key q", app.action_quit),
    ]
    screen = next((s for s in reversed(app.screen_stack) if isinstance(s, ConsoleScreen)), None)
    if screen is None:
        return commands
    selector = screen.selected_selector()
    if selector is not None:
        row = app.model.store.get(selector)
        target = row.aor if row is not None and row.aor else selector
        commands.append(PaletteCommand(f"Open instance: {target}", "instance detail with the ladder · key enter",
                                       partial(app.open_instance, selector)))
        for name, (label, needed) in ACTIONS.items():
            if app.may(needed):
                reason = why_not(name, row)
                commands.append(PaletteCommand(f"Action: {label} {target}",
                                               f"not now: {reason}" if reason else f"needs the {needed} role "
                                               "(confirm first)", partial(app.request_action, selector, name)))
    push = screen.selected_push()
    if push is not None and app.may(REPLAY_ROLE):
        commands.append(PaletteCommand(f"Action: Replay push {push.push_id}",
                                       "send the same push again (confirm first)",
                                       partial(app.request_replay, push)))
    call_id = screen.selected_call_id()
    if call_id is not None:
        commands.append(PaletteCommand(f"Export call trace as text: {call_id}", "writes a .txt into the export folder",
                                       partial(app.export_trace, call_id, "text")))
        commands.append(PaletteCommand(f"Export call trace as pcap: {call_id}", "writes a .pcap into the export folder",
                                       partial(app.export_trace, call_id, "pcap")))
    return commands


class SipisCommands(Provider):
    """Palette provider over :func:`palette_commands`."""

    def _commands(self) -> list[PaletteCommand]:
        return palette_commands(cast("SipisConsole", self.app))

    async def discover(self) -> Hits:
        for command in self._commands():
            yield DiscoveryHit(command.title, command.run, help=command.help)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for command in self._commands():
            score = matcher.match(command.title)
            if score > 0:
                yield Hit(score, matcher.highlight(command.title), command.run, text=command.title, help=command.help)
