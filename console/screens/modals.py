"""The confirm modal (every action goes through it) and the help screen (the key map)."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Grid, Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static

from console.roles import role_allows

#: (section, [(keys, what, role needed or None)]); the help screen and docs/console.md show this
KEYMAP: list[tuple[str, list[tuple[str, str, str | None]]]] = [
    ("Everywhere", [
        ("1 … 8", "views: instances, held calls, push log, event log, audit log, PBX, alarms, nodes", None),
        ("ctrl+p", "command palette: every view and action", None),
        ("?", "this key map", None),
        ("p", "pause / resume live updates (the view freezes, events queue up)", None),
        ("f2", "toggle the high-contrast theme", None),
        ("u", "times in UTC / in local time", None),
        ("q", "quit (asks first); ctrl+c does nothing harmful", None),
        ("esc", "one step back / close / clear the filter", None),
    ]),
    ("Tables", [
        ("↑ ↓ j k", "move the cursor", None),
        ("pgup pgdn home end", "page / jump", None),
        ("enter", "open: instance detail, call trace, the whole event (event log, timeline)", None),
        ("click header", "sort by that column (again: reverse)", None),
    ]),
    ("Instances (1)", [
        ("/", "filter as you type (words AND-ed; state:, status:, code:, push:, provider:)", None),
        ("s / S", "sort by the next column / reverse the order", None),
    ]),
    ("Instance actions (instances, detail)", [
        ("t", "take over: the SIPIS registers for the app now", "operator"),
        ("h", "hand back: drop our binding, the app registers itself", "operator"),
        ("r", "re-register now", "operator"),
        ("n", "send a test push", "operator"),
        ("D", "disable: unregister, wipe credentials, state off", "admin"),
    ]),
    ("Instance detail / call trace", [
        ("tab / shift+tab", "move between ladder, timeline, pushes", None),
        ("e / E", "export the selected call's trace as text / pcap (into ~/sipis-exports)", None),
        ("R", "replay the selected push (detail: Pushes tab; push log)", "operator"),
        ("ctrl+r", "reload", None),
        ("i", "open the call's instance (held calls)", None),
    ]),
]


def keymap_for(role: str | None) -> list[tuple[str, list[tuple[str, str]]]]:
    """The key map without what ``role`` may not do."""
    result = []
    for section, keys in KEYMAP:
        shown = [(k, what) for k, what, needed in keys if needed is None or role_allows(role, needed)]
        if shown:
            result.append((section, shown))
    return result


class ConfirmScreen(ModalScreen[bool]):
    """Yes/no; ``y``/enter confirms, ``n``/esc cancels. A destructive action (``danger``) looks
    different and, with ``type_to_confirm``, is confirmed only by typing that word (enter)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n,escape", "answer(False)", "No"),
    ]

    def __init__(self, title: str, message: str, *, confirm: str = "Yes", danger: bool = False,
                 type_to_confirm: str | None = None) -> None:
        super().__init__(classes="-danger" if danger else None)
        self.title_text = title
        self.message = message
        self.confirm = confirm
        self.type_to_confirm = type_to_confirm

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm-box"):
            yield Label(self.title_text, id="confirm-title")
            yield Static(self.message, id="confirm-message", markup=False)
            if self.type_to_confirm is not None:
                yield Static(f"Type {self.type_to_confirm} and press enter to confirm.", id="confirm-typing",
                             markup=False)
                yield Input(placeholder=self.type_to_confirm, id="confirm-typed", compact=True)
            with Horizontal(id="confirm-buttons"):
                yield Button(f"{self.confirm} (y)" if self.type_to_confirm is None else self.confirm,
                             id="confirm-yes", variant="error" if self.has_class("-danger") else "primary",
                             disabled=self.type_to_confirm is not None)
                yield Button("Cancel (n)" if self.type_to_confirm is None else "Cancel (esc)", id="confirm-no")

    def on_mount(self) -> None:
        focus = "#confirm-typed" if self.type_to_confirm is not None else "#confirm-no"
        self.query_one(focus).focus()

    def _typed(self) -> bool:
        return self.type_to_confirm is None or self.query_one("#confirm-typed", Input).value == self.type_to_confirm

    def on_input_changed(self, event: Input.Changed) -> None:
        self.query_one("#confirm-yes", Button).disabled = not self._typed()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if self._typed():
            self.dismiss(True)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "confirm-yes" and self._typed())

    def action_answer(self, answer: bool) -> None:
        if answer and not self._typed():
            return
        self.dismiss(answer)


class EventScreen(ModalScreen[None]):
    """One event whole: every field in words, one per line (``enter`` on the event log or a
    Timeline); ``i`` opens its instance."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,enter,q", "close", "Close"),
        Binding("i", "instance", "Instance"),
    ]

    def __init__(self, title: str, fields: list[tuple[str, str]], selector: str | None,
                 open_instance: Callable[[str], None]) -> None:
        super().__init__()
        self.title_text = title
        self.fields = fields
        self.selector = selector
        self.open_instance = open_instance

    def compose(self) -> ComposeResult:
        with Vertical(id="event-box"):
            yield Label(self.title_text, id="event-title")
            with VerticalScroll(id="event-scroll"):
                width = max((len(name) for name, _ in self.fields), default=0)
                yield Static("\n".join(f"{name:<{width}}  {value}" for name, value in self.fields) or "no fields",
                             id="event-fields", markup=False)
            hint = "esc closes · i opens the instance" if self.selector else "esc closes"
            yield Label(hint, id="event-hint")

    def action_close(self) -> None:
        self.dismiss(None)

    def action_instance(self) -> None:
        selector = self.selector
        self.dismiss(None)
        if selector:
            self.open_instance(selector)


class HelpScreen(ModalScreen[None]):
    """The key map (what this operator's role may use)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,question_mark,q", "close", "Close"),
    ]

    def __init__(self, role: str | None) -> None:
        super().__init__()
        self.role = role

    def compose(self) -> ComposeResult:
        with Vertical(id="help-box"):
            yield Label("Key map", id="help-title")
            with VerticalScroll(id="help-scroll"), Grid(id="help-grid"):
                for section, keys in keymap_for(self.role):
                    yield Label(section, classes="help-section")
                    for key, what in keys:
                        yield Label(key, classes="help-key", markup=False)
                        yield Label(what, classes="help-what", markup=False)
            yield Label("esc / ? closes · ctrl+p lists every command", id="help-hint")

    def action_close(self) -> None:
        self.dismiss(None)
