"""Shared helpers for the console tests: a console on a FakeFeed with a frozen clock."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from textual.pilot import Pilot

from console.app import SipisConsole

from .fake_feed import FakeFeed

NOW = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC


@dataclass
class Note:
    message: str
    title: str
    severity: str


def make_console(feed: FakeFeed | None = None, *, role: str | None = "operator", name: str | None = "alice",
                 **kwargs: Any) -> SipisConsole:
    feed = feed or FakeFeed(now=NOW)
    kwargs.setdefault("clock", lambda: feed.now)
    kwargs.setdefault("utc", True)
    kwargs.setdefault("tick_interval", 3600.0)  # tests drive the tick themselves
    return SipisConsole(feed, operator_name=name, role=role, **kwargs)


def record_notes(app: SipisConsole) -> list[Note]:
    """Capture every ``app.notify`` (screens notify through the app)."""
    notes: list[Note] = []
    original = app.notify

    def notify(message: str, *, title: str = "", severity: str = "information", **kwargs: Any) -> None:
        notes.append(Note(message, title, severity))
        original(message, title=title, severity=severity, **kwargs)  # type: ignore[arg-type]

    app.notify = notify  # type: ignore[method-assign]
    return notes


async def ready(pilot: Pilot[Any], app: SipisConsole) -> None:
    """Wait for the first full load and one redraw."""
    await app.ready.wait()
    await pilot.pause()
    await app.refresh_now()
    await pilot.pause()


async def until(pilot: Pilot[Any], condition: Callable[[], bool], *, timeout: float = 5.0) -> None:
    """Let the app run until ``condition()`` holds."""
    steps = int(timeout / 0.02)
    for _ in range(steps):
        if condition():
            return
        await pilot.pause(0.02)
    raise AssertionError("condition not reached")


def screen_text(app: SipisConsole) -> str:
    """The current screen as plain text (what an operator would read)."""
    console = Console(width=app.size.width, height=app.size.height, file=io.StringIO(), force_terminal=True,
                      color_system="truecolor", record=True, legacy_windows=False, safe_box=False)
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    return console.export_text(styles=False)
