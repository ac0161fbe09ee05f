"""The console's toasts: one per cause. The same cause again within :data:`WINDOW` seconds adds to
the count of the toast already raised (and keeps it up) instead of stacking another one: a dead push
token under call load is one line "Push rejected … ×12", not a column of identical boxes.

Plain data and a clock passed in, so the window is tested with a fake clock; the screens draw
:meth:`Toasts.shown` in a line area of their own above the footer (they never cover a table's
columns, and dialogs are drawn over them).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

#: seconds within which the same cause counts instead of raising a new toast
WINDOW = 60.0
#: toasts on screen at once (the newest)
SHOWN = 3


@dataclass(slots=True)
class Toast:
    title: str
    message: str
    severity: str
    #: times the cause was raised since ``first``
    count: int
    first: float
    #: when it leaves the screen
    until: float


class Toasts:
    def __init__(self, window: float = WINDOW, shown: int = SHOWN) -> None:
        self.window = window
        self.limit = shown
        self._by_cause: dict[Hashable, Toast] = {}  # raised within the window, newest last

    def raise_toast(self, cause: Hashable, title: str, message: str, severity: str, *, now: float,
                    timeout: float) -> Toast:
        self.expire(now)
        toast = self._by_cause.pop(cause, None)
        if toast is None:
            toast = Toast(title, message, severity, 1, now, now + timeout)
        else:  # the latest words, the gravest severity seen, up for the longer of the two
            toast.count += 1
            toast.title, toast.message = title, message
            toast.severity = max(toast.severity, severity, key=_gravity)
            toast.until = max(toast.until, now + timeout)
        self._by_cause[cause] = toast
        return toast

    def expire(self, now: float) -> None:
        """Forget the causes raised longer ago than the window."""
        self._by_cause = {cause: t for cause, t in self._by_cause.items() if now - t.first < self.window}

    def shown(self, now: float) -> list[Toast]:
        """The toasts on screen, oldest first (the newest is nearest the footer)."""
        return [t for t in self._by_cause.values() if t.until > now][-self.limit:]


def _gravity(severity: str) -> int:
    return ("information", "warning", "error").index(severity) if severity in ("warning", "error") else 0
