"""How late the event loop runs a timer: the stall every SIP timer, push and API request sees.

Every ``interval`` seconds a timer is armed for ``interval`` later; when it fires, how much later
than due it ran is one sample. A stall of the loop anywhere during the wait delays that timer, so
no stall goes unseen. :meth:`LoopLag.worst` is the largest sample of the last ``window`` seconds
(what ``sipis_event_loop_lag_seconds`` shows: a scrape every 15 s still sees a 2 s stall).
"""

from __future__ import annotations

from collections import deque

from sipis.clock import Clock
from sipis.timers import TimerHandle, Timers

INTERVAL = 0.5
WINDOW = 15.0


class LoopLag:
    def __init__(self, clock: Clock, timers: Timers, *, interval: float = INTERVAL, window: float = WINDOW) -> None:
        self.clock = clock
        self.timers = timers
        self.interval = interval
        self.window = window
        #: (monotonic time of the sample, seconds late), oldest first
        self.samples: deque[tuple[float, float]] = deque()
        self._due = 0.0
        self._handle: TimerHandle | None = None

    def start(self) -> None:
        if self._handle is None:
            self._arm()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _arm(self) -> None:
        self._due = self.clock.monotonic() + self.interval
        self._handle = self.timers.call_later(self.interval, self._fire)

    def _fire(self) -> None:
        now = self.clock.monotonic()
        self.samples.append((now, max(0.0, now - self._due)))
        self._forget(now)
        self._arm()

    def _forget(self, now: float) -> None:
        samples, oldest = self.samples, now - self.window
        while samples and samples[0][0] < oldest:
            samples.popleft()

    def latest(self) -> float:
        """How late the last sample ran (0 before the first): what readiness judges."""
        return self.samples[-1][1] if self.samples else 0.0

    def worst(self) -> float:
        """The longest delay of the last ``window`` seconds (0 before the first sample)."""
        self._forget(self.clock.monotonic())
        return max((lag for _, lag in self.samples), default=0.0)
