"""One-shot timers behind a small interface, so call timers (T1/T2) run on a fake clock in tests.

:class:`LoopTimers` uses the running asyncio loop; :class:`FakeTimers` fires callbacks when the
test advances its :class:`~sipis.clock.FakeClock` through :meth:`FakeTimers.advance`.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from typing import Protocol

from sipis.clock import FakeClock


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class Timers(Protocol):
    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle: ...


class LoopTimers:
    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        return asyncio.get_running_loop().call_later(max(0.0, delay), callback)


class _FakeHandle:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeTimers:
    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self._heap: list[tuple[float, int, _FakeHandle, Callable[[], None]]] = []
        self._seq = itertools.count()

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        handle = _FakeHandle()
        heapq.heappush(self._heap, (self.clock.monotonic() + max(0.0, delay), next(self._seq), handle, callback))
        return handle

    def advance(self, seconds: float) -> None:
        """Move the clock forward, firing due callbacks in order at their own due times."""
        target = self.clock.monotonic() + seconds
        while self._heap and self._heap[0][0] <= target:
            due, _, handle, callback = heapq.heappop(self._heap)
            if due > self.clock.monotonic():
                self.clock.advance(due - self.clock.monotonic())
            if not handle.cancelled:
                callback()
        if target > self.clock.monotonic():
            self.clock.advance(target - self.clock.monotonic())

    @property
    def pending(self) -> int:
        return sum(1 for entry in self._heap if not entry[2].cancelled)
