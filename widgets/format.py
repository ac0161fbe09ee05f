"""Small, pure formatting helpers shared by the widgets (no Textual, no core)."""

from __future__ import annotations

import math
import time

from rich.cells import cell_len, set_cell_size


def duration(seconds: float) -> str:
    """A compact duration: ``9s``, ``4m05s``, ``2h03m``, ``3d04h``."""
    s = max(0, math.ceil(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def coarse(seconds: float) -> str:
    """A coarse duration for "ago" columns: ``12s``, ``4m``, ``3h``, ``2d``."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def countdown(deadline: float | None, now: float) -> str:
    """Time left until ``deadline`` (``-`` when there is none, ``now`` when it has passed)."""
    if deadline is None:
        return "-"
    left = deadline - now
    if left <= 0:
        return "now"
    return duration(left)


def ago(at: float | None, now: float) -> str:
    if at is None:
        return "-"
    return f"{coarse(now - at)} ago"


def clock_time(at: float | None, *, utc: bool = False) -> str:
    """``HH:MM:SS`` of a wall-clock time (local time unless ``utc``)."""
    if at is None:
        return "--:--:--"
    parts = time.gmtime(at) if utc else time.localtime(at)
    return time.strftime("%H:%M:%S", parts)


def clock_time_ms(at: float | None, *, utc: bool = False) -> str:
    """``HH:MM:SS.mmm`` (rounded to the millisecond)."""
    if at is None:
        return "--:--:--.---"
    total = round(at * 1000)
    return f"{clock_time(total // 1000, utc=utc)}.{total % 1000:03d}"


def thousands(n: int | float) -> str:
    return f"{int(n):,}"


def fit(text: str, width: int, *, right: bool = False) -> str:
    """Pad or cut ``text`` to exactly ``width`` cells (cut text ends in ``…``)."""
    if width <= 0:
        return ""
    if text.isascii():
        if len(text) > width:
            return text[: width - 1] + "…"
        return text.rjust(width) if right else text.ljust(width)
    if cell_len(text) > width:
        return set_cell_size(text, width - 1) + "…"
    padded = set_cell_size(text, width)
    if right:
        pad = width - cell_len(text)
        return " " * pad + text
    return padded
