"""Can this node serve now? What ``GET /v1/health`` tells load balancers.

Ready means: storage commits (the writer's last flush did not fail), SIP is listening, the event
loop answers within :data:`MAX_LOOP_LAG` and the node is not shutting down. Anything else is a
reason, and the app API answers ``503`` with the reasons. Liveness (the process answers at all) is
``GET /v1/health/live``, always ``200`` while the app API runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from sipis.clock import Clock

#: the event loop may be this late (seconds) before the node stops calling itself ready
MAX_LOOP_LAG = 1.0
#: how often the loop's lateness is sampled (seconds)
LAG_SAMPLE = 0.5


class Readiness:
    def __init__(self, clock: Clock, *, storage_error: Callable[[], str | None],
                 sip_listening: Callable[[], bool]) -> None:
        self.clock = clock
        self.storage_error = storage_error
        self.sip_listening = sip_listening
        #: set when the node stops taking work (shutdown)
        self.draining = False
        #: how late the last sample's sleep woke up (seconds)
        self.loop_lag = 0.0

    def reasons(self) -> list[str]:
        """Why this node cannot serve now; empty when it can."""
        reasons = []
        error = self.storage_error()
        if error is not None:
            reasons.append(f"storage failing: {error}")
        if not self.sip_listening():
            reasons.append("SIP not listening")
        if self.loop_lag >= MAX_LOOP_LAG:
            reasons.append(f"event loop {self.loop_lag:.1f} s late")
        if self.draining:
            reasons.append("shutting down")
        return reasons

    async def watch_loop(self) -> None:
        """Sample the loop's lateness forever (a task of the core)."""
        while True:
            before = self.clock.monotonic()
            await asyncio.sleep(LAG_SAMPLE)
            self.loop_lag = max(0.0, self.clock.monotonic() - before - LAG_SAMPLE)
