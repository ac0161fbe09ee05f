"""Can this node serve now? What ``GET /v1/health`` tells load balancers.

Ready means: storage commits (the writer's last flush did not fail), SIP is listening, the event
loop answers within :data:`MAX_LOOP_LAG` and the node is not shutting down. Anything else is a
reason, and the app API answers ``503`` with the reasons. Liveness (the process answers at all) is
``GET /v1/health/live``, always ``200`` while the app API runs.
"""

from __future__ import annotations

from collections.abc import Callable

#: the event loop may be this late (seconds) before the node stops calling itself ready
MAX_LOOP_LAG = 1.0


class Readiness:
    def __init__(self, *, storage_error: Callable[[], str | None], sip_listening: Callable[[], bool],
                 loop_lag: Callable[[], float]) -> None:
        self.storage_error = storage_error
        self.sip_listening = sip_listening
        #: how late the event loop ran its last timer (seconds): the core's one lag sampler
        self.loop_lag = loop_lag
        #: set when the node stops taking work (shutdown)
        self.draining = False

    def reasons(self) -> list[str]:
        """Why this node cannot serve now; empty when it can."""
        reasons = []
        error = self.storage_error()
        if error is not None:
            reasons.append(f"storage failing: {error}")
        if not self.sip_listening():
            reasons.append("SIP not listening")
        lag = self.loop_lag()
        if lag >= MAX_LOOP_LAG:
            reasons.append(f"event loop {lag:.1f} s late")
        if self.draining:
            reasons.append("shutting down")
        return reasons
